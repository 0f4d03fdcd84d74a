"""Tiny random Stable-Diffusion-like models saved in the real diffusers folder layout, for offline checks.

Same classes, same file layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/ with the
legacy vocab.json + merges.txt that real SD repos ship, scheduler/) as the real weights, so loading
them exercises exactly the code path Stable Diffusion takes -- only the widths are tiny (a few MB,
built in well under a second). Random init differs across library versions: tests built on these
assert invariants, never golden numbers. Used by the tests (fixtures in tests/conftest.py) and by
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


# --- a tiny MVDream: the multi-view UNet in both released weight layouts --------------------------------


def tiny_multiview_config() -> dict:
    """A MultiViewUNetModel configuration with the keys of MVDream's unet/config.json, at tiny widths.

    64-channel heads as MVDream's, because a bare checkpoint carries no head size and the loader
    assumes MVDream's; 64 and 128 channels because MVDream's GroupNorm has 32 groups.
    """
    return {
        "_class_name": "MultiViewUNetModel",
        "image_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 64,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_head_channels": 64,
        "transformer_depth": 1,
        "context_dim": TEXT_DIM,
        "camera_dim": 16,
        "use_checkpoint": False,
    }


def tiny_multiview_unet(seed: int = 0) -> UNet2DConditionModel:
    """The tiny MVDream UNet as diffusers builds it, randomly initialised from `seed`."""
    from server.priors.mvdream import diffusers_unet_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**diffusers_unet_config(tiny_multiview_config()))


LDM_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def ldm_unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's tensors under the LDM names of MVDream's checkpoints, written out from LDM's layout
    (input_blocks / middle_block / output_blocks numbering) rather than by inverting diffusers'
    converter, which the loader uses: tests of the loader then check one against the other."""
    n = unet.config.layers_per_block
    blocks = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "class_embedding.linear_1": "camera_embed.0",
        "class_embedding.linear_2": "camera_embed.2",
        "conv_in": "input_blocks.0.0",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for level, up in enumerate(unet.up_blocks):
        for r in range(n):
            blocks[f"down_blocks.{level}.resnets.{r}"] = f"input_blocks.{1 + level * (n + 1) + r}.0"
            blocks[f"down_blocks.{level}.attentions.{r}"] = f"input_blocks.{1 + level * (n + 1) + r}.1"
        blocks[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{(level + 1) * (n + 1)}.0.op"
        for r in range(n + 1):
            blocks[f"up_blocks.{level}.resnets.{r}"] = f"output_blocks.{level * (n + 1) + r}.0"
            blocks[f"up_blocks.{level}.attentions.{r}"] = f"output_blocks.{level * (n + 1) + r}.1"
        upsampler_slot = 2 if getattr(up, "attentions", None) else 1
        blocks[f"up_blocks.{level}.upsamplers.0.conv"] = (
            f"output_blocks.{level * (n + 1) + n}.{upsampler_slot}.conv"
        )
    state = {}
    for key, value in unet.state_dict().items():
        parts = key.split(".")
        block = next(
            ".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in blocks
        )
        rest = parts[len(block.split(".")) :]
        if ".resnets." in block:
            rest = [*LDM_RESNET_PARTS[rest[0]].split("."), *rest[1:]]
        state[".".join([blocks[block], *rest])] = value.detach().clone()
    return state


def build_tiny_mvdream(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny random MVDream in both released layouts; returns (diffusers folder, checkpoint file).

    `folder/diffusers` is laid out like ashawkey/mvdream-sd2.1-diffusers: the tiny SD text encoder,
    tokenizer, VAE and scheduler, and unet/ with a MultiViewUNetModel config.json and LDM-named
    safetensors. `folder/original/tiny-4view.pt` is laid out like MVDream/MVDream's checkpoint: one
    LDM state dict, the UNet under "model.diffusion_model." next to VAE and text-encoder tensors.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    pipeline = build_tiny_sd(folder / "diffusers", seed=seed)
    for old in (pipeline / "unet").iterdir():
        old.unlink()
    state = ldm_unet_state(tiny_multiview_unet(seed))
    (pipeline / "unet" / "config.json").write_text(json.dumps(tiny_multiview_config(), indent=2))
    save_file(state, pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    index = json.loads((pipeline / "model_index.json").read_text())
    index.update(_class_name="MVDreamPipeline", unet=["mv_unet", "MultiViewUNetModel"])
    (pipeline / "model_index.json").write_text(json.dumps(index, indent=2))

    checkpoint = folder / "original" / "tiny-4view.pt"
    checkpoint.parent.mkdir(parents=True)
    others = {
        "first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
        "cond_stage_model.model.positional_embedding": torch.zeros(MAX_TOKENS, TEXT_DIM),
    }
    torch.save({**{"model.diffusion_model." + k: v for k, v in state.items()}, **others}, checkpoint)
    return pipeline, checkpoint
