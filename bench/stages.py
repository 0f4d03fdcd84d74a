"""Every stage of a profile at full size: `python -m server.bench stages [--json]`.

Runs the job loop (`server.pipeline.setup.start_job`, `server.pipeline.step.optimisation_step`) for a
few steps per stage of a profile (default "sd": coarse volume, DMTet geometry on normal maps, DMTet
texture) on Stable Diffusion 2.1-base with random weights at its real size (`server.testing.sd21`:
UNet, VAE and an OpenCLIP-H-sized text encoder), and checks what a GPU run would need to be true:
every stage runs at its settings, the latents have SD's shape, each stage starts from the surface the
one before left, and nothing becomes NaN. It prints seconds per step and stage, and the process's
peak RSS, which is what a CPU machine needs free for an SD job.

The mesh stages render at `--render-size` (default 512: the reference renders 1024 and encodes 512);
the coarse volume stage at `--coarse-size` (default 128, the reference's first 5k steps: a 512^2
volume render would add about 5 GB, four times the 1.35 GB measured at 256^2, so it is left to the
GPU check, `python -m server.bench gpu`). tests/test_stage_benches.py runs the same function (marked slow).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from server.device import resolve_device, resolve_dtype
from server.job.spec import JobSpec
from server.pipeline.setup import start_job
from server.pipeline.step import optimisation_step
from server.priors import Prior

PROMPT = "a DSLR photo of a red wooden chair"


@dataclass
class StageFigures:
    name: str
    steps: int = 0
    seconds_per_step: float = 0.0  # the median step (the first of a stage warms caches and kernels)
    step_seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(
        default_factory=list
    )  # the process's CPU time: without a busy neighbour's
    render_sizes: list[int] = field(default_factory=list)  # what the prior was shown, per step
    latent_shape: list[int] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    faces_at_start: int = 0  # the surface the stage started from (0: a volume stage's own)
    finite: bool = True


def peak_rss_mb() -> float:
    """The process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def stage_job(
    profile: str,
    steps_per_stage: int,
    render_size: int | None,
    coarse_size: int | None,
    grid: int,
    device: str,
    precision: str,
) -> JobSpec:
    """The profile with `steps_per_stage` steps in each stage, its mesh renders at `render_size` and
    its volume renders at `coarse_size` (None: the profile's own sizes; every other setting is the
    profile's)."""
    stages = JobSpec.from_dict({"prompt": PROMPT, "profile": profile}).resolved_profile().stages
    count = len(stages)
    steps = steps_per_stage * count
    overrides: dict = {"grid_resolution": grid}
    for index, stage in enumerate(stages):
        size = coarse_size if stage.representation == "volume" else render_size
        if size is not None:
            overrides[f"{stage.name}.render_size"] = [[0.0, size]]
        if index < count - 1:  # ends halfway through a step, so int() lands on the stage boundary
            overrides[f"{stage.name}.until"] = (steps_per_stage * (index + 1) + 0.5) / steps
    return JobSpec.from_dict(
        {
            "prompt": PROMPT,
            "prior": "mvdream" if profile.startswith("mvdream") else "stabilityai/stable-diffusion-2-1-base",
            "profile": profile,
            "profile_overrides": overrides,
            "steps": steps,
            "device": device,
            "precision": precision,
        }
    )


def run_stages(spec: JobSpec, prior: Prior, log: Callable[[str], None] | None = None) -> list[StageFigures]:
    """Run `spec` on `prior` step by step; figures per stage (the prior is spied on, not replaced).
    `log` gets a line after every step (a long CPU run shows where it is)."""
    state = start_job(spec, None, prior=prior)
    shown: list[torch.Tensor] = []
    encode = prior.encode_images

    def spy(rgb: torch.Tensor) -> torch.Tensor:
        latents = encode(rgb)
        shown.append(torch.tensor([rgb.shape[1], *latents.shape]))
        return latents

    prior.encode_images = spy
    try:
        figures = [StageFigures(run.settings.name) for run in state.runs]
        for step in range(spec.steps):
            run = state.run_at(step)
            figure = figures[state.runs.index(run)]
            if step == run.start and run.settings.representation == "dmtet":
                with torch.no_grad():
                    figure.faces_at_start = len(state.geometry().faces)
            start, start_cpu = time.perf_counter(), time.process_time()
            outcome = optimisation_step(state, step)
            if state.device.type == "cuda":
                torch.cuda.synchronize(state.device)
            figure.step_seconds.append(round(time.perf_counter() - start, 3))
            figure.cpu_seconds.append(round(time.process_time() - start_cpu, 3))
            figure.steps += 1
            figure.render_sizes.append(int(shown[-1][0]))
            figure.latent_shape = [int(v) for v in shown[-1][1:]]
            figure.timesteps.append(int(outcome.t))
            if log is not None:
                log(
                    f"step {step + 1}/{spec.steps} ({figure.name}): {figure.step_seconds[-1]:.1f} s, "
                    f"CPU {figure.cpu_seconds[-1]:.1f} s, render {figure.render_sizes[-1]}, "
                    f"t {figure.timesteps[-1]}, peak RSS {peak_rss_mb():.0f} MB"
                )
            figure.finite = figure.finite and bool(torch.isfinite(outcome.loss))
    finally:
        prior.encode_images = encode
    for figure in figures:
        figure.seconds_per_step = round(statistics.median(figure.step_seconds), 3) if figure.steps else 0.0
    finite = all(torch.isfinite(p).all() for p in (state.geometry.sdf, *state.texture.parameters()))
    figures[-1].finite = figures[-1].finite and bool(finite)
    return figures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="sd", choices=("sd",), help="the profile whose stages run")
    parser.add_argument("--steps-per-stage", type=int, default=2)
    parser.add_argument("--render-size", type=int, default=512, help="the mesh stages' renders")
    parser.add_argument("--coarse-size", type=int, default=128, help="the volume stage's renders")
    parser.add_argument(
        "--grid", type=int, default=64, help="Kuhn grid resolution (the reference's 128 tets)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")


def main(args: argparse.Namespace) -> int:
    from server.testing.sd21 import RandomSD21, parameter_count

    torch.set_num_threads(1)
    spec = stage_job(
        args.profile,
        args.steps_per_stage,
        args.render_size,
        args.coarse_size,
        args.grid,
        args.device,
        args.precision,
    )
    device = resolve_device(spec.device)
    start = time.perf_counter()
    prior = RandomSD21(device, resolve_dtype(spec.precision, device), [PROMPT])
    build = time.perf_counter() - start
    sizes = {name: parameter_count(getattr(prior, name)) for name in ("unet", "vae", "text_encoder")}
    print(f"SD 2.1-base, random weights: {sizes} parameters, built in {build:.0f} s", flush=True)
    start = time.perf_counter()
    figures = run_stages(spec, prior, log=lambda line: print(line, flush=True))
    total = time.perf_counter() - start
    for f in figures:
        print(
            f"{f.name:9s} {f.steps} steps  {f.seconds_per_step:7.1f} s/step (CPU {f.cpu_seconds} s)  "
            f"renders {f.render_sizes}  "
            f"latents {f.latent_shape}  t {f.timesteps}  faces at start {f.faces_at_start}  finite {f.finite}"
        )
    result = {
        "profile": args.profile,
        "device": str(device),
        "precision": args.precision,
        "grid": args.grid,
        "parameters": sizes,
        "build_s": round(build, 1),
        "run_s": round(total, 1),
        "peak_rss_mb": round(peak_rss_mb()),
        "torch_threads": torch.get_num_threads(),
        "stages": [asdict(f) for f in figures],
    }
    print(f"ran in {total:.0f} s; peak RSS {result['peak_rss_mb']} MB")
    if args.json:
        print(json.dumps(result))
    ok = all(f.finite and f.steps == args.steps_per_stage for f in figures)
    return 0 if ok else 1
