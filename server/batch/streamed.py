"""A batch a protocol client asked for (`batch` message): run on Ray by `run_batch`, each finished variant
sent to the client as its own `done` frame (with the GLB bytes, so a remote Blender keeps it) the moment
its files are written, and a `progress` frame over the batch's variants.

The server imports this only for a batch, and Ray only here: a server without the Ray extra answers
`missing_extra` naming the fix. Ray is joined once per server process (`--ray`), then kept for the
next batch, so only the first batch pays its start-up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from server.batch.jobs import BatchJob
from server.job.errors import MissingExtraError
from server.job.spec import JobSpec
from server.wire import protocol

RAY_FIX = "install the Ray extra in the server's environment: python -m pip install -r requirements-ray.txt"
_connect_lock = threading.Lock()


def variant_id(batch_id: str, job: BatchJob) -> str:
    """The job id a variant's `done` carries: the batch's id and the variant's place in it."""
    return f"{batch_id}-{job.index}"


def _ray_ready(address: str) -> None:
    """Join Ray at `address` unless this process already has; MissingExtraError says what is missing."""
    try:
        import ray
    except ImportError as error:
        message = f"this server cannot run batches: Ray is not installed ({error})"
        raise MissingExtraError(message, RAY_FIX) from None
    from server.batch.cluster import connect

    with _connect_lock:
        if ray.is_initialized():
            return
        try:
            connect(address, threads=1)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise MissingExtraError(
                f"this server cannot reach Ray at {address!r}: {error}",
                "start the cluster's head with `ray start --head`, or start the server with --ray auto",
            ) from None


class _Stream:
    """A `BatchListener` that turns each finished variant into frames for the batch's client."""

    def __init__(self, batch_id: str, total: int, send: Callable[[bytes], object]):
        self.batch_id, self.total, self.send = batch_id, total, send
        self.ended = 0

    def started(self, job: BatchJob, worker_pid: int) -> None: ...

    def retrying(self, job: BatchJob, error: str) -> None: ...

    def finished(self, job: BatchJob, outcome: dict, failed: bool) -> None:
        self.ended += 1
        if not failed:
            seconds = float(outcome["seconds"])
            steps = JobSpec.from_dict(job.settings).steps
            self.send(
                protocol.done(
                    variant_id(self.batch_id, job),
                    glb=outcome["glb"],
                    preview_png=outcome["preview_png"],
                    job_json=outcome["job_json"],
                    out_dir=outcome["out_dir"],
                    seconds=seconds,
                    steps_per_second=steps / seconds if seconds > 0 else 0.0,
                    glb_bytes=Path(outcome["glb"]).read_bytes(),
                    batch_id=self.batch_id,
                    prompt=job.prompt,
                    seed=job.seed,
                    worker=outcome["worker"],
                    stopped_at_step=None,
                )
            )
        self.send(protocol.progress(self.batch_id, self.ended, self.total, "variants"))


def run_streamed(
    batch_id: str,
    jobs: list[BatchJob],
    out: Path,
    send: Callable[[bytes], object],
    ray_address: str,
    cancelled: Callable[[], bool],
    finishing: Callable[[], bool],
) -> dict:
    """Run the batch, streaming each variant to `send`; returns `BatchResult.to_dict()`. Raises
    MissingExtraError before anything runs when Ray is missing or unreachable."""
    _ray_ready(ray_address)
    from server.batch.cluster import default_workers, worker_resources
    from server.batch.driver import run_batch

    stream = _Stream(batch_id, len(jobs), send)
    send(protocol.progress(batch_id, 0, len(jobs), "variants"))
    workers = min(default_workers(1), max(1, len(jobs)))
    result = run_batch(
        jobs, out, workers, worker_resources(1), listener=stream, cancelled=cancelled, finishing=finishing
    )
    return result.to_dict()
