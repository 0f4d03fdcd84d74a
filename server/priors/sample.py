"""Plain DDIM sampling from a prior, written as a PNG grid: does the prior load and follow prompts?

`python -m server sample --prompt "a red cube" --seed 0 --out /tmp/red_cube.png [--prior shapes]`

Classifier-free guidance in the standard form eps_u + s (eps_c - eps_u), eta = 0, through the
prior's own DDIM scheduler, so what this draws is what the prior itself believes.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from server.distill.update import CFGForm, classifier_free_guidance
from server.priors import MissingWeightsError, Prior, default_dtype, load_prior

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@torch.no_grad()
def sample_images(
    prior: Prior,
    prompt: str,
    seed: int,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    n: int = 4,
    negative_prompt: str = "",
    c2w: torch.Tensor | None = None,
) -> torch.Tensor:
    """n images [n, H, W, 3] in [0, 1] drawn by DDIM (eta = 0) from noise seeded by `seed`; `c2w`
    [n, 4, 4] are the cameras a camera-conditioned prior draws them from (others ignore it)."""
    embeddings = prior.encode_prompt(prompt, negative_prompt)
    scheduler = type(prior.scheduler).from_config(prior.scheduler.config)
    scheduler.set_timesteps(num_steps, device=prior.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, prior.latent_channels, prior.latent_size, prior.latent_size)
    x = (torch.randn(shape, generator=generator) * scheduler.init_noise_sigma).to(prior.device)
    for t in scheduler.timesteps:
        eps_cond, eps_uncond = prior.predict_eps(x, int(t), embeddings.cond[:1], embeddings.uncond, c2w=c2w)
        eps = classifier_free_guidance(eps_cond, eps_uncond, guidance_scale, CFGForm.UNCOND)
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return prior.decode_latents(x)


def image_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """Images [n, H, W, 3] in [0, 1] tiled row by row (near-square by default) into one RGB picture."""
    n, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * h, columns * w, 3), 255, dtype=np.uint8)
    pixels = (images.float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    for i, image in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    return Image.fromarray(grid)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="PNG file for the grid")
    parser.add_argument("--prior", default="shapes", help='"shapes", a diffusers folder, or a hub id')
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="CFG scale s in eps_u + s (eps_c - eps_u)"
    )
    parser.add_argument("--n", type=int, default=4, help="how many images")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(args.device)
    try:
        prior = load_prior(args.prior, args.device, dtype)
    except MissingWeightsError as error:
        print(f"error: {error}")
        return 1
    images = sample_images(
        prior, args.prompt, args.seed, args.steps, args.guidance, args.n, args.negative_prompt
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(args.out)
    print(f"wrote {args.n} samples of {args.prompt!r} from {prior.name} to {args.out}")
    return 0
