"""The tetrahedral grid DMTet deforms: a Kuhn (Freudenthal) split of a cube lattice, made in code.

threestudio and nvdiffrec ship grids made by Quartet (not redistributable here, and the large ones
are not shipped at all); a regular Kuhn grid has the same budget, exact counts and needs no asset.
Each of the n^3 cubes is split into the 6 tetrahedra that follow the 6 monotone corner paths from
its (0,0,0) corner to its (1,1,1) corner, one per axis permutation. The split is conforming across
cubes without any parity alternation and all tets are congruent (edges h, sqrt(2) h, sqrt(3) h).

Resolution is named by cells per axis, ``n``. Mapping to threestudio's ``isosurface_resolution``
(Quartet grids, whose number is about twice the lattice cells per axis):

=========  ==================  ====================  =================================
Kuhn n     vertices            tets                  threestudio grid of similar budget
=========  ==================  ====================  =================================
16         4,913               24,576                "32" (smallest shipped; CPU tests)
32         35,937              196,608               "64": 36,562 verts / 192,492 tets
64         274,625             1,572,864             "128": ~277k verts / 1.53M tets
=========  ==================  ====================  =================================

The unique-edge table (what marching tets and the SDF regulariser index) takes seconds at n=64,
so the index arrays are cached as .npz files keyed by n; vertices are recomputed from n and radius.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Edge order inside a tet, shared with the marching-tets case table: (0,1),(0,2),(0,3),(1,2),(1,3),(2,3).
TET_EDGE_CORNERS = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=np.int64)

_CACHE_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TetGrid:
    """A tet grid over the box [-radius, radius]^3 with its unique edges precomputed."""

    n: int  # cells per axis
    radius: float
    vertices: np.ndarray  # [N, 3] float64, world units
    tets: np.ndarray  # [M, 4] int64, every tet positively oriented
    edges: np.ndarray  # [E, 2] int64, a < b, unique grid edges
    tet_edges: np.ndarray  # [M, 6] int64 indices into `edges`, in TET_EDGE_CORNERS order

    @property
    def cell_size(self) -> float:
        return 2.0 * self.radius / self.n


def default_cache_dir() -> Path:
    """Where grids are cached unless `kuhn_grid` is given another folder."""
    return Path.home() / ".cache" / "blender-cfd" / "tets"


def kuhn_grid(
    n: int, radius: float = 1.0, cache_dir: Path | str | None = None, use_cache: bool = True
) -> TetGrid:
    """The Kuhn grid with n cells per axis over [-radius, radius]^3, loaded from or written to the cache."""
    if n < 1:
        raise ValueError(f"a tet grid needs at least one cell per axis, got n={n}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    path = (
        Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"kuhn_n{n}_v{_CACHE_VERSION}.npz"
    )
    vertices = lattice_vertices(n) * radius
    topology = _load(path, n) if use_cache else None
    if topology is None:
        topology = _build_topology(n)
        if use_cache:
            try:
                _save(path, n, topology)
            except OSError as error:  # the cache only saves time: an unwritable folder must not stop a run
                log.warning("could not cache the tet grid at %s: %s", path, error)
    tets, edges, tet_edges = topology
    return TetGrid(n=n, radius=float(radius), vertices=vertices, tets=tets, edges=edges, tet_edges=tet_edges)


def lattice_vertices(n: int) -> np.ndarray:
    """The (n+1)^3 points of [-1, 1]^3, [N, 3] float64; lattice point (i, j, k) has id (i*(n+1)+j)*(n+1)+k."""
    axis = np.linspace(-1.0, 1.0, n + 1)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)


def tet_volumes(vertices: np.ndarray, tets: np.ndarray) -> np.ndarray:
    """Signed volumes [M]; positive means corners 1, 2, 3 seen from corner 0 turn counter-clockwise."""
    v0, v1, v2, v3 = (vertices[tets[:, i]] for i in range(4))
    return np.einsum("ij,ij->i", np.cross(v1 - v0, v2 - v0), v3 - v0) / 6.0


def _build_topology(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    side = n + 1
    vertices = lattice_vertices(n)

    def vertex_id(i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        return (i * side + j) * side + k

    i, j, k = (c.reshape(-1) for c in np.meshgrid(*(np.arange(n),) * 3, indexing="ij"))
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = np.zeros(3, dtype=np.int64)
        path = [vertex_id(i, j, k)]
        for step in perm:
            corner[step] = 1
            path.append(vertex_id(i + corner[0], j + corner[1], k + corner[2]))
        tets.append(np.stack(path, axis=1))
    tets = np.concatenate(tets, axis=0).astype(np.int64)
    negative = tet_volumes(vertices, tets) < 0
    tets[negative] = tets[negative][:, [1, 0, 2, 3]]
    edges, tet_edges = _unique_edges(tets, len(vertices))
    return tets, edges, tet_edges


def _unique_edges(tets: np.ndarray, num_vertices: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique edges via a 1-D unique on int64 keys a*N+b (unique(axis=0) on pairs is ~8x slower)."""
    pairs = tets[:, TET_EDGE_CORNERS]  # [M, 6, 2]
    low, high = pairs.min(axis=-1), pairs.max(axis=-1)
    keys, inverse = np.unique(low * num_vertices + high, return_inverse=True)
    edges = np.stack([keys // num_vertices, keys % num_vertices], axis=1)
    return edges, inverse.reshape(len(tets), 6).astype(np.int64)


def _load(path: Path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if int(data["n"]) != n:
                return None
            return (
                data["tets"].astype(np.int64),
                data["edges"].astype(np.int64),
                data["tet_edges"].astype(np.int64),
            )
    except (OSError, KeyError, ValueError):
        return None  # a truncated or foreign file: rebuild and overwrite it


def _save(path: Path, n: int, topology: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Write atomically (temp file + rename) so concurrent processes never read half a file."""
    tets, edges, tet_edges = topology
    path.parent.mkdir(parents=True, exist_ok=True)
    index_dtype = np.int32 if len(edges) < 2**31 else np.int64  # edges outnumber vertices
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz.tmp", delete=False) as handle:
        np.savez(
            handle,
            n=np.int64(n),
            tets=tets.astype(index_dtype),
            edges=edges.astype(index_dtype),
            tet_edges=tet_edges.astype(index_dtype),
        )
    Path(handle.name).replace(path)
