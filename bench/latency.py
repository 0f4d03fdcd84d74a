"""The waits a user feels: `python -m server.bench latency [--json]`.

1. Submission to first preview on a warm server: a real `python -m server serve` child process
   (`server.wire.client.ServerProcess`, as Blender starts it) runs the CPU demo job; the time from sending
   `generate` to receiving the first `preview_mesh` frame, after one job has already loaded the prior
   (that first, cold job is reported too). Each job is cancelled once its first preview is in.
2. Preview arrival to display in Blender: in a separate process with bpy (`bench/blender_latency.py`,
   Blender as a module; bpy can be imported once per process and keeps its threads apart), the
   extension's own `Session` starts the server and a job the way the Generate button does, and is
   pumped at the cadence of its timer (`TICK_BUSY_SECONDS`). For each preview mesh, the time from the
   client's reader thread queueing the frame to the pump having put it into the Blender mesh; the
   pump's own time per mesh tick; and the whole click-to-first-preview-shown time. Headless Blender
   draws no viewport, so the GPU upload of the redraw is not included. Skipped (with a note) where
   bpy is not installed.
3. What a dense preview costs the pump (`pump_ms_50k`): the extension's own `apply_preview` on a
   50k-vertex mesh, once as a new topology and once moving the vertices in place (median of 7).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from server.wire import protocol
from server.wire.client import Connection, ServerError, ServerProcess

ROOT = Path(__file__).resolve().parents[1]  # the repository: the extension's folder and the server's cwd
DEMO_JOB = {"prompt": "a red cube", "device": "cpu"}  # the CPU demo: JobSpec defaults otherwise
TIMEOUT_S = 300.0


def server_environment(threads: int) -> dict[str, str]:
    """This environment with `threads` OpenMP threads that sleep when idle (the machine is shared)."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")


def wait_job(
    connection: Connection, job_id: str, types: set[str], timeout: float = TIMEOUT_S
) -> protocol.Message:
    """The next frame of job `job_id` whose type is one of `types`; a job error raises ServerError."""
    deadline = time.monotonic() + timeout
    while True:
        message = connection.get(timeout=max(0.0, deadline - time.monotonic()))
        if message is None:
            raise TimeoutError(f"no {'/'.join(sorted(types))} for job {job_id} within {timeout:g} s")
        if message.get("job_id") != job_id:
            continue
        if message.type in types:
            return message
        if message.type == protocol.ERROR:
            raise ServerError(message)


def first_preview(connection: Connection, job_id: str, job: dict) -> dict[str, float]:
    """Milliseconds from sending the job to `accepted` and to its first preview mesh; then cancel it."""
    start = time.perf_counter()
    connection.generate(job_id, job)
    wait_job(connection, job_id, {protocol.ACCEPTED})
    accepted = time.perf_counter()
    wait_job(connection, job_id, {protocol.PREVIEW_MESH})
    preview = time.perf_counter()
    connection.cancel(job_id)
    wait_job(connection, job_id, {protocol.CANCELLED, protocol.DONE})
    return {"accepted_ms": 1e3 * (accepted - start), "first_preview_ms": 1e3 * (preview - start)}


def server_latency(repeats: int, threads: int, job: dict = DEMO_JOB) -> dict:
    """Start-up, cold and warm submission-to-first-preview times of a real server child process."""
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as out:
        start = time.perf_counter()
        server = ServerProcess(
            sys.executable, ["--output-root", out], cwd=ROOT, env=server_environment(threads)
        )
        try:
            server.hello()
            hello_ms = 1e3 * (time.perf_counter() - start)
            cold = first_preview(server, "cold", job)
            warm = [first_preview(server, f"warm{i}", job) for i in range(repeats)]
        finally:
            server.close()
    first = [w["first_preview_ms"] for w in warm]
    return {
        "server_start_to_hello_ms": round(hello_ms, 1),
        "cold_first_preview_ms": round(cold["first_preview_ms"], 1),
        "accepted_ms": round(statistics.median(w["accepted_ms"] for w in warm), 2),
        "first_preview_ms": round(statistics.median(first), 1),
        "first_preview_ms_min": round(min(first), 1),
        "first_preview_ms_max": round(max(first), 1),
        "repeats": repeats,
    }


# ------------------------------------------------------------------------------- the Blender side


def ball(rings: int = 201, segments: int = 250) -> tuple[np.ndarray, np.ndarray]:
    """A closed UV sphere of (rings - 1) * segments + 2 vertices (50k by default) and its triangles."""
    theta = np.linspace(0.0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0.0, 2.0 * np.pi, segments, endpoint=False)
    rows = np.stack(np.meshgrid(theta, phi, indexing="ij"), -1).reshape(-1, 2)
    ring_points = np.stack(
        [
            np.sin(rows[:, 0]) * np.cos(rows[:, 1]),
            np.sin(rows[:, 0]) * np.sin(rows[:, 1]),
            np.cos(rows[:, 0]),
        ],
        -1,
    )
    positions = np.concatenate([[[0.0, 0.0, 1.0]], ring_points, [[0.0, 0.0, -1.0]]]).astype(np.float32)
    grid = 1 + np.arange((rings - 1) * segments).reshape(rings - 1, segments)
    right = np.roll(grid, -1, axis=1)
    top, bottom = 0, len(positions) - 1
    faces = [
        np.stack([np.full(segments, top), grid[0], right[0]], -1),
        np.stack([grid[:-1], grid[1:], right[1:]], -1).reshape(-1, 3),
        np.stack([grid[:-1], right[1:], right[:-1]], -1).reshape(-1, 3),
        np.stack([grid[-1], np.full(segments, bottom), right[-1]], -1),
    ]
    return positions, np.concatenate(faces).astype(np.int32)


def blender_latency(repeats: int, previews: int, threads: int) -> dict:
    """`bench/blender_latency.py` in its own bpy process (the server never imports bpy, and bpy is
    imported once per process); a note if bpy is missing."""
    if importlib.util.find_spec("bpy") is None:
        return {"note": "bpy (Blender as a module) is not installed; the Blender side was not measured"}
    command = [
        sys.executable, str(ROOT / "bench" / "blender_latency.py"),
        "--repeats", str(repeats), "--previews", str(previews), "--threads", str(threads),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=ROOT, env=server_environment(threads), capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(f"the Blender side failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_latency(repeats: int, threads: int, previews: int = 6) -> dict:
    """Both halves, as one JSON-ready dict (what the step bench includes unless --no-latency)."""
    print("latency: server submission to first preview...", file=sys.stderr, flush=True)
    server = server_latency(repeats, threads)
    print("latency: preview arrival to display in Blender...", file=sys.stderr, flush=True)
    return {"server": server, "blender": blender_latency(repeats, previews, threads)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    parser.add_argument("--repeats", type=int, default=3, help="warm jobs per figure")
    parser.add_argument("--previews", type=int, default=6, help="previews timed per job in Blender")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the server")


def print_latency(result: dict) -> None:
    server, blender = result["server"], result["blender"]
    rows = [
        ("server start to hello", server["server_start_to_hello_ms"]),
        ("cold job, submission to 1st preview", server["cold_first_preview_ms"]),
        ("warm job, submission to accepted", server["accepted_ms"]),
        (f"warm job, submission to 1st preview (median of {server['repeats']})", server["first_preview_ms"]),
    ]
    if "note" not in blender:
        rows += [
            ("Blender, click to 1st preview shown", blender["click_to_first_preview_shown_ms"]),
            ("Blender, preview arrival to display (median)", blender["arrival_to_display_ms"]),
            ("Blender, preview arrival to display (max)", blender["arrival_to_display_ms_max"]),
        ]
        rows += [(f"Blender, one pump tick ({kind})", ms) for kind, ms in blender["pump_ms"].items()]
        dense = blender["pump_ms_50k"]
        rows += [
            (f"Blender, applying a {dense['vertices']}-vertex preview ({kind})", dense[kind])
            for kind in ("new_topology", "in_place")
        ]
    for label, ms in rows:
        print(f"{label:<56}{ms:>10.1f} ms")
    if "note" in blender:
        print(f"Blender: {blender['note']}")


def main(args: argparse.Namespace) -> int:
    result = measure_latency(args.repeats, args.threads, args.previews)
    print_latency(result)
    if args.json:
        print(json.dumps(result))
    return 0
