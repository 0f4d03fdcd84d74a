"""Ray-traced spheres and boxes: exact surface hit points and opacity without any rasterizer.

The noise providers only look at what a renderer gives them (true world-space ray hits, opacity and
the camera), so analytic scenes let their tests and benchmarks know the geometry exactly: which
surface point a pixel sees, whether a point is visible from a camera, and where it projects.
numpy float64 for the tracing; `render_query` hands torch float32 to the providers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from server.noise.base import NoiseQuery
from server.render.cameras import Camera, camera_rays, orbit_c2w


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    radius: float = 0.6

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Distance to the first hit in front of each ray origin along unit `dirs`, inf on a miss."""
        oc = origins - np.asarray(self.center)
        b = np.sum(oc * dirs, axis=-1)
        disc = b * b - (np.sum(oc * oc, axis=-1) - self.radius**2)
        root = np.sqrt(np.maximum(disc, 0.0))
        near, far = -b - root, -b + root
        t = np.where(near > 1e-9, near, far)
        return np.where((disc >= 0.0) & (t > 1e-9), t, np.inf)


@dataclass(frozen=True)
class Box:
    """An oriented box: `rotation` maps box axes to world axes (columns are the box axes)."""

    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    half_extents: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Slab test in the box frame: distance to the first hit in front of each origin, inf on a miss."""
        o = (origins - np.asarray(self.center)) @ self.rotation
        d = dirs @ self.rotation
        half = np.asarray(self.half_extents)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t0, t1 = (-half - o) * inv, (half - o) * inv
        t_enter = np.nanmax(np.minimum(t0, t1), axis=-1)
        t_exit = np.nanmin(np.maximum(t0, t1), axis=-1)
        t = np.where(t_enter > 1e-9, t_enter, t_exit)
        return np.where((t_enter <= t_exit) & (t > 1e-9), t, np.inf)


def rotation_z(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def first_hit(shapes: Sequence[Sphere | Box], origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """Distance to the nearest surface of any shape, inf on a miss."""
    return np.min(np.stack([shape.intersect(origins, dirs) for shape in shapes]), axis=0)


def trace(shapes: Sequence[Sphere | Box], camera: Camera, size: int) -> tuple[np.ndarray, np.ndarray]:
    """True hit points [H, W, 3] (zeros on background) and binary opacity [H, W, 1], row 0 = top."""
    origins, dirs = camera_rays(camera, size, size)
    t = first_hit(shapes, origins, dirs)
    hit = np.isfinite(t)
    points = np.where(hit[..., None], origins + np.where(hit, t, 0.0)[..., None] * dirs, 0.0)
    return points, hit[..., None].astype(np.float64)


def visible(
    shapes: Sequence[Sphere | Box], camera: Camera, points: np.ndarray, tol: float = 1e-6
) -> np.ndarray:
    """Whether each surface point [..., 3] is the first thing the camera's ray towards it hits."""
    to_point = points - camera.position
    dist = np.linalg.norm(to_point, axis=-1)
    dirs = to_point / dist[..., None]
    origins = np.broadcast_to(camera.position, dirs.shape)
    return np.abs(first_hit(shapes, origins, dirs) - dist) < tol * max(1.0, float(np.max(dist)))


def project(camera: Camera, points: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (row, col) image coordinates of world points, pixel centres at integer + 0.5."""
    cam = (points - camera.position) @ camera.c2w[:3, :3]  # world -> camera axes (orthonormal)
    tan_y = math.tan(camera.fovy / 2.0)
    x_ndc = cam[..., 0] / (-cam[..., 2] * tan_y)
    y_ndc = cam[..., 1] / (-cam[..., 2] * tan_y)
    return (1.0 - y_ndc) * 0.5 * size, (x_ndc + 1.0) * 0.5 * size


def orbit_camera(
    elevation_deg: float, azimuth_deg: float, radius: float = 2.4, fovy_deg: float = 40.0
) -> Camera:
    return Camera(orbit_c2w(elevation_deg, azimuth_deg, radius), math.radians(fovy_deg))


def render_query(
    shapes: Sequence[Sphere | Box],
    cameras: Sequence[Camera],
    size: int,
    latent: int,
    channels: int = 4,
    device: torch.device | str | None = None,
) -> NoiseQuery:
    """Everything a noise provider may look at for these cameras, as the renderer would hand it over."""
    traced = [trace(shapes, camera, size) for camera in cameras]

    def stack(arrays: list[np.ndarray]) -> torch.Tensor:
        return torch.as_tensor(np.stack(arrays), dtype=torch.float32, device=device)

    return NoiseQuery(
        latent_hw=(latent, latent),
        channels=channels,
        c2w=stack([camera.c2w for camera in cameras]),
        fovy=stack([np.float64(camera.fovy) for camera in cameras]),
        points=stack([points for points, _ in traced]),
        opacity=stack([opacity for _, opacity in traced]),
    )


def surface_samples(shape: Sphere | Box, n: int) -> np.ndarray:
    """About n points spread uniformly by area over the shape's surface (deterministic), [N, 3]."""
    if isinstance(shape, Sphere):
        k = np.arange(n) + 0.5
        z = 1.0 - 2.0 * k / n
        phi = k * math.pi * (3.0 - math.sqrt(5.0))  # Fibonacci sphere
        r = np.sqrt(1.0 - z * z)
        unit = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)
        return np.asarray(shape.center) + shape.radius * unit
    half = np.asarray(shape.half_extents)
    areas = [half[(a + 1) % 3] * half[(a + 2) % 3] for a in range(3)]
    spacing = math.sqrt(2.0 * 4.0 * sum(areas) / n)
    faces = []
    for axis in range(3):
        u, v = (axis + 1) % 3, (axis + 2) % 3
        gu = np.arange(-half[u] + spacing / 2, half[u], spacing)
        gv = np.arange(-half[v] + spacing / 2, half[v], spacing)
        mu, mv = np.meshgrid(gu, gv, indexing="ij")
        for sign in (-1.0, 1.0):
            local = np.zeros((mu.size, 3))
            local[:, u], local[:, v], local[:, axis] = mu.ravel(), mv.ravel(), sign * half[axis]
            faces.append(local)
    return np.asarray(shape.center) + np.concatenate(faces) @ shape.rotation.T


@dataclass(frozen=True)
class Correspondence:
    """Surface samples seen by two views: their latent pixels in each view and the ideal correlation.

    `ideal` is |F_a cap F_b| / sqrt(|F_a| |F_b|) for the two latent pixels' surface footprints: the
    correlation that perfectly surface-attached integral noise would give at that sample.
    """

    pixel_a: np.ndarray  # [N] row-major latent index in view a
    pixel_b: np.ndarray  # [N] in view b
    ideal: np.ndarray  # [N]


def correspondence(
    shapes: Sequence[Sphere | Box],
    cameras: tuple[Camera, Camera],
    size: int,
    latent: int,
    samples: np.ndarray,
) -> Correspondence:
    """Latent pixels that see the same surface samples, keeping pixels fully covered in both views."""
    stride = size // latent
    pixels = []
    for camera in cameras:
        _, opacity = trace(shapes, camera, size)
        full = opacity[..., 0].reshape(latent, stride, latent, stride).min(axis=(1, 3)).ravel() > 0.5
        row, col = project(camera, samples, size)
        inside = (row >= 0) & (row < size) & (col >= 0) & (col < size) & visible(shapes, camera, samples)
        index = np.where(inside, np.floor(row).clip(0, size - 1) // stride * latent, -1)
        index = np.where(inside, index + np.floor(col).clip(0, size - 1) // stride, -1).astype(np.int64)
        pixels.append((index, inside & full[index.clip(0)]))
    (a, ok_a), (b, ok_b) = pixels
    cells = latent * latent
    n_a = np.bincount(a[a >= 0], minlength=cells)
    n_b = np.bincount(b[b >= 0], minlength=cells)
    both = (a >= 0) & (b >= 0)
    pair = a[both] * cells + b[both]
    _, inverse, n_ab = np.unique(pair, return_inverse=True, return_counts=True)
    ideal = np.zeros(len(samples))
    ideal[both] = n_ab[inverse] / np.sqrt(n_a[a[both]] * n_b[b[both]])
    keep = ok_a & ok_b
    return Correspondence(a[keep], b[keep], ideal[keep])
