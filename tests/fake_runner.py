"""A stand-in job for TRANSPORT tests of `python -m server serve --runner tests.fake_runner:run_job`.

It has the real job interface but no model: every STEP_SECONDS it reports progress and, when a
preview is due, a small mesh (an octahedron, or the init mesh, scaled with the step). It honours
cancellation between steps, and a `finish` by stopping there and writing its outputs. A prompt
starting with "fail:" raises the named failure, to check the server's error mapping end to end.
`describe` stands in for the torch probe in the hello.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.job.errors import Cancelled, NonFiniteError
from server.job.events import JobEvents
from server.job.spec import JobSpec

STEP_SECONDS = 0.05
OCTAHEDRON = (
    np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float32),
    np.array(
        [[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]],
        dtype=np.int32,
    ),
)
FAILURES = {
    "fail:memory": lambda: MemoryError("cannot allocate the fake render buffer"),
    "fail:nan": lambda: NonFiniteError("loss became NaN at the fake step"),
    "fail:internal": lambda: KeyError("fake_missing_key"),
}


def describe() -> dict:
    return {"torch": None, "cuda": None, "device": "cpu", "device_name": "fake device"}


def run_job(
    spec: JobSpec,
    init_mesh: tuple[np.ndarray, np.ndarray] | None,
    emit: JobEvents,
    should_cancel: Callable[[], bool],
) -> dict:
    if spec.prompt in FAILURES:
        raise FAILURES[spec.prompt]()
    positions, faces = init_mesh if init_mesh is not None else OCTAHEDRON
    started = time.monotonic()
    stopped_at = None
    for step in range(spec.steps):
        if should_cancel():
            raise Cancelled(step)
        if emit.finish_requested():
            stopped_at = step
            break
        time.sleep(STEP_SECONDS)
        elapsed = time.monotonic() - started
        emit.progress(
            step + 1,
            spec.steps,
            "fake",
            round(980 - 780 * step / max(spec.steps - 1, 1)),
            1.0 / (step + 1),
            None,
            elapsed,
        )
        if emit.preview_due():
            scale = 0.5 + 0.5 * (step + 1) / spec.steps
            colors = np.full(positions.shape, step % 256, dtype=np.uint8)
            emit.preview_mesh(step + 1, positions * scale, faces, colors)
    out_dir = Path(spec.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "job.json").write_text(json.dumps({**spec.to_json_dict(), "stopped_at_step": stopped_at}))
    (out_dir / "fake.glb").write_bytes(b"not a real glb: written by tests/fake_runner.py")
    seconds = time.monotonic() - started
    return {
        "glb": str(out_dir / "fake.glb"),
        "preview_png": None,
        "job_json": str(out_dir / "job.json"),
        "out_dir": str(out_dir),
        "seconds": seconds,
        "steps_per_second": spec.steps / seconds,
        "stopped_at_step": stopped_at,
    }
