"""The shape stage's SDF volume: exact start, distance-like field, a render whose surface points sit on
the surface (what CFD's noise attaches to), and the one property DMTet lacks: a hole can open."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from server.geometry.dmtet import DMTet
from server.geometry.sdf_volume import SDFVolume, ball_chord, eikonal_excess
from server.geometry.tetgrid import kuhn_grid
from server.pipeline.setup import Optimisation
from server.render.cameras import orbit_c2w
from server.render.mesh import render_mesh
from server.shapes.primitives import TORUS_MAJOR, TORUS_MINOR, sdf
from server.shapes.solid import judge_solid, solid_ious

DEVICE = torch.device("cpu")


def sphere_volume(
    n: int = 16, radius: float = 0.5, levels: tuple[int, ...] = (8, 16)
) -> tuple[SDFVolume, DMTet]:
    geometry = DMTet(kuhn_grid(n), device=DEVICE)
    geometry.init_sphere(radius)
    return SDFVolume(geometry.sdf, geometry.grid.radius, levels), geometry


def cameras(views: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    c2w = torch.stack([torch.from_numpy(orbit_c2w(e, a, 2.4)).float() for e, a in views])
    return c2w, torch.full((len(views),), math.radians(40.0))


def test_untrained_volume_is_exactly_the_start_on_the_lattice():
    volume, geometry = sphere_volume()
    torch.testing.assert_close(volume.at(geometry.grid_vertices), geometry.sdf.detach(), rtol=0, atol=1e-6)


def test_field_gradient_matches_finite_differences_and_is_unit_for_a_distance():
    volume, _ = sphere_volume(n=32)
    with torch.no_grad():  # a smooth learned part, as the smoothness term keeps it
        for grid in volume.grids:
            axis = torch.linspace(-1.0, 1.0, grid.shape[-1])
            z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
            grid.copy_((0.1 * torch.sin(2 * x) * torch.cos(3 * y) + 0.05 * z * z)[None, None])
    points = torch.rand(200, 3) * 1.2 - 0.6
    points = points[points.norm(dim=-1) > 0.2]  # away from the sphere SDF's kink at the centre
    _, gradient = volume.field(points)
    h = 1e-3
    numeric = torch.stack(
        [(volume.field(points + h * e)[0] - volume.field(points - h * e)[0]) / (2 * h) for e in torch.eye(3)],
        dim=-1,
    )
    # Equal up to the grids' discretisation (interpolated central differences vs the derivative of
    # the piecewise-trilinear field): same direction, same length within a few per cent.
    cosine = torch.nn.functional.cosine_similarity(gradient, numeric, dim=-1)
    assert cosine.median() > 0.995 and cosine.min() > 0.95
    assert ((gradient.norm(dim=-1) / numeric.norm(dim=-1)) - 1).abs().median() < 0.05
    plain, _ = sphere_volume(n=32)
    _, unit = plain.field(points)
    assert (unit.norm(dim=-1) - 1).abs().max() < 0.05


def test_render_of_a_sphere_is_opaque_inside_its_silhouette_and_points_lie_on_it():
    volume, _ = sphere_volume(n=32)
    c2w, fovy = cameras([(20.0, 30.0), (45.0, -120.0)])
    light = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)
    with torch.no_grad():
        view = volume.render(c2w, fovy, 32, light, beta=0.01, samples=128)
        mesh = render_mesh(*sphere_mesh(), c2w, fovy, 32, shading="albedo")
    silhouette = mesh.mask[..., 0] > 0.5
    opacity = view.opacity[..., 0]
    mask = silhouette.float()[:, None]
    dilated = torch.nn.functional.max_pool2d(mask, 3, 1, 1)[:, 0]
    eroded = -torch.nn.functional.max_pool2d(-mask, 3, 1, 1)[:, 0]
    edge = dilated != eroded
    assert opacity[silhouette & ~edge].min() > 0.95
    assert opacity[~silhouette & ~edge].max() < 0.05  # only pixels on the silhouette's edge differ
    covered = opacity > 0.9
    radii = view.points[covered].norm(dim=-1)
    assert (radii - 0.5).abs().mean() < 0.02  # the noise attaches to points on the surface
    assert view.eikonal < 0.01
    background = view.rgb[~silhouette & (opacity < 0.01)]
    torch.testing.assert_close(background, torch.ones_like(background), atol=0.02, rtol=0)


def sphere_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    ball = trimesh.creation.icosphere(4, 0.5)
    return torch.from_numpy(ball.vertices).float(), torch.from_numpy(ball.faces).long()


def test_ball_chord_identities():
    origins = torch.tensor([[0.0, 0.0, -3.0], [0.0, 2.0, -3.0], [0.0, 0.0, 0.0]])
    dirs = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    near, far = ball_chord(origins, dirs, 1.0)
    assert (near[0], far[0]) == (pytest.approx(2.0), pytest.approx(4.0))  # through the centre
    assert far[1] == near[1]  # a miss: an empty chord
    assert (near[2], far[2]) == (0.0, pytest.approx(1.0))  # from inside: from the origin to the wall


def test_a_hole_opens_in_the_start_sphere():
    """Fit the start sphere's volume to a torus's silhouettes: the surface sweeps down through the
    sphere's centre and the isosurface becomes a torus with an open hole. DMTet, whose gradient reaches
    only SDF values on edges the surface crosses, keeps that hole closed (shape_diagnosis.md): this is
    why the shape stage exists."""
    torch.manual_seed(0)
    volume, geometry = sphere_volume(n=32)
    c2w, fovy = cameras([(90.0, 0.0), (50.0, 0.0), (50.0, 120.0), (50.0, 240.0), (15.0, 45.0)])
    light = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)
    torus = trimesh.creation.torus(TORUS_MAJOR, TORUS_MINOR)
    target = render_mesh(
        torch.from_numpy(torus.vertices).float(), torch.from_numpy(torus.faces).long(), c2w, fovy, 24
    ).mask.detach()
    optimizer = torch.optim.Adam(volume.grids.parameters(), lr=0.02)
    steps = 120
    for step in range(steps):
        beta = 0.05 * (0.4 ** (step / (steps - 1)))
        view = volume.render(c2w, fovy, 24, light, beta=beta, samples=32)
        loss = (view.opacity - target).abs().mean() + 0.1 * view.eikonal + 10.0 * volume.smoothness()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert volume.at(torch.zeros(1, 3)).item() > 0  # the centre is outside: the hole is open
    with torch.no_grad():
        geometry.sdf.copy_(volume.at(geometry.grid_vertices))
        mesh = geometry()
    vertices = mesh.vertices.numpy()
    assert judge_solid(vertices, mesh.faces.numpy())[0] == "torus"
    assert np.abs(sdf("torus", vertices)).mean() < 0.05


def test_the_eikonal_band_keeps_a_cubes_edges_that_the_exact_term_rounds_off():
    """Start from a true cube and optimise the shape stage's regularisers alone (eikonal and
    smoothness at the job's weights, on two volume renders a step from the job's orbit): with the
    exact eikonal term the trilinear field's gradient along the edges (about 0.7) is penalised and
    the cube rounds off; within the band [0.65, 1.35] its edges cost nothing and the cube stays."""
    opt = Optimisation()
    ious = {}
    for slack in (0.0, opt.eikonal_slack):
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        geometry = DMTet(kuhn_grid(32), device=DEVICE)
        with torch.no_grad():
            geometry.sdf.copy_(torch.from_numpy(sdf("cube", geometry.grid_vertices.double().numpy())).float())
        volume = SDFVolume(geometry.sdf, geometry.grid.radius, (8, 16, 32))
        optimizer = torch.optim.Adam(volume.grids.parameters(), lr=1e-2, eps=1e-15)
        steps = 100
        for step in range(steps):
            c2w, fovy = cameras([(rng.uniform(-10.0, 45.0), rng.uniform(-180.0, 180.0)) for _ in range(2)])
            light = torch.nn.functional.normalize(c2w[:, :3, 3], dim=-1)
            beta = 0.05 * (0.4 ** (step / (steps - 1)))
            view = volume.render(c2w, fovy, 16, light, beta=beta, samples=32, eikonal_slack=slack)
            loss = opt.eikonal_weight * view.eikonal + opt.volume_smoothness_weight * volume.smoothness()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            geometry.sdf.copy_(volume.at(geometry.grid_vertices))
            mesh = geometry()
        ious[slack] = solid_ious(mesh.vertices.numpy(), mesh.faces.numpy())["cube"]
    assert ious[opt.eikonal_slack] > 0.95
    assert ious[0.0] < 0.75


def test_eikonal_excess_is_zero_inside_the_band_and_the_exact_residual_without_one():
    norms = torch.tensor([0.2, 0.65, 0.7, 1.0, 1.35, 2.0])
    torch.testing.assert_close(eikonal_excess(norms, 0.0), norms - 1.0)
    torch.testing.assert_close(eikonal_excess(norms, 0.35), torch.tensor([-0.45, 0.0, 0.0, 0.0, 0.0, 0.65]))
