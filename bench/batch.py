"""Throughput of `python -m server batch` on this machine: `python -m server.bench batch [--json]`.

The same jobs ("a red cube", seeds 0..N-1, short settings) three ways, in one run so the machine's
load is shared alike: one after another through the single-job path (`run_job` in this process, one
torch thread: the baseline), then as a Ray batch with 1 worker and with 2 workers (one CPU and one
torch thread each). For each batch: jobs per hour over its whole wall time (worker start-up
included) and in steady state (from the first job sent), and Ray's overhead per job: the 1-worker
batch's steady-state time per job less the job's own time in its worker (sending the job, the
asset's bytes back, writing them), and less the single-job path's time per job (which also moves
with the machine's load: both are reported, with the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from server.batch.driver import BatchListener, run_batch
from server.batch.jobs import batch_jobs
from server.job.events import Events
from server.job.spec import JobSpec

PROMPT = "a red cube"


class FirstSent(BatchListener):
    """When the first job went out: a batch's steady state starts there (its workers are up)."""

    def __init__(self):
        self.first_sent: float | None = None

    def started(self, job, worker_pid: int) -> None:
        if self.first_sent is None:
            self.first_sent = time.perf_counter()


def single_job_path(settings: dict, seeds: list[int], out: Path) -> dict:
    from server.pipeline.run import run_job

    start = time.perf_counter()
    seconds = []
    for seed in seeds:
        spec = JobSpec.from_dict({**settings, "prompt": PROMPT, "seed": seed, "output_dir": str(out)})
        seconds.append(run_job(spec, None, Events(), lambda: False).seconds)
    wall = time.perf_counter() - start
    return {
        "wall_s": round(wall, 1),
        "job_s_mean": round(statistics.mean(seconds), 2),
        "jobs_per_hour": round(len(seeds) / wall * 3600, 1),
    }


def ray_batch(settings: dict, seeds: list[int], workers: int, out: Path) -> dict:
    listener = FirstSent()
    start = time.perf_counter()
    jobs = batch_jobs([PROMPT], seeds, settings)
    result = run_batch(jobs, out, workers, {"num_cpus": 1}, listener=listener)
    wall = time.perf_counter() - start
    if result.failed or len(result.assets) != len(seeds):
        raise RuntimeError(f"the {workers}-worker batch lost jobs: {result.to_dict()['failed']}")
    steady = wall - (listener.first_sent - start)
    return {
        "workers": workers,
        "wall_s": round(wall, 1),
        "startup_s": round(listener.first_sent - start, 1),
        "steady_s": round(steady, 1),
        "job_s_mean": round(statistics.mean(a["seconds"] for a in result.assets), 2),
        "jobs_per_hour": round(len(seeds) / wall * 3600, 1),
        "jobs_per_hour_steady": round(len(seeds) / steady * 3600, 1),
    }


def measure_batch(jobs: int, settings: dict, out: Path) -> dict:
    import ray

    from server.batch.cluster import connect

    torch.set_num_threads(1)
    seeds = list(range(jobs))
    start = time.perf_counter()
    if not ray.is_initialized():
        connect("local", threads=1, num_cpus=2)
    ray_init = time.perf_counter() - start
    single = single_job_path(settings, seeds, out / "single")
    batches = [ray_batch(settings, seeds, workers, out / f"ray{workers}") for workers in (1, 2)]
    one = batches[0]
    return {
        "jobs": jobs,
        "settings": settings,
        "ray_init_s": round(ray_init, 1),
        "single": single,
        "batches": batches,
        "overhead_per_job_s": round(one["steady_s"] / jobs - one["job_s_mean"], 2),
        "vs_single_path_per_job_s": round(one["steady_s"] / jobs - single["wall_s"] / jobs, 2),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=4, help="seeds 0..N-1 of one prompt")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--grid-resolution", type=int, default=16)
    parser.add_argument("--render-size", type=int, default=32)
    parser.add_argument("--texture-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")


def print_batch(result: dict) -> None:
    single = result["single"]
    print(f"{result['jobs']} jobs, {result['settings']}; Ray start {result['ray_init_s']} s")
    print("| path | wall s | start-up s | s per job (worker) | jobs/hour | jobs/hour, steady |")
    print("|---|---|---|---|---|---|")
    cells = (single["wall_s"], "-", single["job_s_mean"], single["jobs_per_hour"], "-")
    print("| single-job path | " + " | ".join(str(c) for c in cells) + " |")
    for b in result["batches"]:
        print(
            f"| Ray, {b['workers']} worker(s) | {b['wall_s']} | {b['startup_s']} | {b['job_s_mean']} "
            f"| {b['jobs_per_hour']} | {b['jobs_per_hour_steady']} |"
        )
    print(
        f"Ray overhead per job (1 worker, steady state less the job's own time): "
        f"{result['overhead_per_job_s']} s; "
        f"less the single-job path's: {result['vs_single_path_per_job_s']} s"
    )


def main(args: argparse.Namespace) -> int:
    settings = {
        "steps": args.steps,
        "grid_resolution": args.grid_resolution,
        "render_size": args.render_size,
        "texture_size": args.texture_size,
        "device": "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        result = measure_batch(args.jobs, settings, args.out or Path(scratch))
    print_batch(result)
    if args.json:
        print(json.dumps(result))
    return 0
