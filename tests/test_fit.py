"""The CPU proof fit (`server.testing.fit`): DMTet + texture field recover a red box and a blue
sphere from renders.

The bounds were set from measured fits (grid 16, 64^2 renders, 200 steps, seeds 0-2: IoU 0.92-0.94,
colour error 0.014-0.017, render error 0.044-0.049) with margin, and fail for a broken pipeline: with
the geometry frozen the IoU is 0.28, with the texture frozen the colour error is 0.35.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import trimesh

from server.shapes.primitives import COLOURS
from server.testing.fit import (
    FitSettings,
    box_and_sphere_target,
    fit_metrics,
    fit_target,
    surface_color_error,
    volumetric_iou,
)

DEVICE = torch.device("cpu")
MIN_IOU = 0.85
MAX_COLOR_ERROR = 0.06
MAX_RENDER_ERROR = 0.1


@functools.cache
def target():
    return box_and_sphere_target()


@pytest.fixture(scope="module")
def fitted():
    vertices, faces, color_fn = target()
    result = fit_target(
        vertices, faces, color_fn, steps=200, grid_resolution=16, render_size=64, seed=0, device=DEVICE
    )
    return result, fit_metrics(result, vertices, faces, color_fn)


def test_fit_recovers_shape_and_colour(fitted):
    result, metrics = fitted
    assert metrics.iou > MIN_IOU
    assert metrics.color_error < MAX_COLOR_ERROR
    assert metrics.render_error < MAX_RENDER_ERROR
    assert np.mean(result.losses[-20:]) < 0.2 * np.mean(result.losses[:20])
    fitted_mesh = trimesh.Trimesh(result.mesh.vertices.numpy(), result.mesh.faces.numpy(), process=False)
    assert fitted_mesh.is_watertight
    assert len(fitted_mesh.split(only_watertight=False)) == 2  # box and sphere, no bridge or floater


def test_fit_without_optimisation_fails_the_bounds():
    """Zero steps is exactly what a frozen geometry (the start sphere) or a frozen texture (grey) gives."""
    vertices, faces, color_fn = target()
    start = fit_target(vertices, faces, color_fn, 0, 16, 64, seed=0, device=DEVICE, settings=FitSettings())
    metrics = fit_metrics(start, vertices, faces, color_fn)
    assert metrics.iou < MIN_IOU - 0.3
    assert metrics.color_error > 3 * MAX_COLOR_ERROR
    assert metrics.render_error > 2 * MAX_RENDER_ERROR


def test_volumetric_iou_of_nested_and_disjoint_spheres():
    small = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    big = trimesh.creation.icosphere(subdivisions=4, radius=0.6)
    apart = small.copy()
    apart.apply_translation((0.5, 0.0, 0.0))
    small.apply_translation((-0.5, 0.0, 0.0))
    inner = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    assert volumetric_iou(big.vertices, big.faces, big.vertices, big.faces) == 1.0
    assert volumetric_iou(small.vertices, small.faces, apart.vertices, apart.faces) == 0.0
    nested = volumetric_iou(inner.vertices, inner.faces, big.vertices, big.faces)
    assert nested == pytest.approx(inner.volume / big.volume, abs=0.01)


def test_surface_color_error_identities():
    vertices, faces, color_fn = target()
    assert surface_color_error(color_fn, vertices, faces, color_fn) == 0.0

    def grey(points: torch.Tensor) -> torch.Tensor:
        return torch.full_like(points, 0.5)

    # the box is the first 8 vertices / 12 faces of the target, the sphere the rest
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    box_area, sphere_area = mesh.area_faces[:12].sum(), mesh.area_faces[12:].sum()
    red, blue = (np.abs(0.5 - np.array(COLOURS[c])).mean() for c in ("red", "blue"))
    expected = (box_area * red + sphere_area * blue) / (box_area + sphere_area)
    assert surface_color_error(grey, vertices, faces, color_fn) == pytest.approx(expected, abs=2e-3)
