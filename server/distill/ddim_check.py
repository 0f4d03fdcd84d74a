"""Prove the clean flow is DDIM: `python -m server ddim-check [--json]`.

With a fixed noise eps_tilde, zero initialisation and plain gradient steps of size
lambda_t - lambda_prev, the distillation update (`server.distill.update`) must retrace DDIM (eta = 0)
started from x_T = sigma_T eps_tilde, step for step. Two priors: the exact closed-form denoiser of
a few shapes renders (float64), and a tiny random diffusers UNet saved to a folder and loaded back
through the same loader real Stable Diffusion weights take. Prints the largest difference over
every step; without --json it also writes a PNG of the clean-flow result beside the DDIM result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from server.distill.clean_flow import clean_flow_2d, ddim_reference, ddim_timesteps_of
from server.distill.schedule import NoiseSchedule
from server.distill.update import CFGForm
from server.noise.base import FixedNoise, NoiseQuery


@dataclass
class Comparison:
    prior: str
    steps: int
    max_abs_diff: float  # over x_t at every step and the final x_0
    flow_images: torch.Tensor  # decoded clean-flow results [B, H, W, 3]
    ddim_images: torch.Tensor  # decoded DDIM results


def compare(
    prior,
    prompt: str,
    batch: int,
    steps: int,
    guidance_scale: float,
    seed: int,
    dtype: torch.dtype,
    cfg_form: CFGForm = CFGForm.UNCOND,
) -> Comparison:
    """Run both samplers from the same noise and measure how far apart they ever get."""
    embeddings = prior.encode_prompt(prompt)
    cond, uncond = embeddings.cond.expand(batch, -1, -1), embeddings.uncond
    shape = (batch, prior.latent_channels, prior.latent_size, prior.latent_size)
    timesteps = ddim_timesteps_of(prior, steps)
    schedule = NoiseSchedule.of(prior)

    query = NoiseQuery(latent_hw=shape[2:], channels=shape[1], view_ids=list(range(batch)))
    eps_tilde = FixedNoise(seed, prior.device).sample(query).to(dtype)
    x_T = schedule.sigma(timesteps[0]) * eps_tilde
    ddim_x0, ddim_trajectory = ddim_reference(prior, cond, uncond, x_T, steps, guidance_scale, CFGForm.UNCOND)

    flow = clean_flow_2d(
        prior,
        cond,
        uncond,
        FixedNoise(seed, prior.device),
        timesteps,
        shape,
        guidance_scale,
        cfg_form,
        optimizer="sgd",
        dtype=dtype,
        device=prior.device,
    )
    diffs = [(a - b).abs().max().item() for a, b in zip(flow.trajectory, ddim_trajectory, strict=True)]
    # DDIM ends at abar_final (1, or abar_0 for SD's set_alpha_to_one=False): compare at that level too.
    final = schedule.alpha(-1) * flow.images + schedule.sigma(-1) * eps_tilde
    diffs.append((final - ddim_x0).abs().max().item())
    decode = prior.decode_latents
    with torch.no_grad():
        return Comparison(prior.name, steps, max(diffs), decode(flow.images.float()), decode(ddim_x0.float()))


def analytic_prior(device: torch.device | str = "cpu"):
    """The exact MMSE denoiser of 24 shapes renders (float64), with captions so CFG has work to do."""
    from server.priors import EmpiricalPrior
    from server.shapes.dataset import build_dataset
    from server.shapes.primitives import COLOURS, SHAPES, caption
    from server.testing.tiny import sd_scheduler

    data = build_dataset(24, 32, seed=5)
    captions = [
        caption(list(COLOURS)[c], SHAPES[s]) for s, c in zip(data.shape_ids, data.colour_ids, strict=True)
    ]
    images = torch.from_numpy(data.images).to(torch.float64) / 255.0
    return EmpiricalPrior(
        images, captions, sd_scheduler().config, device, dtype=torch.float64, name="analytic"
    ), captions[0]


def tiny_unet_prior(folder: Path, device: torch.device | str = "cpu"):
    """A tiny random SD-like pipeline saved to `folder`, loaded back through `load_prior`."""
    from server.priors import load_prior
    from server.testing.tiny import build_tiny_sd

    build_tiny_sd(folder)
    prior = load_prior(str(folder), device, torch.float32)
    prior.name = "tiny-unet"
    return prior


def run(steps: int = 25, guidance_scale: float = 4.0, seed: int = 0) -> list[Comparison]:
    prior, prompt = analytic_prior()
    results = [compare(prior, prompt, 4, steps, guidance_scale, seed, torch.float64)]
    with tempfile.TemporaryDirectory() as tmp:
        results.append(
            compare(
                tiny_unet_prior(Path(tmp) / "tiny-sd"),
                "a red cube",
                2,
                steps,
                guidance_scale,
                seed,
                torch.float32,
            )
        )
    return results


def save_png(results: list[Comparison], path: Path) -> None:
    """One row per prior: clean-flow results, then DDIM results, upscaled for viewing."""
    rows = []
    for result in results:
        row = torch.cat(
            [*result.flow_images, torch.ones_like(result.flow_images[0][:, :2]), *result.ddim_images], 1
        )
        image = Image.fromarray((row.clamp(0, 1).numpy() * 255).astype(np.uint8))
        rows.append(image.resize((image.width * 128 // image.height, 128), Image.NEAREST))
    canvas = Image.new("RGB", (max(r.width for r in rows), 128 * len(rows) + 8 * (len(rows) - 1)), "white")
    for i, row in enumerate(rows):
        canvas.paste(row, (0, i * 136))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--png", type=Path, default=Path("outputs/ddim_check.png"))


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    results = run(args.steps, args.guidance, args.seed)
    for r in results:
        print(f"{r.prior:>10}: {r.steps} DDIM steps, max |clean flow - DDIM| = {r.max_abs_diff:.3e}")
    summary = {
        "steps": args.steps,
        "max_abs_diff": max(r.max_abs_diff for r in results),
        "priors": {r.prior: r.max_abs_diff for r in results},
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        save_png(results, args.png)
        print(f"wrote {args.png} (left: clean flow, right: DDIM; one row per prior)")
    return 0 if summary["max_abs_diff"] < 1e-3 else 1
