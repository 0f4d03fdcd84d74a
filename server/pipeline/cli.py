"""`python -m server generate --prompt "a red cube" --seed 0 --out DIR [--variants N]`: jobs headless.

Runs one job per seed with a progress bar on stderr; the last line on stdout is JSON with the paths
of the asset (or, with --variants, of every variant and a labelled grid of their previews).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from server.distill.update import Method
from server.job.errors import JobSpecError, NonFiniteError
from server.job.events import Events
from server.job.spec import JobSpec
from server.pipeline.asset import JobResult, slug
from server.pipeline.run import run_job


class ProgressBar(Events):
    def __init__(self, label: str, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(self, step, total, stage, t, loss, eta_s, elapsed_s) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(stage=stage, t=t, loss=f"{loss:.3g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    parser.add_argument("--variants", type=int, default=1, help="re-roll N seeds (seed, seed+1, ...)")
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
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the prior's own")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def spec_from_args(args: argparse.Namespace, seed: int, extra: dict | None = None) -> JobSpec:
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": seed,
        "output_dir": str(args.out),
        **(extra or {}),
    }
    keys = (
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
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            fields[key] = value
    return JobSpec.from_dict(fields)


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


def main(args: argparse.Namespace) -> int:
    return run_variants(args, {}, lambda spec, events: run_job(spec, None, events, lambda: False))


def run_variants(args: argparse.Namespace, extra: dict, run: Callable[[JobSpec, Events], JobResult]) -> int:
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
    results, done_seeds = [], []
    for seed, spec in zip(seeds, specs, strict=True):
        bar = ProgressBar(f"seed {seed}", spec.steps)
        try:
            results.append(run(spec, bar))
        except NonFiniteError as error:  # this seed diverged or its shape vanished: the next may not
            print(
                f"seed {seed}: error: {error}; try another seed, or a lower --guidance-scale", file=sys.stderr
            )
            continue
        except JobSpecError as error:  # the input itself (a texture job's UV map): no seed can help
            print(f"error: {error}; fix: {getattr(error, 'fix', 'change it')}", file=sys.stderr)
            return 2
        finally:
            bar.close()
        done_seeds.append(seed)
        print(f"wrote {results[-1].glb}", file=sys.stderr)
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
