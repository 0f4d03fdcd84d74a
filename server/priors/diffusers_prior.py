"""Text-conditioned diffusers models as priors: Stable Diffusion 1.5 / 2.1-base and the shapes prior.

One class for every model laid out like a diffusers pipeline folder: unet/, text_encoder/,
tokenizer/, scheduler/ and, for latent models, vae/ (model_index.json is optional). Without vae/
the model is a pixel-space prior and "encoding" is just resizing to the model's resolution.

A hub id is first resolved to a folder in the Hugging Face cache (`snapshot_download`, which honours
HF_HUB_OFFLINE and the cache), so hub models and local folders load through the same code. Missing
weights raise `MissingWeightsError` naming the model and the command that fetches them; nothing is
downloaded implicitly when the hub is offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import CLIPTextModel, CLIPTokenizer

from server.job.errors import MissingWeightsError
from server.priors.base import (
    VIEW_DIRECTION_DIM,
    Prior,
    cfg_batch,
    model_output_to_rgb,
    rgb_to_model_input,
    view_directions,
)

COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler", "vae")
REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE read now, not at import time, so a test or the server can switch it late."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_weights(
    source: str | Path, variant: str | None = None, local_files_only: bool | None = None
) -> Path:
    """The local folder holding a model: `source` itself if it is a folder, else the cached hub snapshot.

    Only the pipeline components a prior uses are fetched (no safety checker), in the `variant`
    ("fp16") when given. Raises MissingWeightsError when the folder or the snapshot is not there.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return check_folder(path, str(source))
    repo = str(source)
    fix = (
        f"download it with `hf download {repo}` (or `huggingface-cli download {repo}`) while online, "
        f"or pass a local folder with the diffusers layout (unet/, text_encoder/, tokenizer/, "
        f"scheduler/, vae/)"
    )
    if path.is_absolute() or repo.startswith((".", "~")) or repo.count("/") != 1:
        raise MissingWeightsError(repo, f"no such folder; {fix}")
    offline = hub_offline() if local_files_only is None else local_files_only
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    patterns = ["model_index.json"] + [f"{c}/{p}" for c in COMPONENTS for p in ("*.json", "*.txt", weights)]
    try:
        folder = snapshot_download(repo, allow_patterns=patterns, local_files_only=offline)
    except (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        HFValidationError,
        HfHubHTTPError,
    ) as error:
        where = "the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the Hugging Face hub"
        raise MissingWeightsError(repo, f"not found in {where} ({type(error).__name__}); {fix}") from error
    return check_folder(Path(folder), repo, fix)


def check_folder(folder: Path, model: str, fix: str | None = None) -> Path:
    """Fail early, naming every missing part, rather than deep inside from_pretrained."""
    fix = fix or (
        "the folder must hold a diffusers pipeline: unet/, text_encoder/ (config + weights), "
        "tokenizer/, scheduler/, and vae/ for latent models; e.g. "
        "`hf download stabilityai/stable-diffusion-2-1-base --local-dir FOLDER`"
    )
    missing = [c for c in REQUIRED if not (folder / c).is_dir()]
    missing += [
        f"{c} weights"
        for c in ("unet", "text_encoder", "vae")
        if (folder / c).is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in (folder / c).iterdir())
    ]
    if missing:
        raise MissingWeightsError(model, f"{folder} lacks {', '.join(missing)}; {fix}")
    return folder


class DiffusersPrior(Prior):
    """A UNet2DConditionModel with a CLIP text encoder, in latent space (with a VAE) or pixel space.

    Memory savers for 8-12 GB cards, all off by default: `attention_slicing` (sliced attention in
    the UNet), `vae_slicing` / `vae_tiling` (encode and decode in pieces), `cpu_offload` (accelerate
    moves each model to the GPU only while it runs), `channels_last` (faster convolutions on CUDA).
    Attention is PyTorch's scaled_dot_product_attention otherwise (diffusers' default processor).
    `view_dependent` (default: True for latent models, False for pixel ones) is the default for
    jobs' view-suffixed prompts; `seed` seeds the VAE posterior sampling.
    """

    def __init__(
        self,
        source: str | Path,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        name: str | None = None,
        variant: str | None = None,
        local_files_only: bool | None = None,
        attention_slicing: bool = False,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        cpu_offload: bool = False,
        channels_last: bool = False,
        view_dependent: bool | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.folder = resolve_weights(source, variant, local_files_only)
        self.name = name or str(source)
        self.device, self.dtype = torch.device(device), dtype
        load = dict(dtype=dtype, local_files_only=True)
        if variant and any(
            p.name.endswith(f".{variant}.safetensors") for p in (self.folder / "unet").iterdir()
        ):
            load["variant"] = variant

        self.tokenizer = CLIPTokenizer.from_pretrained(self.folder / "tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(self.folder / "text_encoder", **load)
        self.unet = UNet2DConditionModel.from_pretrained(self.folder / "unet", **load)
        has_vae = (self.folder / "vae").is_dir()
        self.vae = AutoencoderKL.from_pretrained(self.folder / "vae", **load) if has_vae else None
        self.scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(self.folder / "scheduler"))
        self._freeze_and_describe(seed)
        # DreamFusion-style view suffixes help Stable Diffusion; the pixel-space shapes prior never saw them.
        self.view_dependent = self.vae is not None if view_dependent is None else view_dependent

        if attention_slicing:
            self.unet.set_attention_slice("auto")
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if self.vae is not None and vae_slicing:
            self.vae.enable_slicing()
        if self.vae is not None and vae_tiling:
            self.vae.enable_tiling()
        if cpu_offload:
            self._enable_cpu_offload()
        else:
            for module in self.modules():
                module.to(self.device)

    def _freeze_and_describe(self, seed: int) -> None:
        """Frozen eval-mode networks, and the attributes of `Prior` read off the loaded models."""
        for module in self.modules():
            module.eval().requires_grad_(False)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to("cpu", torch.float64)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        self.latent_channels = int(self.unet.config.in_channels)
        self.latent_size = int(self.unet.config.sample_size)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae else 1
        self.pixel_size = self.latent_size * self.vae_scale_factor
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        # The shapes prior's UNet adds a projection of the view direction to its time embedding.
        self.camera_conditioned = (
            self.unet.config.class_embed_type == "projection"
            and self.unet.config.projection_class_embeddings_input_dim == VIEW_DIRECTION_DIM
        )

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.unet, self.vae) if m is not None]

    def _enable_cpu_offload(self) -> None:
        """accelerate hooks chained in a step's call order: each model moves to the GPU when it runs
        and pushes the previous one back to the CPU (the text encoder leaves once prompts are cached)."""
        from accelerate import cpu_offload_with_hook

        hook = None
        for module in (self.text_encoder, self.vae, self.unet):
            if module is not None:
                _, hook = cpu_offload_with_hook(module, self.device, prev_module_hook=hook)

    def release_text_encoder(self) -> None:
        """Free the text encoder once every prompt the job needs is cached (SD 2.1's is 0.7 GB fp16)."""
        self.text_encoder = None

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        if self.text_encoder is None:
            raise RuntimeError(f"the text encoder was released; {texts!r} is not in the prompt cache")
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device)).last_hidden_state.to(self.device, self.dtype)

    def encode_images(self, rgb: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Renders [B, H, W, 3] in [0, 1] -> latents [B, C, h, w], differentiable w.r.t. rgb.

        Latent models sample the VAE posterior (with `generator`, else the prior's own seeded one)
        and scale it as Stable Diffusion does; pixel models return the resized image in [-1, 1].
        """
        x = rgb_to_model_input(rgb.to(self.device), self.pixel_size)
        if self.vae is None:
            return x.to(self.output_dtype)
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator or self.generator)
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.output_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, H, W, 3] in [0, 1], float32."""
        if self.vae is None:
            return model_output_to_rgb(latents)
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor
        z = z + (self.vae.config.shift_factor or 0.0)
        return model_output_to_rgb(self.vae.decode(z).sample)

    @torch.no_grad()
    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        c2w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) [B, C, h, w] in output_dtype from one UNet call on the 2B batch.

        A camera-conditioned UNet sees each view's direction (`c2w`) in both halves: the camera is
        part of the image's description, not of the prompt that guidance amplifies.
        """
        x_t = x_t.to(self.device)
        x2, t2, context = cfg_batch(x_t, t, cond, uncond)
        camera = None
        if self.camera_conditioned:
            camera = view_directions(c2w, x_t.shape[0], self.device).repeat(2, 1).to(self.unet.dtype)
        out = self.unet(
            x2.to(self.unet.dtype), t2, encoder_hidden_states=context.to(self.unet.dtype), class_labels=camera
        ).sample
        eps = self._to_eps(out.to(self.output_dtype), x2.to(self.output_dtype), t2)
        b = x_t.shape[0]
        return eps[:b], eps[b:]

    def _to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's prediction as epsilon, whatever it was trained to predict."""
        if self.prediction_type == "epsilon":
            return out
        abar = self.alphas_cumprod[t.cpu()].to(x_t.device, x_t.dtype).view(-1, 1, 1, 1)
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        if self.prediction_type == "v_prediction":
            return alpha * out + sigma * x_t
        if self.prediction_type == "sample":
            return (x_t - alpha * out) / sigma
        raise ValueError(f"{self.name}: unsupported prediction_type {self.prediction_type!r}")
