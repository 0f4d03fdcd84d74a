"""The interface every diffusion prior implements, and the parts all priors share.

A prior turns renders into its own space (`encode_images`, with gradient), embeds prompts once
(`encode_prompt`, cached), and predicts noise for a batch under classifier-free guidance in one
network call (`predict_eps`). The distillation loop (`server.distill.update`) sees nothing else, so the
Stable Diffusion prior, the project's pixel-space shapes prior and the closed-form empirical prior
are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# DreamFusion's view-dependent prompting: one suffix per direction, chosen per camera.
VIEW_SUFFIXES = (", front view", ", side view", ", back view", ", overhead view")
FRONT, SIDE, BACK, OVERHEAD = range(4)
OVERHEAD_ELEVATION_DEG = 60.0
FRONT_HALF_ANGLE_DEG = 45.0  # and the back's: DreamFusion's threshold


def view_suffix_index(
    elevation_deg: float,
    azimuth_deg: float,
    front_azimuth_deg: float = 0.0,
    front_back_deg: float = FRONT_HALF_ANGLE_DEG,
) -> int:
    """Which of VIEW_SUFFIXES describes a camera at (elevation, azimuth), in degrees.

    DreamFusion / threestudio thresholds: overhead when the elevation exceeds 60 degrees; otherwise,
    with the azimuth measured from the object's front and wrapped to [-180, 180): front when it is
    strictly within 45 degrees of the front, back when strictly within 45 degrees of the back, and
    side in between (the boundaries at exactly 45 and 135 degrees are side).

    Azimuths follow `server.render.cameras.orbit_c2w` (0 on +X, counter-clockwise seen from +Z), and the
    object's front is where `front_azimuth_deg` points: 0 (+X) as in threestudio by default;
    -90 puts the front towards Blender's Front view (a camera on -Y). `front_back_deg` replaces the
    45 degrees on both sides (the CFD reference's Stable Diffusion stages use 30).
    """
    if elevation_deg > OVERHEAD_ELEVATION_DEG:
        return OVERHEAD
    relative = (azimuth_deg - front_azimuth_deg + 180.0) % 360.0 - 180.0
    if abs(relative) < front_back_deg:
        return FRONT
    if abs(relative) > 180.0 - front_back_deg:
        return BACK
    return SIDE


@dataclass
class PromptEmbeddings:
    """A prompt's conditioning for `Prior.predict_eps`, on the prior's device and in its dtype."""

    cond: torch.Tensor  # [K, L, D]: one row per entry of `suffixes`
    uncond: torch.Tensor  # [1, L, D]: the negative prompt ("" by default)
    suffixes: list[str]  # [""] or the VIEW_SUFFIXES

    def for_views(
        self,
        elevation_deg: torch.Tensor,
        azimuth_deg: torch.Tensor,
        front_azimuth_deg: float = 0.0,
        front_back_deg: float = FRONT_HALF_ANGLE_DEG,
    ) -> torch.Tensor:
        """cond rows [B, L, D] for B cameras: the view-dependent row of each, or row 0 repeated."""
        if len(self.suffixes) == 1:
            return self.cond.expand(len(elevation_deg), -1, -1)
        rows = [
            view_suffix_index(float(e), float(a), front_azimuth_deg, front_back_deg)
            for e, a in zip(elevation_deg, azimuth_deg, strict=True)
        ]
        return self.cond[torch.tensor(rows, device=self.cond.device)]


class Prior:
    """Base class of the diffusion priors. Subclasses set the attributes and implement the methods.

    Conventions: images enter as the renderer's [B, H, W, 3] in [0, 1], row 0 = top; latents are
    [B, C, h, w]; `predict_eps` returns (eps_cond, eps_uncond) -- conditional first, as threestudio
    does -- and the CFG combination is the caller's (`server.distill.update`). Latents and predictions come
    out in `output_dtype`: float32, or float64 for a prior run in float64 (exactness tests).
    """

    name: str
    guidance_scale: float = 7.5  # what a job uses unless it says otherwise (Stable Diffusion's)
    device: torch.device
    dtype: torch.dtype
    alphas_cumprod: torch.Tensor  # [T] float64 on the CPU
    num_train_timesteps: int
    latent_channels: int
    latent_size: int
    pixel_size: int
    scheduler: object  # a diffusers DDIMScheduler built from the model's scheduler config
    view_dependent: bool = False  # whether jobs should use the view-suffixed prompts by default

    def __init__(self) -> None:
        self._prompt_cache: dict[tuple[str, str, bool], PromptEmbeddings] = {}

    @property
    def output_dtype(self) -> torch.dtype:
        return torch.promote_types(self.dtype, torch.float32)

    def encode_prompt(
        self, prompt: str, negative_prompt: str = "", view_dependent: bool = False
    ) -> PromptEmbeddings:
        """Embed a prompt (and its view-dependent variants) once; later calls return the cached result."""
        key = (prompt, negative_prompt, view_dependent)
        if key not in self._prompt_cache:
            suffixes = list(VIEW_SUFFIXES) if view_dependent else [""]
            embedded = self.embed_texts([prompt + s for s in suffixes] + [negative_prompt])
            self._prompt_cache[key] = PromptEmbeddings(embedded[:-1], embedded[-1:], suffixes)
        return self._prompt_cache[key]

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), L, D] conditioning for the network; called only on a prompt-cache miss."""
        raise NotImplementedError

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict_eps(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | int,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        c2w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`c2w` [B, 4, 4]: the views' cameras, for priors conditioned on them (MVDream); others ignore it."""
        raise NotImplementedError


def cfg_batch(
    x_t: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor, uncond: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2B batch of one CFG network call: (x_t twice, timesteps [2B] long, (cond; uncond) [2B, L, D]).

    `t` may be a Python int, a 0-d tensor or one timestep per item; cond and uncond may have
    batch 1 (broadcast to all B items) or B.
    """
    b = x_t.shape[0]
    timesteps = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(b)
    cond = cond.to(x_t.device).expand(b, -1, -1) if cond.shape[0] == 1 else cond.to(x_t.device)
    uncond = uncond.to(x_t.device).expand(b, -1, -1) if uncond.shape[0] == 1 else uncond.to(x_t.device)
    if cond.shape[0] != b or uncond.shape[0] != b:
        raise ValueError(f"cond/uncond batch must be 1 or {b}, got {cond.shape[0]} and {uncond.shape[0]}")
    return torch.cat([x_t, x_t]), torch.cat([timesteps, timesteps]), torch.cat([cond, uncond])


# A camera-conditioned pixel prior (the shapes prior) takes the direction it is seen from: the unit
# vector from the object's centre to the camera, 3 numbers; zeros mean "no camera" (trained as dropout).
VIEW_DIRECTION_DIM = 3


def view_directions(c2w: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """[batch, 3]: each camera's position on the unit sphere around the object, or zeros without cameras.

    Orbit cameras look at the origin, so this is (cos e cos a, cos e sin a, sin e) for elevation e and
    azimuth a (`server.render.cameras.orbit_c2w`); the radius is left out, as it barely varies in the rig.
    """
    if c2w is None:
        return torch.zeros(batch, VIEW_DIRECTION_DIM, device=device)
    position = c2w[..., :3, 3].to(device, torch.float32).reshape(-1, 3)
    if position.shape[0] != batch:
        raise ValueError(f"{position.shape[0]} cameras for a batch of {batch} images")
    return position / position.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def rgb_to_model_input(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """Renderer images [B, H, W, 3] in [0, 1] -> [B, 3, size, size] in [-1, 1], keeping the graph.

    Antialiased bilinear resampling: plain bilinear when enlarging (threestudio's 64 -> 512), a
    proper low-pass when shrinking, so a large render does not alias into the prior's input.
    """
    x = rgb.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


def model_output_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> renderer layout [B, H, W, 3] in [0, 1], float32."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on CUDA (Stable Diffusion's usual precision), fp32 elsewhere (CPU half is slow)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32
