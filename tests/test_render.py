"""The mesh renderer against Blender's camera projection, analytic ray-sphere hits and the shading model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy import stats

from server.render.cameras import Camera, camera_rays, look_at, orbit_c2w
from server.render.mesh import lambert, render_mesh, sample_light_dirs, vertex_normals
from server.render.shading import AMBIENT, DIFFUSE, lambert_np
from server.render.shading import sample_light_dirs as sample_light_dirs_np


def sphere(subdivisions: int, radius: float, centre=(0.0, 0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    vertices = torch.tensor(mesh.vertices + np.asarray(centre), dtype=torch.float64)
    return vertices, torch.from_numpy(mesh.faces)


def cameras(*c2w: np.ndarray, fovy_deg: float = 40.0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(np.stack(c2w)), torch.full((len(c2w),), math.radians(fovy_deg), dtype=torch.float64)


def coverage_centroid(opacity: torch.Tensor) -> tuple[float, float]:
    """(column, row) of the coverage centroid in continuous pixel units, row measured from the top."""
    weights = opacity[..., 0]
    rows, cols = torch.meshgrid(torch.arange(weights.shape[0]), torch.arange(weights.shape[1]), indexing="ij")
    total = weights.sum()
    return float((weights * (cols + 0.5)).sum() / total), float((weights * (rows + 0.5)).sum() / total)


def facing_quad(centre, right, up, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A square through `centre` spanned by `right` and `up`, wound to face the viewer."""
    centre, right, up = (np.asarray(x, dtype=np.float64) for x in (centre, right, up))
    corners = [centre + half * (sx * right + sy * up) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    return torch.tensor(np.stack(corners)), torch.tensor([[0, 1, 2], [0, 2, 3]])


def landing_pixel(out, point, right, up) -> tuple[float, float]:
    """Continuous (column, row-from-top) where `point` projects, read off the rendered ray hits.

    On a quad facing the camera through `point`, the hit's offset from `point` along the camera's
    right (up) axis is linear in the pixel column (row); its zero crossing is the projection of `point`.
    """
    covered = out.mask[0, ..., 0] > 0
    rows, cols = torch.nonzero(covered, as_tuple=True)
    offset = out.points[0][covered] - torch.as_tensor(np.asarray(point, dtype=np.float64))
    landing = []
    for index, axis in ((cols, right), (rows, up)):
        along = offset @ torch.as_tensor(np.asarray(axis, dtype=np.float64))
        slope, intercept = np.polyfit(index.numpy() + 0.5, along.numpy(), 1)
        landing.append(-intercept / slope)
    return landing[0], landing[1]


def test_a_point_lands_where_the_analytic_blender_camera_puts_it():
    # Camera at (0, -5, 0) looking at the origin: +X is right, +Z up, the point is 5 units ahead.
    size, fovy, point = 64, math.radians(40.0), (0.5, 0.0, 0.5)
    ndc = 0.5 / (5.0 * math.tan(fovy / 2))
    expected_col, expected_row = (ndc + 1) / 2 * size, (1 - ndc) / 2 * size  # 40.79, 23.21
    vertices, faces = facing_quad(point, (1, 0, 0), (0, 0, 1), 0.1)
    out = render_mesh(vertices, faces, *cameras(look_at((0.0, -5.0, 0.0))), size, shading="albedo")
    col, row = landing_pixel(out, point, (1, 0, 0), (0, 0, 1))
    assert col == pytest.approx(expected_col, abs=1e-6) and row == pytest.approx(expected_row, abs=1e-6)
    assert out.mask[0, 23, 40, 0] == 1 and out.mask[0, 32, 32, 0] == 0  # right of and above centre
    pixel = 2 * 5.0 * math.tan(fovy / 2) / size  # world size of one pixel at the quad
    hit = out.points[0, 23, 40].numpy()
    assert np.allclose(hit, [0.5 + (40.5 - expected_col) * pixel, 0.0, 0.5 - (23.5 - expected_row) * pixel])


def test_projection_matches_blender_world_to_camera_view():
    bpy = pytest.importorskip("bpy")
    from bpy_extras.object_utils import world_to_camera_view
    from mathutils import Matrix, Vector

    size, fovy = 64, math.radians(35.0)
    scene = bpy.context.scene
    scene.render.resolution_x = scene.render.resolution_y = size
    camera_data = bpy.data.cameras.new("probe")
    camera_data.sensor_fit = "VERTICAL"
    camera_data.angle_y = fovy
    camera = bpy.data.objects.new("probe", camera_data)
    scene.collection.objects.link(camera)
    try:
        views = (
            (orbit_c2w(30.0, 60.0, 3.0), (0.3, -0.2, 0.4)),
            (orbit_c2w(-10.0, 200.0, 2.5), (-0.4, 0.1, -0.3)),
        )
        for c2w, point in views:
            camera.matrix_world = Matrix(c2w.tolist())
            bpy.context.view_layer.update()
            x, y, _ = world_to_camera_view(scene, camera, Vector(point))  # (0, 0) = bottom left
            right, up = c2w[:3, 0], c2w[:3, 1]
            vertices, faces = facing_quad(point, right, up, 0.1)
            out = render_mesh(vertices, faces, *cameras(c2w, fovy_deg=35.0), size, shading="albedo")
            col, row = landing_pixel(out, point, right, up)
            assert col == pytest.approx(x * size, abs=1e-4) and row == pytest.approx((1 - y) * size, abs=1e-4)
    finally:
        bpy.data.objects.remove(camera)
        bpy.data.cameras.remove(camera_data)


def test_points_and_depth_are_the_analytic_ray_sphere_hits():
    radius, size = 0.8, 64
    vertices, faces = sphere(5, radius)  # 20480 faces
    corners = vertices[faces].numpy()
    facet_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    facet_normals /= np.linalg.norm(facet_normals, axis=-1, keepdims=True)
    max_sagitta = radius - np.abs((facet_normals * corners[:, 0]).sum(-1)).min()
    assert max_sagitta < 3e-4
    c2w, fovy = cameras(orbit_c2w(20.0, 30.0, 2.5), orbit_c2w(-30.0, 250.0, 2.2))
    out = render_mesh(vertices, faces, c2w, fovy, size, shading="albedo")
    flat = render_mesh(vertices, faces, c2w, fovy, size, shading="albedo", normals="face")
    for b in range(2):
        origins, dirs = camera_rays(Camera(c2w[b].numpy(), float(fovy[b])), size, size)
        half_b = (origins * dirs).sum(-1)
        disc = half_b**2 - ((origins**2).sum(-1) - radius**2)
        t = -half_b - np.sqrt(np.maximum(disc, 0.0))
        analytic = origins + t[..., None] * dirs
        cosine = np.sqrt(np.maximum(disc, 0.0)) / radius  # |cos| of the incidence angle
        mask = out.mask[b, ..., 0].numpy() > 0
        # coverage: same as the true sphere except within tessellation distance of its silhouette
        miss_distance = np.sqrt(np.maximum((origins**2).sum(-1) - half_b**2, 0.0)) - radius
        assert np.array_equal(
            mask[np.abs(miss_distance) > 2e-3], (miss_distance < 0)[np.abs(miss_distance) > 2e-3]
        )
        steep = mask & (cosine > 0.2)
        assert steep.sum() > 1000
        points = out.points[b].numpy()
        assert np.abs(points - analytic)[steep].max() < 1e-3
        # every hit lies on a facet: inside the sphere by at most the deepest facet's sagitta
        deficit = radius - np.linalg.norm(points[mask], axis=-1)
        assert deficit.min() > -1e-9 and deficit.max() < max_sagitta + 1e-9
        depth = out.depth[b, ..., 0].numpy()
        assert np.allclose(depth[mask], np.linalg.norm(points - origins, axis=-1)[mask], atol=1e-9)
        assert np.allclose(points[mask], (origins + depth[..., None] * dirs)[mask], atol=1e-9)
        assert np.all(depth[~mask] == 0) and np.all(points[~mask] == 0)
        # vertex normals of a sphere point radially; flat facet normals within a facet's angle of it
        radial = analytic / radius
        assert np.abs(out.normal[b].numpy() - radial)[steep].max() < 2e-2
        assert ((flat.normal[b].numpy() * radial).sum(-1)[steep]).min() > math.cos(0.03)


def test_a_floor_reaching_behind_the_camera_is_drawn_where_the_rays_hit_it():
    # Two corners of the quad lie behind the camera (w < 0): homogeneous rasterization must still draw
    # exactly the pixels whose rays meet the quad in front of the camera, at the right points.
    c2w = orbit_c2w(30.0, 0.0, 2.5)
    vertices = torch.tensor(
        [[-3.0, -3.0, 0.0], [3.0, -3.0, 0.0], [3.0, 3.0, 0.0], [-3.0, 3.0, 0.0]], dtype=torch.float64
    )
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    assert ((vertices.numpy() - c2w[:3, 3]) @ -c2w[:3, 2] < 0).sum() == 2
    out = render_mesh(vertices, faces, *cameras(c2w), 64, shading="albedo")
    origins, dirs = camera_rays(Camera(c2w, math.radians(40.0)), 64, 64)
    t = -origins[..., 2] / np.where(dirs[..., 2] < 0, dirs[..., 2], -1e-30)
    hits = origins + t[..., None] * dirs
    border = np.abs(np.abs(hits[..., :2]).max(-1) - 3.0)
    expected = (dirs[..., 2] < 0) & (np.abs(hits[..., :2]).max(-1) < 3.0)
    mask = out.mask[0, ..., 0].numpy() > 0
    clear = (dirs[..., 2] >= 0) | (border > 0.3)
    assert expected.sum() > 1000 and (~expected & clear).sum() > 300
    assert np.array_equal(mask[clear], expected[clear])
    assert np.allclose(out.points[0].numpy()[mask], hits[mask], atol=1e-9)


def test_depth_gradient_follows_the_ray_geometry():
    # Pushing a camera-facing quad back by s along the view axis lengthens the ray to pixel p by
    # s / cos(angle between p's ray and the axis): d depth_p / ds = 1 / (d_p . forward).
    c2w = orbit_c2w(20.0, 40.0, 3.0)
    forward, right, up = -c2w[:3, 2], c2w[:3, 0], c2w[:3, 1]
    vertices, faces = facing_quad(0.2 * right, right, up, 0.6)
    step = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    out = render_mesh(vertices + step * torch.from_numpy(forward), faces, *cameras(c2w), 32, shading="albedo")
    covered = out.mask[0, ..., 0] > 0
    (grad,) = torch.autograd.grad(out.depth[0, ..., 0][covered].sum(), step)
    _, dirs = camera_rays(Camera(c2w, math.radians(40.0)), 32, 32)
    assert covered.sum() > 200
    assert grad.item() == pytest.approx((1.0 / (dirs @ forward))[covered.numpy()].sum(), rel=1e-9)


def test_shading_modes_and_background():
    vertices, faces = sphere(3, 0.6)
    c2w, fovy = cameras(orbit_c2w(15.0, 45.0, 2.5), orbit_c2w(50.0, -100.0, 2.8))

    def color_fn(p):
        return (p + 1.0) / 2.0

    light = torch.tensor([[0.2, 0.3, 0.93], [0.8, -0.6, 0.1]], dtype=torch.float64)
    background = (0.1, 0.2, 0.3)
    common = dict(color_fn=color_fn, light_dir=light, background=background)
    albedo = render_mesh(vertices, faces, c2w, fovy, 48, shading="albedo", **common)
    lit = render_mesh(vertices, faces, c2w, fovy, 48, shading="lambertian", **common)
    plain = render_mesh(vertices, faces, c2w, fovy, 48, shading="textureless", **common)
    normal = render_mesh(vertices, faces, c2w, fovy, 48, shading="normal", **common)

    solid = (lit.opacity[..., 0] == 1) & (lit.mask[..., 0] == 1)  # away from silhouettes
    empty = lit.opacity[..., 0] == 0
    assert solid.sum() > 500 and empty.sum() > 500
    expected_albedo = color_fn(lit.points)
    assert torch.allclose(lit.albedo[solid], expected_albedo[solid])
    assert torch.allclose(albedo.rgb[solid], expected_albedo[solid])
    unit_light = light / light.norm(dim=-1, keepdim=True)
    shaded = lambert_np(expected_albedo.numpy(), lit.normal.numpy(), unit_light.numpy()[:, None, None, :])
    assert np.allclose(lit.rgb[solid].numpy(), shaded[solid.numpy()])
    assert torch.allclose(
        plain.rgb[solid], lambert(torch.ones(3), lit.normal, unit_light[:, None, None])[solid]
    )
    assert torch.allclose(normal.rgb[solid], ((lit.normal + 1) / 2)[solid])
    for render in (albedo, lit, plain, normal):
        assert torch.allclose(render.rgb[empty], torch.tensor(background, dtype=torch.float64))
        assert torch.equal(render.opacity, lit.opacity)
    assert albedo.light_dir is None and torch.allclose(lit.light_dir, unit_light)


def test_background_function_receives_the_view_directions():
    vertices, faces = sphere(2, 0.5)
    c2w, fovy = cameras(orbit_c2w(10.0, 20.0, 2.5))
    out = render_mesh(vertices, faces, c2w, fovy, 32, background=lambda d: (d + 1) / 2, shading="textureless")
    _, dirs = camera_rays(Camera(c2w[0].numpy(), float(fovy[0])), 32, 32)
    empty = out.opacity[0, ..., 0] == 0
    assert empty.sum() > 300
    assert np.allclose(out.rgb[0][empty].numpy(), (dirs[empty.numpy()] + 1) / 2)


def test_lambert_is_the_shared_shading_model():
    rng = np.random.default_rng(0)
    albedo = rng.uniform(0, 1, (50, 3))
    normal = rng.normal(size=(50, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    light = np.array([0.0, 0.6, 0.8])
    ours = lambert(torch.from_numpy(albedo), torch.from_numpy(normal), torch.from_numpy(light)).numpy()
    assert np.allclose(ours, lambert_np(albedo, normal, light))
    facing = lambert(torch.ones(3), torch.tensor([0.0, 0.6, 0.8]), torch.tensor([0.0, 0.6, 0.8]))
    assert torch.allclose(facing, torch.full((3,), AMBIENT + DIFFUSE))


def test_light_directions_follow_the_shapes_prior_training_distribution():
    # The optimiser must light its renders like the prior's training images (server.render.shading).
    position = np.array([2.5, 0.3, 0.9])
    ours = sample_light_dirs(torch.tensor(position).expand(3000, 3), torch.Generator().manual_seed(0)).numpy()
    theirs = sample_light_dirs_np(np.random.default_rng(0), np.broadcast_to(position, (3000, 3)))
    assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0)
    towards = position / np.linalg.norm(position)
    for axis in (towards, np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])):
        assert stats.ks_2samp(ours @ axis, theirs @ axis).pvalue > 0.01
    assert np.array_equal(
        ours,
        sample_light_dirs(torch.tensor(position).expand(3000, 3), torch.Generator().manual_seed(0)).numpy(),
    )


def test_vertex_normals_of_a_sphere_point_outwards():
    vertices, faces = sphere(3, 0.7)
    normals = vertex_normals(vertices, faces)
    assert torch.allclose(normals, vertices / 0.7, atol=2e-2)
    assert torch.allclose(normals.norm(dim=-1), torch.ones(len(normals), dtype=torch.float64))


def test_a_batch_renders_like_single_views():
    vertices, faces = sphere(2, 0.6)
    c2w, fovy = cameras(orbit_c2w(15.0, 45.0, 2.5), orbit_c2w(50.0, -100.0, 2.8))
    light = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    both = render_mesh(vertices, faces, c2w, fovy, 32, light_dir=light)
    for b in range(2):
        one = render_mesh(vertices, faces, c2w[b : b + 1], fovy[b : b + 1], 32, light_dir=light[b : b + 1])
        for field in ("rgb", "opacity", "points", "depth", "normal"):
            assert torch.allclose(getattr(both, field)[b], getattr(one, field)[0])


def test_silhouettes_alone_recover_a_translation():
    vertices, faces = sphere(2, 0.45)
    vertices = vertices.float()
    c2w, fovy = cameras(orbit_c2w(0.0, 0.0, 3.0), orbit_c2w(0.0, 90.0, 3.0), orbit_c2w(70.0, 30.0, 3.0))
    c2w, fovy = c2w.float(), fovy.float()
    target_shift = torch.tensor([0.12, -0.09, 0.07])
    with torch.no_grad():
        target = render_mesh(vertices + target_shift, faces, c2w, fovy, 48, shading="albedo").opacity
    shift = torch.zeros(3, requires_grad=True)
    optimiser = torch.optim.Adam([shift], lr=0.01)
    start_error = (shift - target_shift).norm().item()
    for _ in range(60):
        optimiser.zero_grad()
        opacity = render_mesh(vertices + shift, faces, c2w, fovy, 48, shading="albedo").opacity
        loss = (opacity - target).square().mean()
        loss.backward()
        optimiser.step()
    assert (shift - target_shift).norm().item() < start_error / 10


def test_the_renderers_projections_and_rays_are_the_cameras_own_built_on_the_device():
    """`perspective_matrices` and `pixel_rays` build on the cameras' device what `cameras.perspective` and
    `cameras.camera_rays` build in numpy for Blender (so no camera is read back mid-step): the same
    numbers for sampled rig cameras and a non-square image, to the last bit for the projections and
    for the float32 rays a job uses (float64 rays differ only in their last bits: another summation
    order)."""
    from server.render.cameras import OrbitRig, perspective
    from server.render.mesh import perspective_matrices, pixel_rays

    sampled = OrbitRig().sample(np.random.default_rng(7), 5)
    c2w = torch.tensor(np.stack([camera.c2w for camera in sampled]), dtype=torch.float32)
    fovy = torch.tensor([camera.fovy for camera in sampled], dtype=torch.float32)
    matrices = perspective_matrices(fovy, 1.5, 0.1, 100.0)
    rays, rays64 = pixel_rays(c2w, fovy, 24, 36), pixel_rays(c2w.double(), fovy.double(), 24, 36)
    assert rays.dtype == torch.float32 and rays.shape == (5, 24, 36, 3)
    for b in range(len(sampled)):
        camera = Camera(c2w[b].double().numpy(), float(fovy[b]))  # the float32 camera, as numpy sees it
        assert np.array_equal(matrices[b].numpy(), perspective(camera.fovy, 1.5, 0.1, 100.0))
        expected = camera_rays(camera, 24, 36)[1]
        assert np.array_equal(rays[b].numpy(), expected.astype(np.float32))
        np.testing.assert_allclose(rays64[b].numpy(), expected, rtol=0, atol=1e-15)
