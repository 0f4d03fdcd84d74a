"""Which primitive and which colour does an image show? The automatic judge of the shapes prior.

A sample is judged against renders of the true primitives, not against a learned classifier: its
foreground silhouette is matched (IoU) to a bank of silhouettes of every primitive seen from the
camera rig, and its mean foreground colour to the mean shaded colour of every known colour. Used to
measure the prior's prompt-following rate and, in the benchmarks, which mode a 3-D result fell into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from server.render.cameras import Camera, OrbitRig, orbit_c2w
from server.render.shading import BACKGROUND, sample_light_dirs
from server.shapes.dataset import render_primitive
from server.shapes.primitives import COLOURS, SHAPES

FOREGROUND_THRESHOLD = 0.12  # max-channel distance from the image's background
BACKGROUND_DRIFT = 0.25  # how far a sample's background may drift from the renders' white


@dataclass(frozen=True)
class Judgement:
    shape: str
    colour: str
    silhouette_iou: float  # best IoU against the bank of the judged shape
    colour_distance: float  # RGB distance to the judged colour's reference


def background_colours(images: np.ndarray) -> np.ndarray:
    """[N, 3]: each image's own background, the median of its border pixels when that is near white.

    A diffusion sample's plain background drifts a little from the training renders' white (a
    greyish tint in some seeds); measured against the fixed white, that tint would count as
    foreground and turn a right sphere into a wrong cube. An object covering half the border or
    more makes the median its own colour: then the renders' white is the better guess.
    """
    border = np.concatenate([images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)
    median = np.median(border, axis=1)
    white = np.asarray(BACKGROUND, dtype=median.dtype)
    drifted = np.abs(median - white).max(axis=-1, keepdims=True) <= BACKGROUND_DRIFT
    return np.where(drifted, median, white)


def foreground(images: np.ndarray) -> np.ndarray:
    """[N, S, S] bool: pixels that differ from the image's background."""
    background = background_colours(images)[:, None, None, :]
    return np.abs(images - background).max(axis=-1) > FOREGROUND_THRESHOLD


def mask_ious(masks: np.ndarray, references: np.ndarray) -> np.ndarray:
    """[N, M]: IoU of each mask [N, S, S] with each reference mask [M, S, S] (0 where both are empty)."""
    a = masks.reshape(len(masks), -1).astype(np.float32)
    b = references.reshape(len(references), -1).astype(np.float32)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


@lru_cache(maxsize=4)
def _references(
    size: int, views_per_shape: int = 48, seed: int = 1234
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Silhouette bank [S*V, size, size], its shape ids, and reference colours [K, 3]."""
    rng = np.random.default_rng(seed)
    rig = OrbitRig()
    masks, ids = [], []
    colour_sums = np.zeros((len(COLOURS), 3))
    colour_counts = np.zeros(len(COLOURS))
    for s, shape in enumerate(SHAPES):
        for v, (e, a, r, f) in enumerate(rig.sample_angles(rng, views_per_shape)):
            camera = Camera(orbit_c2w(e, a, r), math.radians(f))
            k = (s * views_per_shape + v) % len(COLOURS)
            light = sample_light_dirs(rng, camera.position[None])[0]
            image = render_primitive(shape, COLOURS[list(COLOURS)[k]], camera, size, light)
            mask = foreground(image[None])[0]
            masks.append(mask)
            ids.append(s)
            colour_sums[k] += image[mask].mean(axis=0)
            colour_counts[k] += 1
    return np.stack(masks), np.array(ids), colour_sums / colour_counts[:, None]


def judge(images: np.ndarray) -> list[Judgement]:
    """Judge [N, S, S, 3] images in [0, 1] (row 0 = top)."""
    size = images.shape[1]
    bank, bank_ids, colour_refs = _references(size)
    masks = foreground(images)
    results = []
    for image, mask, iou in zip(images, masks, mask_ious(masks, bank), strict=True):
        best_per_shape = np.array([iou[bank_ids == s].max() for s in range(len(SHAPES))])
        s = int(best_per_shape.argmax())
        mean_colour = image[mask].mean(axis=0) if mask.any() else np.asarray(BACKGROUND, dtype=float)
        distances = np.linalg.norm(colour_refs - mean_colour, axis=1)
        k = int(distances.argmin())
        results.append(Judgement(SHAPES[s], list(COLOURS)[k], float(best_per_shape[s]), float(distances[k])))
    return results
