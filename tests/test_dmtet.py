"""DMTet geometry: the Kuhn tet grid, marching tets, SDF initialisation, island cleanup, regularisers and
the texture field. Meshes are judged with trimesh (watertightness, winding, volume) against exact shapes."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import trimesh

from server.geometry.dmtet import CASE_TABLE, CASE_TRIANGLES, DMTet, TriangleMesh, fit_into_box
from server.geometry.mesh_sdf import lattice_inside, lattice_signed_distance, point_triangle_distance
from server.geometry.regularizers import laplacian_smoothness, mesh_edges, normal_consistency, sdf_sign_change
from server.geometry.tetgrid import TET_EDGE_CORNERS, kuhn_grid, lattice_vertices, tet_volumes
from server.geometry.texture_field import HashGridEncoding, TextureField, default_encoding

DEVICE = torch.device("cpu")


@functools.cache
def grid(n: int, radius: float = 1.0):
    return kuhn_grid(n, radius, use_cache=False)


def to_trimesh(mesh: TriangleMesh) -> trimesh.Trimesh:
    return trimesh.Trimesh(mesh.vertices.detach().cpu().numpy(), mesh.faces.cpu().numpy(), process=False)


def box_sdf(points: np.ndarray, half: np.ndarray) -> np.ndarray:
    q = np.abs(points) - half
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)


# ---------------------------------------------------------------- tet grid


def test_kuhn_grid_counts_orientation_and_edge_table():
    g = grid(4, 0.5)
    assert g.vertices.shape == (5**3, 3) and g.tets.shape == (6 * 4**3, 4)
    assert np.allclose(g.vertices.min(0), -0.5) and np.allclose(g.vertices.max(0), 0.5)
    volumes = tet_volumes(g.vertices, g.tets)
    assert (volumes > 0).all()
    assert volumes.sum() == pytest.approx(1.0)  # the tets tile the box exactly
    assert np.allclose(volumes, volumes[0])  # Kuhn tets are congruent
    # every tet's 6 edges are the table's edges, in TET_EDGE_CORNERS order
    expected = np.sort(g.tets[:, TET_EDGE_CORNERS], axis=-1)
    assert np.array_equal(g.edges[g.tet_edges], expected)
    assert (g.edges[:, 0] < g.edges[:, 1]).all()
    assert len(np.unique(g.edges, axis=0)) == len(g.edges)
    # Kuhn edges are axis, face-diagonal and body-diagonal steps: lengths h, sqrt(2) h, sqrt(3) h
    lengths = np.linalg.norm(g.vertices[g.edges[:, 0]] - g.vertices[g.edges[:, 1]], axis=-1) / g.cell_size
    assert np.allclose(np.unique(lengths.round(9)), np.sqrt([1, 2, 3]))


def test_kuhn_grid_cache_round_trip(tmp_path):
    fresh = kuhn_grid(6, 1.0, use_cache=False)
    first = kuhn_grid(6, 2.0, cache_dir=tmp_path)
    cached = kuhn_grid(6, 1.0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for name in ("tets", "edges", "tet_edges"):
        assert np.array_equal(getattr(cached, name), getattr(fresh, name))
        assert getattr(cached, name).dtype == np.int64
    assert np.array_equal(cached.vertices, fresh.vertices)
    assert np.allclose(first.vertices, 2.0 * fresh.vertices)


# ---------------------------------------------------------------- marching tets


def test_case_table_uses_exactly_the_crossing_edges():
    for case in range(16):
        outside = [(case >> c) & 1 for c in range(4)]
        crossing = {e for e, (a, b) in enumerate(TET_EDGE_CORNERS) if outside[a] != outside[b]}
        used = CASE_TABLE[case][CASE_TABLE[case] >= 0]
        assert set(used.tolist()) == crossing
        assert CASE_TRIANGLES[case] == {0: 0, 3: 1, 4: 2}[len(crossing)]
        assert len(used) == 3 * CASE_TRIANGLES[case]


@pytest.mark.parametrize("n", [16, 32])
def test_sphere_extracts_watertight_outward_mesh(n):
    radius = 0.6
    model = DMTet(grid(n), device=DEVICE)
    model.init_sphere(radius)
    mesh = model()
    assert mesh.vertices.dtype == torch.float32 and mesh.faces.dtype == torch.long
    tm = to_trimesh(mesh)
    assert tm.is_watertight and tm.is_winding_consistent
    exact = 4.0 / 3.0 * math.pi * radius**3
    assert tm.volume > 0  # outward winding
    assert tm.volume == pytest.approx(exact, rel=0.03)
    distance = np.linalg.norm(tm.vertices, axis=1)
    assert np.abs(distance - radius).max() < 0.01 * (32 / n)


def test_random_fields_give_closed_locally_outward_surfaces():
    """Any sign pattern (boundary outside) must give a closed, consistently outward mesh: pins the table."""
    g = grid(6)
    rng = np.random.default_rng(0)
    model = DMTet(g, device=DEVICE, dtype=torch.float64)
    for _ in range(5):
        sdf = rng.normal(size=len(g.vertices)) + 0.3
        sdf[np.abs(g.vertices).max(axis=1) > 0.99] = 1.0  # keep the surface off the grid boundary
        with torch.no_grad():
            model.sdf.copy_(torch.from_numpy(sdf))
        mesh = model()
        tm = to_trimesh(mesh)
        assert tm.is_watertight and tm.is_winding_consistent and tm.volume > 0
        # each face's normal points from the inside endpoints of its vertices' edges towards the outside ones
        ends = model.edges[mesh.source_edges]
        first_outside = model.sdf[ends[:, 0]] > 0
        inside_end = torch.where(first_outside, ends[:, 1], ends[:, 0])
        outside_end = torch.where(first_outside, ends[:, 0], ends[:, 1])
        outward = model.grid_vertices[outside_end] - model.grid_vertices[inside_end]
        corners = mesh.vertices[mesh.faces]
        normals = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)
        assert ((normals * outward[mesh.faces].sum(1)).sum(-1) > 0).all()


def test_box_on_lattice_planes_is_reproduced_exactly():
    """SDF values of exactly 0 count as inside; the faces through them must still close up."""
    g = grid(16)
    model = DMTet(g, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        model.sdf.copy_(torch.from_numpy(box_sdf(g.vertices, np.array([0.5, 0.5, 0.5]))))
    tm = to_trimesh(model())
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(1.0, abs=1e-9)


def test_gradients_reach_sdf_and_deformation_through_the_crossing():
    model = DMTet(grid(8), device=DEVICE, dtype=torch.float64)
    model.init_sphere(0.55)
    with torch.no_grad():
        model.deformation.copy_(
            0.3 * torch.randn(model.deformation.shape, generator=torch.Generator().manual_seed(0))
        )
    mesh = model()
    weights = torch.randn(
        mesh.vertices.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    (mesh.vertices * weights).sum().backward()

    def objective() -> float:
        with torch.no_grad():
            return float((model().vertices * weights).sum())

    edge = int(mesh.source_edges[0])
    a, b = model.edges[edge].tolist()
    step = 1e-6
    for parameter, index in (
        (model.sdf, (a,)),
        (model.sdf, (b,)),
        (model.deformation, (a, 2)),
        (model.deformation, (b, 0)),
    ):
        with torch.no_grad():
            parameter[index] += step
            plus = objective()
            parameter[index] -= 2 * step
            minus = objective()
            parameter[index] += step
        numeric = (plus - minus) / (2 * step)
        assert parameter.grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)
        assert abs(numeric) > 1e-4  # the check is not vacuous
    # vertices on no crossing edge get no gradient
    touched = torch.zeros(len(model.sdf), dtype=torch.bool)
    touched[model.edges[mesh.source_edges].reshape(-1)] = True
    assert (model.sdf.grad[~touched] == 0).all() and (model.deformation.grad[~touched] == 0).all()


def test_optimising_vertices_moves_the_surface_through_topology_changes():
    """Pulling the extracted vertices onto a smaller sphere must flip SDF signs, not just slide vertices."""
    model = DMTet(grid(16), device=DEVICE)
    model.init_sphere(0.7)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(120):
        optimizer.zero_grad()
        mesh = model()
        loss = (mesh.vertices.norm(dim=-1) - 0.35).square().mean() + 0.01 * sdf_sign_change(
            model.sdf, model.edges
        )
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            model.remove_small_islands(optimizer=optimizer)
    model.remove_small_islands()  # specks keep appearing between cleanups; none may survive one
    mesh = model()
    radii = mesh.vertices.norm(dim=-1)
    assert abs(radii.mean().item() - 0.35) < 0.02 and radii.std().item() < 0.03
    tm = to_trimesh(mesh)
    assert tm.is_watertight and tm.is_winding_consistent and len(tm.split(only_watertight=False)) == 1


def test_deformation_is_bounded_by_half_a_cell():
    g = grid(8)
    model = DMTet(g, device=DEVICE)
    with torch.no_grad():
        model.deformation.copy_(
            1e3 * torch.randn(model.deformation.shape, generator=torch.Generator().manual_seed(0))
        )
    offset = (model.vertex_positions() - model.grid_vertices).abs()
    assert offset.max() <= 0.5 * g.cell_size + 1e-6
    assert offset.max() > 0.49 * g.cell_size
    frozen = DMTet(g, deformable=False, device=DEVICE)
    assert not frozen.deformation.requires_grad
    assert torch.equal(frozen.vertex_positions(), frozen.grid_vertices)


def test_ellipsoid_init_has_the_exact_zero_set():
    radii = (0.7, 0.5, 0.35)
    model = DMTet(grid(32), device=DEVICE)
    model.init_ellipsoid(radii)
    tm = to_trimesh(model())
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(4.0 / 3.0 * math.pi * np.prod(radii), rel=0.03)
    level = ((tm.vertices / np.array(radii)) ** 2).sum(1)
    assert np.abs(level - 1.0).max() < 0.05


# ---------------------------------------------------------------- mesh SDF


def test_point_triangle_distance_matches_trimesh():
    rng = np.random.default_rng(0)
    triangles = rng.normal(size=(3000, 3, 3))
    triangles[:5, 2] = triangles[:5, 0]  # degenerate ones too
    points = 2.0 * rng.normal(size=(3000, 3))
    reference = np.linalg.norm(trimesh.triangles.closest_point(triangles, points) - points, axis=1)
    assert np.allclose(point_triangle_distance(points, triangles), reference, atol=1e-12)


def test_lattice_signed_distance_of_a_sphere_mesh():
    n, radius = 16, 1.0
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.55)
    sdf = lattice_signed_distance(sphere.vertices, sphere.faces, n, radius)
    points = lattice_vertices(n) * radius
    exact = np.linalg.norm(points, axis=1) - 0.55
    assert ((sdf <= 0) == (exact <= 0)).all()
    near = np.abs(exact) < 2 * (2 * radius / n)
    # the facets lie at most ~2.5e-3 inside the true sphere; far values are an upper bound within a cell
    assert np.abs(sdf - exact)[near].max() < 3e-3
    assert (sdf[~near] * np.sign(exact[~near]) >= np.abs(exact[~near]) - 3e-3).all()
    assert (np.abs(sdf - exact)[~near] < 2 * radius / n).all()
    # flipped orientation and a missing face do not change the sign
    assert np.array_equal(lattice_inside(sphere.vertices, sphere.faces[:, ::-1], n, radius), sdf <= 0)
    holed = lattice_inside(sphere.vertices, sphere.faces[1:], n, radius)
    assert np.array_equal(holed, exact <= 0)


def test_init_from_box_mesh_reproduces_the_box():
    extents = np.array([0.9, 0.7, 0.54])
    model = DMTet(grid(32), device=DEVICE)
    # a big, off-centre copy of the box: fill=0.45 maps it back to `extents`
    box = trimesh.creation.box(extents=10 * extents)
    box.apply_translation([100.0, -3.0, 2.0])
    model.init_from_mesh(box.vertices, box.faces, fill=0.45)
    tm = to_trimesh(model())
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(np.prod(extents), rel=0.02)
    # IoU on a finer lattice: analytic box against the extracted mesh
    fine = 48
    points = lattice_vertices(fine)
    truth = box_sdf(points, extents / 2) < 0
    extracted = lattice_inside(tm.vertices, tm.faces, fine, 1.0)
    iou = (truth & extracted).sum() / (truth | extracted).sum()
    assert iou > 0.95


def test_fit_into_box_centres_and_scales():
    vertices = np.array([[10.0, 0.0, 0.0], [14.0, 1.0, 2.0], [12.0, -1.0, -2.0]])
    fitted = fit_into_box(vertices, radius=1.0, fill=0.5)
    assert np.allclose(fitted.min(0), -fitted.max(0))
    assert np.abs(fitted).max() == pytest.approx(0.5)


# ---------------------------------------------------------------- island cleanup


def two_sphere_sdf(points: np.ndarray) -> np.ndarray:
    main = np.linalg.norm(points, axis=1) - 0.5
    floater = np.linalg.norm(points - np.array([0.72, 0.72, 0.0]), axis=1) - 0.15
    return np.minimum(main, floater)


def test_remove_small_islands_deletes_floaters_and_resets_their_optimiser_state():
    g = grid(32)
    model = DMTet(g, device=DEVICE)
    alone = DMTet(g, device=DEVICE)
    alone.init_sphere(0.5)
    with torch.no_grad():
        model.sdf.copy_(torch.from_numpy(two_sphere_sdf(g.vertices)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model().vertices.sum().backward()
    optimizer.step()
    with torch.no_grad():
        model.sdf.copy_(torch.from_numpy(two_sphere_sdf(g.vertices)))
    assert len(to_trimesh(model()).split(only_watertight=False)) == 2

    changed = model.remove_small_islands(min_fraction=0.2, optimizer=optimizer)
    in_floater = np.linalg.norm(g.vertices - np.array([0.72, 0.72, 0.0]), axis=1) < 0.15
    assert set(changed.tolist()) == set(np.nonzero(in_floater)[0].tolist())  # the whole floater body
    assert (model.sdf[changed] > 0).all()
    cleaned = to_trimesh(model())
    assert len(cleaned.split(only_watertight=False)) == 1
    assert len(cleaned.faces) == len(alone().faces)  # the main body is untouched
    state = optimizer.state[model.sdf]
    assert (state["exp_avg"][changed] == 0).all() and (state["exp_avg_sq"][changed] == 0).all()
    assert state["exp_avg_sq"].abs().sum() > 0  # only those entries were reset
    assert len(model.remove_small_islands(min_fraction=0.2)) == 0  # nothing left to do


def test_remove_small_islands_fills_cavities():
    g = grid(32)
    model = DMTet(g, device=DEVICE)
    centre = np.array([0.1, 0.0, -0.1])
    bubble = 0.15 - np.linalg.norm(g.vertices - centre, axis=1)
    with torch.no_grad():
        model.sdf.copy_(torch.from_numpy(np.maximum(np.linalg.norm(g.vertices, axis=1) - 0.6, bubble)))
    before = to_trimesh(model())
    assert len(before.split(only_watertight=False)) == 2
    changed = model.remove_small_islands(min_fraction=0.2)
    assert (model.sdf[changed] < 0).all() and len(changed) > 0
    after = to_trimesh(model())
    assert len(after.split(only_watertight=False)) == 1
    assert after.volume == pytest.approx(4.0 / 3.0 * math.pi * 0.6**3, rel=0.03)


# ---------------------------------------------------------------- regularisers


def test_sdf_sign_change_regulariser():
    edges = torch.tensor([[0, 1], [1, 2], [2, 3]])
    positive = torch.tensor([0.3, 0.1, 0.2, 0.5], requires_grad=True)
    assert sdf_sign_change(positive, edges).item() == 0.0
    assert sdf_sign_change(-positive, edges).item() == 0.0
    flipped = torch.tensor([0.3, -0.2, -0.1, -0.4], requires_grad=True)  # only edge (0, 1) changes sign
    loss = sdf_sign_change(flipped, edges)
    softplus = torch.nn.functional.softplus
    assert loss.item() == pytest.approx((softplus(torch.tensor(0.3)) + softplus(torch.tensor(0.2))).item())
    loss.backward()
    # both ends are pulled towards the other's sign; other vertices untouched
    assert flipped.grad[0] > 0 and flipped.grad[1] < 0 and (flipped.grad[2:] == 0).all()


def plane_mesh(bumps: float, seed: int = 0) -> TriangleMesh:
    side = 12
    u, v = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    height = bumps * np.random.default_rng(seed).normal(size=u.shape)
    vertices = np.stack([u, v, height], axis=-1).reshape(-1, 3)
    ids = np.arange(side * side).reshape(side, side)
    a, b, c, d = ids[:-1, :-1], ids[1:, :-1], ids[1:, 1:], ids[:-1, 1:]
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    return TriangleMesh(torch.tensor(vertices, requires_grad=True), torch.from_numpy(faces))


def test_normal_consistency_and_laplacian():
    flat, bumpy = plane_mesh(0.0), plane_mesh(0.05)
    assert normal_consistency(flat).item() < 1e-12
    assert normal_consistency(bumpy).item() > 1e-2
    assert laplacian_smoothness(bumpy).item() > laplacian_smoothness(flat).item() + 1e-2
    loss = normal_consistency(bumpy) + laplacian_smoothness(bumpy)
    loss.backward()
    assert torch.isfinite(bumpy.vertices.grad).all() and bumpy.vertices.grad.abs().sum() > 0
    # a few gradient steps make a bumpy surface smoother
    vertices = bumpy.vertices.detach().clone().requires_grad_(True)
    optimizer = torch.optim.SGD([vertices], lr=0.05)
    start = normal_consistency(TriangleMesh(vertices, bumpy.faces)).item()
    for _ in range(50):
        optimizer.zero_grad()
        mesh = TriangleMesh(vertices, bumpy.faces)
        (normal_consistency(mesh) + laplacian_smoothness(mesh)).backward()
        optimizer.step()
    assert normal_consistency(TriangleMesh(vertices, bumpy.faces)).item() < 0.5 * start
    edges = mesh_edges(bumpy.faces, len(bumpy.vertices))
    assert len(edges) == 3 * 11 * 11 + 2 * 11  # unique edges of an 11 x 11 quad grid split into triangles
    assert normal_consistency(bumpy, edges).item() == pytest.approx(normal_consistency(bumpy).item())
    assert laplacian_smoothness(bumpy, edges).item() == pytest.approx(laplacian_smoothness(bumpy).item())


# ---------------------------------------------------------------- texture field


@pytest.mark.parametrize(
    ("encoding", "options"),
    [("triplane", None), ("hash", {"levels": 8, "log2_table_size": 14, "finest_resolution": 256})],
)
def test_texture_field_starts_grey_stays_in_range_and_learns(encoding, options):
    torch.manual_seed(0)
    field = TextureField(radius=1.0, encoding=encoding, encoding_options=options, device=DEVICE)
    points = torch.rand(2000, 3) * 2 - 1
    albedo = field(points)
    assert albedo.shape == (2000, 3)
    assert (albedo - 0.5).abs().max() < 0.01
    albedo.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.parameters())

    target = torch.where(points[:, :1] > 0, torch.tensor([0.9, 0.1, 0.1]), torch.tensor([0.1, 0.2, 0.9]))
    optimizer = torch.optim.Adam(field.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        loss = (field(points) - target).square().mean()
        loss.backward()
        optimizer.step()
    albedo = field(points * 4)  # also far outside the box: clamped, still in range
    assert ((albedo >= 0) & (albedo <= 1)).all()
    assert loss.item() < 0.02


def test_texture_field_defaults_per_device():
    assert TextureField(device=DEVICE).encoding_name == "triplane"
    assert default_encoding("cuda") == "hash"


def test_hash_encoding_interpolates_linear_functions_exactly_on_dense_levels():
    encoding = HashGridEncoding(
        levels=2,
        features=1,
        log2_table_size=14,
        base_resolution=8,
        finest_resolution=16,
        device=DEVICE,
        dtype=torch.float64,
    )
    resolution = int(encoding.resolutions[0])
    assert bool(encoding.dense[0])
    ids = torch.arange((resolution + 1) ** 3)
    i, j, k = (
        ids % (resolution + 1),
        (ids // (resolution + 1)) % (resolution + 1),
        ids // (resolution + 1) ** 2,
    )
    with torch.no_grad():
        encoding.table[0, : len(ids), 0] = (0.5 * i - 2.0 * j + 3.0 * k).double() / resolution
    x = torch.rand(500, 3, dtype=torch.float64) * 2 - 1
    unit = (x + 1) / 2
    expected = 0.5 * unit[:, 0] - 2.0 * unit[:, 1] + 3.0 * unit[:, 2]
    assert torch.allclose(encoding(x)[:, 0], expected, atol=1e-12)
