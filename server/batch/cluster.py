"""Where a batch runs: Ray on this machine, or an existing Ray cluster joined by its address, and what
each worker asks of it (one GPU where the cluster has GPUs, else a number of CPUs)."""

from __future__ import annotations

from pathlib import Path

import ray

SERVER = Path(__file__).resolve().parents[1]  # the `server` package, shipped to every node by Ray


def connect(address: str, threads: int, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` ("ray://head:10001", "head:6379"), or with "auto" the Ray instance
    `ray start` left on this machine, else a new one here ("local" always starts a new one, of
    `num_cpus`). Workers get this checkout's `server` package (so no node needs the project installed,
    only the server's requirements and Ray) and `threads` OpenMP threads."""
    runtime_env = {
        "py_modules": [str(SERVER)],
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {"OMP_NUM_THREADS": str(threads)},
    }
    options = {} if num_cpus is None else {"num_cpus": num_cpus}
    ray.init(
        address=None if address == "auto" else address,
        runtime_env=runtime_env,
        include_dashboard=False,
        log_to_driver=False,
        **options,
    )


def worker_resources(cpus_per_worker: int) -> dict:
    """What one worker reserves: a GPU (and a CPU to feed it) where the cluster has GPUs, else CPUs."""
    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": cpus_per_worker}


def default_workers(cpus_per_worker: int) -> int:
    """One worker per GPU of the cluster, else as many as its CPUs hold."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    return gpus or max(1, int(resources.get("CPU", 1)) // cpus_per_worker)
