"""The Blender half of `python -m server.bench latency` (`bench/latency.py`): run in a bpy process of its own.

    python bench/blender_latency.py [--repeats N --previews N --threads N]

Prints one JSON line (the bench's `blender` figures). It lives outside `server/` because the
server never imports bpy; it imports the repository root as the extension, as Blender would.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bpy
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.latency import DEMO_JOB, TIMEOUT_S, ball  # noqa: E402

EXTENSION = "blender_cfd_bench"  # the name the repository root is imported under here


def import_extension():
    """The extension's session module, with the repository root imported as the extension package."""
    spec = importlib.util.spec_from_file_location(
        EXTENSION, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[EXTENSION] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{EXTENSION}.blender_cfd.session")


def blender_side(repeats: int, previews: int, threads: int) -> dict:
    """Runs inside the bpy process: click-to-first-preview and arrival-to-display with the real pump."""
    session = import_extension()
    extension = sys.modules[EXTENSION]
    ctl = session.Session()
    with tempfile.TemporaryDirectory(prefix="bench-latency-blender-") as out:
        env = extension.blender_cfd.environment.server_environment()
        env.update(OMP_NUM_THREADS=str(threads))
        connection = extension.server.wire.client.ServerProcess(
            sys.executable, ["--output-root", out], cwd=ROOT, env=env
        )
        ctl.connection = connection
        try:
            connection.hello()
            jobs = [
                _pumped_job(ctl, bpy.context, previews, session.TICK_BUSY_SECONDS) for _ in range(1 + repeats)
            ]
        finally:
            ctl.shutdown()
        dense = dense_preview_ms(extension.blender_cfd.scene_objects, bpy)
    warm = jobs[1:]  # the first job loaded the prior
    shown = [1e3 * s for j in warm for s in j["arrival_to_display_s"]]
    ticks = {kind: [1e3 * s for s in values] for kind, values in ctl.stats.ticks.items() if values}
    return {
        "tick_interval_ms": 1e3 * session.TICK_BUSY_SECONDS,
        "click_to_first_preview_shown_ms": round(
            statistics.median(1e3 * j["click_to_shown_s"] for j in warm), 1
        ),
        "arrival_to_display_ms": round(statistics.median(shown), 2),
        "arrival_to_display_ms_max": round(max(shown), 2),
        "previews_timed": len(shown),
        "preview_vertices": warm[-1]["vertices"],
        "pump_ms": {kind: round(statistics.median(ms), 2) for kind, ms in ticks.items() if kind != "idle"},
        "pump_ms_50k": dense,
    }


def dense_preview_ms(scene_objects, bpy, repeats: int = 7) -> dict:
    """What the pump spends on a 50k-vertex preview: a new topology, then the same faces moved."""
    positions, faces = ball()
    colours = np.full((len(positions), 3), 200, dtype=np.uint8)
    mesh = bpy.data.meshes.new("bench 50k preview")
    timings: dict[str, list[float]] = {"new_topology": [], "in_place": []}
    for repeat in range(repeats):
        for kind in timings:
            moved = positions * (1.0 + 0.01 * repeat)
            start = time.perf_counter()
            scene_objects.apply_preview(mesh, moved, faces, colours, same_topology=kind == "in_place")
            timings[kind].append(1e3 * (time.perf_counter() - start))
    assert len(mesh.vertices) == len(positions) and len(mesh.polygons) == len(faces)
    bpy.data.meshes.remove(mesh)
    return {"vertices": len(positions)} | {
        kind: round(statistics.median(ms), 2) for kind, ms in timings.items()
    }


def _pumped_job(ctl, context, previews: int, tick_s: float) -> dict:
    """Start the demo job as the Generate button does, pump it like the timer until `previews`
    previews are shown, then cancel it and pump until the server confirms."""
    start = time.perf_counter()
    job_id = ctl.start(context, dict(DEMO_JOB), (0.0, 0.0, 0.0))
    if job_id is None:
        raise RuntimeError(f"the session could not start the job: {ctl.error}")
    delays = ctl.stats.preview_delays  # the pump notes each shown preview's arrival-to-display time
    already, shown_step, first_shown, vertices = len(delays), -1, None, 0
    deadline = time.monotonic() + TIMEOUT_S
    while len(delays) - already < previews:
        if time.monotonic() > deadline or not ctl.busy:
            raise RuntimeError(f"no preview shown within {TIMEOUT_S:g} s; error: {ctl.error}")
        ctl.tick()
        now = time.perf_counter()
        step = ctl.job.preview_step if ctl.job is not None else -1
        if step > 0 and step != shown_step:
            first_shown = first_shown or now
            shown_step = step
            vertices = len(context.scene.objects[ctl.job.object_name].data.vertices)
        time.sleep(tick_s)
    ctl.cancel()
    while ctl.busy:
        ctl.tick()
        time.sleep(tick_s)
    shown = list(delays)[already:]
    return {"click_to_shown_s": first_shown - start, "arrival_to_display_s": shown, "vertices": vertices}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="warm jobs per figure")
    parser.add_argument("--previews", type=int, default=6, help="previews timed per job")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the server")
    args = parser.parse_args()
    print(json.dumps(blender_side(args.repeats, args.previews, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
