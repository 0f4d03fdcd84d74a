"""How well does the shapes prior follow prompts? `python -m server.shapes.evaluate [--json]`.

DDIM-samples every "a <colour> <shape>" prompt and judges each sample against renders of the true
primitives (`server.shapes.classify`): the rate at which both the colour and the silhouette are
right is the prior's binding rate. The judge itself is scored on true renders, so its own error is
reported beside it. Each sample is drawn for a rig camera; `view_iou` is the mean silhouette IoU of a
sample against the true primitive seen from that camera: how well a camera-conditioned prior draws the
view it is asked for (`--no-camera` draws the same samples without cameras, for comparison);
`camera_gain`, per noise level, the share of the x0 error on true renders that the right camera saves
over a wrong one. Writes a PNG grid (one row per prompt) so a person can see the samples.

`--x0-grid PATH` instead draws what the prior makes of true renders at each noise level (the x0 it
predicts from them, at two guidance scales): a distillation can only keep a shape the prior keeps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from server.distill.schedule import NoiseSchedule
from server.distill.update import CFGForm, classifier_free_guidance
from server.priors import load_prior
from server.priors.base import Prior
from server.priors.sample import image_grid, sample_images
from server.render.cameras import OrbitRig, orbit_c2w
from server.render.shading import sample_light_dirs
from server.shapes.classify import foreground, judge, mask_ious
from server.shapes.dataset import build_dataset, render_primitive
from server.shapes.primitives import COLOURS, SHAPES, caption

X0_TIMESTEPS = (300, 500, 700, 900)
X0_GUIDANCE = (3.0, 10.0)
CAMERA_TIMESTEPS = (300, 600, 900)


def judge_accuracy_on_true_renders(n: int = 200) -> float:
    data = build_dataset(n, 32, seed=99)
    verdicts = judge(data.images / 255.0)
    colours = list(COLOURS)
    right = [
        v.shape == SHAPES[s] and v.colour == colours[c]
        for v, s, c in zip(verdicts, data.shape_ids, data.colour_ids, strict=True)
    ]
    return float(np.mean(right))


@torch.no_grad()
def camera_gain(prior: Prior, n: int = 256, seed: int = 99) -> dict[str, float]:
    """Per t in CAMERA_TIMESTEPS, 1 - (x0 error with each render's own camera) / (with the cameras
    shuffled among the renders), on n held-out true renders: how much the prior's denoising uses the
    view it is told (0 for a prior that ignores cameras). At one t the eps error is the x0 error times
    the SNR, so their ratio is the same in either."""
    data = build_dataset(n, prior.pixel_size, seed=seed)
    c2w = torch.from_numpy(np.stack([orbit_c2w(e, a, r) for e, a, r, _ in data.views]))
    shuffled = c2w[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    x0 = prior.encode_images(torch.from_numpy(data.images).float().div(255.0).to(prior.device))
    colours = list(COLOURS)
    cond = torch.cat(
        [
            prior.encode_prompt(caption(colours[c], SHAPES[s])).cond[:1]
            for s, c in zip(data.shape_ids, data.colour_ids, strict=True)
        ]
    )
    schedule = NoiseSchedule.of(prior)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    gains = {}
    for t in CAMERA_TIMESTEPS:
        x_t = schedule.alpha(t) * x0 + schedule.sigma(t) * noise
        errors = [
            (prior.predict_eps(x_t, t, cond, cond, c2w=cameras)[0] - noise).pow(2).mean().item()
            for cameras in (c2w, shuffled)
        ]
        gains[str(t)] = 1.0 - errors[0] / errors[1]
    return gains


@torch.no_grad()
def x0_probe(prior: Prior, views: int = 3, seed: int = 0) -> np.ndarray:
    """[H, W, 3] grid: per primitive and guidance, `views` rows of (true render, x0 at each of
    `X0_TIMESTEPS`), the noise drawn once per timestep so the guidance scales see the same x_t."""
    rng = np.random.default_rng(seed)
    cameras = OrbitRig().sample(rng, views)
    c2w = torch.from_numpy(np.stack([c.c2w for c in cameras]))
    size = prior.pixel_size
    blocks = []
    for shape, colour in zip(SHAPES, COLOURS, strict=False):
        renders = np.stack(
            [
                render_primitive(shape, COLOURS[colour], c, size, sample_light_dirs(rng, c.position[None])[0])
                for c in cameras
            ]
        )
        latents = prior.encode_images(torch.from_numpy(renders).float().to(prior.device))
        embeddings = prior.encode_prompt(caption(colour, shape))
        cond = embeddings.cond[:1].expand(views, -1, -1)
        uncond = embeddings.uncond.expand(views, -1, -1)
        schedule = NoiseSchedule.of(prior)
        columns = {guidance: [renders] for guidance in X0_GUIDANCE}
        for t in X0_TIMESTEPS:
            generator = torch.Generator().manual_seed(seed * 1000 + t)
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            x_t = schedule.alpha(t) * latents + schedule.sigma(t) * noise
            eps_cond, eps_uncond = prior.predict_eps(x_t, t, cond, uncond, c2w=c2w)
            for guidance in X0_GUIDANCE:
                eps = classifier_free_guidance(eps_cond, eps_uncond, guidance, CFGForm.UNCOND)
                x0 = (x_t - schedule.sigma(t) * eps) / schedule.alpha(t)
                columns[guidance].append(prior.decode_latents(x0).clamp(0, 1).cpu().numpy())
        for guidance in X0_GUIDANCE:
            rows = [np.concatenate(list(column), axis=0) for column in columns[guidance]]
            blocks.append(np.concatenate(rows, axis=1))
    return np.concatenate(blocks, axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prior", default="shapes")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=30, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--png", type=Path, default=Path("outputs/shapes_prior_samples.png"))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--x0-grid", type=Path, help="draw the prior's x0 of true renders into this PNG only")
    parser.add_argument("--no-camera", action="store_true", help="sample without giving the prior cameras")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    prior = load_prior(args.prior, "cpu", torch.float32)
    if args.x0_grid is not None:
        grid = (x0_probe(prior) * 255).round().astype(np.uint8)
        args.x0_grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.x0_grid)
        print(
            f"x0 grid (rows: {', '.join(SHAPES)} x guidance {X0_GUIDANCE} x views; columns: the render, "
            f"then t = {', '.join(map(str, X0_TIMESTEPS))}): {args.x0_grid}"
        )
        return 0
    rows, per_prompt, view_ious = [], {}, []
    shape_right = colour_right = both_right = 0
    # Each sample from its own rig camera (one set for every prompt), as a 3-D job's views are.
    rng = np.random.default_rng(0)
    cameras = OrbitRig().sample(rng, args.samples)
    c2w = None if args.no_camera else torch.from_numpy(np.stack([c.c2w for c in cameras]))
    for shape in SHAPES:
        for colour in COLOURS:
            prompt = caption(colour, shape)
            images = sample_images(
                prior,
                prompt,
                seed=0,
                num_steps=args.steps,
                guidance_scale=args.guidance,
                n=args.samples,
                c2w=c2w,
            )
            verdicts = judge(images.numpy())
            truth = np.stack(
                [
                    render_primitive(shape, COLOURS[colour], c, prior.pixel_size, light)
                    for c in cameras
                    for light in sample_light_dirs(rng, c.position[None])
                ]
            )
            view_ious += np.diagonal(mask_ious(foreground(images.numpy()), foreground(truth))).tolist()
            s = sum(v.shape == shape for v in verdicts)
            c = sum(v.colour == colour for v in verdicts)
            b = sum(v.shape == shape and v.colour == colour for v in verdicts)
            shape_right, colour_right, both_right = shape_right + s, colour_right + c, both_right + b
            per_prompt[prompt] = b / args.samples
            rows.append(images)
    total = len(SHAPES) * len(COLOURS) * args.samples
    args.png.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(torch.cat(rows), columns=args.samples * 4)
    grid.resize((grid.width * 3, grid.height * 3), 0).save(args.png)
    folder = Path(__file__).parent / "weights" if args.prior == "shapes" else Path(args.prior)
    record = folder / "training.json"
    training = json.loads(record.read_text()) if record.is_file() else {}
    summary = {
        "prior": args.prior,
        "training_steps": training.get("steps"),
        "samples": total,
        "shape_rate": shape_right / total,
        "colour_rate": colour_right / total,
        "binding_rate": both_right / total,
        "judge_accuracy_on_true_renders": judge_accuracy_on_true_renders(),
        "view_iou": float(np.mean(view_ious)),
        "camera_gain": camera_gain(prior),
        "cameras": not args.no_camera,
        "guidance": args.guidance,
        "ddim_steps": args.steps,
        "png": str(args.png),
        "seconds": round(time.perf_counter() - start, 1),
    }
    for prompt, rate in per_prompt.items():
        print(f"{prompt:>22}: {rate:.2f}")
    rates = f"shape {summary['shape_rate']:.2f}  colour {summary['colour_rate']:.2f}"
    judge_rate = summary["judge_accuracy_on_true_renders"]
    both = summary["binding_rate"]
    print(f"{rates}  both {both:.2f}  (judge on true renders: {judge_rate:.2f}); grid: {args.png}")
    print(f"silhouette IoU against the true primitive from the asked camera: {summary['view_iou']:.3f}")
    gains = ", ".join(f"t = {t}: {gain:.3f}" for t, gain in summary["camera_gain"].items())
    print(f"x0 error saved by the right camera over a shuffled one: {gains}")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
