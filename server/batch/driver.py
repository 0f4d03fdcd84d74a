"""A batch from its jobs to the assets on the submitting machine: workers as Ray actors, each job sent
to an idle one, each reply written into `out` atomically (`server.pipeline.asset.staged_folder`).

Faults lose nothing: a job whose worker process or node died is sent again to a fresh worker (at most
`retries` times); a finished job is written once, by this process, the moment its reply arrives; a
job that fails (bad settings, a vanished shape) fails alone with its error. Ctrl-C (or `cancelled`,
a server's client cancelling) kills the workers at once and keeps what had finished; `finishing`
sends no new job and waits for the running ones.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

from server.batch.jobs import BatchJob
from server.batch.worker import VariantWorker
from server.pipeline.asset import staged_folder

WORKER_LOST = (RayActorError, WorkerCrashedError, ObjectLostError)
POLL_SECONDS = 0.25  # how often a waiting batch looks at `cancelled`


class BatchCancelled(Exception):
    """The batch's client cancelled it: handled as Ctrl-C is."""


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


class WorkerPool:
    """The batch's actors, each one process for its whole life (Ray does not restart it: a lost worker
    is replaced here, where it is known which job it held). A worker is starting (until its pid comes
    back, which the batch waits on beside the jobs, so a replacement never holds up the others), idle,
    or running a job."""

    def __init__(self, resources: dict, threads: int):
        self.actor_class = ray.remote(max_restarts=0, max_task_retries=0, **resources)(VariantWorker)
        self.threads = threads
        self.starting: dict[ray.ObjectRef, ray.actor.ActorHandle] = {}
        self.idle: list[Worker] = []
        self.running: dict[ray.ObjectRef, tuple[BatchJob, Worker]] = {}

    def start(self, count: int) -> None:
        for _ in range(count):
            actor = self.actor_class.remote(self.threads)
            self.starting[actor.pid.remote()] = actor

    def waiting_on(self) -> list[ray.ObjectRef]:
        return [*self.running, *self.starting]

    def send(self, job: BatchJob) -> Worker:
        worker = self.idle.pop()
        self.running[worker.actor.run.remote(job.settings)] = (job, worker)
        return worker

    def started(self, ref: ray.ObjectRef) -> str | None:
        """The worker of `ref` is up and idle; or the reason it could not start."""
        actor = self.starting.pop(ref)
        try:
            self.idle.append(Worker(actor, ray.get(ref)))
        except WORKER_LOST as error:
            ray.kill(actor)
            return f"{type(error).__name__}: {error}"[:500]
        return None

    def close(self) -> None:
        """Kill every worker: a running job stops at once (Ctrl-C, or the batch is over)."""
        actors = [*self.starting.values(), *(w.actor for w in self.idle)]
        for actor in [*actors, *(worker.actor for _, worker in self.running.values())]:
            ray.kill(actor)


def run_batch(
    jobs: list[BatchJob],
    out: Path,
    workers: int,
    resources: dict,
    threads: int = 1,
    retries: int = 2,
    listener: BatchListener | None = None,
    cancelled: Callable[[], bool] = lambda: False,
    finishing: Callable[[], bool] = lambda: False,
) -> BatchResult:
    """Run every valid job of `jobs` on `workers` Ray actors (Ray must be initialised) into `out`.
    Once `finishing()` is true no job is sent; the ones not sent are listed as cancelled."""
    start = time.perf_counter()
    listener = listener or BatchListener()
    out = Path(out).expanduser()
    result = BatchResult()

    def fail(job: BatchJob, error: str) -> None:
        failure = {"index": job.index, **job.label(), "error": error}
        result.failed.append(failure)
        listener.finished(job, failure, True)

    def keep(job: BatchJob, reply: dict) -> None:
        asset = {
            "index": job.index,
            **job.label(),
            **save_reply(out, reply),
            "seconds": round(reply["seconds"], 2),
            "worker": reply["worker"],
        }
        result.assets.append(asset)
        listener.finished(job, asset, False)

    for job in jobs:
        if job.error is not None:
            fail(job, job.error)
    pending = deque(job for job in jobs if job.error is None)
    attempts: dict[int, int] = {}
    start_failures, start_error, arrived = 0, None, None
    pool = WorkerPool(resources, threads)
    pool.start(min(workers, len(pending)))
    try:
        while (pending and not finishing()) or pool.running:
            while pending and pool.idle and not finishing():
                job = pending.popleft()
                listener.started(job, pool.send(job).pid)
            if not pool.waiting_on():  # every worker failed to start, more times than retries
                while pending:
                    fail(pending.popleft(), f"no worker could start: {start_error}")
                break
            ready_refs = ray.wait(pool.waiting_on(), num_returns=1, timeout=POLL_SECONDS)[0]
            if not ready_refs:
                if cancelled():
                    raise BatchCancelled
                continue
            ready = ready_refs[0]
            if ready in pool.starting:
                start_error = pool.started(ready)
                if start_error is not None and start_failures < retries:
                    start_failures += 1
                    pool.start(1)
                continue
            job, worker = pool.running.pop(ready)
            try:
                reply = ray.get(ready)
            except WORKER_LOST as error:
                ray.kill(worker.actor)
                pool.start(1)
                attempts[job.index] = attempts.get(job.index, 0) + 1
                message = f"worker {worker.pid} lost: {type(error).__name__}: {error}"[:500]
                if attempts[job.index] <= retries:
                    result.retried.append({"index": job.index, **job.label(), "error": message})
                    listener.retrying(job, message)
                    pending.appendleft(job)
                else:
                    fail(job, f"gave up after {retries} retries; last: {message}")
                continue
            except RayTaskError as error:  # not a job error the worker knows: still this job's alone
                reply = {"error": str(error.cause or error)}
            pool.idle.append(worker)
            if "error" in reply:
                fail(job, reply["error"])
                continue
            arrived = (job, reply)
            keep(job, reply)
            arrived = None
        result.cancelled.extend({"index": job.index, **job.label()} for job in pending)  # finishing
    except (KeyboardInterrupt, BatchCancelled):
        kept = {asset["index"] for asset in result.assets}
        if arrived is not None and arrived[0].index not in kept:  # its files were being written: keep it
            keep(*arrived)
        running = [job for job, _ in pool.running.values()]
        result.cancelled.extend({"index": job.index, **job.label()} for job in [*running, *pending])
    finally:
        pool.close()
    result.seconds = time.perf_counter() - start
    return result
