"""Where the distillation noise eps_tilde comes from: the interface every noise provider implements.

The three methods differ only here. SDS draws fresh noise every step (`FreshNoise`); FSD and the
2-D clean flow hold the noise fixed per view (`FixedNoise`, and FSD's world-map noise in
`server.noise.worldmap`); CFD attaches it to the object's surface so that every view of one
surface patch sees the same noise (`server.noise.consistent`). A provider returns noise at latent
resolution, [B, C, h, w], deterministic given its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class NoiseQuery:
    """Everything a provider may look at for a batch of B views."""

    latent_hw: tuple[int, int]
    channels: int
    c2w: torch.Tensor | None = None  # [B, 4, 4], Blender convention
    fovy: torch.Tensor | None = None  # [B], radians
    points: torch.Tensor | None = None  # [B, H, W, 3], true world-space ray hits, row 0 = top
    opacity: torch.Tensor | None = None  # [B, H, W, 1]
    view_ids: list[int] | None = None  # identity of each view (2-D mode: which image)

    @property
    def batch_size(self) -> int:
        for value in (self.c2w, self.points, self.opacity):
            if value is not None:
                return value.shape[0]
        if self.view_ids is not None:
            return len(self.view_ids)
        raise ValueError("a NoiseQuery needs cameras, render outputs or view ids to know its batch size")


class NoiseProvider:
    """Base class: `sample` gives the noise of a batch of views; `reinject` is the SDE step."""

    def __init__(self, seed: int, device: torch.device | str):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def sample(self, query: NoiseQuery) -> torch.Tensor:
        raise NotImplementedError

    def reinject(self, gamma: float) -> None:
        """eps <- sqrt(1 - gamma) eps + sqrt(gamma) xi on all held noise; variance stays exactly 1."""

    def _randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=torch.float32)


def mix_in_fresh(noise: torch.Tensor, gamma: float, fresh: torch.Tensor) -> torch.Tensor:
    """The clean-flow SDE's variance-preserving re-injection (CFD Eq. 10-11)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    return math.sqrt(1.0 - gamma) * noise + math.sqrt(gamma) * fresh


class FreshNoise(NoiseProvider):
    """SDS: i.i.d. N(0, 1) drawn anew for every view at every step."""

    def sample(self, query: NoiseQuery) -> torch.Tensor:
        return self._randn((query.batch_size, query.channels, *query.latent_hw))


class FixedNoise(NoiseProvider):
    """Plain fixed noise: one screen-space N(0, 1) image per view id, held across steps.

    In 2-D mode a view id is the image being optimised, so this is exactly the clean flow's constant
    eps_tilde. For 3-D cameras without ids every view shares id 0: the "vanilla" fixed noise FSD
    reports makes holes, kept for comparison.
    """

    def __init__(self, seed: int, device: torch.device | str):
        super().__init__(seed, device)
        self.noise: dict[int, torch.Tensor] = {}

    def sample(self, query: NoiseQuery) -> torch.Tensor:
        ids = query.view_ids if query.view_ids is not None else [0] * query.batch_size
        shape = (query.channels, *query.latent_hw)
        for i in ids:
            if i not in self.noise:
                self.noise[i] = self._randn(shape)
            elif self.noise[i].shape != shape:
                raise ValueError(
                    f"view {i} was first asked for noise of shape {tuple(self.noise[i].shape)}, now {shape}"
                )
        return torch.stack([self.noise[i] for i in ids])

    def reinject(self, gamma: float) -> None:
        if gamma == 0.0:
            return
        for i, eps in self.noise.items():
            self.noise[i] = mix_in_fresh(eps, gamma, self._randn(tuple(eps.shape)))
