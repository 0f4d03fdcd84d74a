"""A batch from its jobs to the assets on the submitting machine: workers as Ray actors, each job sent
to an idle one, each reply written into `out` atomically (`server.pipeline.asset.staged_folder`).

Faults lose nothing: a job whose worker process or node died is sent again to a fresh worker (at most
`retries` times); a finished job is written once, by this process, the moment its reply arrives; a
job that fails (bad settings, a vanished shape) fails alone with its error. Ctrl-C kills the workers
at once and keeps what had finished.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from server.batch.jobs import BatchJob
from server.batch.worker import VariantWorker
from server.pipeline.asset import staged_folder

WORKER_LOST = (RayActorError, WorkerCrashedError, ObjectLostError)


class BatchListener:
    """What a running batch reports; a progress bar or a test keeps what it needs."""

    def started(self, job: BatchJob, worker_pid: int) -> None: ...

    def finished(self, job: BatchJob, outcome: dict, failed: bool) -> None: ...

    def retrying(self, job: BatchJob, error: str) -> None: ...


@dataclass
class BatchResult:
    assets: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    retried: list[dict] = field(default_factory=list)
    cancelled: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Each list in job order, without the job indexes."""

        def strip(records: list[dict]) -> list[dict]:
            ordered = sorted(records, key=lambda record: record["index"])
            return [{k: v for k, v in record.items() if k != "index"} for record in ordered]

        return {
            "assets": strip(self.assets),
            "failed": strip(self.failed),
            "retried": strip(self.retried),
            "cancelled": strip(self.cancelled),
            "seconds": round(self.seconds, 2),
        }


@dataclass
class Worker:
    actor: ray.actor.ActorHandle
    pid: int


def save_reply(out: Path, reply: dict) -> dict:
    """Write a worker's files into `out/<name>` atomically; job.json's output folder becomes `out`, so
    the saved job still says where its asset is. Returns the asset's paths."""
    files = dict(reply["files"])
    record = json.loads(files["job.json"])
    record["job"]["output_dir"] = str(out)
    files["job.json"] = json.dumps(record, indent=2).encode()
    with staged_folder(out, reply["name"]) as staging:
        for relative, data in files.items():
            path = staging / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    final = out / reply["name"]
    return {
        "glb": str(final / record["files"]["glb"]),
        "obj": str(final / record["files"]["obj"]),
        "preview_png": str(final / "preview.png"),
        "job_json": str(final / "job.json"),
        "out_dir": str(final),
    }


def start_workers(count: int, resources: dict, threads: int) -> list[Worker]:
    """`count` actors, started together; each is one process for its whole life (Ray does not restart
    it: a lost worker is replaced by the driver, which knows which job it held)."""
    actor_class = ray.remote(max_restarts=0, max_task_retries=0, **resources)(VariantWorker)
    actors = [actor_class.remote(threads) for _ in range(count)]
    pids = ray.get([actor.pid.remote() for actor in actors])
    return [Worker(actor, pid) for actor, pid in zip(actors, pids, strict=True)]


def run_batch(
    jobs: list[BatchJob],
    out: Path,
    workers: int,
    resources: dict,
    threads: int = 1,
    retries: int = 2,
    listener: BatchListener | None = None,
) -> BatchResult:
    """Run every valid job of `jobs` on `workers` Ray actors (Ray must be initialised) into `out`."""
    start = time.perf_counter()
    listener = listener or BatchListener()
    out = Path(out).expanduser()
    result = BatchResult()
    for job in jobs:
        if job.error is not None:
            failure = {"index": job.index, **job.label(), "error": job.error}
            result.failed.append(failure)
            listener.finished(job, failure, True)
    pending = deque(job for job in jobs if job.error is None)
    attempts: dict[int, int] = {}
    idle = start_workers(min(workers, len(pending)), resources, threads) if pending else []
    running: dict[ray.ObjectRef, tuple[BatchJob, Worker]] = {}
    try:
        while pending or running:
            while pending and idle:
                job, worker = pending.popleft(), idle.pop()
                running[worker.actor.run.remote(job.settings)] = (job, worker)
                listener.started(job, worker.pid)
            ready, _ = ray.wait(list(running), num_returns=1)
            job, worker = running.pop(ready[0])
            try:
                reply = ray.get(ready[0])
            except WORKER_LOST as error:
                ray.kill(worker.actor)
                idle.extend(start_workers(1, resources, threads))
                attempts[job.index] = attempts.get(job.index, 0) + 1
                message = f"worker {worker.pid} lost: {type(error).__name__}: {error}"[:500]
                lost = {"index": job.index, **job.label(), "error": message}
                if attempts[job.index] <= retries:
                    result.retried.append(lost)
                    listener.retrying(job, lost["error"])
                    pending.appendleft(job)
                else:
                    lost["error"] = f"gave up after {retries} retries; last: {lost['error']}"
                    result.failed.append(lost)
                    listener.finished(job, lost, True)
                continue
            except RayTaskError as error:  # not a job error the worker knows: still this job's alone
                reply = {"error": str(error.cause or error)}
            idle.append(worker)
            if "error" in reply:
                failure = {"index": job.index, **job.label(), "error": reply["error"]}
                result.failed.append(failure)
                listener.finished(job, failure, True)
                continue
            asset = {
                "index": job.index,
                **job.label(),
                **save_reply(out, reply),
                "seconds": round(reply["seconds"], 2),
                "worker": reply["worker"],
            }
            result.assets.append(asset)
            listener.finished(job, asset, False)
    except KeyboardInterrupt:
        for job, _ in running.values():
            result.cancelled.append({"index": job.index, **job.label()})
        result.cancelled.extend({"index": job.index, **job.label()} for job in pending)
    finally:
        for worker in [*idle, *(worker for _, worker in running.values())]:
            ray.kill(worker.actor)
    result.seconds = time.perf_counter() - start
    return result
