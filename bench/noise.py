"""Noise providers on ray-traced spheres and boxes: cost, within-view statistics, cross-view consistency.

`python -m server.bench noise [--json]` prints, for CFD's consistent noise (`server.noise.consistent`):
ms per view at 32x32 latents (256^2 renders) and 64x64 latents (512^2 renders), the peak extra memory
of one 64x64 view, the within-view statistics (KS p-value against N(0, 1), neighbour and long-range
correlation of foreground latent pixels, pooled over seeds and views), and the correlation of the
noise at corresponding surface points of a sphere between two cameras an azimuth angle apart, next to
the ideal for that pair of latent grids (the footprint overlap |A cap B| / sqrt(|A| |B|) that perfectly
surface-attached integral noise would give: the latent grids of two views are not aligned on the
surface, so even ideal noise is far from 1 after a sub-pixel shift), FSD's world-map noise and plain
fixed noise. With --json the last line is one JSON object.

`python -m server.bench noise --png out.png` draws a sphere and a box from four views 10 degrees apart
in azimuth with the noise on the object: CFD's raw noise (channel 0), then CFD's and FSD's noise
low-passed over a few latent pixels (the part integral noise keeps whatever the latent grid), each
next to its first view's low-passed noise painted on the surface and carried into the other views.
CFD's rows match their carried rows (the noise sticks to the surface); FSD's slide over the object.

Run with OMP_WAIT_POLICY=PASSIVE; --threads sets torch's CPU threads (default 1).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from server.noise.base import FixedNoise, NoiseProvider
from server.noise.consistent import ConsistentNoise
from server.noise.worldmap import WorldMapNoise
from server.render.cameras import Camera
from server.testing.analytic_geometry import (
    Box,
    Sphere,
    correspondence,
    orbit_camera,
    project,
    render_query,
    rotation_z,
    surface_samples,
    visible,
)

SPHERE = Sphere(radius=0.6)
BOX = Box(half_extents=(0.5, 0.35, 0.45), rotation=rotation_z(25.0))
ANGLES = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0)
REFERENCE_TEXTURE_MB = 6 * 4 * 2048 * 2048 * 4 * 4 / 2**20  # [6 charts, 4 shells, 2048, 2048, 4] fp32


def iid_statistics(noise: torch.Tensor, foreground: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Tests of "i.i.d. N(0, 1)" on the foreground latent pixels of views [N, C, h, w] (mask [N, h, w]).

    ks_pvalue: KS test of all foreground values against N(0, 1). neighbor_corr / neighbor_pvalue:
    Pearson correlation over horizontally and vertically adjacent foreground pairs (same channel).
    far_corr / far_pvalue: over random pairs of distinct foreground pixels of one view. channel_corr:
    between channels 0 and 1 at the same pixel.
    """
    noise, fg = noise.detach().cpu().double().numpy(), foreground.cpu().numpy()
    values = np.concatenate([noise[n][:, fg[n]].ravel() for n in range(len(noise))])
    pairs_h = fg[:, :, :-1] & fg[:, :, 1:]
    pairs_v = fg[:, :-1, :] & fg[:, 1:, :]
    left = np.concatenate(
        [
            noise[:, :, :, :-1].transpose(1, 0, 2, 3)[:, pairs_h].ravel(),
            noise[:, :, :-1, :].transpose(1, 0, 2, 3)[:, pairs_v].ravel(),
        ]
    )
    right = np.concatenate(
        [
            noise[:, :, :, 1:].transpose(1, 0, 2, 3)[:, pairs_h].ravel(),
            noise[:, :, 1:, :].transpose(1, 0, 2, 3)[:, pairs_v].ravel(),
        ]
    )
    rng = np.random.default_rng(seed)
    far_a, far_b = [], []
    for n in range(len(noise)):
        pixels = noise[n][:, fg[n]]  # [C, P]
        a = rng.integers(0, pixels.shape[1], pixels.shape[1])
        b = (a + rng.integers(1, pixels.shape[1], pixels.shape[1])) % pixels.shape[1]
        far_a.append(pixels[:, a].ravel())
        far_b.append(pixels[:, b].ravel())
    neighbor = stats.pearsonr(left, right)
    far = stats.pearsonr(np.concatenate(far_a), np.concatenate(far_b))
    channels = np.concatenate([noise[n][:2, fg[n]] for n in range(len(noise))], axis=1)
    return {
        "ks_pvalue": float(stats.kstest(values, "norm").pvalue),
        "samples": int(values.size),
        "std": float(values.std()),
        "neighbor_corr": float(neighbor.statistic),
        "neighbor_pvalue": float(neighbor.pvalue),
        "far_corr": float(far.statistic),
        "far_pvalue": float(far.pvalue),
        "channel_corr": float(np.corrcoef(channels[0], channels[1])[0, 1]),
    }


def correlation_at_corresponding_points(
    make: Callable[[int], NoiseProvider],
    shapes: list,
    cameras: tuple,
    size: int,
    latent: int,
    samples: np.ndarray,
    seeds: range,
    device: torch.device,
) -> tuple[float, float]:
    """(measured, ideal) correlation of the noise at surface samples both cameras see, pooled over seeds."""
    pairs = correspondence(shapes, cameras, size, latent, samples)
    query = render_query(shapes, list(cameras), size, latent, device=device)
    xs, ys = [], []
    for seed in seeds:
        noise = make(seed).sample(query).reshape(2, query.channels, -1).cpu().numpy()
        xs.append(noise[0][:, pairs.pixel_a])
        ys.append(noise[1][:, pairs.pixel_b])
    return float(np.corrcoef(np.ravel(xs), np.ravel(ys))[0, 1]), float(pairs.ideal.mean())


def providers(device: torch.device) -> dict[str, Callable[[int], NoiseProvider]]:
    return {
        "cfd": lambda seed: ConsistentNoise(seed, device),
        "fsd": lambda seed: WorldMapNoise(seed, device),
        "plain": lambda seed: FixedNoise(seed, device),
    }


def ms_per_view(latent: int, device: torch.device, repeats: int) -> float:
    query = render_query([SPHERE], [orbit_camera(15.0, 30.0)], 8 * latent, latent, device=device)
    provider = ConsistentNoise(0, device)
    provider.sample(query)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        provider.sample(query)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def peak_mb(device: torch.device) -> float:
    """Extra memory at the peak of one 64x64 view from a 512^2 render, beyond its inputs and the process.

    CUDA: the allocator's peak. CPU: the resident-set high-water mark of a fresh process (in this one,
    memory freed by earlier runs stays resident and would hide the peak).
    """
    if device.type == "cuda":
        query = render_query([SPHERE], [orbit_camera(15.0, 30.0)], 512, 64, device=device)
        provider = ConsistentNoise(0, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        provider.sample(query)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    code = "from bench import noise; print(noise.resident_peak_mb())"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def resident_peak_mb() -> float:
    """Growth of this process's resident set at the peak of one 64x64 CPU view, one thread (Linux /proc)."""
    torch.set_num_threads(1)
    query = render_query([SPHERE], [orbit_camera(15.0, 30.0)], 512, 64)
    provider = ConsistentNoise(0, "cpu")
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
    before = _status_kb("VmRSS")
    provider.sample(query)
    return (_status_kb("VmHWM") - before) / 1024.0


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def within_view_statistics(device: torch.device, seeds: range) -> dict[str, float]:
    rng = np.random.default_rng(0)
    cameras = [
        orbit_camera(rng.uniform(-10, 45), rng.uniform(-180, 180), rng.uniform(2.2, 2.6)) for _ in range(4)
    ]
    noises, masks = [], []
    for shapes in ([SPHERE], [BOX]):
        query = render_query(shapes, cameras, 512, 64, device=device)
        for seed in seeds:
            noise, counts = ConsistentNoise(seed, device).sample_with_counts(query)
            noises.append(noise)
            masks.append(counts > 0)
    return iid_statistics(torch.cat(noises), torch.cat(masks))


def figures(device: torch.device, seeds: range, repeats: int) -> dict:
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "ms_per_view_32": ms_per_view(32, device, repeats),
        "ms_per_view_64": ms_per_view(64, device, repeats),
        "peak_mb": peak_mb(device),
        "reference_texture_mb": REFERENCE_TEXTURE_MB,
    }
    result.update(within_view_statistics(device, seeds))
    samples = surface_samples(SPHERE, 1_000_000)
    base = orbit_camera(15.0, 0.0)
    table = {}
    for angle in ANGLES:
        cameras = (base, orbit_camera(15.0, angle))
        row = {}
        for name, make in providers(device).items():
            row[name], row["ideal"] = correlation_at_corresponding_points(
                make, [SPHERE], cameras, 512, 64, samples, seeds, device
            )
        table[f"{angle:g}"] = row
        print(f"  {angle:5.1f} deg  " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    result["corr_table"] = table
    for angle in (5, 30):
        row = table[str(angle)]
        result[f"corr_{angle}deg"] = row["cfd"]
        result[f"ideal_{angle}deg"] = row["ideal"]
        result[f"fsd_corr_{angle}deg"] = row["fsd"]
        result[f"plain_corr_{angle}deg"] = row["plain"]
    return result


def low_pass(noise: torch.Tensor, foreground: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Channel 0 of latent noise [C, h, w] blurred over the foreground [h, w] and rescaled to unit variance.

    Integral noise summed over a patch of several latent pixels is the surface integral over that patch,
    whatever the latent grid, so this low-pass part is what must stick to the surface from view to view
    (single latent pixels are re-gridded between views, see the correlation table).
    """
    offsets = torch.arange(-4, 5, dtype=torch.float32, device=noise.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel[:, None] * kernel[None, :] / kernel.sum() ** 2)[None, None]
    mask = foreground.to(torch.float32)[None, None]
    blurred = F.conv2d(noise[None, :1] * mask, kernel, padding=4) / F.conv2d(
        mask, kernel, padding=4
    ).clamp_min(1e-3)
    return torch.where(foreground, blurred[0, 0] / kernel.square().sum().sqrt(), 0.0)


def diverging(values: np.ndarray) -> np.ndarray:
    """Blue (negative) - white - red (positive) colours [..., 3] for values in about [-2.5, 2.5]."""
    v = np.clip(values / 2.5, -1.0, 1.0)
    return np.stack([np.minimum(1.0, 1.0 + v), 1.0 - np.abs(v), np.minimum(1.0, 1.0 - v)], axis=-1)


def shown(latent_values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Latent values [h, w] at the render's size on the object (mask [H, W]), grey around."""
    stride = mask.shape[0] // latent_values.shape[0]
    upsampled = np.repeat(np.repeat(latent_values, stride, axis=0), stride, axis=1)
    return np.where(mask[..., None], diverging(upsampled), 0.35)


def carried(
    latent_values: np.ndarray, shapes: list, first: Camera, points: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Latent values [h, w] of the `first` view painted on the surface, seen at `points` of another view."""
    size, stride = mask.shape[0], mask.shape[0] // latent_values.shape[0]
    row, col = project(first, points, size)
    seen = mask & visible(shapes, first, points)
    r, c = (np.clip(x, 0, size - 1).astype(int) // stride for x in (row, col))
    return np.where(seen[..., None], diverging(latent_values[r, c]), np.where(mask[..., None], 0.15, 0.35))


def picture(path: Path, device: torch.device) -> None:
    """Sphere and box, four views 10 degrees apart in azimuth; rows per shape: CFD's noise (channel 0),
    CFD's and FSD's noise low-passed, each next to its first view's low-passed noise painted on the
    surface and carried to the other views (what noise that sticks to the surface shows)."""
    from PIL import Image, ImageDraw

    size, latent, pad, label = 192, 32, 6, 170
    cameras = [orbit_camera(15.0, azimuth) for azimuth in (0.0, 10.0, 20.0, 30.0)]
    rows = []
    for shape_name, shapes in (("sphere", [SPHERE]), ("box", [BOX])):
        query = render_query(shapes, cameras, size, latent, device=device)
        points, mask = query.points.cpu().double().numpy(), query.opacity.cpu().numpy()[..., 0] > 0.5
        foreground = F.avg_pool2d(query.opacity.permute(0, 3, 1, 2), size // latent)[:, 0] > 0.5
        cfd = ConsistentNoise(0, device).sample(query)
        raw = [shown(cfd[v, 0].cpu().numpy(), mask[v]) for v in range(4)]
        rows.append((f"{shape_name}: CFD noise\n(channel 0)", raw))
        for name, noise in (("CFD", cfd), ("FSD", WorldMapNoise(0, device).sample(query))):
            smooth = [low_pass(noise[v], foreground[v]).cpu().numpy() for v in range(4)]
            rows.append((f"{shape_name}: {name},\nlow-passed", [shown(smooth[v], mask[v]) for v in range(4)]))
            moved = [carried(smooth[0], shapes, cameras[0], points[v], mask[v]) for v in range(4)]
            rows.append((f"{shape_name}: {name} of view 1,\ncarried by the surface", moved))
    canvas = Image.new(
        "RGB", (label + 4 * (size + pad) + pad, len(rows) * (size + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for r, (text, tiles) in enumerate(rows):
        top = pad + r * (size + pad)
        draw.multiline_text((pad, top + size // 2 - 12), text, fill=(0, 0, 0))
        for c, tile in enumerate(tiles):
            canvas.paste(
                Image.fromarray((255 * tile).astype(np.uint8)), (label + pad + c * (size + pad), top)
            )
    canvas.save(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--png", type=Path, help="write the picture to this PNG instead of measuring")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seeds", type=int, default=4, help="noise seeds pooled in the statistics")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per latent size (median)")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.png is not None:
        picture(args.png, device)
        print(f"wrote {args.png}")
        return 0
    print(
        f"noise providers on {device}, {torch.get_num_threads()} thread(s); correlation at corresponding "
        "sphere points vs azimuth (64x64 latents, 512^2 renders):"
    )
    result = figures(device, range(args.seeds), args.repeats)
    ms32, ms64, peak = result["ms_per_view_32"], result["ms_per_view_64"], result["peak_mb"]
    print(
        f"CFD: {ms32:.1f} ms/view at 32x32, {ms64:.1f} ms/view at 64x64, peak {peak:.1f} MB "
        f"(the reference's texture alone: {REFERENCE_TEXTURE_MB:.0f} MB)"
    )
    print(
        f"within view: KS p = {result['ks_pvalue']:.3f} over {result['samples']} values, "
        f"std {result['std']:.4f}, neighbour r = {result['neighbor_corr']:+.4f}, "
        f"far r = {result['far_corr']:+.4f}"
    )
    if args.json:
        print(json.dumps(result))
    return 0 if math.isfinite(result["corr_5deg"]) else 1
