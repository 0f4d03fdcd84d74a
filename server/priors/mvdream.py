"""MVDream (Shi et al. 2023) as a prior: Stable Diffusion 2.1's UNet fine-tuned to denoise 4 views of
one object at once, each view conditioned on its camera. The backbone both CFD and FSD report on.

MVDream's UNet is SD 2.1-base's with two additions, and both map onto diffusers' own
`UNet2DConditionModel`, so fp16, SDPA, channels_last and CPU offload work as for Stable Diffusion:

1. `camera_embed`, an MLP 16 -> 1280 -> 1280 on the flattened camera-to-world matrix whose output is
   added to the timestep embedding: exactly diffusers' projection class embedding
   (`class_embed_type="projection"`, the camera passed as `class_labels`).
2. Every self-attention (`attn1`) attends over the tokens of all 4 views of its object; no new
   weights. `MultiViewSelfAttention` folds the views of a group into one token sequence around
   diffusers' own attention processor; cross-attention, ResBlocks and norms stay per view, so views
   of different objects (groups) never mix. `MVDreamPrior` re-installs it before every call, in
   case anything swapped the processors (attention slicing, LoRA loaders, ...).

Weights, converted at load time by key mapping (nothing is written to disk):
- the diffusers-format repository ashawkey/mvdream-sd2.1-diffusers: a pipeline folder whose
  unet/config.json says `MultiViewUNetModel` and whose safetensors keep the original (LDM) key
  names, next to SD 2.1's vae/, text_encoder/, tokenizer/ and scheduler/;
- the original checkpoint MVDream/MVDream `sd-v2.1-base-4view.pt` (a full LDM state dict; its UNet
  keys start with "model.diffusion_model."), with the text encoder, tokenizer, VAE and scheduler
  taken from Stable Diffusion 2.1-base (`sd_source`): MVDream fine-tuned only the UNet.
The LDM -> diffusers renaming is diffusers' `convert_ldm_unet_checkpoint` (its table already sends
LDM's `label_emb.0.{0,2}` to `class_embedding.linear_{1,2}`; `camera_embed` is renamed to that
first). The UNet configuration comes from unet/config.json, or, for a bare checkpoint, is read off
the tensor shapes; what shapes cannot tell (64-channel heads, 32x32 latents) is MVDream's.
The code is the project's own: the public converter repository has no licence.

Camera convention and group sampling: `server.render.mvdream_cameras`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from huggingface_hub import hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from server.job.errors import MissingWeightsError
from server.job.prior_kind import (
    MULTIVIEW_CLASS,
    ORIGINAL_FILE,
    ORIGINAL_REPO,
    checkpoints_in,
    is_multiview_config,
    local_mvdream,
)
from server.priors.base import Prior, cfg_batch
from server.priors.diffusers_prior import WEIGHT_SUFFIXES, DiffusersPrior, check_folder, hub_offline
from server.render.mvdream_cameras import VIEWS_PER_GROUP, camera_embedding

DEFAULT_SOURCE = "ashawkey/mvdream-sd2.1-diffusers"
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
LDM_UNET_PREFIX = "model.diffusion_model."
COMPONENTS = ("text_encoder", "tokenizer", "vae", "scheduler")
# What the weights cannot tell, for a bare checkpoint: MVDream SD 2.1's 64-channel heads and 32x32 latents.
DEFAULT_HEAD_CHANNELS = 64
DEFAULT_IMAGE_SIZE = 32
HUB_ERRORS = (
    LocalEntryNotFoundError,
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    HFValidationError,
    HfHubHTTPError,
)
FIX = (
    f"download MVDream with `hf download {DEFAULT_SOURCE}` (diffusers layout, SD 2.1's text encoder and "
    f"VAE included) while online, or the original checkpoint with `hf download {ORIGINAL_REPO} "
    f"{ORIGINAL_FILE}` plus `hf download {SD21_BASE}`; or pass the local folder or .pt file"
)


# ------------------------------------------------------------------------------------- finding weights


def is_mvdream(spec: str) -> bool:
    """Whether a job's `prior` names MVDream: what its name and local files tell
    (`server.job.prior_kind.local_mvdream`), else for a hub id whether its cached unet/config.json is a
    MultiViewUNetModel (or, not cached, whether its name contains "mvdream"). Cheap and offline:
    `load_prior` dispatches on it."""
    local = local_mvdream(spec)
    if local is not None:
        return local
    try:
        cached = try_to_load_from_cache(spec, "unet/config.json")
    except HFValidationError:
        return False
    if isinstance(cached, str):
        return is_multiview_config(Path(cached))
    return "mvdream" in spec.lower()


def locate_weights(
    source: str | Path, sd_source: str | Path = SD21_BASE, local_files_only: bool | None = None
) -> tuple[Path, dict | None, Path]:
    """(UNet weights file, its MultiViewUNetModel config or None, folder with the text encoder,
    tokenizer, VAE and scheduler) for a folder, a checkpoint file, or a hub id.

    Nothing is downloaded when HF_HUB_OFFLINE is set (or `local_files_only`); anything missing
    raises MissingWeightsError saying how to get it.
    """
    offline = hub_offline() if local_files_only is None else local_files_only
    name = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        return path, None, resolve_components(sd_source, offline)
    if path.is_dir():
        if (path / "unet" / "config.json").is_file():
            return _diffusers_layout(path, name)
        checkpoints = checkpoints_in(path)
        if checkpoints:
            return checkpoints[0], None, resolve_components(sd_source, offline)
        raise MissingWeightsError(
            name, f"{path} holds neither unet/config.json (diffusers layout) nor a .pt checkpoint; {FIX}"
        )
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
        raise MissingWeightsError(name, f"no such file or folder; {FIX}")
    where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
    try:
        if name == ORIGINAL_REPO:
            checkpoint = Path(hf_hub_download(name, ORIGINAL_FILE, local_files_only=offline))
            return checkpoint, None, resolve_components(sd_source, offline)
        patterns = ["model_index.json", "unet/config.json", "unet/*.safetensors"]
        patterns += [f"{c}/{p}" for c in COMPONENTS for p in ("*.json", "*.txt", "*.safetensors")]
        folder = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=offline))
    except HUB_ERRORS as error:
        raise MissingWeightsError(name, f"not found in {where} ({type(error).__name__}); {FIX}") from error
    return _diffusers_layout(folder, name)


def _diffusers_layout(folder: Path, name: str) -> tuple[Path, dict, Path]:
    check_folder(folder, name, FIX)
    config = json.loads((folder / "unet" / "config.json").read_text())
    if config.get("_class_name") != MULTIVIEW_CLASS:
        raise MissingWeightsError(
            name, f"{folder / 'unet'} holds a {config.get('_class_name')}, not MVDream's {MULTIVIEW_CLASS}"
        )
    weights = sorted((folder / "unet").glob("*.safetensors"))
    if not weights:
        raise MissingWeightsError(name, f"{folder / 'unet'} has no .safetensors weights; {FIX}")
    return weights[0], config, folder


def resolve_components(sd_source: str | Path, offline: bool) -> Path:
    """A folder with Stable Diffusion 2.1's text_encoder/, tokenizer/, vae/ and scheduler/ (no UNet)."""
    name = str(sd_source)
    path = Path(sd_source).expanduser()
    fix = (
        f"MVDream's original checkpoint holds only the UNet we use; its text encoder, tokenizer, VAE "
        f"and scheduler are Stable Diffusion 2.1-base's: `hf download {SD21_BASE}` while online, or "
        f"pass sd_source= a local SD 2.1-base folder"
    )
    if not path.is_dir():
        if path.is_absolute() or name.startswith((".", "~")) or name.count("/") != 1:
            raise MissingWeightsError(name, f"no such folder; {fix}")
        patterns = [f"{c}/{p}" for c in COMPONENTS for p in ("*.json", "*.txt", "*.safetensors")]
        try:
            path = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=offline))
        except HUB_ERRORS as error:
            where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
            raise MissingWeightsError(
                name, f"not found in {where} ({type(error).__name__}); {fix}"
            ) from error
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    missing += [
        f"{c} weights"
        for c in ("text_encoder", "vae")
        if (path / c).is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in (path / c).iterdir())
    ]
    if missing:
        raise MissingWeightsError(name, f"{path} lacks {', '.join(missing)}; {fix}")
    return path


# ------------------------------------------------------------------------------------ UNet conversion


def read_unet_state(path: Path) -> dict[str, torch.Tensor]:
    """The UNet tensors of a checkpoint under their LDM names without the "model.diffusion_model."
    prefix (the original .pt also holds the VAE and OpenCLIP, which are dropped here)."""
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if any(k.startswith(LDM_UNET_PREFIX) for k in state):
        state = {k[len(LDM_UNET_PREFIX) :]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    if "camera_embed.0.weight" not in state or "input_blocks.0.0.weight" not in state:
        raise MissingWeightsError(
            str(path), f"not an MVDream UNet checkpoint (no camera_embed / input_blocks tensors); {FIX}"
        )
    return state


def infer_ldm_config(state: dict[str, torch.Tensor]) -> dict:
    """A MultiViewUNetModel configuration read off the tensor shapes of an LDM-named UNet state."""
    model_channels, in_channels = state["input_blocks.0.0.weight"].shape[:2]
    inputs = sorted({int(m.group(1)) for k in state if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    levels = 1 + sum(f"input_blocks.{i}.0.op.weight" in state for i in inputs)
    res_blocks = (len(inputs) - 1 - (levels - 1)) // levels
    first_block = [1 + level * (res_blocks + 1) for level in range(levels)]
    channels = [state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] for i in first_block]
    attention = [
        level for level, i in enumerate(first_block) if f"input_blocks.{i}.1.proj_in.weight" in state
    ]
    cross = next(v for k, v in state.items() if k.endswith("attn2.to_k.weight"))
    transformer = f"input_blocks.{first_block[attention[0]]}.1."
    depth = {k.split(".")[4] for k in state if k.startswith(transformer + "transformer_blocks.")}
    return {
        "_class_name": MULTIVIEW_CLASS,
        "image_size": DEFAULT_IMAGE_SIZE,
        "in_channels": int(in_channels),
        "out_channels": int(state["out.2.weight"].shape[0]),
        "model_channels": int(model_channels),
        "attention_resolutions": [2**level for level in attention],
        "num_res_blocks": res_blocks,
        "channel_mult": [int(c) // int(model_channels) for c in channels],
        "num_head_channels": DEFAULT_HEAD_CHANNELS,
        "transformer_depth": len(depth),
        "context_dim": int(cross.shape[1]),
        "camera_dim": int(state["camera_embed.0.weight"].shape[1]),
        "use_linear_in_transformer": state[transformer + "proj_in.weight"].ndim == 2,
    }


def diffusers_unet_config(ldm: dict) -> dict:
    """MultiViewUNetModel (LDM) configuration -> `UNet2DConditionModel` keyword arguments.

    Attention sits at the levels whose downsampling factor 2^level is in `attention_resolutions`;
    LDM gives heads as channels per head (`num_head_channels`, or -1 and `num_heads`), diffusers as
    the number of heads (its `attention_head_dim`, a historical misnomer); the LDM timestep embedding
    is cos-then-sin without shift.
    """
    levels = range(len(ldm["channel_mult"]))
    channels = [ldm["model_channels"] * m for m in ldm["channel_mult"]]
    attention = [2**level in ldm["attention_resolutions"] for level in levels]
    head_channels = ldm.get("num_head_channels", -1)
    heads = (
        [c // head_channels for c in channels] if head_channels > 0 else [ldm["num_heads"]] * len(channels)
    )
    return {
        "sample_size": ldm["image_size"],
        "in_channels": ldm["in_channels"],
        "out_channels": ldm["out_channels"],
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        "block_out_channels": tuple(channels),
        "layers_per_block": ldm["num_res_blocks"],
        "attention_head_dim": tuple(heads),
        "transformer_layers_per_block": ldm.get("transformer_depth", 1),
        "cross_attention_dim": ldm["context_dim"],
        "use_linear_projection": ldm.get("use_linear_in_transformer", True),
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": ldm["camera_dim"],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def load_multiview_unet(
    state: dict[str, torch.Tensor], ldm_config: dict, dtype: torch.dtype = torch.float32
) -> UNet2DConditionModel:
    """Build the diffusers UNet (no random init: on the meta device) and assign the converted tensors,
    cast to `dtype`.

    Every checkpoint tensor must find its place and every parameter must be filled, else the
    checkpoint does not match the configuration and loading fails with the names that differ.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(ldm_config))
    renamed = {
        LDM_UNET_PREFIX + re.sub(r"^camera_embed\.", "label_emb.0.", key): value
        for key, value in state.items()
    }
    converted = {k: v.to(dtype) for k, v in convert_ldm_unet_checkpoint(renamed, unet.config).items()}
    mismatch = f"the MVDream checkpoint does not match its configuration {ldm_config}"
    try:
        missing, unexpected = unet.load_state_dict(converted, strict=False, assign=True)
    except RuntimeError as error:  # tensors of the wrong shape
        raise ValueError(f"{mismatch}: {str(error)[:600]}") from error
    if missing or unexpected or len(converted) != len(state):
        raise ValueError(
            f"{mismatch}: "
            f"{len(missing)} parameters missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(state) - len(converted)} checkpoint tensors unused"
        )
    return unet


# ------------------------------------------------------------------------------ cross-view attention


class MultiViewSelfAttention:
    """Self-attention over the tokens of all views of one object: [G * V, L, C] is folded into
    [G, V * L, C], attended with diffusers' SDPA processor, and unfolded. Views of one object must be
    consecutive in the batch. `views` lives on the instance: diffusers drops unknown call kwargs."""

    def __init__(self, views: int = VIEWS_PER_GROUP):
        self.views = views
        self.attention = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("MultiViewSelfAttention is for self-attention (attn1) without a mask")
        batch, tokens, channels = hidden_states.shape
        if batch % self.views:
            raise ValueError(f"a batch of {batch} views is not whole groups of {self.views}")
        folded = hidden_states.reshape(batch // self.views, self.views * tokens, channels)
        out = self.attention(attn, folded, temb=temb)
        return out.reshape(batch, tokens, out.shape[-1])


def self_attention_modules(unet: UNet2DConditionModel) -> list[Attention]:
    """The `attn1` of every transformer block: the ones MVDream makes cross-view."""
    return [m for name, m in unet.named_modules() if name.endswith(".attn1") and isinstance(m, Attention)]


def install_multiview_attention(modules: list[Attention], processor: MultiViewSelfAttention) -> None:
    """Put `processor` on every module that lost it (cheap enough to call before every forward)."""
    for module in modules:
        if module.processor is not processor:
            module.set_processor(processor)


# ---------------------------------------------------------------------------------------------- prior


class MVDreamPrior(DiffusersPrior):
    """MVDream behind the `Prior` interface; `predict_eps` needs each view's camera (`c2w`).

    `source`: "mvdream" (= DEFAULT_SOURCE), a hub id, a folder or a checkpoint file (`locate_weights`);
    `sd_source`: where a bare checkpoint's text encoder, tokenizer, VAE and scheduler come from.

    Text encoder, VAE, encoding and decoding are DiffusersPrior's (SD 2.1's: 256 px renders ->
    32x32x4 latents); only loading and the UNet call differ. Batches are whole groups of
    `views_per_group` consecutive views of one object. No view-suffixed prompts (MVDream needs none).
    Options as DiffusersPrior's; `attention_slicing` slices only the cross-attention, the multi-view
    self-attention stays SDPA.
    """

    views_per_group = VIEWS_PER_GROUP
    guidance_scale = 50.0  # the CFD reference's MVDream stage

    def __init__(
        self,
        source: str | Path = DEFAULT_SOURCE,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        sd_source: str | Path = SD21_BASE,
        name: str | None = None,
        local_files_only: bool | None = None,
        attention_slicing: bool = False,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        cpu_offload: bool = False,
        channels_last: bool = False,
        seed: int = 0,
    ):
        Prior.__init__(self)  # DiffusersPrior's loading does not apply; its methods do
        source = DEFAULT_SOURCE if str(source) == "mvdream" else source
        unet_file, ldm_config, components = locate_weights(source, sd_source, local_files_only)
        state = read_unet_state(unet_file)
        self.ldm_config = ldm_config or infer_ldm_config(state)
        self.weights, self.folder = unet_file, components
        self.name = name or ("mvdream" if str(source) == DEFAULT_SOURCE else str(source))
        self.device, self.dtype = torch.device(device), dtype

        load = dict(dtype=dtype, local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(components / "tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(components / "text_encoder", **load)
        self.vae = AutoencoderKL.from_pretrained(components / "vae", **load)
        self.unet = load_multiview_unet(state, self.ldm_config, dtype)
        del state
        # MVDream predicts epsilon whatever the scheduler folder says (SD 2.1 768-v would say v).
        scheduler_config = DDIMScheduler.load_config(components / "scheduler")
        self.scheduler = DDIMScheduler.from_config(scheduler_config, prediction_type="epsilon")
        self._freeze_and_describe(seed)
        self.view_dependent = False

        if attention_slicing:
            self.unet.set_attention_slice("auto")
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if vae_slicing:
            self.vae.enable_slicing()
        if vae_tiling:
            self.vae.enable_tiling()
        self.multiview_attention = MultiViewSelfAttention(self.views_per_group)
        self.self_attention = self_attention_modules(self.unet)
        install_multiview_attention(self.self_attention, self.multiview_attention)
        if cpu_offload:
            self._enable_cpu_offload()
        else:
            for module in self.modules():
                module.to(self.device)

    @torch.no_grad()
    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        c2w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) [B, 4, h, w] from one UNet call on the 2B CFG batch.

        `c2w` [B, 4, 4] are the views' cameras in Blender's convention; B is whole groups of 4
        consecutive views of one object, and the views of a group share one timestep.
        """
        b, views = x_t.shape[0], self.views_per_group
        if c2w is None or tuple(c2w.shape) != (b, 4, 4):
            shape = None if c2w is None else tuple(c2w.shape)
            raise ValueError(f"MVDream needs every view's camera: c2w must be [{b}, 4, 4], got {shape}")
        if b % views:
            raise ValueError(f"MVDream denoises groups of {views} views; a batch of {b} is not whole groups")
        timesteps = torch.as_tensor(t).reshape(-1)
        if timesteps.numel() == b and bool(
            (timesteps.view(-1, views) != timesteps.view(-1, views)[:, :1]).any()
        ):
            raise ValueError(
                f"the {views} views of a group must share one timestep, got {timesteps.tolist()}"
            )
        install_multiview_attention(self.self_attention, self.multiview_attention)
        x_t = x_t.to(self.device)
        x2, t2, context = cfg_batch(x_t, t, cond, uncond)
        camera = camera_embedding(c2w.to(self.device, torch.float32)).to(self.unet.dtype)
        out = self.unet(
            x2.to(self.unet.dtype),
            t2,
            encoder_hidden_states=context.to(self.unet.dtype),
            class_labels=torch.cat([camera, camera]),
        ).sample
        eps = out.to(self.output_dtype)
        return eps[:b], eps[b:]
