"""The one shading model shared by the shapes prior's training renders and the optimiser's renders.

The prior learns what shaded primitives look like; the optimiser must render its mesh the same way,
or the prior's score pulls towards an appearance the renderer cannot produce. Both sides take the
constants and the light sampling from here. numpy only (the torch renderer uses the constants).
"""

from __future__ import annotations

import numpy as np

AMBIENT = 0.4
DIFFUSE = 0.6
LIGHT_JITTER = 0.5  # std of the Gaussian perturbation added to the camera direction (DreamFusion-style)
BACKGROUND = (1.0, 1.0, 1.0)


def sample_light_dirs(rng: np.random.Generator, camera_positions: np.ndarray) -> np.ndarray:
    """Unit light directions [B, 3] (pointing from the surface towards the light) near each camera."""
    towards_camera = camera_positions / np.linalg.norm(camera_positions, axis=-1, keepdims=True)
    light = towards_camera + LIGHT_JITTER * rng.standard_normal(towards_camera.shape)
    return light / np.linalg.norm(light, axis=-1, keepdims=True)


def lambert_np(albedo: np.ndarray, normal: np.ndarray, light_dir: np.ndarray) -> np.ndarray:
    """albedo * (ambient + diffuse * max(0, n . l))."""
    n_dot_l = np.clip((normal * light_dir).sum(-1, keepdims=True), 0.0, None)
    return albedo * (AMBIENT + DIFFUSE * n_dot_l)
