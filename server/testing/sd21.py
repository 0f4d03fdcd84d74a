"""Stable Diffusion 2.1-base at full size with random weights, built in memory with no download.

The UNet, VAE and scheduler configs are SD 2.1-base's own files written out; the text encoder is a
CLIPTextModel of OpenCLIP ViT-H/14's text tower size (23 layers, width 1024, SD 2 drops the last of
24), with a locally trained CLIP tokenizer (its ids all fall inside the real 49408-token vocabulary,
so the embedding table is full size). Random weights cost what trained ones do, so the full-size smoke
run (`python -m server.bench stages`) and the GPU check (`python -m server.bench gpu`) measure the real
time and memory of every stage; their outputs mean nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from server.priors.base import VIEW_SUFFIXES, Prior
from server.priors.diffusers_prior import DiffusersPrior
from server.shapes.tokenizer import build_clip_tokenizer
from server.testing.tiny import MAX_TOKENS, sd_scheduler

CLIP_VOCABULARY = 49_408  # OpenCLIP's BPE vocabulary, SD 2.1's text_encoder/config.json


def sd21_unet_config() -> dict:
    """stabilityai/stable-diffusion-2-1-base unet/config.json, written out so no download is needed."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
        center_input_sample=False,
        dual_cross_attention=False,
        upcast_attention=False,
    )


def sd_vae_config() -> dict:
    """Stable Diffusion 1.x/2.x vae/config.json (the same autoencoder in both)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        act_fn="silu",
        sample_size=512,
        scaling_factor=0.18215,
    )


def sd21_text_encoder_config(bos: int, eos: int, pad: int) -> CLIPTextConfig:
    """stabilityai/stable-diffusion-2-1-base text_encoder/config.json (OpenCLIP ViT-H/14's text tower)."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCABULARY,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        projection_dim=512,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


class RandomSD21(DiffusersPrior):
    """SD 2.1-base's UNet (866M parameters), VAE (84M) and text encoder (340M) with seeded random
    weights behind DiffusersPrior's own methods (prompt embedding, encode_images, predict_eps): the
    generator's real code path at the real sizes."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype, prompts: list[str], seed: int = 0):
        Prior.__init__(self)  # not DiffusersPrior's: nothing is loaded from a folder
        self.name = "sd21-base (random weights)"
        self.device, self.dtype = torch.device(device), dtype
        corpus = [*prompts, *(p + s for p in prompts for s in VIEW_SUFFIXES)]
        with tempfile.TemporaryDirectory() as folder:
            self.tokenizer = build_clip_tokenizer(corpus, Path(folder), max_length=MAX_TOKENS)
        ids = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        with torch.random.fork_rng(devices=[]), torch.device(self.device):
            torch.manual_seed(seed)
            self.unet = UNet2DConditionModel.from_config(sd21_unet_config()).to(dtype)
            self.vae = AutoencoderKL.from_config(sd_vae_config()).to(dtype)
            self.text_encoder = CLIPTextModel(sd21_text_encoder_config(*ids)).to(dtype)
        self.scheduler = sd_scheduler()
        self._freeze_and_describe(seed)
        self.view_dependent = True


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
