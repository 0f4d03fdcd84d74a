"""The primitives and colours the shapes prior knows, as exact signed distance functions.

Every primitive is centred at the origin, upright (axis along world Z) and of a fixed known size
inside the DMTet box [-1, 1]^3, so a generated asset can be compared with the true primitive.
numpy only: the training-data renderer, the benchmarks and the tests all use these.
"""

from __future__ import annotations

import numpy as np

SHAPES = ("cube", "sphere", "cylinder", "cone", "torus")

# Display RGB in [0, 1]; chosen far apart in hue and lightness so that 32-pixel renders separate them.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.10),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.85, 0.12),
    "green": (0.16, 0.66, 0.20),
    "cyan": (0.10, 0.75, 0.80),
    "blue": (0.14, 0.30, 0.88),
    "purple": (0.52, 0.20, 0.72),
    "pink": (0.96, 0.50, 0.72),
}

CUBE_HALF = 0.42
SPHERE_RADIUS = 0.5
CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT = 0.4, 0.42
CONE_RADIUS, CONE_HALF_HEIGHT = 0.48, 0.45
TORUS_MAJOR, TORUS_MINOR = 0.42, 0.16


def sdf(shape: str, p: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of `shape` at points p [..., 3]."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    if shape == "sphere":
        return np.linalg.norm(p, axis=-1) - SPHERE_RADIUS
    if shape == "cube":
        q = np.abs(p) - CUBE_HALF
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
        return outside + np.minimum(q.max(axis=-1), 0.0)
    if shape == "cylinder":
        d = np.stack([np.hypot(x, y) - CYLINDER_RADIUS, np.abs(z) - CYLINDER_HALF_HEIGHT], axis=-1)
        return np.minimum(d.max(axis=-1), 0.0) + np.linalg.norm(np.maximum(d, 0.0), axis=-1)
    if shape == "torus":
        return np.hypot(np.hypot(x, y) - TORUS_MAJOR, z) - TORUS_MINOR
    if shape == "cone":
        return _cone_sdf(np.hypot(x, y), z)
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def _cone_sdf(r: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Exact distance to a solid cone with apex (0, +h) and base disc of radius R at z = -h (2-D profile)."""
    h, big_r = CONE_HALF_HEIGHT, CONE_RADIUS
    # Profile polygon in the (r, z) half-plane: (0, h) apex, (R, -h) rim, (0, -h) base centre.
    apex, rim, base = np.array([0.0, h]), np.array([big_r, -h]), np.array([0.0, -h])
    q = np.stack([r, z], axis=-1)

    def seg_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ab = b - a
        t = np.clip(((q - a) @ ab) / (ab @ ab), 0.0, 1.0)
        return np.linalg.norm(q - (a + t[..., None] * ab), axis=-1)

    dist = np.minimum(seg_dist(apex, rim), seg_dist(rim, base))
    # Inside: below the slanted side and above the base.
    slant_side = (r * (2 * h) + (z - h) * big_r) <= 0.0  # r/R <= (h - z)/(2h)
    inside = slant_side & (z >= -h)
    return np.where(inside, -np.minimum(dist, np.abs(z + h)), dist)


def inside(shape: str, p: np.ndarray) -> np.ndarray:
    return sdf(shape, p) < 0.0


def caption(colour: str | None, shape: str | None) -> str:
    """ "a red cube", "a red shape", "a cube" or "a shape"."""
    return f"a {colour + ' ' if colour else ''}{shape or 'shape'}"


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """The (colour, shape) a caption asks for; None where it leaves it open."""
    words = text.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def all_captions() -> list[str]:
    specific = [caption(c, s) for c in COLOURS for s in SHAPES]
    open_ = [caption(c, None) for c in COLOURS] + [caption(None, s) for s in SHAPES] + [caption(None, None)]
    return specific + open_
