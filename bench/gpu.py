"""The check to run the day a GPU is lent: `python -m server.bench gpu [--json]` (or bench/gpu_check.sh).

With no network and no weights: builds Stable Diffusion 2.1-base with random weights at its real size
(`server.testing.sd21`), then for fp16 and fp32 runs a few steps of every stage of the "sd" profile at
the reference's settings (coarse volume 128 -> 512, DMTet geometry on 1024 px normal maps, DMTet texture
at 1024 px, all encoded at 512; Kuhn 64) through the job loop (`bench.stages.run_stages`), and prints per
stage the median step time against the FLOP floor of an SD step (one UNet CFG call on 64x64 latents and
the VAE encoder's forward and backward at 512 px, counted by torch's FLOP counter on the built model),
the peak GPU memory, and whether the losses and parameters stayed finite (fp16 NaNs). Meant to finish
in well under 5 minutes on one H100-class card.

Without CUDA it refuses (exit 2) and says so. `--device cpu --tiny` runs the same code on the tiny
random SD of `server.testing.tiny` with small renders, which is what the tests run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.prior import gflop
from bench.stages import PROMPT, StageFigures, run_stages, stage_job
from server.device import resolve_device, resolve_dtype
from server.priors import Prior
from server.priors.base import rgb_to_model_input

PRECISIONS = ("fp16", "fp32")


def sd_step_gflop(prior: Prior) -> float:
    """The FLOP floor of one SD step on this prior: one CFG UNet call (batch 2) on its latents and the
    VAE encoder forward and backward on one image at its pixel size."""
    device, dtype = prior.device, prior.dtype
    size = prior.latent_size
    x = torch.randn(2, prior.latent_channels, size, size, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    context = torch.randn(2, 77, prior.unet.config.cross_attention_dim, device=device, dtype=dtype)

    def unet() -> object:
        with torch.no_grad():
            return prior.unet(x, t, encoder_hidden_states=context).sample

    def encoder() -> object:
        image = torch.rand(1, prior.pixel_size, prior.pixel_size, 3, device=device, requires_grad=True)
        latents = prior.vae.encode(rgb_to_model_input(image, prior.pixel_size).to(dtype)).latent_dist.mean
        latents.float().sum().backward()
        return image.grad

    return gflop(unet) + gflop(encoder)


def build_prior(tiny: bool, device: torch.device, dtype: torch.dtype, folder: Path) -> Prior:
    if tiny:
        from server.priors.diffusers_prior import DiffusersPrior
        from server.testing.tiny import build_tiny_sd

        return DiffusersPrior(build_tiny_sd(folder / "tiny_sd"), device, dtype, view_dependent=True)
    from server.testing.sd21 import RandomSD21

    return RandomSD21(device, dtype, [PROMPT])


def check_precision(args: argparse.Namespace, precision: str, folder: Path) -> dict:
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    prior = build_prior(args.tiny, device, resolve_dtype(precision, device), folder)
    build = time.perf_counter() - start
    floor = sd_step_gflop(prior)
    sizes = (64, 32) if args.tiny else (None, None)  # tiny: renders its 8x8 latents hold; else the profile's
    spec = stage_job("sd", args.steps_per_stage, *sizes, args.grid, args.device, precision)
    figures: list[StageFigures] = run_stages(spec, prior)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    stages = [
        {
            "stage": f.name,
            "median_s": f.seconds_per_step,
            "step_s": f.step_seconds,
            "renders": f.render_sizes,
            "achieved_tflops": float(f"{floor / 1e3 / f.seconds_per_step:.3g}")
            if f.seconds_per_step
            else None,
            "finite": f.finite,
        }
        for f in figures
    ]
    del prior
    return {
        "precision": precision,
        "build_s": round(build, 1),
        "sd_step_gflop": round(floor, 1),
        "peak_gpu_gib": None if peak is None else round(peak, 2),
        "nan_free": all(f.finite for f in figures),
        "stages": stages,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only with --tiny")
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny random SD and small renders (a dry run)"
    )
    parser.add_argument("--steps-per-stage", type=int, default=3)
    parser.add_argument(
        "--grid", type=int, default=64, help="Kuhn grid resolution (the reference's 128 tets)"
    )
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: fp16,fp32")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")


def main(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench gpu: no CUDA device here (torch.cuda.is_available() is False). Run it on a machine "
            "with an NVIDIA GPU, or try the code path with `--device cpu --tiny`.",
            file=sys.stderr,
        )
        return 2
    if not args.tiny and resolve_device(args.device).type != "cuda":
        print(
            "bench gpu: full-size SD on a CPU is `python -m server.bench stages`; use --tiny here",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for precision in args.precisions.split(","):
            result = check_precision(args, precision, Path(folder))
            results.append(result)
            peak = "" if result["peak_gpu_gib"] is None else f", peak GPU memory {result['peak_gpu_gib']} GiB"
            print(
                f"{precision} on {name}: SD step floor {result['sd_step_gflop']} GFLOP{peak}, "
                f"{'no NaN' if result['nan_free'] else 'NaN or inf appeared'}",
                flush=True,
            )
            for stage in result["stages"]:
                print(
                    f"  {stage['stage']:9s} {stage['median_s'] * 1e3:9.1f} ms/step "
                    f"(median of {stage['step_s']}) = {stage['achieved_tflops']} TFLOP/s of the SD floor; "
                    f"renders {stage['renders']}"
                )
    summary = {
        "device": name,
        "tiny": args.tiny,
        "seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    print(f"done in {summary['seconds']} s")
    if args.json:
        print(json.dumps(summary))
    return 0 if all(r["nan_free"] for r in results if r["precision"] == "fp32") else 1
