"""Tiny random Stable-Diffusion-like models saved in the real diffusers folder layout, for offline checks.

Same classes, same file layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/ with the
legacy vocab.json + merges.txt that real SD repos ship, scheduler/) as the real weights, so loading
them exercises exactly the code path Stable Diffusion takes -- only the widths are tiny (a few MB,
built in well under a second). Random init differs across library versions: tests built on these
assert invariants, never golden numbers. Used by the tests (tests/tiny_models.py) and by
`python -m server ddim-check`, hence in the server package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from server.priors.base import VIEW_SUFFIXES
from server.shapes.primitives import all_captions
from server.shapes.tokenizer import build_clip_tokenizer

TEXT_DIM = 32
MAX_TOKENS = 77  # CLIP's context length, as in Stable Diffusion
LATENT_SIZE = 8  # 8x8 latents <-> 64x64 pixels through the 8x VAE
PIXEL_SIZE = 16  # the pixel-space variant's resolution


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's DDIM settings (scaled_linear betas 0.00085 -> 0.012, epsilon prediction)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def tiny_unet(channels: int, sample_size: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )


def tiny_vae() -> AutoencoderKL:
    """Four blocks, so three downsamplings: SD's 8x factor (64 px -> 8x8x4 latents)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=LATENT_SIZE * 8,
    )


def build_tiny_sd(folder: Path, pixel_space: bool = False, seed: int = 0) -> Path:
    """Write a tiny random text-to-image model to `folder`: an SD-like latent pipeline, or with
    `pixel_space` a pixel model without vae/ (the layout of the project's shapes prior)."""
    folder = Path(folder)
    corpus = [*all_captions(), "a photo of a cat", *(c + s for c in all_captions() for s in VIEW_SUFFIXES)]
    tokenizer = build_clip_tokenizer(corpus, folder / "tokenizer", max_length=MAX_TOKENS)
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_DIM,
                intermediate_size=2 * TEXT_DIM,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS,
                projection_dim=TEXT_DIM,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        unet = tiny_unet(3, PIXEL_SIZE) if pixel_space else tiny_unet(4, LATENT_SIZE)
        vae = None if pixel_space else tiny_vae()
    text_encoder.save_pretrained(folder / "text_encoder")
    unet.save_pretrained(folder / "unet")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    sd_scheduler().save_pretrained(folder / "scheduler")
    if vae is not None:
        (folder / "model_index.json").write_text(
            json.dumps(
                {
                    "_class_name": "StableDiffusionPipeline",
                    "_diffusers_version": "0.42.1",
                    "feature_extractor": [None, None],
                    "requires_safety_checker": False,
                    "safety_checker": [None, None],
                    "scheduler": ["diffusers", "DDIMScheduler"],
                    "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"],
                    "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": ["diffusers", "AutoencoderKL"],
                },
                indent=2,
            )
        )
    return folder
