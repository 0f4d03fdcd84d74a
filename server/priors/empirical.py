"""The closed-form optimal denoiser of a finite image set, as a prior (priors.md §6.5).

For images {x_i} and x_t = alpha_t x_0 + sigma_t eps with x_0 drawn uniformly from the set, the
exact posterior-mean denoiser is

    x0_hat(x_t) = sum_i softmax_i(-||x_t - alpha_t x_i||^2 / (2 sigma_t^2)) x_i,
    eps_hat     = (x_t - alpha_t x0_hat) / sigma_t.

No training, no weight files, deterministic and cheap (two matmuls), and its scores are exact, so it
is a real prior for end-to-end tests and CPU demos: sampling from it reproduces set images. A text
prompt restricts the set to the images whose caption matches it, which makes the conditional and
unconditional predictions differ exactly as classifier-free guidance expects ("" = every image).
The "prompt embedding" is therefore a 0/1 mask over the set, [K, 1, N].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import DDIMScheduler

from server.priors.base import VIEW_SUFFIXES, Prior, cfg_batch, model_output_to_rgb, rgb_to_model_input


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def caption_matches(prompt: str, caption: str) -> bool:
    """Exact match after lower-casing and collapsing spaces; a trailing view suffix on the prompt is
    ignored (the set's images carry no view labels); the empty prompt matches every caption."""
    prompt = _normalise(prompt)
    for suffix in VIEW_SUFFIXES:
        if prompt.endswith(_normalise(suffix)):
            prompt = prompt[: -len(_normalise(suffix))].strip()
    return prompt == "" or prompt == _normalise(caption)


class EmpiricalPrior(Prior):
    """A pixel-space prior whose denoiser is the exact MMSE estimate over `images` [N, H, W, 3] in [0, 1].

    `match(prompt, caption)` decides which images a prompt selects (default `caption_matches`).
    `dtype=torch.float64` makes predictions (returned in float64 then) exact to double precision.
    """

    def __init__(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        scheduler_config: Mapping,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        *,
        pixel_size: int | None = None,
        match: Callable[[str, str], bool] = caption_matches,
        name: str = "empirical",
    ):
        super().__init__()
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.name, self.device, self.dtype = name, torch.device(device), dtype
        self.captions, self.match = list(captions), match
        self.pixel_size = self.latent_size = pixel_size or images.shape[1]
        self.latent_channels = 3
        self.images = rgb_to_model_input(images.to(self.device, dtype), self.pixel_size)  # [N, 3, s, s]
        self.flat = self.images.reshape(len(images), -1)
        self.sq_norms = (self.flat**2).sum(dim=1)
        self.scheduler = DDIMScheduler.from_config(dict(scheduler_config))
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to("cpu", torch.float64)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        masks = torch.tensor(
            [[self.match(text, c) for c in self.captions] for text in texts],
            device=self.device,
            dtype=self.dtype,
        )
        for text, mask in zip(texts, masks, strict=True):
            if not mask.any():
                known = sorted(set(self.captions))
                raise ValueError(
                    f"no image in the empirical set matches {text!r}; captions include {known[:8]}"
                )
        return masks[:, None, :]

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        return rgb_to_model_input(rgb.to(self.device), self.pixel_size).to(self.output_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return model_output_to_rgb(latents)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The posterior mean [B, 3, s, s] of x_t at timesteps t [B] over the masked image sets [B, N]."""
        abar = self.alphas_cumprod[t.cpu()].to(self.device, self.dtype)
        alpha, var = abar.sqrt()[:, None], (1.0 - abar)[:, None]
        q = x_t.reshape(len(x_t), -1).to(self.dtype)
        # ||q - alpha x_i||^2 expanded into one matmul over the whole set.
        sq_dist = (q**2).sum(dim=1, keepdim=True) - 2.0 * alpha * (q @ self.flat.T) + alpha**2 * self.sq_norms
        logits = (-sq_dist / (2.0 * var)).masked_fill(masks == 0, float("-inf"))
        return (torch.softmax(logits, dim=1) @ self.flat).reshape(x_t.shape)

    @torch.no_grad()
    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        c2w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_cond, eps_uncond) in output_dtype: exact scores of the caption-restricted and full sets."""
        x_t = x_t.to(self.device)
        x2, t2, masks = cfg_batch(x_t, t, cond, uncond)
        x0 = self.predict_x0(x2, t2, masks[:, 0, :])
        abar = self.alphas_cumprod[t2.cpu()].to(self.device, self.dtype).view(-1, 1, 1, 1)
        eps = ((x2.to(self.dtype) - abar.sqrt() * x0) / (1.0 - abar).sqrt()).to(self.output_dtype)
        b = x_t.shape[0]
        return eps[:b], eps[b:]
