"""The torch rasterizer against independent geometry and finite differences (nvdiffrast semantics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.render import raster
from server.render.raster import antialias, interpolate, opposite_vertices, rasterize


def clip(xy_z_w: list[list[float]], dtype=torch.float64) -> torch.Tensor:
    """[N, 4] clip positions from rows (x_ndc, y_ndc, z_ndc, w): stored as (x w, y w, z w, w)."""
    p = torch.tensor(xy_z_w, dtype=dtype)
    return torch.cat([p[:, :3] * p[:, 3:], p[:, 3:]], 1)[None]


def pixel_centres_ndc(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """NDC of every pixel centre, [H, W] each, row 0 = bottom (nvdiffrast layout)."""
    xs = (2 * np.arange(width) + 1) / width - 1
    ys = (2 * np.arange(height) + 1) / height - 1
    return np.meshgrid(xs, ys)


def inside_triangle(px: np.ndarray, py: np.ndarray, tri_xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent same-side test; also the smallest distance of each point to the edges' lines."""
    signs, dists = [], []
    for i in range(3):
        (x0, y0), (x1, y1) = tri_xy[i], tri_xy[(i + 1) % 3]
        cross = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
        signs.append(np.sign(cross))
        dists.append(np.abs(cross) / np.hypot(x1 - x0, y1 - y0))
    signs = np.stack(signs)
    return (np.all(signs > 0, 0) | np.all(signs < 0, 0)), np.min(dists, 0)


def test_coverage_is_exactly_the_pixel_centres_inside_each_triangle():
    rng = np.random.default_rng(0)
    height, width = 37, 53
    px, py = pixel_centres_ndc(height, width)
    for _ in range(20):
        xy = rng.uniform(-1.3, 1.3, (3, 2))
        w = rng.uniform(0.5, 3.0, (3, 1))
        pos = torch.tensor(np.concatenate([xy * w, np.zeros((3, 1)), w], 1))[None]
        rast = rasterize(pos, torch.tensor([[0, 1, 2]]), (height, width))
        expected, margin = inside_triangle(px, py, xy)
        covered = rast[0, :, :, 3].numpy() > 0
        clear = margin > 1e-9
        assert np.array_equal(covered[clear], expected[clear])
        assert expected.sum() == 0 or covered.sum() > 0


def test_shared_edges_have_no_cracks_and_no_double_coverage():
    # A fan of 12 triangles around an off-centre point covers a convex 12-gon; every pixel centre
    # inside it belongs to exactly one triangle, including centres on or near the shared spokes.
    angles = np.linspace(0, 2 * np.pi, 13)[:-1] + 0.1
    rim = np.stack([0.9 * np.cos(angles), 0.8 * np.sin(angles)], 1)
    xy = np.concatenate([[[0.05, -0.03]], rim])
    pos = torch.tensor(np.concatenate([xy, np.zeros((13, 1)), np.ones((13, 1))], 1))[None]
    tri = torch.tensor([[0, 1 + i, 1 + (i + 1) % 12] for i in range(12)])
    rast = rasterize(pos, tri, (64, 64))
    covered = rast[0, :, :, 3].numpy() > 0
    px, py = pixel_centres_ndc(64, 64)
    in_polygon = np.zeros_like(covered)
    for t in tri.numpy():
        in_polygon |= inside_triangle(px, py, xy[t])[0]
    assert np.array_equal(covered, in_polygon)
    # each triangle's pixels are among that triangle's inside-or-boundary centres
    for f, t in enumerate(tri.numpy()):
        inside, margin = inside_triangle(px, py, xy[t])
        mine = rast[0, :, :, 3].numpy() == f + 1
        assert np.all(inside[mine] | (margin[mine] < 1e-12))


def test_depth_test_keeps_the_nearest_triangle_in_either_order():
    near = [[-0.9, -0.9, -0.2, 2.0], [0.9, -0.9, -0.2, 2.0], [0.0, 0.9, -0.2, 2.0]]
    far = [[-0.5, -0.5, 0.4, 1.0], [1.0, -0.5, 0.4, 1.0], [0.2, 1.0, 0.4, 1.0]]
    for first, second, near_id in ((near, far, 1), (far, near, 2)):
        pos = clip(first + second)
        rast = rasterize(pos, torch.tensor([[0, 1, 2], [3, 4, 5]]), (32, 32))
        px, py = pixel_centres_ndc(32, 32)
        both = (
            inside_triangle(px, py, np.array(near)[:, :2])[0]
            & inside_triangle(px, py, np.array(far)[:, :2])[0]
        )
        both = torch.from_numpy(both)
        assert both.sum() > 50
        assert torch.all(rast[0, :, :, 3][both] == near_id)
        assert torch.allclose(rast[0, :, :, 2][both], torch.tensor(-0.2, dtype=torch.float64))


def test_barycentrics_are_perspective_correct():
    # Interpolating the clip positions themselves must reproduce each pixel centre after the divide.
    pos = torch.tensor(
        [[[-1.5, -1.2, 0.5, 3.0], [2.0, -0.5, -0.3, 2.2], [0.1, 0.9, 0.1, 1.1]]], dtype=torch.float64
    )
    rast = rasterize(pos, torch.tensor([[0, 1, 2]]), (24, 40))
    p = interpolate(pos[0], rast, torch.tensor([[0, 1, 2]]))
    covered = rast[..., 3] > 0
    px, py = pixel_centres_ndc(24, 40)
    assert covered.sum() > 100
    assert torch.allclose((p[..., 0] / p[..., 3])[covered], torch.from_numpy(px)[covered[0]])
    assert torch.allclose((p[..., 1] / p[..., 3])[covered], torch.from_numpy(py)[covered[0]])
    assert torch.allclose((p[..., 2] / p[..., 3])[covered], rast[..., 2][covered])
    # vertex 0 <-> (u, v) = (1, 0), vertex 1 <-> (0, 1): u interpolates a one-hot attribute exactly
    onehot = interpolate(torch.eye(3, dtype=torch.float64), rast, torch.tensor([[0, 1, 2]]))
    assert torch.allclose(onehot[..., 0], rast[..., 0]) and torch.allclose(onehot[..., 1], rast[..., 1])
    assert torch.all(
        interpolate(torch.eye(3, dtype=torch.float64), rast, torch.tensor([[0, 1, 2]]))[~covered] == 0
    )


def test_triangles_behind_the_camera_or_beyond_the_depth_range_are_not_drawn():
    behind = [[-0.9, -0.9, 0.0, -1.0], [0.9, -0.9, 0.0, -1.0], [0.0, 0.9, 0.0, -2.0]]
    beyond_far = [[-0.9, -0.9, 1.5, 1.0], [0.9, -0.9, 1.5, 1.0], [0.0, 0.9, 1.5, 1.0]]
    for corners in (behind, beyond_far):
        rast = rasterize(clip(corners), torch.tensor([[0, 1, 2]]), (16, 16))
        assert torch.all(rast == 0)
    # Half in front of the far plane: drawn exactly where the interpolated z/w is at most 1.
    straddling = clip([[-0.9, -0.9, 0.5, 1.0], [0.9, -0.9, 0.5, 1.0], [0.0, 0.9, 1.5, 1.0]])
    rast = rasterize(straddling, torch.tensor([[0, 1, 2]]), (16, 16))
    px, py = pixel_centres_ndc(16, 16)
    inside, margin = inside_triangle(px, py, np.array([[-0.9, -0.9], [0.9, -0.9], [0.0, 0.9]]))
    z = 0.5 + (py + 0.9) / 1.8  # z/w is affine on screen: 0.5 at the bottom edge, 1.5 at the apex
    clear = (margin > 1e-9) & (np.abs(z - 1.0) > 1e-9)
    assert np.array_equal((rast[0, :, :, 3] > 0).numpy()[clear], (inside & (z <= 1.0))[clear])


def test_chunked_rasterization_matches_a_single_pass(monkeypatch):
    rng = np.random.default_rng(1)
    xy = rng.uniform(-1, 1, (60, 2))
    pos = torch.tensor(np.concatenate([xy, rng.uniform(-0.9, 0.9, (60, 1)), np.ones((60, 1))], 1))[None]
    pos = torch.cat([pos, pos.flip(1)])  # two images with different vertex buffers
    tri = torch.from_numpy(rng.integers(0, 60, (40, 3)))
    whole = rasterize(pos, tri, (48, 48))
    monkeypatch.setattr(raster, "CHUNK_CANDIDATES", 50)
    chunked = rasterize(pos, tri, (48, 48))
    assert torch.equal(whole, chunked)
    assert (whole[..., 3] > 0).sum() > 500
    single = rasterize(pos[1:], tri, (48, 48))
    assert torch.equal(whole[1:], single)


def test_interpolate_and_barycentric_gradients_match_finite_differences():
    pos = clip([[-0.8, -0.7, 0.1, 1.3], [0.9, -0.5, 0.2, 0.8], [0.1, 0.85, 0.3, 1.1], [0.6, 0.9, -0.5, 1.6]])
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    attr = torch.randn(1, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos.requires_grad_(True)
    attr.requires_grad_(True)

    def render(p, a):
        return interpolate(a, rasterize(p, tri, (9, 11)), tri)

    assert torch.autograd.gradcheck(render, (pos, attr))


def test_antialias_gradients_match_finite_differences():
    pos = clip(
        [[-0.83, -0.71, 0.1, 1.3], [0.93, -0.52, 0.2, 0.8], [0.12, 0.86, 0.3, 1.1], [0.61, 0.92, -0.5, 1.6]]
    )
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    color = torch.rand(1, 10, 12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos.requires_grad_(True)
    color.requires_grad_(True)
    rast = rasterize(pos.detach(), tri, (10, 12))
    out = antialias(color, rast, pos, tri)
    assert (out != color).any(-1).sum() >= 10  # enough silhouette pixels for the check to mean something
    (grad_pos,) = torch.autograd.grad(out.sum(), pos)
    assert (grad_pos[0, :, :2].abs() > 1e-3).sum() >= 6  # and unsaturated blends that move vertices

    def blend(p, c):
        return antialias(c, rasterize(p.detach(), tri, (10, 12)), p, tri)

    assert torch.autograd.gradcheck(blend, (pos, color))


@pytest.mark.parametrize("edge_x", [10.3, 10.5, 10.8, 11.0])
def test_antialias_of_a_straight_edge_is_the_pixel_coverage(edge_x):
    # A quad reaching past the image on three sides, its right edge at pixel coordinate x_right(y),
    # slightly slanted so that every row crosses it elsewhere. Along each row the antialiased mask
    # must be the box-filter coverage clip(x_right - x, 0, 1) of pixel column x.
    width, height = 24, 8

    def x_right(y):
        return edge_x + 0.02 * (y - 4)

    corners = [(-12, -12), (x_right(-12), -12), (x_right(20), 20), (-12, 20)]  # pixel coordinates
    pos = clip([[2 * x / width - 1, 2 * y / height - 1, 0.0, 1.0] for x, y in corners])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast = rasterize(pos, tri, (height, width))
    mask = (rast[..., 3:] > 0).double()
    soft = antialias(mask, rast, pos, tri)[0, :, :, 0].numpy()
    for row in range(height):
        expected = np.clip(x_right(row + 0.5) - np.arange(width), 0.0, 1.0)
        assert np.allclose(soft[row], expected, atol=1e-9)


def test_antialiased_area_and_its_gradient_match_the_true_triangle_area():
    # Silhouette gradients are right when d(sum of the antialiased mask)/d(vertices) is the derivative
    # of the triangle's true area: the hard mask has no such gradient at all.
    rng = np.random.default_rng(3)
    tri = torch.tensor([[0, 1, 2]])
    tested = 0
    while tested < 8:
        xy = torch.tensor(rng.uniform(-0.9, 0.9, (3, 2)), requires_grad=True)
        corners = xy * 32  # pixel units of a 64 x 64 image
        area = (
            (corners[1] - corners[0])[0] * (corners[2] - corners[0])[1]
            - (corners[2] - corners[0])[0] * (corners[1] - corners[0])[1]
        ).abs() / 2
        if area < 50:
            continue
        tested += 1
        pos = torch.cat([xy, torch.zeros(3, 1, dtype=xy.dtype), torch.ones(3, 1, dtype=xy.dtype)], 1)[None]
        rast = rasterize(pos, tri, (64, 64))
        soft = antialias((rast[..., 3:] > 0).double(), rast, pos, tri).sum()
        assert soft.item() == pytest.approx(area.item(), rel=0.01)
        (grad_soft,) = torch.autograd.grad(soft, xy)
        (grad_true,) = torch.autograd.grad(area, xy)
        assert (grad_soft - grad_true).norm() < 0.1 * grad_true.norm()


def test_antialias_ignores_interior_edges_and_treats_folds_as_silhouettes():
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    assert opposite_vertices(tri).tolist() == [[3, -1, -1], [-1, 0, -1]]
    # Flat: two triangles side by side; colours differ across the shared edge, which is not a silhouette.
    flat = clip([[-0.9, -0.8, 0.0, 1.0], [0.3, -0.9, 0.0, 1.0], [0.2, 0.9, 0.0, 1.0], [0.9, 0.7, 0.0, 1.0]])
    rast = rasterize(flat, tri, (20, 20))
    ids = rast[0, :, :, 3]
    color = (rast[..., 3:] == 1).double()
    out = antialias(color, rast, flat, tri)
    assert (out != color).sum() > 10  # the outer silhouette is antialiased
    padded = torch.nn.functional.pad(ids, (1, 1, 1, 1))
    away_from_background = (
        (padded[1:-1, :-2] > 0) & (padded[1:-1, 2:] > 0) & (padded[:-2, 1:-1] > 0) & (padded[2:, 1:-1] > 0)
    )
    shared = (ids == 1) & (torch.roll(ids, -1, dims=1) == 2) & away_from_background
    assert shared.sum() >= 5
    assert torch.equal(out[0][shared], color[0][shared])
    # Folded: vertex 3 swings over the shared edge to lie behind triangle 0, which then hides
    # triangle 1 completely; the shared edge is now a silhouette, exactly like a boundary edge.
    folded = clip(
        [[-0.9, -0.8, 0.0, 1.0], [0.3, -0.9, 0.0, 1.0], [0.2, 0.9, 0.0, 1.0], [-0.1, 0.0, 0.5, 1.0]]
    )
    rast = rasterize(folded, tri, (20, 20))
    single = rasterize(folded, tri[:1], (20, 20))
    assert torch.equal(rast, single)
    mask = (rast[..., 3:] > 0).double()
    soft = antialias(mask, rast, folded, tri)
    assert torch.equal(soft, antialias(mask, single, folded, tri[:1]))
    assert (soft != mask).sum() > 10


def test_opposite_vertices_on_a_closed_mesh():
    trimesh = pytest.importorskip("trimesh")
    mesh = trimesh.creation.icosphere(subdivisions=1)
    tri = torch.from_numpy(mesh.faces)
    opposite = opposite_vertices(tri)
    assert (opposite >= 0).all()
    for f in range(0, len(tri), 7):
        for i in range(3):
            edge = {int(tri[f, (i + 1) % 3]), int(tri[f, (i + 2) % 3])}
            others = [g for g in range(len(tri)) if g != f and edge <= set(tri[g].tolist())]
            assert len(others) == 1
            assert int(opposite[f, i]) == (set(tri[others[0]].tolist()) - edge).pop()
    assert (opposite_vertices(tri[:5]) == -1).any()


def test_backend_selection():
    pos = clip([[-0.9, -0.9, 0.0, 1.0], [0.9, -0.9, 0.0, 1.0], [0.0, 0.9, 0.0, 1.0]])
    tri = torch.tensor([[0, 1, 2]])
    assert torch.equal(
        rasterize(pos, tri, (8, 8), backend="auto"), rasterize(pos, tri, (8, 8), backend="torch")
    )
    with pytest.raises(ValueError, match="unknown rasterizer backend"):
        rasterize(pos, tri, (8, 8), backend="opengl")
    with pytest.raises((RuntimeError, ValueError), match="nvdiffrast"):
        rasterize(pos, tri, (8, 8), backend="nvdiffrast")


@pytest.mark.skipif(
    not torch.cuda.is_available() or raster._nvdiffrast() is None, reason="needs CUDA and nvdiffrast"
)
def test_torch_backend_matches_nvdiffrast_on_cuda():
    trimesh = pytest.importorskip("trimesh")
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.7)
    v = torch.tensor(mesh.vertices, dtype=torch.float32, device="cuda")
    tri = torch.tensor(mesh.faces, dtype=torch.int32, device="cuda")
    pos = torch.cat([v[:, :2] * 1.2 + 0.1, v[:, 2:] * 0.5, 1.5 + 0.3 * v[:, 2:]], 1)[None]
    ours = rasterize(pos, tri, (96, 96), backend="torch")
    ref = rasterize(pos, tri, (96, 96), backend="nvdiffrast")
    # nvdiffrast snaps vertices to a sub-pixel grid: a few pixel centres right on an edge may differ
    assert (ours[..., 3] == ref[..., 3]).float().mean() > 0.995
    same = (ours[..., 3] == ref[..., 3]) & (ref[..., 3] > 0)
    assert torch.allclose(ours[..., :3][same], ref[..., :3][same], atol=2e-3)
    ours_attr = interpolate(v, ref, tri, backend="torch")
    assert torch.allclose(ours_attr, interpolate(v, ref, tri, backend="nvdiffrast"), atol=1e-5)
    mask = (ref[..., 3:] > 0).float()
    a = antialias(mask, ref, pos, tri, backend="torch")
    b = antialias(mask, ref, pos, tri, backend="nvdiffrast")
    assert (a - b).abs().mean() < 1e-4 and ((a - b).abs() > 1e-3).float().mean() < 1e-3
