"""How well does the shapes prior follow prompts? `python -m server.shapes.evaluate [--json]`.

DDIM-samples every "a <colour> <shape>" prompt and judges each sample against renders of the true
primitives (`server.shapes.classify`): the rate at which both the colour and the silhouette are
right is the prior's binding rate. The judge itself is scored on true renders, so its own error is
reported beside it. Writes a PNG grid (one row per prompt) so a person can see the samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from server.priors import load_prior
from server.priors.sample import image_grid, sample_images
from server.shapes.classify import judge
from server.shapes.dataset import build_dataset
from server.shapes.primitives import COLOURS, SHAPES, caption


def judge_accuracy_on_true_renders(n: int = 200) -> float:
    data = build_dataset(n, 32, seed=99)
    verdicts = judge(data.images / 255.0)
    colours = list(COLOURS)
    right = [
        v.shape == SHAPES[s] and v.colour == colours[c]
        for v, s, c in zip(verdicts, data.shape_ids, data.colour_ids, strict=True)
    ]
    return float(np.mean(right))


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
    args = parser.parse_args(argv)

    start = time.perf_counter()
    prior = load_prior(args.prior, "cpu", torch.float32)
    rows, per_prompt = [], {}
    shape_right = colour_right = both_right = 0
    for shape in SHAPES:
        for colour in COLOURS:
            prompt = caption(colour, shape)
            images = sample_images(
                prior, prompt, seed=0, num_steps=args.steps, guidance_scale=args.guidance, n=args.samples
            )
            verdicts = judge(images.numpy())
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
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
