"""DMTet: a per-vertex SDF and a bounded deformation on a tet grid, turned into a mesh every step.

The optimiser moves two tensors per grid vertex: the signed distance (negative inside) and a 3-D
offset bounded to half a cell by tanh (as in threestudio/nvdiffrec), so that tets rarely invert.
Marching tetrahedra places one mesh vertex on every grid edge whose SDF changes sign, at the
linear zero crossing; gradients reach both tensors only through that interpolation. The grid's
unique-edge table is precomputed (`server.geometry.tetgrid`), so a call does no `torch.unique` over tets.

The 16-case table is derived in code from a positively oriented reference tet (each triangle
faces from the inside corners towards the outside ones); affine maps with positive determinant
keep that orientation, so on a positively oriented grid the output is outward-wound and, because
neighbouring tets share edge vertices, watertight. `tests/test_dmtet.py` pins both properties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
from torch import nn

from server.geometry.mesh_sdf import lattice_signed_distance
from server.geometry.tetgrid import TET_EDGE_CORNERS, TetGrid


@dataclass
class TriangleMesh:
    """A triangle mesh: vertices [V, 3] float, faces [F, 3] long (counter-clockwise seen from outside)."""

    vertices: torch.Tensor
    faces: torch.Tensor
    source_edges: torch.Tensor | None = None  # [V] long: the grid edge each vertex lies on (DMTet output)


def _case_table() -> tuple[np.ndarray, np.ndarray]:
    """Marching-tets table [16, 6] of local edge ids (two triangles, -1 padded) and triangle counts [16].

    Case bit i is set when corner i is outside (sdf > 0). Crossing points are taken at edge midpoints
    of the reference tet (0,0,0),(1,0,0),(0,1,0),(0,0,1); every triangle is turned to face from the
    centroid of the inside corners towards that of the outside corners.
    """
    corners = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    midpoints = corners[TET_EDGE_CORNERS].mean(axis=1)
    table = np.full((16, 6), -1, dtype=np.int64)
    counts = np.zeros(16, dtype=np.int64)
    for case in range(16):
        is_outside = np.array([(case >> corner) & 1 for corner in range(4)], dtype=bool)
        crossing = [e for e, (a, b) in enumerate(TET_EDGE_CORNERS) if is_outside[a] != is_outside[b]]
        if not crossing:
            continue
        # Walk the crossing edges in cyclic order: consecutive ones share a corner (and a tet face).
        polygon = [crossing.pop(0)]
        while crossing:
            previous = set(TET_EDGE_CORNERS[polygon[-1]])
            shared = next(e for e in crossing if previous & set(TET_EDGE_CORNERS[e]))
            crossing.remove(shared)
            polygon.append(shared)
        outward = corners[is_outside].mean(axis=0) - corners[~is_outside].mean(axis=0)
        triangles = (
            [polygon[0:3]] if len(polygon) == 3 else [polygon[0:3], [polygon[0], polygon[2], polygon[3]]]
        )
        for slot, triangle in enumerate(triangles):
            p0, p1, p2 = midpoints[triangle]
            if np.dot(np.cross(p1 - p0, p2 - p0), outward) < 0:
                triangle = [triangle[0], triangle[2], triangle[1]]
            table[case, 3 * slot : 3 * slot + 3] = triangle
        counts[case] = len(triangles)
    return table, counts


CASE_TABLE, CASE_TRIANGLES = _case_table()


def marching_tetrahedra(
    positions: torch.Tensor,
    sdf: torch.Tensor,
    tets: torch.Tensor,
    edges: torch.Tensor,
    tet_edges: torch.Tensor,
    case_table: torch.Tensor,
    case_triangles: torch.Tensor,
) -> TriangleMesh:
    """Extract the zero level set of `sdf` [N] on the tet grid with vertex `positions` [N, 3].

    `edges` [E, 2] / `tet_edges` [M, 6] are the grid's unique-edge table, `case_table` / `case_triangles`
    are CASE_TABLE / CASE_TRIANGLES on the grid's device. Differentiable w.r.t. positions and sdf.
    `tets` and `edges` work in any memory layout; column-major (as `DMTet` stores them) is fastest.
    The returned mesh's `source_edges` names the grid edge of each vertex.
    """
    outside = sdf > 0  # sdf == 0 counts as inside, so a crossing edge never has equal endpoint values
    crossing_ids = torch.nonzero(outside[edges[:, 0]] != outside[edges[:, 1]])[:, 0]
    a, b = edges[crossing_ids].unbind(1)
    weight = (sdf[a] / (sdf[a] - sdf[b])).unsqueeze(-1)
    vertices = positions[a] + weight * (positions[b] - positions[a])

    edge_to_vertex = torch.full((len(edges),), -1, dtype=torch.long, device=edges.device)
    edge_to_vertex[crossing_ids] = torch.arange(len(crossing_ids), device=edges.device)
    # The case of every tet is the one O(tets) step: uint8 bit ops keep it ~4x cheaper than int64 sums.
    corner_outside = outside.to(torch.uint8)[tets.T]  # [4, M]
    case = corner_outside[0] | (corner_outside[1] << 1) | (corner_outside[2] << 2) | (corner_outside[3] << 3)
    active = torch.nonzero((case != 0) & (case != 15))[:, 0]
    active_case = case[active].long()
    local = case_table[active_case]  # [A, 6] local edge ids
    tet_vertices = edge_to_vertex[tet_edges[active]]  # [A, 6] mesh vertex per tet edge (-1 if none)
    first = torch.gather(tet_vertices, 1, local[:, :3])
    two = torch.nonzero(case_triangles[active_case] == 2).squeeze(1)
    second = torch.gather(tet_vertices[two], 1, local[two, 3:])
    faces = torch.cat([first, second], dim=0)
    return TriangleMesh(vertices=vertices, faces=faces, source_edges=crossing_ids)


def fit_into_box(vertices: np.ndarray, radius: float, fill: float = 0.8) -> np.ndarray:
    """Centre the bounding box at the origin; scale uniformly so its largest half-extent is fill * radius."""
    vertices = np.asarray(vertices, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    half_extent = max(float((high - low).max()) / 2, 1e-12)
    return (vertices - (low + high) / 2) * (fill * radius / half_extent)


class DMTet(nn.Module):
    """Per-vertex SDF + tanh-bounded deformation on a `TetGrid`; calling it extracts the surface mesh.

    The `init_*` methods write an SDF (negative inside) and reset the deformation to zero.
    """

    def __init__(
        self,
        grid: TetGrid,
        *,
        deformable: bool = True,
        max_deformation: float = 0.5,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ):
        """`max_deformation` is in cells: each coordinate moves at most that many cell sizes."""
        super().__init__()
        self.grid = grid
        self.deformable = deformable
        self.deformation_bound = max_deformation * grid.cell_size
        device = torch.device(device)

        def index(array: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(array, dtype=torch.long, device=device)

        def column_major(array: np.ndarray) -> torch.Tensor:
            """[K, C] whose columns are contiguous, so the per-corner gathers read memory in order."""
            return index(np.ascontiguousarray(array.T)).T

        self.register_buffer(
            "grid_vertices", torch.as_tensor(grid.vertices, dtype=dtype, device=device), False
        )
        self.register_buffer("tets", column_major(grid.tets), False)
        self.register_buffer("edges", column_major(grid.edges), False)
        self.register_buffer("tet_edges", index(grid.tet_edges), False)
        self.register_buffer("case_table", index(CASE_TABLE), False)
        self.register_buffer("case_triangles", index(CASE_TRIANGLES), False)
        num_vertices = len(grid.vertices)
        self.sdf = nn.Parameter(torch.zeros(num_vertices, dtype=dtype, device=device))
        self.deformation = nn.Parameter(
            torch.zeros(num_vertices, 3, dtype=dtype, device=device), requires_grad=deformable
        )

    def vertex_positions(self) -> torch.Tensor:
        """Deformed grid vertices [N, 3]; each coordinate stays within deformation_bound of the lattice."""
        if not self.deformable:
            return self.grid_vertices
        return self.grid_vertices + self.deformation_bound * torch.tanh(self.deformation)

    def forward(self) -> TriangleMesh:
        return marching_tetrahedra(
            self.vertex_positions(),
            self.sdf,
            self.tets,
            self.edges,
            self.tet_edges,
            self.case_table,
            self.case_triangles,
        )

    @torch.no_grad()
    def init_sphere(self, radius: float, center: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        """SDF of a sphere; also resets the deformation."""
        offset = self.grid_vertices - self.grid_vertices.new_tensor(center)
        self._set(offset.norm(dim=-1) - radius)

    @torch.no_grad()
    def init_ellipsoid(self, radii: Sequence[float], center: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        """A distance-like field of an ellipsoid: exact zero set, close to the true distance near it.

        Uses k0 (k0 - 1) / k1 with k0 = |p / r|, k1 = |p / r^2| (a standard first-order bound).
        """
        r = self.grid_vertices.new_tensor(radii)
        offset = self.grid_vertices - self.grid_vertices.new_tensor(center)
        k0 = (offset / r).norm(dim=-1)
        k1 = (offset / (r * r)).norm(dim=-1)
        sdf = torch.where(k1 > 1e-12, k0 * (k0 - 1.0) / k1.clamp_min(1e-12), -r.min())
        self._set(sdf)

    @torch.no_grad()
    def init_from_mesh(
        self, vertices: np.ndarray | torch.Tensor, faces: np.ndarray | torch.Tensor, fill: float | None = None
    ) -> None:
        """Signed distance of a triangle mesh (`geometry.mesh_sdf`); with `fill`, first fit it into the box.

        `fill` is the fraction of the grid radius the mesh's largest half-extent should span (e.g. 0.8).
        """
        vertices = torch.as_tensor(vertices).detach().cpu().numpy().astype(np.float64)
        faces = torch.as_tensor(faces).detach().cpu().numpy().astype(np.int64)
        if fill is not None:
            vertices = fit_into_box(vertices, self.grid.radius, fill)
        sdf = lattice_signed_distance(vertices, faces, self.grid.n, self.grid.radius)
        self._set(torch.as_tensor(sdf, dtype=self.sdf.dtype, device=self.sdf.device))

    def _set(self, sdf: torch.Tensor) -> None:
        self.sdf.copy_(sdf)
        self.deformation.zero_()

    @torch.no_grad()
    def remove_small_islands(
        self,
        min_fraction: float = 0.05,
        value: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> torch.Tensor:
        """Delete mesh components with fewer than min_fraction x the largest one's faces, on the SDF grid.

        Floaters appear when Adam's momentum keeps moving SDF entries that no longer touch the surface,
        and sub-pixel islands get too little image gradient to vanish again; a periodic cleanup (every
        few dozen steps) removes them, which the sign-change regulariser alone does not. A small solid
        island goes by setting its whole inside region (grid vertices with sdf <= 0 connected through
        grid edges and bordered only by island surfaces) to +value, a small cavity by setting its
        outside region to -value; value defaults to half a cell. Returns the changed vertex ids; with
        `optimizer`, their per-entry state for `sdf` (Adam moments, momentum buffers) is zeroed too.
        """
        mesh = self()
        faces = mesh.faces.cpu().numpy()
        empty = torch.zeros(0, dtype=torch.long, device=self.sdf.device)
        if len(faces) == 0:
            return empty
        num_mesh_vertices = len(mesh.vertices)
        component = _connected_components(num_mesh_vertices, faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2))
        face_count = np.bincount(component[faces[:, 0]])
        kept = face_count >= min_fraction * face_count.max()
        if kept.all():
            return empty

        sdf = self.sdf.detach().cpu().numpy()
        outside = sdf > 0
        edges = self.grid.edges
        both_outside = outside[edges[:, 0]] & outside[edges[:, 1]]
        both_inside = ~outside[edges[:, 0]] & ~outside[edges[:, 1]]
        inside_region = _connected_components(len(sdf), edges[both_inside])
        outside_region = _connected_components(len(sdf), edges[both_outside])

        ends = edges[mesh.source_edges.cpu().numpy()]  # [V, 2] grid endpoints of each mesh vertex's edge
        first_outside = outside[ends[:, 0]]
        inside_end = np.where(first_outside, ends[:, 1], ends[:, 0])
        outside_end = np.where(first_outside, ends[:, 0], ends[:, 1])
        vertex_kept = kept[component]

        in_label = inside_region[inside_end]
        floater = _bordered_only_by(in_label, vertex_kept, len(sdf))
        out_label = outside_region[outside_end]
        cavity = _bordered_only_by(out_label, vertex_kept | floater[in_label], len(sdf))

        fill = 0.5 * self.grid.cell_size if value is None else value
        to_outside = np.nonzero(floater[inside_region] & ~outside)[0]
        to_inside = np.nonzero(cavity[outside_region] & outside)[0]
        changed = torch.as_tensor(
            np.concatenate([to_outside, to_inside]), dtype=torch.long, device=self.sdf.device
        )
        self.sdf[changed[: len(to_outside)]] = fill
        self.sdf[changed[len(to_outside) :]] = -fill
        if optimizer is not None:
            for state in optimizer.state.get(self.sdf, {}).values():
                if torch.is_tensor(state) and state.shape == self.sdf.shape:
                    state[changed] = 0
        return changed


def _connected_components(num_nodes: int, pairs: np.ndarray) -> np.ndarray:
    """Component label per node of the undirected graph with edge list `pairs` [K, 2]."""
    graph = scipy.sparse.coo_matrix(
        (np.ones(len(pairs), dtype=bool), (pairs[:, 0], pairs[:, 1])), shape=(num_nodes, num_nodes)
    )
    return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def _bordered_only_by(labels: np.ndarray, blocked: np.ndarray, num_labels: int) -> np.ndarray:
    """Per label: True if it borders at least one crossing and none of its crossings is blocked."""
    borders = np.bincount(labels, minlength=num_labels)
    blocked_borders = np.bincount(labels, weights=blocked.astype(np.float64), minlength=num_labels)
    return (borders > 0) & (blocked_borders == 0)
