"""The colour field DMTet's surface is painted with: world points [M, 3] -> albedo [M, 3] in [0, 1].

A spatial feature encoding followed by a tiny MLP and a sigmoid, in plain PyTorch so it runs on CPU
and CUDA alike (threestudio's tinycudann hash grid has no CPU path). Two encodings:

- "triplane" (default on CPU): xy, xz and yz feature planes at two resolutions (by default 32^2
  and 128^2; jobs size them to their renders, `triplane_resolutions`) with 8 channels,
  sampled bilinearly with `F.grid_sample`. On one contended CPU thread, forward + backward for 10k
  points took ~10 ms against ~20-35 ms for dense 16^3..64^3 volumes (3-D grid_sample's scattered
  backward is cache-bound) and ~0.5-0.8 s for the hash grid. The coarse level moves large regions
  together.
- "hash" (default on CUDA): instant-NGP's multi-resolution hash grid (16 levels x 2 features,
  2^19 entries per level, resolutions 16 .. 2048; jobs size the finest to their renders,
  `hash_grid_resolution`), for finer detail when gather cost is no issue.

The last layer starts near zero, so the field starts mid-grey (albedo 0.5) everywhere.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Encoding = Literal["triplane", "hash"]


def default_encoding(device: torch.device | str) -> Encoding:
    return "hash" if torch.device(device).type == "cuda" else "triplane"


def triplane_resolutions(render_size: int) -> tuple[int, int]:
    """Planes no finer than the renders that train them.

    A plane spans the whole [-1, 1] box and an object about half of it, so a `render_size` plane
    puts about one texel under each rendered pixel. A finer plane leaves most texels touched by a
    pixel only now and then, and Adam turns those rare, tiny gradients into full-size steps:
    at 64-pixel renders the 128-texel plane baked yellow streaks into a red cube.
    """
    return (max(8, render_size // 4), render_size)


def hash_grid_resolution(render_size: int, base_resolution: int = 16) -> int:
    """The hash grid's finest level for renders of `render_size`, by the rule of `triplane_resolutions`:
    about one texel per rendered pixel. With the fixed 2048 a 512-pixel render touched each finest-level
    entry with about a sixteenth of a pixel, so those levels learnt from rare, noisy gradients."""
    return max(2 * base_resolution, render_size)


class TriplaneEncoding(nn.Module):
    """Bilinear features from three axis-aligned feature planes (xy, xz, yz) at several resolutions.

    [M, 3] in [-1, 1] -> [M, 3 * features * levels], planes and levels concatenated.
    """

    def __init__(
        self,
        resolutions: tuple[int, ...] = (32, 128),
        features: int = 8,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.planes = nn.ParameterList(
            nn.Parameter(torch.empty(3, features, r, r, device=device, dtype=dtype).uniform_(-1e-4, 1e-4))
            for r in resolutions
        )
        self.output_dim = 3 * features * len(resolutions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, 3] in [-1, 1] (clamped at the border)."""
        grid = torch.stack([x[:, [0, 1]], x[:, [0, 2]], x[:, [1, 2]]]).unsqueeze(2)  # [3 planes, M, 1, 2]
        sampled = [
            F.grid_sample(
                planes, grid.to(planes.dtype), mode="bilinear", padding_mode="border", align_corners=True
            )
            for planes in self.planes
        ]
        return torch.cat([s.reshape(s.shape[0] * s.shape[1], len(x)) for s in sampled], dim=0).T


class HashGridEncoding(nn.Module):
    """Multi-resolution hash encoding (Mueller et al. 2022), plain PyTorch: [M, 3] -> [M, levels*features]."""

    _PRIMES = (1, 2654435761, 805459861)

    def __init__(
        self,
        levels: int = 16,
        features: int = 2,
        log2_table_size: int = 19,
        base_resolution: int = 16,
        finest_resolution: int = 2048,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        growth = math.exp(math.log(finest_resolution / base_resolution) / max(levels - 1, 1))
        resolutions = [math.floor(base_resolution * growth**level) for level in range(levels)]
        self.table_size = 2**log2_table_size
        self.register_buffer("resolutions", torch.tensor(resolutions, dtype=torch.long, device=device), False)
        dense = torch.tensor([(r + 1) ** 3 <= self.table_size for r in resolutions], device=device)
        self.register_buffer("dense", dense, False)
        corners = torch.tensor(
            [[(i >> a) & 1 for a in range(3)] for i in range(8)], dtype=torch.long, device=device
        )
        self.register_buffer("corners", corners, False)
        self.table = nn.Parameter(
            torch.empty(levels, self.table_size, features, device=device, dtype=dtype).uniform_(-1e-4, 1e-4)
        )
        self.output_dim = levels * features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, 3] in [-1, 1] (clamped)."""
        levels, size, features = self.table.shape
        unit = ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).to(self.table.dtype)
        position = unit[:, None, :] * self.resolutions[None, :, None].to(unit.dtype)  # [M, L, 3]
        floor = position.floor()
        fraction = position - floor
        corner = floor.long()[:, :, None, :] + self.corners  # [M, L, 8, 3]
        resolution = self.resolutions[None, :, None]
        corner = torch.minimum(corner, resolution[..., None])
        stride = resolution + 1
        dense_index = corner[..., 0] + stride * (corner[..., 1] + stride * corner[..., 2])
        hashed = (
            (corner[..., 0] * self._PRIMES[0])
            ^ (corner[..., 1] * self._PRIMES[1])
            ^ (corner[..., 2] * self._PRIMES[2])
        )
        index = torch.where(self.dense[None, :, None], dense_index, hashed % size)
        level_offset = torch.arange(levels, device=x.device)[None, :, None] * size
        gathered = self.table.reshape(levels * size, features)[index + level_offset]  # [M, L, 8, F]
        weight = torch.where(
            self.corners.bool(), fraction[:, :, None, :], 1.0 - fraction[:, :, None, :]
        ).prod(-1)
        return (gathered * weight[..., None]).sum(2).reshape(len(x), levels * features)


class TextureField(nn.Module):
    """Albedo at world points of the box [-radius, radius]^3: encoding, MLP (one hidden layer), sigmoid."""

    def __init__(
        self,
        radius: float = 1.0,
        encoding: Encoding | None = None,
        hidden: int = 32,
        encoding_options: dict | None = None,
        *,
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.radius = radius
        self.encoding_name = encoding or default_encoding(device)
        options = encoding_options or {}  # constructor arguments of the encoding class, e.g. resolutions
        if self.encoding_name == "triplane":
            self.encoding = TriplaneEncoding(**options, device=device, dtype=dtype)
        elif self.encoding_name == "hash":
            self.encoding = HashGridEncoding(**options, device=device, dtype=dtype)
        else:
            raise ValueError(f"unknown texture encoding {encoding!r}; use 'triplane' or 'hash'")
        self.mlp = nn.Sequential(
            nn.Linear(self.encoding.output_dim, hidden, device=device, dtype=dtype),
            nn.ReLU(),
            nn.Linear(hidden, 3, device=device, dtype=dtype),
        )
        with torch.no_grad():  # near-zero logits: mid-grey start, but gradients reach every layer at once
            self.mlp[-1].weight.normal_(0.0, 1e-3)
            self.mlp[-1].bias.zero_()

    @torch.no_grad()
    def set_base_colour(self, logit: torch.Tensor) -> None:
        """Move the field's base (its output bias) to `logit` [3]: with the last layer's small weights,
        the field then shows about sigmoid(logit) everywhere (the shape stage's albedo)."""
        self.mlp[-1].bias.copy_(logit)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points [M, 3] world -> albedo [M, 3] in [0, 1]."""
        return torch.sigmoid(self.mlp(self.encoding(points / self.radius)))
