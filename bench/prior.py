"""What one distillation step costs the prior: `python -m server.bench prior [--json]`.

Three measurements, each a network call a CFD/SDS step makes:
- the shipped shapes prior: one CFG noise prediction for one view (a 2-image UNet batch at 32x32);
- a Stable Diffusion 2.1-base-sized UNet (865.9M parameters, random weights, so no download):
  one CFG call, batch 2 at 64x64 latents with 77x1024 text context;
- Stable Diffusion's VAE encoder at 512x512 (random weights): forward plus the backward pass to the
  pixels, which a latent prior needs every step (priors.md §2: it costs more than the UNet call).

Random weights cost exactly what trained ones do. FLOPs are counted once on meta tensors
(torch.utils.flop_counter), so the table also shows the achieved GFLOP/s. SD-sized parts take tens
of seconds per repetition on one CPU thread; the default is one repetition.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from server.priors import MissingWeightsError, default_dtype, load_prior
from server.testing.sd21 import sd21_unet_config, sd_vae_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PARTS = ("shapes", "unet", "vae")


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """Median wall-clock and process-CPU milliseconds of fn() over `repeats` runs after `warmup` ones.

    On a shared CPU the wall time includes waiting for a core; the process CPU time does not, so with
    one thread it estimates the uncontended cost.
    """
    wall, cpu = [], []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def gflop(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def unet_cfg_call(
    unet: UNet2DConditionModel, device: torch.device, dtype: torch.dtype, tokens: int = 77
) -> Callable[[], object]:
    """One CFG noise prediction for one view: batch 2 (cond, uncond) at the UNet's native size."""
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, device=device, dtype=dtype)
    t = torch.tensor([500, 500], device=device)
    context = torch.randn(2, tokens, unet.config.cross_attention_dim, device=device, dtype=dtype)

    @torch.no_grad()
    def call() -> object:
        return unet(x, t, encoder_hidden_states=context).sample

    return call


def vae_encode_fwd_bwd(vae: AutoencoderKL, device: torch.device, dtype: torch.dtype) -> Callable[[], object]:
    """Encode one 512x512 image with gradient and backpropagate to its pixels (weights frozen)."""
    vae.requires_grad_(False)
    size = vae.config.sample_size
    image = torch.rand(1, 3, size, size, device=device, dtype=dtype, requires_grad=True)

    def call() -> object:
        latents = vae.encode(image * 2 - 1).latent_dist.sample()
        latents.sum().backward()
        return image.grad

    return call


def measure_sd(
    part: str, device: torch.device, dtype: torch.dtype, repeats: int
) -> tuple[float, float, float]:
    """(wall ms, CPU ms, GFLOP) for the SD-2.1-sized UNet CFG call or the SD VAE encoder step."""
    build, make_call = {
        "unet": (lambda: UNet2DConditionModel(**sd21_unet_config()), unet_cfg_call),
        "vae": (lambda: AutoencoderKL(**sd_vae_config()), vae_encode_fwd_bwd),
    }[part]
    with torch.device("meta"):
        flops = gflop(make_call(build(), torch.device("meta"), dtype))
    with torch.device(device):
        model = build().eval()
    if dtype != torch.float32:
        model.to(dtype)
    ms, cpu_ms = timed(
        make_call(model, device, dtype), device, repeats, warmup=0 if device.type == "cpu" else 2
    )
    del model
    return ms, cpu_ms, flops


def measure_shapes(device: torch.device, dtype: torch.dtype, repeats: int) -> tuple[float, float, float]:
    prior = load_prior("shapes", device, dtype)
    emb = prior.encode_prompt("a red cube")
    size = prior.latent_size
    x_t = torch.randn(1, prior.latent_channels, size, size, device=device)

    def call() -> object:
        return prior.predict_eps(x_t, 500, emb.cond, emb.uncond)

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(prior.unet.config)
        flops = gflop(unet_cfg_call(unet, torch.device("meta"), dtype, tokens=emb.cond.shape[1]))
    return *timed(call, device, max(repeats, 10), warmup=2), flops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 on CUDA, else float32")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each SD-sized part (median)")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}"
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run the benchmark; `args` parsed by `python -m server.bench prior`, or a raw argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(
            prog="python -m server.bench prior",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(parser)
        args = parser.parse_args(sys.argv[1:] if args is None else args)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")

    results: dict[str, object] = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "torch": torch.__version__,
        "ms_shapes_step": None,
        "ms_sd21_unet_cfg": None,
        "ms_sd21_vae_encode_fwd_bwd": None,
        "notes": [],
    }
    rows = []
    if "shapes" in parts:
        try:
            ms, cpu_ms, flops = measure_shapes(device, dtype, args.repeats)
            results.update(ms_shapes_step=ms, cpu_ms_shapes_step=cpu_ms, gflop_shapes_step=flops)
            rows.append(("shapes prior, CFG step (UNet batch 2, 32x32)", ms, cpu_ms, flops))
        except MissingWeightsError as error:
            results["notes"].append(f"shapes prior skipped: {error}")
    for part, key, label in [
        ("unet", "sd21_unet_cfg", "SD 2.1 UNet, CFG call (batch 2, 64x64 latents)"),
        ("vae", "sd21_vae_encode_fwd_bwd", "SD VAE encoder 512x512, forward + backward"),
    ]:
        if part in parts:
            ms, cpu_ms, flops = measure_sd(part, device, dtype, args.repeats)
            results.update({f"ms_{key}": ms, f"cpu_ms_{key}": cpu_ms, f"gflop_{key}": flops})
            rows.append((label, ms, cpu_ms, flops))

    setting = f"{results['dtype']}, {args.threads} thread(s), torch {results['torch']}"
    print(f"prior cost per step on {device} ({setting})")
    print(f"{'what':<50} {'wall ms':>10} {'CPU ms':>10} {'GFLOP':>9} {'GFLOP/s':>9}")
    for label, ms, cpu_ms, flops in rows:
        print(f"{label:<50} {ms:>10.1f} {cpu_ms:>10.1f} {flops:>9.1f} {flops / (ms / 1e3):>9.1f}")
    for note in results["notes"]:
        print(f"note: {note}")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
