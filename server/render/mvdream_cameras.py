"""MVDream's cameras: groups of 4 views of one object, and the 16 numbers its UNet is conditioned on.

MVDream was fine-tuned on renders of one object from 4 cameras 90 degrees apart in azimuth at one
elevation, and its UNet sees each view's camera-to-world matrix as 16 numbers (the input of its
`camera_embed` MLP). The convention, as MVDream's own `get_camera` defines it:

1. an OpenGL look-at camera (looks down its -Z, +Y up) at (cos e sin a, sin e, cos e cos a) in a
   Y-up world, looking at the origin;
2. left-multiplied by the Y/Z swap [[1,0,0,0],[0,0,-1,0],[0,1,0,0],[0,0,0,1]], which makes the world
   Z-up ("blender" coordinates): the camera of azimuth 0 sits on -Y, Blender's Front view;
3. translation scaled to unit length (distance is not conditioned), flattened row by row.

Steps 1-2 produce exactly a Blender camera matrix (`server.render.cameras`), so a c2w of this project needs
only step 3: `camera_embedding`. Only MVDream's azimuth label differs from `orbit_c2w`'s (0 on +X):
MVDream's azimuth a is orbit azimuth a - 90 (`mvdream_orbit_c2w`). The CFD reference feeds
threestudio's matrices, which follow the same Blender convention, unchanged.

`MultiViewRig` samples groups as the CFD reference's MVDream stage does (threestudio's multi-view
camera sampler with `relative_radius`): per group one elevation in [0, 30] degrees (half the groups
uniform in degrees, half uniform on the sphere's band), one vertical fov in [15, 60] degrees, one
distance = relative radius in [0.8, 1.0] / tan(fovy / 2) -- so the view's half-height at the origin
is 0.8-1.0 whatever the fov, a tight frame on the object box -- and 4 azimuths start + k * 90 from a
uniform random start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from server.render.cameras import Camera, orbit_c2w

VIEWS_PER_GROUP = 4


def mvdream_orbit_c2w(elevation_deg: float, azimuth_deg: float, radius: float = 1.0) -> np.ndarray:
    """Blender c2w of the camera MVDream calls (elevation, azimuth): azimuth 0 on -Y, 90 on +X."""
    return orbit_c2w(elevation_deg, azimuth_deg - 90.0, radius)


def camera_embedding(c2w: torch.Tensor) -> torch.Tensor:
    """Blender-convention camera-to-world [B, 4, 4] -> MVDream's camera input [B, 16] (same dtype).

    The translation is scaled to unit length, the rotation and the last row kept, the matrix
    flattened row-major, as MVDream's `normalize_camera` does.
    """
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4):
        raise ValueError(f"c2w must be [B, 4, 4], got {tuple(c2w.shape)}")
    translation = c2w[:, :3, 3]
    unit = translation / translation.norm(dim=1, keepdim=True).clamp_min(1e-8)
    normalised = torch.cat([c2w[:, :3, :3], unit[:, :, None]], dim=2)
    return torch.cat([normalised, c2w[:, 3:, :]], dim=1).reshape(-1, 16)


@dataclass(frozen=True)
class MultiViewRig:
    """Ranges of the CFD reference's MVDream stage (degrees; relative radius = distance * tan(fovy/2))."""

    elevation_deg: tuple[float, float] = (0.0, 30.0)
    fovy_deg: tuple[float, float] = (15.0, 60.0)
    relative_radius: tuple[float, float] = (0.8, 1.0)
    views: int = VIEWS_PER_GROUP

    def sample_angles(self, rng: np.random.Generator, groups: int) -> np.ndarray:
        """[groups * views, 4] rows of (elevation_deg, azimuth_deg, radius, fovy_deg), a group's views
        contiguous; azimuths follow `orbit_c2w` (0 on +X) and are wrapped to [-180, 180)."""
        lo, hi = np.radians(self.elevation_deg)
        uniform_deg = rng.uniform(lo, hi, groups)
        uniform_sphere = np.arcsin(rng.uniform(np.sin(lo), np.sin(hi), groups))
        elevation = np.degrees(np.where(rng.random(groups) < 0.5, uniform_deg, uniform_sphere))
        start = rng.uniform(-180.0, 180.0, groups)
        fovy = rng.uniform(*self.fovy_deg, groups)
        radius = rng.uniform(*self.relative_radius, groups) / np.tan(np.radians(fovy) / 2.0)
        azimuth = start[:, None] + 360.0 / self.views * np.arange(self.views)[None, :]
        azimuth = (azimuth + 180.0) % 360.0 - 180.0
        per_group = np.stack([elevation, radius, fovy], axis=1).repeat(self.views, axis=0)
        return np.stack([per_group[:, 0], azimuth.reshape(-1), per_group[:, 1], per_group[:, 2]], axis=1)

    def sample(self, rng: np.random.Generator, groups: int) -> list[Camera]:
        """`groups * views` cameras, the views of a group consecutive (MVDream's batch layout)."""
        return [Camera(orbit_c2w(e, a, r), math.radians(f)) for e, a, r, f in self.sample_angles(rng, groups)]
