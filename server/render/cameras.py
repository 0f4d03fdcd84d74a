"""Cameras in Blender's convention, shared by the renderer, the noise, the data generator and Blender.

World is right-handed with Z up. A camera-to-world matrix has the camera looking down its local -Z
with +Y up and +X right, exactly like a Blender camera object's `matrix_world`, so matrices sent by
Blender are used as they are. numpy only: the training-data generator and Blender-facing code use it
without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: camera-to-world matrix and vertical field of view in radians."""

    c2w: np.ndarray
    fovy: float

    @property
    def position(self) -> np.ndarray:
        return self.c2w[:3, 3]


def look_at(
    eye: np.ndarray, target: np.ndarray = (0.0, 0.0, 0.0), up: np.ndarray = (0.0, 0.0, 1.0)
) -> np.ndarray:
    """Camera-to-world matrix of a camera at `eye` looking at `target` (camera -Z points at it)."""
    eye = np.asarray(eye, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:  # looking straight along `up`: any perpendicular right will do
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, -forward, eye
    return c2w


def orbit_c2w(elevation_deg: float, azimuth_deg: float, radius: float) -> np.ndarray:
    """Camera on a sphere around the origin; azimuth 0 on +X, elevation up towards +Z."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    eye = radius * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    return look_at(eye)


def perspective(fovy: float, aspect: float = 1.0, near: float = 0.1, far: float = 100.0) -> np.ndarray:
    """OpenGL projection matrix: camera space (looking down -Z) to clip space."""
    f = 1.0 / math.tan(fovy / 2.0)
    return np.array(
        [
            [f / aspect, 0.0, 0.0, 0.0],
            [0.0, f, 0.0, 0.0],
            [0.0, 0.0, (far + near) / (near - far), 2.0 * far * near / (near - far)],
            [0.0, 0.0, -1.0, 0.0],
        ]
    )


def camera_rays(camera: Camera, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """World-space ray origins and unit directions through pixel centres, [H, W, 3], row 0 = top."""
    tan_y = math.tan(camera.fovy / 2.0)
    tan_x = tan_y * width / height
    xs = ((np.arange(width) + 0.5) / width * 2.0 - 1.0) * tan_x
    ys = (1.0 - (np.arange(height) + 0.5) / height * 2.0) * tan_y
    gx, gy = np.meshgrid(xs, ys)
    dirs_cam = np.stack([gx, gy, -np.ones_like(gx)], axis=-1)
    dirs = dirs_cam @ camera.c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    origins = np.broadcast_to(camera.position, dirs.shape).copy()
    return origins, dirs


@dataclass(frozen=True)
class OrbitRig:
    """Ranges the optimiser samples cameras from (degrees and scene units), as the CFD configs do.

    Elevation is drawn half the time uniformly in degrees and half the time uniformly on the
    sphere's band, so views near the horizon and from above are both well represented.
    """

    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    radius: tuple[float, float] = (2.2, 2.6)
    fovy_deg: tuple[float, float] = (38.0, 42.0)

    def validate(self) -> None:
        for name, (lo, hi) in vars(self).items():
            if not lo <= hi:
                raise ValueError(f"camera rig {name}: lower bound {lo} is above upper bound {hi}")
        if not (self.elevation_deg[0] >= -90.0 and self.elevation_deg[1] <= 90.0):
            raise ValueError(f"camera rig elevation_deg must lie in [-90, 90], got {self.elevation_deg}")
        if self.radius[0] <= 1.0:
            raise ValueError(f"camera rig radius must exceed 1 (the object's box), got {self.radius}")
        if not (self.fovy_deg[0] >= 1.0 and self.fovy_deg[1] < 170.0):
            raise ValueError(f"camera rig fovy_deg must lie in [1, 170), got {self.fovy_deg}")

    def sample_angles(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """[n, 4] rows of (elevation_deg, azimuth_deg, radius, fovy_deg)."""
        lo, hi = np.radians(self.elevation_deg)
        uniform_deg = rng.uniform(lo, hi, n)
        uniform_sphere = np.arcsin(rng.uniform(np.sin(lo), np.sin(hi), n))
        elevation = np.degrees(np.where(rng.random(n) < 0.5, uniform_deg, uniform_sphere))
        azimuth = rng.uniform(*self.azimuth_deg, n)
        radius = rng.uniform(*self.radius, n)
        fovy = rng.uniform(*self.fovy_deg, n)
        return np.stack([elevation, azimuth, radius, fovy], axis=1)

    def sample(self, rng: np.random.Generator, n: int) -> list[Camera]:
        return [Camera(orbit_c2w(e, a, r), math.radians(f)) for e, a, r, f in self.sample_angles(rng, n)]
