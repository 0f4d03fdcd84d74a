"""The artist's mesh a texture job keeps exactly (`FixedMesh`), checked before any work starts.

A texture job never moves a vertex: the colour field is optimised on this surface and baked into its
own UVs (or a fresh unwrap), and the asset carries these positions and triangles bitwise (as float32).
So every problem with the input is found here and named with its fix (`MeshInputError`), before the
job is accepted. stdlib + numpy only: Blender may check a mesh before sending it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import JobSpecError

MIN_AREA_FRACTION = 1e-12  # of the bounding box's squared diagonal: below it the mesh is degenerate


class MeshInputError(JobSpecError):
    """A texture job's mesh cannot be used as it is; `field` names the array, `fix` what to do."""

    def __init__(self, field: str, message: str, fix: str):
        super().__init__(field, message)
        self.fix = fix


@dataclass(frozen=True)
class FixedMesh:
    """Vertices float32 [N, 3], triangles int32 [F, 3], and optional per-corner UVs float32 [F, 3, 2]
    (v up): one UV per triangle corner, as a UV map stores them, so seams need no split vertices."""

    vertices: np.ndarray
    faces: np.ndarray
    uvs: np.ndarray | None = None

    @classmethod
    def from_arrays(
        cls, vertices: np.ndarray | None, faces: np.ndarray | None, uvs: np.ndarray | None = None
    ) -> FixedMesh:
        """Check and convert. Quads [F, 4] are split into two triangles each (0-1-2, 0-2-3), their
        corner UVs [F, 4, 2] with them; anything else raises `MeshInputError`."""
        if vertices is None or faces is None:
            raise MeshInputError(
                "mesh_vertices", "a texture job needs the mesh's vertices and faces", "send both arrays"
            )
        vertices, faces = np.asarray(vertices), np.asarray(faces)
        if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.dtype.kind != "f":
            raise MeshInputError(
                "mesh_vertices",
                f"must be float [N, 3], got {vertices.dtype} {vertices.shape}",
                "send the positions as an N x 3 float array",
            )
        if len(vertices) < 3 or len(faces) == 0:
            raise MeshInputError(
                "mesh_faces", "the mesh is empty: it has no faces", "select a mesh that has faces"
            )
        if not np.isfinite(vertices).all():
            raise MeshInputError(
                "mesh_vertices",
                f"{int((~np.isfinite(vertices)).any(axis=1).sum())} vertices have NaN or infinite "
                "coordinates",
                "fix or delete those vertices (Blender: Mesh > Clean Up)",
            )
        if faces.ndim != 2 or faces.shape[1] not in (3, 4) or faces.dtype.kind not in "iu":
            raise MeshInputError(
                "mesh_faces",
                "faces must be triangles or quads (integer [F, 3] or [F, 4]), "
                f"got {faces.dtype} {faces.shape}",
                "triangulate the mesh first (Blender: Face > Triangulate Faces)",
            )
        if faces.min() < 0 or faces.max() >= len(vertices):
            raise MeshInputError(
                "mesh_faces",
                f"face indices must lie in 0..{len(vertices) - 1}, got {faces.min()}..{faces.max()}",
                "send the faces of the same mesh as the vertices",
            )
        if uvs is not None:
            uvs = np.asarray(uvs)
            if uvs.shape != (*faces.shape, 2) or uvs.dtype.kind != "f":
                raise MeshInputError(
                    "mesh_uvs",
                    f"must hold one (u, v) per face corner, float {(*faces.shape, 2)}, "
                    f"got {uvs.dtype} {uvs.shape}",
                    "send the UV map of this mesh, or no UVs for a fresh unwrap",
                )
            if not np.isfinite(uvs).all():
                raise MeshInputError(
                    "mesh_uvs",
                    "contains NaN or infinite coordinates",
                    "unwrap the mesh again, or send no UVs",
                )
        if faces.shape[1] == 4:
            faces = np.concatenate([faces[:, [0, 1, 2]], faces[:, [0, 2, 3]]])
            if uvs is not None:
                uvs = np.concatenate([uvs[:, [0, 1, 2]], uvs[:, [0, 2, 3]]])
        vertices = vertices.astype(np.float32)
        corners = vertices[faces].astype(np.float64)
        area = 0.5 * np.linalg.norm(
            np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1
        )
        extent = np.ptp(vertices, axis=0).astype(np.float64)
        if area.sum() <= MIN_AREA_FRACTION * float(extent @ extent) or np.count_nonzero(extent) < 2:
            raise MeshInputError(
                "mesh_faces",
                "the mesh is degenerate: its faces have no area",
                "select a mesh with a surface (Blender: Mesh > Clean Up > Degenerate Dissolve)",
            )
        return cls(vertices, faces.astype(np.int32), None if uvs is None else uvs.astype(np.float32))
