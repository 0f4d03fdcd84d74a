"""Signed distance of a triangle mesh at the vertices of the cube lattice a DMTet grid is built on.

Used to start DMTet from a user's mesh. Written here rather than taken from trimesh because
trimesh's signed_distance / contains need rtree (not a dependency), and a brute-force generalised
winding number ran at about a million point-triangle pairs per second on this CPU, i.e. minutes
for a 36k-vertex grid and a 5k-face mesh. The lattice makes both halves cheap:

- inside/outside: rays along the lattice axes, one per column of lattice points. Each triangle is
  tested only against the columns inside its projected bounding box, in fixed-point integers with
  a top-left tie rule, so a ray through a shared edge or vertex is counted exactly once. A column's
  signed crossings give the winding number of every point on it; the six axis rays of a point
  (both directions along each axis) vote, which keeps the sign exact for closed meshes in either
  orientation and mostly right for meshes with small holes.
- distance: exact point-triangle distance for points within 2 cells of the surface (the only
  values that place the zero crossings), against candidate triangles found with a k-d tree on the
  mesh subdivided to half-cell edges; farther out an upper bound through the nearest band point
  (within about a cell; these values only need the right sign and a plausible size).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import scipy.ndimage
import scipy.spatial
import trimesh

from server.geometry.tetgrid import lattice_vertices

_SUBCELL = 2**12  # fixed-point units per cell for the exact ray tests
_MAX_CELLS = 2**17  # |coordinate| bound in cells that keeps the integer edge functions inside int64
_EXACT_BAND = 2.0  # cells: endpoints of crossing edges lie within sqrt(3) cells
# Rays along axis w run through columns indexed (u, v) with u x v = w: projected area > 0 <=> normal . w > 0.
_COLUMN_AXES = {0: (1, 2, 0), 1: (2, 0, 1), 2: (0, 1, 2)}


def lattice_signed_distance(vertices: np.ndarray, faces: np.ndarray, n: int, radius: float) -> np.ndarray:
    """Signed distance, negative inside, at `lattice_vertices(n) * radius`: [(n+1)^3] float64."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    inside = lattice_inside(vertices, faces, n, radius)
    distance = _distance(vertices, faces, n, radius)
    return np.where(inside, -distance, distance)


def lattice_inside(vertices: np.ndarray, faces: np.ndarray, n: int, radius: float) -> np.ndarray:
    """Whether each lattice point is inside: at least 4 of its 6 axis rays see a nonzero winding number."""
    # lattice coordinates: lattice point (i, j, k) sits at (i, j, k)
    cells = (np.asarray(vertices, dtype=np.float64) + radius) * (n / (2.0 * radius))
    if np.abs(cells).max(initial=0.0) > _MAX_CELLS:
        raise ValueError("the mesh reaches too far outside the grid box; fit it into the box first")
    fixed = np.round(cells * _SUBCELL).astype(np.int64)
    faces = np.asarray(faces, dtype=np.int64)
    votes = np.zeros((n + 1,) * 3, dtype=np.int64)
    for axis in range(3):
        above, below = _column_windings(fixed, faces, n, axis)
        column_votes = (above != 0).astype(np.int64) + (below != 0)
        votes += np.moveaxis(column_votes, (0, 1, 2), _COLUMN_AXES[axis])  # back to (x, y, z) index order
    return (votes >= 4).reshape(-1)


def _column_windings(
    fixed: np.ndarray, faces: np.ndarray, n: int, axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """Signed crossings above and below each lattice point along `axis`: two [n+1]^3 arrays in (u, v, w)."""
    u, v, w = _COLUMN_AXES[axis]
    corners = fixed[faces]  # [F, 3, 3]
    pu, pv, pw = corners[..., u], corners[..., v], corners[..., w]
    area2 = (pu[:, 1] - pu[:, 0]) * (pv[:, 2] - pv[:, 0]) - (pv[:, 1] - pv[:, 0]) * (pu[:, 2] - pu[:, 0])
    keep = area2 != 0  # triangles seen edge-on cover no area of the column plane
    facing = np.sign(area2[keep])
    order = np.where((area2[keep] > 0)[:, None], [0, 1, 2], [0, 2, 1])  # counter-clockwise in (u, v)
    pu, pv, pw = (np.take_along_axis(p[keep], order, axis=1) for p in (pu, pv, pw))
    area2 = np.abs(area2[keep])

    low_u = np.clip(-(-pu.min(1) // _SUBCELL), 0, n + 1)  # ceil division
    high_u = np.clip(pu.max(1) // _SUBCELL, -1, n)
    low_v = np.clip(-(-pv.min(1) // _SUBCELL), 0, n + 1)
    high_v = np.clip(pv.max(1) // _SUBCELL, -1, n)
    count_u = np.clip(high_u - low_u + 1, 0, None)
    count_v = np.clip(high_v - low_v + 1, 0, None)
    per_triangle = count_u * count_v
    tri = np.repeat(np.arange(len(per_triangle)), per_triangle)
    local = np.arange(len(tri)) - np.repeat(np.cumsum(per_triangle) - per_triangle, per_triangle)
    column_u = low_u[tri] + local // count_v[tri]
    column_v = low_v[tri] + local % count_v[tri]
    qu, qv = column_u * _SUBCELL, column_v * _SUBCELL

    covered = np.ones(len(tri), dtype=bool)
    weights = []
    for start, end in ((1, 2), (2, 0), (0, 1)):  # edge opposite corner 0, 1, 2
        du = pu[tri, end] - pu[tri, start]
        dv = pv[tri, end] - pv[tri, start]
        edge = du * (qv - pv[tri, start]) - dv * (qu - pu[tri, start])
        top_left = (dv > 0) | ((dv == 0) & (du > 0))  # opposite directions never agree: one owner per edge
        covered &= (edge > 0) | ((edge == 0) & top_left)
        weights.append(edge)
    weights = np.stack(weights, axis=1)[covered]
    tri, column_u, column_v = tri[covered], column_u[covered], column_v[covered]
    depth = (weights * pw[tri]).sum(1) / (area2[tri] * float(_SUBCELL))  # in cells along the ray
    levels_below = np.clip(np.ceil(depth), 0, n + 1).astype(np.int64)

    side = n + 1
    slot = (column_u * side + column_v) * (side + 1) + levels_below
    crossings = np.bincount(slot, weights=facing[tri], minlength=side * side * (side + 1))
    crossings = np.rint(crossings).astype(np.int64).reshape(side, side, side + 1)
    above = np.cumsum(crossings[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # crossings strictly above level k
    below = np.cumsum(crossings, axis=-1)[..., :side]
    return above, below


def _distance(vertices: np.ndarray, faces: np.ndarray, n: int, radius: float) -> np.ndarray:
    """Unsigned distance at the lattice points: exact within _EXACT_BAND cells of the surface.

    Farther out: the distance to the nearest band point plus that point's distance (an upper bound,
    continuous at the band edge). Nearest-neighbour queries for all points are avoided on purpose: a
    k-d tree visits nearly every sample for points near the centre of a round surface (16 s at n=64).
    """
    cell = 2.0 * radius / n
    points = lattice_vertices(n) * radius
    max_edge = cell / 2
    longest = np.linalg.norm(vertices[faces] - vertices[faces[:, [1, 2, 0]]], axis=-1).max(initial=0.0)
    if longest > max_edge:
        iterations = math.ceil(math.log2(longest / max_edge)) + 1
        vertices, faces = trimesh.remesh.subdivide_to_size(vertices, faces, max_edge, max_iter=iterations)
    samples = scipy.spatial.cKDTree(vertices)
    sample_distance, _ = samples.query(points, distance_upper_bound=_EXACT_BAND * cell)
    near = np.nonzero(np.isfinite(sample_distance))[0]
    if len(near) == 0:  # the surface stays away from every lattice point: plain queries are cheap then
        return samples.query(points)[0]

    triangles = vertices[faces]
    centroids = triangles.mean(axis=1)
    reach = np.linalg.norm(triangles - centroids[:, None], axis=-1).max()
    # A triangle can beat the nearest sample only if its centroid lies within that distance + reach.
    candidates = scipy.spatial.cKDTree(centroids).query_ball_point(
        points[near], sample_distance[near] + reach
    )
    counts = np.fromiter(map(len, candidates), dtype=np.int64, count=len(near))
    point_index = np.repeat(np.arange(len(near)), counts)
    triangle_index = np.fromiter(
        itertools.chain.from_iterable(candidates), dtype=np.int64, count=counts.sum()
    )
    exact = sample_distance[near].copy()
    pair_distance = point_triangle_distance(points[near][point_index], triangles[triangle_index])
    np.minimum.at(exact, point_index, pair_distance)

    distance = np.empty(len(points))
    distance[near] = exact
    in_band = np.zeros((n + 1,) * 3, dtype=bool)
    in_band.reshape(-1)[near] = True
    nearest = scipy.ndimage.distance_transform_edt(~in_band, return_distances=False, return_indices=True)
    nearest = np.ravel_multi_index(tuple(nearest), in_band.shape).reshape(-1)
    far = np.nonzero(~in_band.reshape(-1))[0]
    distance[far] = np.linalg.norm(points[far] - points[nearest[far]], axis=-1) + distance[nearest[far]]
    return distance


def point_triangle_distance(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Exact distance [K] from points [K, 3] to triangles [K, 3, 3], pairwise."""
    a = triangles[:, 0]
    directions = triangles[:, [1, 2, 0]] - triangles  # edges a->b, b->c, c->a
    normal = _cross(directions[:, 0], -directions[:, 2])
    area2 = np.sqrt(_dot(normal, normal))
    to_point = points[:, None] - triangles
    t = np.clip(_dot(to_point, directions) / np.maximum(_dot(directions, directions), 1e-300), 0.0, 1.0)
    residual = to_point - t[..., None] * directions
    edge_distance = np.sqrt(_dot(residual, residual).min(axis=-1))
    over_face = (_dot(_cross(directions, to_point), normal[:, None]) >= 0).all(axis=-1) & (area2 > 1e-300)
    plane_distance = np.abs(_dot(points - a, normal)) / np.maximum(area2, 1e-300)
    return np.where(over_face, plane_distance, edge_distance)


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x[..., 0] * y[..., 0] + x[..., 1] * y[..., 1] + x[..., 2] * y[..., 2]


def _cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cross product over the last axis; np.cross was the slowest step of the distance pass here."""
    x0, x1, x2 = x[..., 0], x[..., 1], x[..., 2]
    y0, y1, y2 = y[..., 0], y[..., 1], y[..., 2]
    return np.stack([x1 * y2 - x2 * y1, x2 * y0 - x0 * y2, x0 * y1 - x1 * y0], axis=-1)
