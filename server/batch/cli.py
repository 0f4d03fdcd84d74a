"""`python -m server batch --prompt "a red cube" --prompt "a blue sphere" --seeds 0-7 --out DIR`: every
(prompt, seed) job on Ray, on this machine (`--ray auto`) or a cluster (`--ray ADDRESS`).

A progress bar over jobs on stderr; each finished asset (GLB, OBJ, preview, job.json) lands in `--out`
as soon as it is done; then a variant grid PNG per prompt. With `--json` the last line on stdout is
one JSON object: `assets` (prompt, seed, paths, seconds, worker), `failed` (prompt, seed, error),
`retried` (jobs sent again after their worker died) and `cancelled`. Exit 0 when every job finished,
1 when some failed, 2 for bad arguments, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from server.batch.jobs import BatchJob, batch_jobs, parse_seeds, read_prompts
from server.pipeline.cli import add_job_arguments, job_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts", type=Path, default=None, help="a text file of prompts, one a line")
    parser.add_argument("--seeds", default="0", help='"0-7", "0,3,5" or both (default 0)')
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (this machine)")
    parser.add_argument(
        "--ray",
        default="auto",
        help='"auto": Ray on this machine (the one `ray start` left, else a new one); or a cluster '
        'address, e.g. "ray://head:10001" or the one `ray start --head` printed',
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="default: one per GPU, else CPUs / --cpus-per-worker"
    )
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPU cores (and threads) per job")
    parser.add_argument("--retries", type=int, default=2, help="times a job is resent after its worker died")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    add_job_arguments(parser)


class JobsBar:
    """A progress bar over the batch's jobs (`server.batch.driver.BatchListener`)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="jobs", unit="job", file=sys.stderr, dynamic_ncols=True)
        self.failed = self.retried = 0

    def started(self, job: BatchJob, worker_pid: int) -> None:
        self.bar.set_postfix_str(f"started {job.prompt!r} seed {job.seed}")

    def finished(self, job: BatchJob, outcome: dict, failed: bool) -> None:
        if failed:
            self.failed += 1
            self.bar.write(f"{job.prompt!r} seed {job.seed}: error: {outcome['error']}", file=sys.stderr)
        self.bar.update(1)
        self.bar.set_postfix(failed=self.failed, retried=self.retried)

    def retrying(self, job: BatchJob, error: str) -> None:
        self.retried += 1
        self.bar.write(f"{job.prompt!r} seed {job.seed}: {error}; sending it again", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def prompt_grids(assets: list[dict], out: Path) -> dict[str, str]:
    """A variant grid PNG per prompt (rows: its finished seeds in order)."""
    from server.pipeline.asset import slug
    from server.pipeline.cli import variant_grid

    grids = {}
    for prompt in dict.fromkeys(asset["prompt"] for asset in assets):
        mine = sorted((a for a in assets if a["prompt"] == prompt), key=lambda a: a["seed"])
        seeds = [a["seed"] for a in mine]
        path = out / f"variants_{slug(prompt)}_seed{seeds[0]}-{seeds[-1]}.png"
        variant_grid([Path(a["preview_png"]) for a in mine], seeds, path)
        grids[prompt] = str(path)
    return grids


def main(args: argparse.Namespace) -> int:
    try:
        prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
        seeds = parse_seeds(args.seeds)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not prompts:
        print("error: no prompts: give --prompt TEXT (repeatable) or --prompts FILE", file=sys.stderr)
        return 2
    for name, value, low in (("workers", args.workers, 1), ("cpus-per-worker", args.cpus_per_worker, 1)):
        if value is not None and value < low:
            print(f"error: --{name} must be at least {low}, got {value}", file=sys.stderr)
            return 2
    if args.retries < 0:
        print(f"error: --retries must be 0 or more, got {args.retries}", file=sys.stderr)
        return 2
    jobs = batch_jobs(prompts, seeds, job_settings(args))
    if all(job.error is not None for job in jobs):
        print(f"error: {jobs[0].error}", file=sys.stderr)
        return 2
    try:
        import ray
    except ImportError:
        print(
            "error: Ray is not installed: install the extra with "
            "`python -m pip install -r requirements-ray.txt`",
            file=sys.stderr,
        )
        return 2
    from server.batch.cluster import connect, default_workers, worker_resources
    from server.batch.driver import run_batch

    try:
        connect(args.ray, args.cpus_per_worker)
    except (ConnectionError, RuntimeError, ValueError) as error:
        print(
            f"error: cannot reach Ray at {args.ray!r}: {error}; start the cluster's head with "
            "`ray start --head`, or use --ray auto to run the batch on this machine",
            file=sys.stderr,
        )
        return 2
    bar = JobsBar(len(jobs))
    try:
        workers = args.workers or default_workers(args.cpus_per_worker)
        resources = worker_resources(args.cpus_per_worker)
        result = run_batch(jobs, args.out, workers, resources, args.cpus_per_worker, args.retries, bar)
    finally:
        bar.close()
        ray.shutdown()
    record = {**result.to_dict(), "grids": prompt_grids(result.assets, Path(args.out).expanduser())}
    if args.json:
        print(json.dumps(record))
    else:
        for asset in record["assets"]:
            print(f"{asset['prompt']!r} seed {asset['seed']}: {asset['glb']}")
        for prompt, grid in record["grids"].items():
            print(f"{prompt!r}: grid {grid}")
    if result.cancelled:
        return 130
    return 1 if result.failed else 0
