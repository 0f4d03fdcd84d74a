"""Which primitive, in which colour, a generated asset is, judged from its mesh alone (what the GLB carries).

Both the mesh and every true primitive are centred on their bounding boxes and scaled so that their
largest extent is the same; the verdict is the primitive with the highest volumetric IoU on a lattice
(the cube also turned about its axis, since a generated cube may face any way: every 9 degrees, and
the turn that gives the mesh its smallest footprint, which squares a box up to within a degree).
Size and position are the optimiser's free choice; proportions are not: a flat disc is not a cube.
"""

from __future__ import annotations

import numpy as np
import trimesh

from server.geometry.mesh_sdf import lattice_inside
from server.geometry.tetgrid import lattice_vertices
from server.shapes.primitives import (
    COLOURS,
    CONE_HALF_HEIGHT,
    CONE_RADIUS,
    CUBE_HALF,
    CYLINDER_HALF_HEIGHT,
    CYLINDER_RADIUS,
    SHAPES,
    SPHERE_RADIUS,
    TORUS_MAJOR,
    TORUS_MINOR,
    inside,
    sdf,
)

LATTICE = 48
EXTENT = 1.6  # the largest extent both solids are scaled to, inside the lattice's [-1, 1]^3
CUBE_TURNS_DEG = tuple(range(0, 90, 9))  # a cube repeats every 90 degrees about its axis

# Half-extents (x = y, z) of the true primitives' bounding boxes.
HALF_EXTENTS = {
    "cube": (CUBE_HALF, CUBE_HALF),
    "sphere": (SPHERE_RADIUS, SPHERE_RADIUS),
    "cylinder": (CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT),
    "cone": (CONE_RADIUS, CONE_HALF_HEIGHT),
    "torus": (TORUS_MAJOR + TORUS_MINOR, TORUS_MINOR),
}


def true_primitive_mesh(shape: str) -> trimesh.Trimesh:
    """The named primitive as a triangle mesh at its true size and place (`server.shapes.primitives`)."""
    creation = trimesh.creation
    if shape == "cube":
        return creation.box([2 * CUBE_HALF] * 3)
    if shape == "sphere":
        return creation.icosphere(4, SPHERE_RADIUS)
    if shape == "cylinder":
        return creation.cylinder(CYLINDER_RADIUS, 2 * CYLINDER_HALF_HEIGHT, sections=64)
    if shape == "cone":  # trimesh's cone stands on z = 0
        cone = creation.cone(CONE_RADIUS, 2 * CONE_HALF_HEIGHT, sections=64)
        return cone.apply_translation([0.0, 0.0, -CONE_HALF_HEIGHT])
    if shape == "torus":
        return creation.torus(TORUS_MAJOR, TORUS_MINOR, major_sections=64, minor_sections=32)
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def normalised(vertices: np.ndarray) -> np.ndarray:
    """Vertices centred on their bounding box, scaled so its largest extent is EXTENT."""
    vertices = np.asarray(vertices, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    return (vertices - (low + high) / 2) * (EXTENT / max(float((high - low).max()), 1e-9))


def true_scale(shape: str) -> float:
    """From normalised coordinates to the true primitive's own."""
    radial, axial = HALF_EXTENTS[shape]
    return 2 * max(radial, axial) / EXTENT


def turns(shape: str, vertices: np.ndarray) -> list[np.ndarray]:
    """Rotations about the up axis the mesh is compared with the primitive at."""
    angles = [0.0]
    if shape == "cube":
        angles = [*np.radians(CUBE_TURNS_DEG), smallest_footprint_turn(vertices)]
    return [
        np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]]) for a in angles
    ]


def smallest_footprint_turn(vertices: np.ndarray) -> float:
    """The turn (radians, in [0, 90) degrees) whose frame gives the mesh's x-y bounding box the least
    area: a box's sides lie along that frame's axes (a 9-degree step alone misses by up to 4.5 degrees,
    which costs a true cube a seventh of its IoU)."""
    angles = np.radians(np.arange(0.0, 90.0, 0.5))
    xy = np.asarray(vertices, dtype=np.float64)[:, :2]
    rotated_x = xy[:, :1] * np.cos(angles) + xy[:, 1:] * np.sin(angles)  # [N, A]: x after each turn
    rotated_y = -xy[:, :1] * np.sin(angles) + xy[:, 1:] * np.cos(angles)
    areas = np.ptp(rotated_x, axis=0) * np.ptp(rotated_y, axis=0)
    return float(angles[int(areas.argmin())])


def solid_ious(vertices: np.ndarray, faces: np.ndarray, n: int = LATTICE) -> dict[str, float]:
    """IoU of the mesh's solid against each primitive, both normalised to the same largest extent (the
    mesh in each frame it is compared in: a cube turned 45 degrees has a wider bounding box)."""
    points = lattice_vertices(n)
    vertices = np.asarray(vertices, dtype=np.float64)
    inside_by_turn: dict[int, np.ndarray] = {}
    ious = {}
    for shape in SHAPES:
        true_inside = inside(shape, points * true_scale(shape))
        best = 0.0
        for k, turn in enumerate(turns(shape, vertices)):
            if k not in inside_by_turn:
                inside_by_turn[k] = lattice_inside(normalised(vertices @ turn), faces, n, 1.0)
            mesh_inside = inside_by_turn[k]
            union = np.count_nonzero(mesh_inside | true_inside)
            best = max(best, np.count_nonzero(mesh_inside & true_inside) / union if union else 0.0)
        ious[shape] = float(best)
    return ious


def surface_error(vertices: np.ndarray, shape: str) -> float:
    """Mean distance of the surface (its vertices) from the true primitive's, as a fraction of the
    primitive's largest extent, after the same normalisation: 0 for an exact primitive, and what lumps,
    spikes and rounded edges add to."""
    scale = true_scale(shape)
    vertices = np.asarray(vertices, dtype=np.float64)
    frames = [normalised(vertices @ turn) * scale for turn in turns(shape, vertices)]
    distance = float(min(np.abs(sdf(shape, frame)).mean() for frame in frames))
    return distance / (EXTENT * scale)


def judge_solid(vertices: np.ndarray, faces: np.ndarray) -> tuple[str, float]:
    """(the primitive the solid is closest to, its IoU)."""
    ious = solid_ious(vertices, faces)
    shape = max(ious, key=ious.get)
    return shape, ious[shape]


def judge_colour(vertices: np.ndarray, faces: np.ndarray, colours: np.ndarray) -> str:
    """The named colour covering most of the surface: each face votes with its area for the colour
    nearest (in RGB) to the mean of its vertex colours [N, 3] in [0, 1]."""
    corners = np.asarray(vertices, dtype=np.float64)[faces]
    areas = 0.5 * np.linalg.norm(
        np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1
    )
    face_colours = np.asarray(colours, dtype=np.float64)[faces].mean(axis=1)
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names])
    nearest = np.linalg.norm(face_colours[:, None, :] - palette[None], axis=-1).argmin(axis=1)
    return names[int(np.bincount(nearest, weights=areas, minlength=len(names)).argmax())]
