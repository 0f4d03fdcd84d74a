"""`python -m server generate --prompt "a red cube" --seed 0 --out DIR [--variants N]`: jobs headless.

Runs one job per seed with a progress bar on stderr; the last line on stdout is JSON with the paths
of the asset (or, with --variants, of every variant and a labelled grid of their previews).
Ctrl-C once finishes the running job now (its whole asset is still written, later variants are not
started); Ctrl-C again cancels it and nothing more is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from server.distill.update import Method
from server.job.errors import Cancelled, JobSpecError, NonFiniteError
from server.job.events import Events
from server.job.spec import JobSpec
from server.pipeline.asset import JobResult, slug
from server.pipeline.run import run_job


class Interrupts:
    """Ctrl-C as the panel's two buttons: the first asks to finish now, the second cancels."""

    def __init__(self) -> None:
        self.finish = threading.Event()
        self.cancel = threading.Event()

    def handle(self, signum, frame) -> None:
        if self.finish.is_set():
            self.cancel.set()
            print("\ncancelling: nothing more is written", file=sys.stderr, flush=True)
            raise KeyboardInterrupt  # also stops a bake in progress; its staging folder is removed
        self.finish.set()
        print("\nfinishing now: the asset is baked and written (Ctrl-C again cancels)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        previous = signal.signal(signal.SIGINT, self.handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


class ProgressBar(Events):
    def __init__(self, label: str, total: int, interrupts: Interrupts | None = None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)
        self.interrupts = interrupts

    def finish_requested(self) -> bool:
        return self.interrupts is not None and self.interrupts.finish.is_set()

    def progress(self, step, total, stage, t, loss, eta_s, elapsed_s) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(stage=stage, t=t, loss=f"{loss:.3g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    parser.add_argument("--variants", type=int, default=1, help="re-roll N seeds (seed, seed+1, ...)")
    add_job_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


JOB_KEYS = (
    "method",
    "prior",
    "chain_prior",
    "chain_at",
    "steps",
    "render_size",
    "grid_resolution",
    "texture_size",
    "guidance_scale",
    "device",
    "precision",
)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job settings a command line shares with `python -m server batch` (all but prompt and seed)."""
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--method", choices=[m.value for m in Method], default=None)
    parser.add_argument(
        "--prior",
        default=None,
        help='"shapes" (default), "mvdream", a folder, a checkpoint or a hub id',
    )
    parser.add_argument(
        "--chain-prior",
        default=None,
        help="a prior that takes over at --chain-at (SD after MVDream)",
    )
    parser.add_argument("--chain-at", type=float, default=None, help="fraction of the steps (default 0.5)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--render-size", type=int, default=None)
    parser.add_argument("--grid-resolution", type=int, default=None, help="DMTet cells per axis (default 32)")
    parser.add_argument("--texture-size", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the profile's")
    parser.add_argument(
        "--profile",
        default=None,
        help="pipeline profile: shapes, sd, mvdream, mvdream+sd (default: the prior's own)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SETTING=JSON",
        help='one profile setting, e.g. texture.guidance_scale=30 or geometry.render_size="[[0,512]]"',
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None)


def job_settings(args: argparse.Namespace) -> dict:
    """The settings of `add_job_arguments` that were given, as `JobSpec.from_dict` fields."""
    settings = {"negative_prompt": args.negative_prompt}
    settings.update({key: getattr(args, key) for key in JOB_KEYS if getattr(args, key) is not None})
    if args.profile is not None:
        settings["profile"] = args.profile
    if args.override:
        settings["profile_overrides"] = dict(profile_override(text) for text in args.override)
    return settings


def spec_from_args(args: argparse.Namespace, seed: int, extra: dict | None = None) -> JobSpec:
    fields = {"prompt": args.prompt, "seed": seed, "output_dir": str(args.out), **job_settings(args)}
    fields.update(extra or {})
    return JobSpec.from_dict(fields)


def profile_override(text: str) -> tuple[str, Any]:
    """ "texture.guidance_scale=30" -> ("texture.guidance_scale", 30): the value is JSON, else a string."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise JobSpecError("profile_overrides", f"--override takes SETTING=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def variant_grid(previews: list[Path], seeds: list[int], path: Path) -> None:
    """One row per variant (its preview views, labelled with its seed), so re-rolls can be compared."""
    images = [Image.open(p).convert("RGB") for p in previews]
    width = max(i.width for i in images)
    canvas = Image.new("RGB", (width, sum(i.height for i in images)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for image, seed in zip(images, seeds, strict=True):
        canvas.paste(image, (0, y))
        draw.text((4, y + 4), f"seed {seed}", fill=(0, 0, 0))
        y += image.height
    canvas.save(path)


Runner = Callable[[JobSpec, Events, Callable[[], bool]], JobResult]  # a job, its events, should_cancel


def run_seeds(
    seeds: list[int], specs: list[JobSpec], interrupts: Interrupts, run: Runner
) -> tuple[list, list[int]]:
    """Each seed's job in turn, until every one ran, or Ctrl-C finished or cancelled the current one."""
    results, done_seeds = [], []
    for seed, spec in zip(seeds, specs, strict=True):
        if interrupts.finish.is_set():
            print(f"seed {seed}: not started (finished early)", file=sys.stderr)
            continue
        bar = ProgressBar(f"seed {seed}", spec.steps, interrupts)
        try:
            results.append(run(spec, bar, interrupts.cancel.is_set))
        except NonFiniteError as error:  # this seed diverged or its shape vanished: the next may not
            print(
                f"seed {seed}: error: {error}; try another seed, or a lower --guidance-scale", file=sys.stderr
            )
            continue
        except (Cancelled, KeyboardInterrupt):
            print(f"seed {seed}: cancelled, nothing written for it", file=sys.stderr)
            break
        finally:
            bar.close()
        done_seeds.append(seed)
        stopped = results[-1].stopped_at_step
        note = "" if stopped is None else f" (finished early at step {stopped} of {spec.steps})"
        print(f"wrote {results[-1].glb}{note}", file=sys.stderr)
    return results, done_seeds


def main(args: argparse.Namespace) -> int:
    return run_variants(args, {}, lambda spec, events, cancel: run_job(spec, None, events, cancel))


def run_variants(args: argparse.Namespace, extra: dict, run: Runner) -> int:
    """One job per seed (`extra` settings added to the arguments'), each with a progress bar; the JSON
    summary on stdout and, for several variants, their grid. Exit 2 on bad settings, 1 when no
    variant finished."""
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(max(1, args.variants))]
    try:
        specs = [spec_from_args(args, seed, extra) for seed in seeds]
    except JobSpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    interrupts = Interrupts()
    try:
        with interrupts.installed():
            results, done_seeds = run_seeds(seeds, specs, interrupts, run)
    except JobSpecError as error:  # the input itself (a texture job's UV map): no seed can help
        print(f"error: {error}; fix: {getattr(error, 'fix', 'change it')}", file=sys.stderr)
        return 2
    if interrupts.cancel.is_set():
        return 130  # the shell's code for a job stopped by Ctrl-C
    if not results:
        return 1
    if len(seeds) == 1:
        print(json.dumps(results[0].to_dict()))
        return 0
    grid = Path(args.out) / f"variants_{slug(args.prompt)}_seed{seeds[0]}-{seeds[-1]}.png"
    variant_grid([r.preview_png for r in results], done_seeds, grid)
    print(
        json.dumps(
            {
                "variants": [r.to_dict() for r in results],
                "grid_png": str(grid),
                "seconds": round(sum(r.seconds for r in results), 2),
            }
        )
    )
    return 0
