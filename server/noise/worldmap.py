"""FSD's world-map noise eps(c): a wrap-around noise panorama cropped by the camera's azimuth and elevation.

Why: FSD (Yan et al. 2024) found that one fixed screen-space noise for every camera makes holes, since
no static surface can show the same noise-driven pattern at the same pixels from every side. Its
remedy makes the noise a function of the camera instead: a fixed N(0, 1) "world map" of
(360 / window) x (180 / window) latent windows, from which each view crops the h x w window at its
azimuth and elevation, so turning the camera by `window_deg` slides the noise by one full window. The
noise ignores depth and geometry, so it slides over the object rather than sticking to it; it is kept
as the FSD baseline and for comparison with `server.noise.consistent`.

Choices: the map wraps in both directions (a torus), so a small camera move always shifts the window by
a small amount (the reference's elevation offset wraps at the equator without a vertical wrap);
offsets are floored to whole latent pixels as in the reference. Background (FSD Eq. 16): latent pixels
whose render block has mean opacity below `opacity_threshold` take a fixed screen-space noise shared by
all views ("fixed") or fresh noise ("fresh"). Every pixel of a view is a distinct map or background
entry, so the view's noise is exactly i.i.d. N(0, 1); `reinject` mixes map and background exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from server.noise.base import NoiseProvider, NoiseQuery, mix_in_fresh


def camera_angles(c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elevation and azimuth in degrees of cameras [B, 4, 4] around the origin (azimuth 0 on +X)."""
    position = c2w[:, :3, 3].to(torch.float64)
    elevation = torch.rad2deg(torch.asin((position[:, 2] / position.norm(dim=1)).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(position[:, 1], position[:, 0]))
    return elevation, azimuth


class WorldMapNoise(NoiseProvider):
    """FSD's noise provider: crops of a wrap-around world map, background by pooled opacity."""

    def __init__(
        self,
        seed: int,
        device: torch.device | str,
        *,
        window_deg: float = 180.0,
        background: str = "fixed",
        opacity_threshold: float = 0.5,
    ):
        super().__init__(seed, device)
        if background not in ("fixed", "fresh"):
            raise ValueError(f"background must be 'fixed' or 'fresh', got {background!r}")
        if not 0.0 < window_deg <= 180.0 or (180.0 / window_deg) % 1.0:
            raise ValueError(f"window_deg must divide 180, got {window_deg}")
        self.window_deg = window_deg
        self.background_mode = background
        self.opacity_threshold = opacity_threshold
        self.maps: dict[tuple[int, int, int], torch.Tensor] = {}
        self.background: dict[tuple[int, int, int], torch.Tensor] = {}

    def map_for(self, channels: int, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The world map [C, (180 / window) h, (360 / window) w], drawn on first use."""
        key = (channels, *latent_hw)
        if key not in self.maps:
            windows = round(180.0 / self.window_deg)
            self.maps[key] = self._randn((channels, windows * latent_hw[0], 2 * windows * latent_hw[1]))
        return self.maps[key]

    def sample(self, query: NoiseQuery) -> torch.Tensor:
        if query.c2w is None:
            raise ValueError("world-map noise needs the cameras (c2w)")
        h, w = query.latent_hw
        world = self.map_for(query.channels, query.latent_hw)
        rows, cols = world.shape[1:]
        elevation, azimuth = camera_angles(query.c2w.to(self.device))
        row0 = torch.floor(-elevation * rows / 180.0).long() % rows
        col0 = torch.floor(azimuth * cols / 360.0).long() % cols
        r = (row0[:, None] + torch.arange(h, device=self.device)) % rows  # [B, h]
        c = (col0[:, None] + torch.arange(w, device=self.device)) % cols  # [B, w]
        noise = world[:, r[:, :, None], c[:, None, :]].permute(1, 0, 2, 3)  # [B, C, h, w]
        if query.opacity is None:
            return noise.contiguous()
        if query.opacity.shape[1] % h or query.opacity.shape[2] % w:
            raise ValueError(f"render size must be an integer multiple of the latent grid {h}x{w}")
        pooled = F.adaptive_avg_pool2d(
            query.opacity.to(self.device, torch.float32).permute(0, 3, 1, 2), (h, w)
        )
        return torch.where(pooled >= self.opacity_threshold, noise, self._background(query))

    def reinject(self, gamma: float) -> None:
        if gamma == 0.0:
            return
        for store in (self.maps, self.background):
            for key, eps in store.items():
                store[key] = mix_in_fresh(eps, gamma, self._randn(tuple(eps.shape)))

    def _background(self, query: NoiseQuery) -> torch.Tensor:
        shape = (query.channels, *query.latent_hw)
        if self.background_mode == "fresh":
            return self._randn((query.batch_size, *shape))
        if shape not in self.background:
            self.background[shape] = self._randn(shape)
        return self.background[shape].expand(query.batch_size, *shape)
