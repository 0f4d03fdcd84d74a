"""Diffusion priors behind one interface (`Prior`), and `load_prior` to get one by name.

Import cost: this package imports diffusers and transformers (seconds); `server/__init__.py` and the
protocol never import it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from server.job.errors import MissingWeightsError
from server.priors.base import (
    VIEW_SUFFIXES,
    Prior,
    PromptEmbeddings,
    default_dtype,
    view_suffix_index,
)
from server.priors.diffusers_prior import DiffusersPrior, resolve_weights
from server.priors.empirical import EmpiricalPrior, caption_matches
from server.priors.mvdream import MVDreamPrior, is_mvdream

SHAPES_WEIGHTS = Path(__file__).resolve().parent.parent / "shapes" / "weights"
# A small prior's conditional and unconditional predictions differ little, so it needs more than SD's
# 7.5; with the shape stage, 20 over-sharpens each view's answer (cubes twist between views) and 10
# gave truer cubes and cylinders (bench/README.md).
SHAPES_GUIDANCE = 10.0

__all__ = [
    "SHAPES_GUIDANCE",
    "SHAPES_WEIGHTS",
    "VIEW_SUFFIXES",
    "DiffusersPrior",
    "EmpiricalPrior",
    "MVDreamPrior",
    "MissingWeightsError",
    "Prior",
    "PromptEmbeddings",
    "caption_matches",
    "default_dtype",
    "load_prior",
    "resolve_weights",
    "view_suffix_index",
]


def load_prior(spec: str, device: torch.device | str, dtype: torch.dtype, **options) -> Prior:
    """The prior named by `spec`: "shapes" (the project's shipped prior), "mvdream" or anything else
    `is_mvdream` recognises (MVDream's folder, checkpoint or hub id), a local diffusers-layout folder,
    or a Hugging Face hub id (e.g. "stabilityai/stable-diffusion-2-1-base", taken from the cache when
    HF_HUB_OFFLINE=1). `options` go to the prior (memory savers, variant, seed)."""
    if spec == "shapes":
        if not (SHAPES_WEIGHTS / "unet").is_dir():
            raise MissingWeightsError(
                "shapes",
                f"the shipped shapes prior is missing from {SHAPES_WEIGHTS}; restore it from the repository "
                "(`git checkout -- server/shapes/weights`) or train it with `python -m server.shapes.train`",
            )
        prior = DiffusersPrior(SHAPES_WEIGHTS, device, dtype, name="shapes", **options)
        prior.guidance_scale = SHAPES_GUIDANCE
        return prior
    if is_mvdream(spec):
        return MVDreamPrior(spec, device, dtype, **options)
    return DiffusersPrior(spec, device, dtype, **options)
