"""The shape stage: a signed distance volume, volume-rendered, free to change topology.

Marching tets passes gradient only to SDF values on grid edges that cross the surface, and the
regularisers that keep a DMTet surface clean also pin it where it started: on a 32-grid the start
sphere bends but never opens a torus's hole (`shared/research/shape_diagnosis.md`). The reference
pipelines form the shape first in a volume (a NeRF) and hand its isosurface to DMTet. This is that
first stage made small enough for a CPU: the SDF is the job's start (the DMTet's initial SDF on its
lattice, so the default start is the same sphere) plus a learned coarse-to-fine pyramid of dense
trilinear grids (8^3 + 16^3 + 32^3 in the shapes pipeline), rendered with a logistic density of the SDF,
sigma = sigmoid(-sdf / beta) / beta (NeuS/VolSDF family). While beta is wide, every sample near
the surface gets gradient, so the surface can sweep through the volume and open holes; as beta
shrinks the surface turns crisp. An eikonal term keeps the field a distance, so its zero level is
the surface (no density threshold to guess) and its gradient is the shading normal. It penalises
|grad sdf| only outside a band around 1 (`eikonal_slack`): on a trilinear grid the interpolated gradient
of a true distance falls to about 0.7 along a sharp edge (two unit normals averaged), so the exact
term rounds every edge off, and regularisers alone took a true cube from IoU 0.98 to 0.55
(bench/README.md); with the band they keep it at 0.98.

While the shape forms the volume has one albedo: with no texture there is nothing to paint a fake
silhouette with (a sphere painted white where a torus has its hole). `VolumeRender` carries the
expected surface point and opacity per pixel, which is all CFD's surface-attached noise needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.render.mesh import pixel_rays
from server.render.shading import AMBIENT, BACKGROUND, DIFFUSE


@dataclass
class VolumeRender:
    """One batch of views, images [B, H, W, C] with row 0 = top, as `server.render.mesh.MeshRender`."""

    rgb: torch.Tensor  # [B,H,W,3] the shaded volume over the background
    opacity: torch.Tensor  # [B,H,W,1] accumulated alpha
    points: torch.Tensor  # [B,H,W,3] expected ray termination (the surface where opacity is high)
    eikonal: torch.Tensor  # scalar: mean squared excess of |grad sdf| outside [1 - slack, 1 + slack]
    c2w: torch.Tensor  # [B,4,4]
    fovy: torch.Tensor  # [B]


class SDFVolume(nn.Module):
    """SDF on [-radius, radius]^3 = fixed start lattice + sum of learned grids; one learned albedo.

    `start` holds the start SDF at `server.geometry.tetgrid.lattice_vertices(n) * radius`, [(n+1)^3].
    """

    def __init__(
        self,
        start: torch.Tensor,
        radius: float = 1.0,
        levels: tuple[int, ...] = (8, 16),
        albedo: float = 0.5,
    ):
        super().__init__()
        self.radius = radius
        side = round(len(start) ** (1 / 3))
        # lattice order is x-major (i, j, k) = (x, y, z); grid_sample wants [z, y, x]
        lattice = start.detach().float().reshape(side, side, side).permute(2, 1, 0)
        self.register_buffer("start", self._with_gradient(lattice[None, None]), False)
        device = start.device
        self.grids = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, 1, n, n, n, device=device)) for n in levels]
        )
        logit = torch.logit(torch.tensor(albedo)).item()
        self.albedo_logit = nn.Parameter(torch.full((3,), logit, device=device))

    def _with_gradient(self, grid: torch.Tensor) -> torch.Tensor:
        """[1, 4, D, H, W]: the grid and its central differences (d/dx, d/dy, d/dz), interpolated
        together, so a lookup gives the field and its gradient without a double backward."""
        spacing = 2.0 * self.radius / (grid.shape[-1] - 1)
        d_z, d_y, d_x = torch.gradient(grid[0, 0], spacing=spacing)
        return torch.cat([grid, torch.stack([d_x, d_y, d_z])[None]], dim=1)

    def field(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDF [N] and its spatial gradient [N, 3] at world points [N, 3]."""
        coords = (points / self.radius).reshape(1, -1, 1, 1, 3)  # grid_sample takes (x, y, z)
        total = 0.0
        for volume in [self.start, *(self._with_gradient(g) for g in self.grids)]:
            sampled = F.grid_sample(
                volume, coords, mode="bilinear", padding_mode="border", align_corners=True
            )
            total = total + sampled.reshape(4, -1)
        return total[0], total[1:].T

    def albedo(self) -> torch.Tensor:
        return torch.sigmoid(self.albedo_logit)

    def smoothness(self) -> torch.Tensor:
        """Mean squared difference between neighbouring cells of the learned grids (an L2 total variation)."""
        terms = [grid.diff(dim=dim).pow(2).mean() for grid in self.grids for dim in (2, 3, 4)]
        return torch.stack(terms).mean()

    @torch.no_grad()
    def at(self, points: torch.Tensor) -> torch.Tensor:
        """SDF [N] at world points [N, 3], e.g. the DMTet lattice the shape is handed to."""
        return torch.cat([self.field(chunk)[0] for chunk in points.split(65536)])

    def render(
        self,
        c2w: torch.Tensor,
        fovy: torch.Tensor,
        size: int,
        light_dir: torch.Tensor,
        beta: float,
        samples: int = 48,
        generator: torch.Generator | None = None,
        eikonal_slack: float = 0.0,
    ) -> VolumeRender:
        """Alpha-composite `samples` jittered points per ray over its chord through the ball of `radius`,
        each Lambert-shaded (the prior's shading model) with the albedo and the SDF's normal.
        `eikonal_slack`: the eikonal term's band, `eikonal_excess`."""
        device = self.albedo_logit.device
        dirs = pixel_rays(c2w.to(device), fovy.to(device), size, size)  # [B,H,W,3]
        origins = c2w.to(device)[:, None, None, :3, 3].expand_as(dirs)
        near, far = ball_chord(origins, dirs, self.radius)  # [B,H,W]
        draw_device = generator.device if generator is not None else device
        jitter = torch.rand((*near.shape, samples), generator=generator, device=draw_device).to(device)
        fraction = (torch.arange(samples, device=device) + jitter) / samples  # stratified along the chord
        depth = near[..., None] + (far - near)[..., None] * fraction  # [B,H,W,S]
        delta = ((far - near) / samples)[..., None]
        points = origins[..., None, :] + depth[..., None] * dirs[..., None, :]  # [B,H,W,S,3]

        sdf, gradient = self.field(points.reshape(-1, 3))
        sigma = (torch.sigmoid(-sdf / beta) / beta).reshape(depth.shape)
        normal = F.normalize(gradient, dim=-1, eps=1e-8).reshape(points.shape)
        alpha = 1.0 - torch.exp(-sigma * delta)
        transmittance = torch.cumprod(
            torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha + 1e-10], dim=-1), dim=-1
        )
        weights = alpha * transmittance[..., :-1]  # [B,H,W,S]
        opacity = weights.sum(-1, keepdim=True)

        light = light_dir.to(device)[:, None, None, None, :]
        shade = AMBIENT + DIFFUSE * (normal * light).sum(-1).clamp(min=0.0)  # [B,H,W,S]
        background = torch.tensor(BACKGROUND, device=device)
        rgb = (weights * shade).sum(-1, keepdim=True) * self.albedo() + (1.0 - opacity) * background
        surface = (weights[..., None] * points).sum(-2) / opacity.clamp_min(1e-6)
        eikonal = eikonal_excess(gradient.norm(dim=-1), eikonal_slack).pow(2).mean()
        return VolumeRender(rgb, opacity, surface, eikonal, c2w, fovy)


def eikonal_excess(gradient_norm: torch.Tensor, slack: float) -> torch.Tensor:
    """How far |grad sdf| lies outside [1 - slack, 1 + slack] (signed; 0 inside the band): slack 0 is the
    classic eikonal residual |grad sdf| - 1."""
    return (gradient_norm - (1.0 + slack)).clamp_min(0.0) - ((1.0 - slack) - gradient_norm).clamp_min(0.0)


def ball_chord(origins: torch.Tensor, dirs: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of unit rays through the ball of `radius` at the origin; a ray that
    misses gets an empty chord (far == near)."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    root = (b * b - c).clamp_min(0.0).sqrt()
    near = (-b - root).clamp_min(0.0)
    far = (-b + root).clamp_min(near)
    return near, far
