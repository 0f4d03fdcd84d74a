"""Training images for the shapes prior: coloured primitives rendered from the server's camera rig.

Sphere tracing of the exact SDFs in numpy (no GL, no GPU), 2x supersampled and box-filtered, shaded
with the shared Lambert model on the shared white background, so the prior sees exactly the kind of
image the optimiser renders. Captions mix specific ("a red cube") and open ("a red shape", "a cube",
"a shape") forms so that open prompts have several right answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from server.render.cameras import Camera, OrbitRig, camera_rays, orbit_c2w
from server.render.shading import BACKGROUND, lambert_np, sample_light_dirs
from server.shapes.primitives import COLOURS, SHAPES, caption, sdf

SUPERSAMPLE = 2
MARCH_STEPS = 64
HIT_EPS = 1e-3

# Caption mix: what fraction of images get each caption form.
CAPTION_MIX = {"specific": 0.70, "colour_only": 0.12, "shape_only": 0.12, "open": 0.06}


@dataclass
class ShapeImages:
    images: np.ndarray  # [N, S, S, 3] uint8, row 0 = top
    shape_ids: np.ndarray  # [N] index into SHAPES
    colour_ids: np.ndarray  # [N] index into COLOURS
    views: np.ndarray  # [N, 4] elevation_deg, azimuth_deg, radius, fovy_deg


def render_primitive(
    shape: str, rgb: tuple[float, float, float], camera: Camera, size: int, light_dir: np.ndarray
) -> np.ndarray:
    """One shaded render [size, size, 3] float in [0, 1], row 0 = top."""
    hi = size * SUPERSAMPLE
    origins, dirs = camera_rays(camera, hi, hi)
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    # Start each ray at the unit sphere that bounds every primitive.
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - 1.0
    disc = b * b - c
    t = np.where(disc > 0, -b - np.sqrt(np.maximum(disc, 0.0)), np.inf)
    active = np.isfinite(t)
    t = np.where(active, np.maximum(t, 0.0), 0.0)
    hit = np.zeros(len(t), dtype=bool)
    for _ in range(MARCH_STEPS):
        idx = np.flatnonzero(active & ~hit)
        if idx.size == 0:
            break
        d = sdf(shape, origins[idx] + t[idx, None] * dirs[idx])
        hit[idx[d < HIT_EPS]] = True
        t[idx] += np.maximum(d, 0.0) * 0.9
        escaped = t[idx] > np.linalg.norm(origins[idx], axis=-1) + 1.0
        active[idx[escaped]] = False
    image = np.broadcast_to(np.asarray(BACKGROUND), (len(t), 3)).copy()
    if hit.any():
        p = origins[hit] + t[hit, None] * dirs[hit]
        image[hit] = lambert_np(np.asarray(rgb), _sdf_normal(shape, p), light_dir[None])
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(image, 0.0, 1.0)


def _sdf_normal(shape: str, p: np.ndarray, h: float = 1e-4) -> np.ndarray:
    offsets = np.eye(3) * h
    grad = np.stack([sdf(shape, p + o) - sdf(shape, p - o) for o in offsets], axis=-1)
    return grad / np.maximum(np.linalg.norm(grad, axis=-1, keepdims=True), 1e-12)


def sample_caption(rng: np.random.Generator, colour: str, shape: str) -> str:
    form = rng.choice(list(CAPTION_MIX), p=list(CAPTION_MIX.values()))
    return caption(
        colour if form in ("specific", "colour_only") else None,
        shape if form in ("specific", "shape_only") else None,
    )


def build_dataset(n: int, size: int, seed: int, rig: OrbitRig | None = None) -> ShapeImages:
    """n renders balanced over (shape, colour), deterministic in `seed`."""
    rig = rig or OrbitRig()
    rng = np.random.default_rng(seed)
    n_combos = len(SHAPES) * len(COLOURS)
    combo = np.arange(n) % n_combos
    rng.shuffle(combo)
    shape_ids, colour_ids = combo // len(COLOURS), combo % len(COLOURS)
    views = rig.sample_angles(rng, n)
    colour_names = list(COLOURS)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc="rendering shapes", unit="img", mininterval=5.0):
        e, a, r, f = views[i]
        camera = Camera(orbit_c2w(e, a, r), math.radians(f))
        light = sample_light_dirs(rng, camera.position[None])[0]
        img = render_primitive(
            SHAPES[shape_ids[i]], COLOURS[colour_names[colour_ids[i]]], camera, size, light
        )
        images[i] = np.round(img * 255.0).astype(np.uint8)
    return ShapeImages(images, shape_ids, colour_ids, views)


def load_or_build(path: Path, n: int, size: int, seed: int) -> ShapeImages:
    """Cache the rendered set on disk: rendering is deterministic, so the cache is only a speed-up."""
    if path.exists():
        data = np.load(path)
        if len(data["images"]) == n and data["images"].shape[1] == size:
            return ShapeImages(data["images"], data["shape_ids"], data["colour_ids"], data["views"])
    data = build_dataset(n, size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=data.images, shape_ids=data.shape_ids, colour_ids=data.colour_ids, views=data.views)
    tmp.replace(path)
    return data
