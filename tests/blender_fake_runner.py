"""A quick, model-free job for the Blender extension's tests: `serve --runner blender_fake_runner:run_job`.

It speaks the real protocol through the real server and writes a real asset with the real exporter
(`server.pipeline.export.bake_and_export`: clean, unwrap, bake, GLB), so the extension's whole path from
Generate to a textured variant runs in seconds. The shape is a sphere with seeded bumps that grows
over a few steps, so the seed decides the asset: same seed, same GLB. Halfway the sphere is
subdivided once more, so the previews change topology once (the slow path) and keep it otherwise
(the fast path). Prompt tags: "[50k]" streams 50k-vertex previews, 4 of one topology and then 4
that change it every step (pump timing); "[slow]" takes 1 s per step (cancel, kill, the GUI
check); "[oom]" raises MemoryError at step 2. A `finish` stops the steps and writes the asset early.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image

from server.job.errors import Cancelled
from server.job.events import JobEvents
from server.job.spec import JobSpec
from server.pipeline.export import bake_and_export

STEPS = 6
STEPS_50K_HALF = 4
STEP_SECONDS = 0.03
SLOW_STEP_SECONDS = 1.0


def describe() -> dict:
    return {"torch": None, "cuda": None, "device": "cpu", "device_name": "blender-cfd fake runner"}


def _sphere(subdivisions: int) -> tuple[np.ndarray, np.ndarray]:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    return sphere.vertices.astype(np.float64), sphere.faces.astype(np.int32)


def _uv_sphere(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A latitude-longitude sphere with rows * cols + 2 vertices (50,178 for 224 x 224)."""
    theta = np.linspace(0.0, np.pi, rows + 2)[1:-1]
    phi = np.linspace(0.0, 2 * np.pi, cols, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    ring = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], axis=-1).reshape(-1, 3)
    vertices = np.concatenate([[[0.0, 0.0, 1.0]], ring, [[0.0, 0.0, -1.0]]])
    index = np.arange(rows * cols).reshape(rows, cols) + 1
    right = np.roll(index, -1, axis=1)
    faces = [np.stack([np.zeros(cols, int), index[0], right[0]], axis=1)]
    faces += [
        np.stack([index[:-1], index[1:], right[1:]], axis=-1).reshape(-1, 3),
        np.stack([index[:-1], right[1:], right[:-1]], axis=-1).reshape(-1, 3),
    ]
    faces.append(np.stack([np.full(cols, len(vertices) - 1), right[-1], index[-1]], axis=1))
    return vertices, np.concatenate(faces).astype(np.int32)


class Blob:
    """The seed's shape: radius 0.6 plus a few Gaussian bumps in seeded directions; colours follow them."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        directions = rng.normal(size=(5, 3))
        self.directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
        self.heights = rng.uniform(0.1, 0.35, 5)
        self.base = rng.uniform(0.2, 0.9, 3)
        self.tint = rng.uniform(0.0, 1.0, (5, 3))

    def bumps(self, unit: np.ndarray) -> np.ndarray:
        return np.exp(-8.0 * (1.0 - unit @ self.directions.T))  # [N, 5]

    def surface(self, unit: np.ndarray, grown: float) -> np.ndarray:
        radius = 0.6 + grown * (self.bumps(unit) @ self.heights)
        return unit * (radius * (0.6 + 0.4 * grown))[:, None]

    def color(self, points: np.ndarray) -> np.ndarray:
        unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-9)
        weights = self.bumps(unit)
        color = self.base + weights @ (self.tint - self.base) / (1.0 + weights.sum(axis=1, keepdims=True))
        return np.clip(color, 0.0, 1.0)


def run_job(
    spec: JobSpec,
    init_mesh: tuple[np.ndarray, np.ndarray] | None,
    emit: JobEvents,
    should_cancel: Callable[[], bool],
) -> dict:
    started = time.monotonic()
    blob = Blob(spec.seed)
    delay = SLOW_STEP_SECONDS if "[slow]" in spec.prompt else STEP_SECONDS
    dense = "[50k]" in spec.prompt
    steps = 2 * STEPS_50K_HALF if dense else STEPS
    stopped_at = None
    for step in range(steps):
        if should_cancel():
            raise Cancelled(step)
        if emit.finish_requested():  # finish now: the asset as the real job delivers it, early
            stopped_at = step
            break
        if "[oom]" in spec.prompt and step == 2:
            raise MemoryError("CUDA out of memory (fake): tried to allocate 2.00 GiB")
        if dense:
            unit, faces = _uv_sphere(224, 224 - (step >= STEPS_50K_HALF and step % 2))
        else:
            unit, faces = _sphere(2 if step < steps // 2 else 3)
        grown = (step + 1) / steps
        positions = blob.surface(unit, grown).astype(np.float32)
        colors = (blob.color(positions) * 255).round().astype(np.uint8)
        time.sleep(delay)
        elapsed = time.monotonic() - started
        eta = elapsed / (step + 1) * (steps - step - 1)
        emit.progress(step + 1, steps, "shape" if step < steps - 1 else "texture", 500.0, 1.0, eta, elapsed)
        emit.preview_mesh(step + 1, positions, faces, colors)
    if should_cancel():
        raise Cancelled(steps)

    unit, faces = _sphere(3)
    vertices = blob.surface(unit, 1.0).astype(np.float32)
    out_dir = Path(spec.output_dir) / f"fake_seed{spec.seed}_{time.time_ns()}"
    exported = bake_and_export(vertices, faces, blob.color, out_dir, texture_size=128, write_obj=False)
    texture_png = _png(exported["glb"])
    emit.texture(steps, texture_png, 128, 128, final=True)
    # The real job renders a strip of views side by side; the texture beside a white view will do here.
    preview_png = out_dir / "preview.png"
    texture = Image.open(io.BytesIO(texture_png)).convert("RGB")
    strip = Image.new("RGB", (texture.width * 2, texture.height), "white")
    strip.paste(texture, (0, 0))
    strip.save(preview_png)
    job_json = out_dir / "job.json"
    record = {"job": spec.to_json_dict(), "seed": spec.seed, "stopped_at_step": stopped_at}
    job_json.write_text(json.dumps(record, indent=2))
    seconds = time.monotonic() - started
    return {
        "glb": str(exported["glb"]),
        "preview_png": str(preview_png),
        "job_json": str(job_json),
        "out_dir": str(out_dir),
        "seconds": seconds,
        "steps_per_second": steps / seconds,
        "stopped_at_step": stopped_at,
    }


def _png(glb_path: Path) -> bytes:
    """The texture embedded in the GLB, re-encoded as PNG (what the texture frame carries)."""
    scene = trimesh.load(glb_path, force="scene")
    geometry = next(iter(scene.geometry.values()))
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(geometry.visual.material.baseColorTexture.convert("RGB"))).save(buffer, "PNG")
    return buffer.getvalue()
