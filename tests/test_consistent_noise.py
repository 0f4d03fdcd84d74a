"""CFD's consistent noise, FSD's world-map noise and plain fixed noise on ray-traced spheres and boxes.

Every property is checked together with a negative control showing that the same test fails for the
mistake it guards against: averaged (not summed / sqrt(count)) noise, resampled noise (fresh, or
bilinearly interpolated from a texture) and screen-space noise.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from bench.noise import correlation_at_corresponding_points, iid_statistics
from server.noise.base import FixedNoise, FreshNoise, NoiseQuery
from server.noise.consistent import ConsistentNoise, HashedWhiteNoise, hash64, splitmix64
from server.noise.worldmap import WorldMapNoise
from server.render.cameras import OrbitRig
from server.testing.analytic_geometry import (
    Box,
    Sphere,
    orbit_camera,
    render_query,
    rotation_z,
    surface_samples,
)

torch.set_num_threads(1)
CPU = torch.device("cpu")
SPHERE = Sphere(radius=0.6)
BOX = Box(half_extents=(0.5, 0.35, 0.45), rotation=rotation_z(25.0))
SCENE = [Sphere((0.1, -0.1, 0.0), 0.55), Box((0.5, 0.3, 0.1), (0.25, 0.2, 0.3), rotation_z(-30.0))]
SHAPES = {"sphere": [SPHERE], "box": [BOX], "sphere and box": SCENE}


def rig_cameras(n: int, seed: int) -> list:
    return OrbitRig().sample(np.random.default_rng(seed), n)


def covered_latents(query: NoiseQuery) -> torch.Tensor:
    """[B, h, w]: latent pixels whose whole render block lies on the object."""
    (h, w), (b, height, width) = query.latent_hw, query.opacity.shape[:3]
    blocks = query.opacity[..., 0].reshape(b, h, height // h, w, width // w)
    return blocks.amin(dim=(2, 4)) > 0.5


def pooled_cfd_noise(shape_names, cameras, seeds, size=128, latent=32):
    """CFD noise of many views and seeds, [N, C, h, w], with the pixels that integrate cells [N, h, w]."""
    noises, masks = [], []
    for name in shape_names:
        query = render_query(SHAPES[name], cameras, size, latent)
        for seed in seeds:
            noise, counts = ConsistentNoise(seed, CPU).sample_with_counts(query)
            noises.append(noise)
            masks.append(counts > 0)
    return torch.cat(noises), torch.cat(masks)


# --- the lattice noise itself ------------------------------------------------------------------------


def test_hash_is_splitmix64_bit_for_bit():
    values = [0, 1, 12345, 2**31, 2**62 + 987654321, -1, -(2**63)]
    got = hash64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g % 2**64 for g in got] == [splitmix64(v) for v in values]


def test_lattice_cells_are_iid_normal_and_reinjection_is_a_variance_preserving_time_change():
    cells = torch.arange(100_000, dtype=torch.int64) * 7919 - 300_000
    texture = HashedWhiteNoise(seed=3)
    first = texture.values(cells, 4).double().numpy()
    assert stats_ks(first) > 0.01
    assert abs(np.corrcoef(first[:, 0], first[:, 1])[0, 1]) < 0.02
    assert abs(np.corrcoef(first[:-1, 0], first[1:, 0])[0, 1]) < 0.02  # neighbouring cell ids
    texture.reinject(0.75)  # correlation with the previous step: sqrt(1 - 0.75) = 0.5
    second = texture.values(cells, 4).double().numpy()
    assert stats_ks(second) > 0.01
    assert np.corrcoef(first.ravel(), second.ravel())[0, 1] == pytest.approx(0.5, abs=0.01)
    # one Cauchy phase turns every channel of a cell: the channels stay independent, within a step and
    # across steps
    for a, b in ((second[:, 0], second[:, 1]), (second[:, 2], second[:, 3]), (first[:, 0], second[:, 1])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    assert abs(np.corrcoef(second[:, 0] ** 2, second[:, 1] ** 2)[0, 1]) < 0.02  # not just uncorrelated
    texture.reinject(0.36)  # and 0.5 * 0.8 over both steps
    third = texture.values(cells, 4).double().numpy()
    assert stats_ks(third) > 0.01
    assert np.corrcoef(first.ravel(), third.ravel())[0, 1] == pytest.approx(0.4, abs=0.01)
    texture.reinject(1.0)
    assert abs(np.corrcoef(first.ravel(), texture.values(cells, 4).double().numpy().ravel())[0, 1]) < 0.01
    with pytest.raises(ValueError, match="gamma"):
        texture.reinject(1.5)


def stats_ks(values: np.ndarray) -> float:
    return float(stats.kstest(np.ravel(values), "norm").pvalue)


# --- within one view ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHAPES)
def test_every_cell_has_one_owner_and_no_pixel_on_the_object_falls_back(name):
    provider = ConsistentNoise(0, CPU)
    cameras = [*rig_cameras(6, 1), orbit_camera(85.0, 10.0), orbit_camera(-30.0, 200.0, radius=1.9)]
    query = render_query(SHAPES[name], cameras, 256, 32)
    covered = covered_latents(query)
    batch = provider.footprints(query.points, query.opacity, query.latent_hw)  # all views in one pass
    for v in range(len(cameras)):
        mine = batch.view == v
        cells, pixel, foreground = batch.cells[mine], batch.pixel[mine], batch.foreground[v]
        alone = provider.footprints(query.points[v : v + 1], query.opacity[v : v + 1], query.latent_hw)
        assert torch.equal(torch.sort(alone.cells).values, torch.sort(cells).values), "views interfere"
        assert len(torch.unique(cells)) == len(cells), "a cell is owned by two latent pixels"
        counts = torch.bincount(pixel, minlength=32 * 32).reshape(32, 32)
        assert covered[v].sum() > 20
        assert torch.all(foreground[covered[v]])
        assert torch.all(counts[foreground] > 0), "a foreground latent pixel integrates no cell"
        assert not torch.any(counts[~foreground])
        assert counts[covered[v]].float().mean() > 20


def test_a_plate_through_the_centre_falls_back_nowhere_though_its_radial_charts_are_degenerate():
    plate = [Box(half_extents=(0.7, 0.6, 0.02), rotation=rotation_z(10.0))]
    cameras = [orbit_camera(85.0, 10.0), orbit_camera(-30.0, 200.0, radius=1.9), orbit_camera(40.0, 70.0)]
    query = render_query(plate, cameras, 256, 32)
    provider = ConsistentNoise(0, CPU)
    for v in range(len(cameras)):
        foot = provider.footprints(query.points[v : v + 1], query.opacity[v : v + 1], query.latent_hw)
        counts = torch.bincount(foot.pixel, minlength=32 * 32)[foot.foreground[0].ravel()]
        radial = foot.pixel[(foot.cells & 15) < 6]  # the cube-map charts: the reference's kind
        radial_counts = torch.bincount(radial, minlength=32 * 32)[foot.foreground[0].ravel()]
        assert (radial_counts == 0).sum() > 0.1 * len(counts)  # direction charts alone would fall back here
        assert torch.all(counts > 0)


def test_within_a_view_foreground_noise_is_iid_standard_normal():
    noise, masks = pooled_cfd_noise(SHAPES, rig_cameras(4, 2), range(3))
    result = iid_statistics(noise, masks)
    assert result["samples"] > 40_000
    assert result["ks_pvalue"] > 0.01
    assert abs(result["neighbor_corr"]) < 0.02 and result["neighbor_pvalue"] > 1e-3
    assert abs(result["far_corr"]) < 0.02 and result["far_pvalue"] > 1e-3
    assert abs(result["channel_corr"]) < 0.03


def test_the_iid_test_rejects_averaged_and_bilinearly_resampled_noise():
    # One view per seed: views of one lattice share cells, and pooling them would make KS
    # anti-conservative (their samples are correlated), so each sample here is independent.
    sums, counts = [], []
    for name in ("sphere", "box"):
        for seed, camera in enumerate(rig_cameras(4, 2)):
            total, count = ConsistentNoise(seed, CPU).integrate(render_query(SHAPES[name], [camera], 128, 32))
            sums.append(total)
            counts.append(count)
    sums, counts = torch.cat(sums), torch.cat(counts)
    averaged = sums / counts.clamp_min(1)[:, None]  # the mistake: the footprint's mean, as for colours
    assert iid_statistics(averaged, counts > 0)["ks_pvalue"] < 1e-6
    summed = sums / counts.clamp_min(1).sqrt()[:, None]  # the same footprints, summed / sqrt(count)
    assert iid_statistics(summed, counts > 0)["ks_pvalue"] > 0.01
    resampled, fg = [], []
    for name in ("sphere", "box"):
        query = render_query(SHAPES[name], rig_cameras(2, 2), 128, 32)
        for seed in range(2):
            noise, mask = bilinear_texture_noise(query, seed)
            resampled.append(noise)
            fg.append(mask)
    result = iid_statistics(torch.cat(resampled), torch.cat(fg))
    assert result["ks_pvalue"] < 1e-6
    assert result["neighbor_corr"] > 0.1 and result["neighbor_pvalue"] < 1e-6


def bilinear_texture_noise(query: NoiseQuery, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mistake: look a fixed N(0, 1) direction texture up bilinearly at each pixel's surface point."""
    texture = torch.randn((1, query.channels, 48, 96), generator=torch.Generator().manual_seed(seed))
    h, w = query.latent_hw
    mask = F.adaptive_avg_pool2d(query.opacity.permute(0, 3, 1, 2), (h, w))
    mean = F.adaptive_avg_pool2d((query.points * query.opacity).permute(0, 3, 1, 2), (h, w)) / mask.clamp_min(
        1e-6
    )
    x, y, z = mean.unbind(dim=1)
    grid = torch.stack(
        [torch.atan2(y, x) / math.pi, torch.atan2(z, torch.hypot(x, y)) / (math.pi / 2)], dim=-1
    )
    noise = F.grid_sample(texture.expand(len(grid), -1, -1, -1), grid, mode="bilinear", align_corners=False)
    return noise, mask[:, 0] > 0.99


# --- determinism and smoothness ----------------------------------------------------------------------


def test_same_geometry_and_camera_give_identical_noise():
    cameras = rig_cameras(3, 4)
    query = render_query([BOX], cameras, 128, 32)
    first = ConsistentNoise(7, CPU).sample(query)
    assert torch.equal(first, ConsistentNoise(7, CPU).sample(query))
    alone = ConsistentNoise(7, CPU).sample(render_query([BOX], cameras[1:2], 128, 32))
    assert torch.equal(first[1:2], alone), "a view's noise must not depend on the rest of its batch"
    other = ConsistentNoise(8, CPU).sample(query)
    assert abs(np.corrcoef(first.ravel(), other.ravel())[0, 1]) < 0.05
    fresh = FreshNoise(7, CPU)  # negative control: resampled noise is not a function of the geometry
    assert abs(np.corrcoef(fresh.sample(query).ravel(), fresh.sample(query).ravel())[0, 1]) < 0.05


def test_background_is_a_fixed_screen_noise_shared_by_views_or_fresh():
    query = render_query([SPHERE], rig_cameras(2, 5), 128, 32)
    fixed = ConsistentNoise(1, CPU, background="fixed")
    first, counts = fixed.sample_with_counts(query)
    covered = counts > 0
    assert torch.equal(first, fixed.sample(query))
    both_bg = ~covered[0] & ~covered[1]
    assert torch.equal(first[0][:, both_bg], first[1][:, both_bg])
    fresh = ConsistentNoise(1, CPU, background="fresh")
    a, b = (noise.permute(1, 0, 2, 3) for noise in (fresh.sample(query), fresh.sample(query)))
    assert torch.equal(a[:, covered], b[:, covered])
    assert torch.equal(a[:, covered], first.permute(1, 0, 2, 3)[:, covered])
    assert abs(np.corrcoef(a[:, ~covered].ravel(), b[:, ~covered].ravel())[0, 1]) < 0.1


def test_a_small_change_of_geometry_changes_the_noise_only_a_little():
    cameras = [orbit_camera(20.0, 30.0), orbit_camera(5.0, 150.0)]
    base = render_query([SPHERE], cameras, 128, 32)
    correlations = []
    for delta in (0.001, 0.004, 0.016, 0.064):
        moved = render_query([Sphere(radius=SPHERE.radius + delta)], cameras, 128, 32)
        xs, ys = [], []
        for seed in range(3):
            provider = ConsistentNoise(seed, CPU)
            both = covered_latents(base) & covered_latents(moved)
            xs.append(provider.sample(base).permute(1, 0, 2, 3)[:, both])
            ys.append(provider.sample(moved).permute(1, 0, 2, 3)[:, both])
        correlations.append(np.corrcoef(torch.cat(xs).ravel(), torch.cat(ys).ravel())[0, 1])
    assert correlations[0] > 0.95
    assert all(a > b for a, b in itertools.pairwise(correlations)), correlations
    assert correlations[-1] < 0.8
    fresh = FreshNoise(0, CPU)  # negative control: resampling makes any change a total change
    assert abs(np.corrcoef(fresh.sample(base).ravel(), fresh.sample(base).ravel())[0, 1]) < 0.05


# --- across views ------------------------------------------------------------------------------------


def providers() -> dict:
    return {
        "cfd": lambda seed: ConsistentNoise(seed, CPU),
        "fsd": lambda seed: WorldMapNoise(seed, CPU),
        "plain": lambda seed: FixedNoise(seed, CPU),
        "fresh": lambda seed: FreshNoise(seed, CPU),
    }


def test_the_same_surface_patch_gets_the_same_noise_across_views():
    samples = surface_samples(SPHERE, 200_000)
    base = orbit_camera(15.0, 0.0)
    same = ConsistentNoise(0, CPU).sample(render_query([SPHERE], [base, base], 128, 32))
    assert torch.equal(same[0], same[1])
    measured, ideals = [], []
    for angle in (1.0, 5.0, 10.0, 30.0, 60.0):
        cameras = (base, orbit_camera(15.0, angle))
        value, ideal = correlation_at_corresponding_points(
            providers()["cfd"], [SPHERE], cameras, 128, 32, samples, range(4), CPU
        )
        measured.append(value)
        ideals.append(ideal)
        # integral noise attached to the surface: what the two views' footprints share, and nothing less
        assert value > 0.9 * ideal and ideal > 0.3, (angle, value, ideal)
    assert all(b < a + 0.02 for a, b in itertools.pairwise(measured)), measured


@pytest.mark.parametrize("move", ["orbit 30 degrees", "dolly in"])
def test_world_map_plain_and_fresh_noise_do_not_stick_to_the_surface(move):
    samples = surface_samples(SPHERE, 200_000)
    base = orbit_camera(15.0, 0.0)
    other = orbit_camera(15.0, 30.0) if move.startswith("orbit") else orbit_camera(15.0, 0.0, radius=1.9)
    result = {
        name: correlation_at_corresponding_points(
            make, [SPHERE], (base, other), 128, 32, samples, range(4), CPU
        )
        for name, make in providers().items()
    }
    ideal = result["cfd"][1]
    assert result["cfd"][0] > 0.9 * ideal
    for name in ("fsd", "plain", "fresh"):
        assert result[name][0] < 0.35 * ideal, (name, result[name][0], ideal)


# --- FSD's world map ---------------------------------------------------------------------------------


def test_world_map_window_moves_one_latent_pixel_per_window_fraction_of_a_turn():
    provider = WorldMapNoise(0, CPU, window_deg=180.0)
    step = 180.0 / 32  # degrees per latent pixel at 32 x 32 with a 180 degree window

    def noise(elevation, azimuth):
        camera = orbit_camera(elevation, azimuth)
        c2w = torch.as_tensor(camera.c2w[None], dtype=torch.float32)
        return provider.sample(NoiseQuery(latent_hw=(32, 32), channels=4, c2w=c2w))[0]

    start = noise(1.0, 1.0)
    assert torch.equal(noise(1.0, 1.0 + step)[:, :, :-1], start[:, :, 1:])  # turn right: the map moves left
    assert torch.equal(noise(1.0 + step, 1.0)[:, 1:, :], start[:, :-1, :])  # look from higher: it moves down
    assert torch.equal(noise(1.0, 1.0 + 360.0), start)
    assert torch.equal(noise(1.0, -step / 2)[:, :, 1:], noise(1.0, step / 2)[:, :, :-1])  # wraps in azimuth
    assert torch.equal(noise(-step / 2, 1.0)[:, :-1, :], noise(step / 2, 1.0)[:, 1:, :])  # and in elevation


def test_world_map_noise_is_iid_with_fsd_background_rule():
    cameras = rig_cameras(6, 6)
    noises, masks = [], []
    for name in ("sphere", "box"):
        query = render_query(SHAPES[name], cameras, 128, 32)
        pooled = F.avg_pool2d(query.opacity.permute(0, 3, 1, 2), 4)[:, 0]
        for seed in range(4):
            provider = WorldMapNoise(seed, CPU)
            noise = provider.sample(query)
            background = pooled < 0.5
            assert torch.equal(
                noise[0][:, background[0] & background[1]], noise[1][:, background[0] & background[1]]
            )
            noises.append(noise)
            masks.append(~background)
    result = iid_statistics(torch.cat(noises), torch.cat(masks))
    assert result["ks_pvalue"] > 0.01 and abs(result["neighbor_corr"]) < 0.03


# --- SDE re-injection --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cfd", "fsd"])
def test_reinjection_keeps_noise_standard_normal_with_the_sde_correlation(kind):
    query = render_query([SPHERE], rig_cameras(4, 7), 128, 32)
    results = []
    for seed in range(3):
        provider = providers()[kind](seed)
        before = provider.sample(query)
        provider.reinject(0.0)
        assert torch.equal(provider.sample(query), before)
        provider.reinject(0.36)
        once = provider.sample(query)
        provider.reinject(0.36)
        results.append((before, once, provider.sample(query)))
    before, once, twice = (torch.cat(parts) for parts in zip(*results, strict=True))
    assert np.corrcoef(before.ravel(), once.ravel())[0, 1] == pytest.approx(0.8, abs=0.03)
    assert np.corrcoef(before.ravel(), twice.ravel())[0, 1] == pytest.approx(0.64, abs=0.03)
    # one view per seed: views of one seed share the background (and, for FSD, overlapping map windows)
    twice, before = twice[:: len(query.c2w)], before[:: len(query.c2w)]
    everything = torch.ones(twice.shape[0], *twice.shape[2:], dtype=torch.bool)
    stats_twice = iid_statistics(twice, everything)
    assert stats_twice["ks_pvalue"] > 0.01 and abs(stats_twice["neighbor_corr"]) < 0.03
    naive = 0.64 * before + 0.36 * torch.randn(before.shape, generator=torch.Generator().manual_seed(0))
    assert iid_statistics(naive, everything)["ks_pvalue"] < 1e-6  # the test catches a variance-losing mix


def test_bad_inputs_are_refused():
    query = render_query([SPHERE], rig_cameras(1, 8), 100, 32)
    with pytest.raises(ValueError, match="integer multiple"):
        ConsistentNoise(0, CPU).sample(query)
    with pytest.raises(ValueError, match="integer multiple"):
        WorldMapNoise(0, CPU).sample(query)
    with pytest.raises(ValueError, match="surface points"):
        ConsistentNoise(0, CPU).sample(NoiseQuery(latent_hw=(32, 32), channels=4, c2w=query.c2w))
    with pytest.raises(ValueError, match="background"):
        ConsistentNoise(0, CPU, background="zeros")
    with pytest.raises(ValueError, match="window_deg"):
        WorldMapNoise(0, CPU, window_deg=70.0)
