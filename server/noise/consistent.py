"""CFD's multi-view-consistent Gaussian noise: exactly i.i.d. N(0, 1) within a view, attached to the surface.

Why: CFD adds to every rendered view a noise eps_tilde(theta, c) that the diffusion model must see as
i.i.d. N(0, 1) at latent resolution, yet that follows the object's surface, so that one surface patch
seen from two cameras receives the same noise (the 3-D analogue of the clean flow's fixed noise).
Like "How I Warped Your Noise" and the reference code, a latent pixel's noise is the integral of a
fine white noise W over the surface it sees, normalised by sqrt(area):

    eps(p) = sum_{cells in footprint(p)} W(cell) / sqrt(count(p))

a *sum* over *disjoint* cells, so each pixel is exactly N(0, 1) and pixels are independent, while two
views of one patch integrate the same cells (correlation |A cap B| / sqrt(|A| |B|)).

The reference stores W as a [6 charts, 4 radial shells, 2048, 2048, 4] texture (1.6 GB) and rasterises
24 times at 2048^2 per view. This module needs no texture and keeps the guarantees exact:

1. Cells without storage. W lives on unbounded integer lattices, one per chart: (chart, i, j, k) with
   (i, j) a texel of the chart and k a depth slab. A cell holds C values computed on demand by a
   counter-based hash (splitmix64 of the packed cell and the seed, then Box-Muller), so any cell is
   reproducible anywhere without being stored.
2. Charts. Six radial charts, the cube map of directions from the object's centre (gnomonic, so a
   triangle stays a triangle, 1 / distance-along-the-axis is affine over it, and each direction lies
   on exactly one face), with slabs k = floor(|p| / slab + jitter(chart, i, j)) in the radius, as the
   reference's direction x radial-shell charts: a surface moving along its normal on a roughly
   star-shaped object stays in its radial cells. Plus three parallel charts, the planes orthogonal to
   x, y and z with slabs in the coordinate along the axis, their texels as large in world units as the
   cube map's in gnomonic units (a fifth of the cells at radius 0.6): a surface element with normal n
   projects onto them with total area (|n_x| + |n_y| + |n_z|) A >= A, so no surface is degenerate for
   the whole set (the radial charts alone are, on surfaces that pass through the centre, where the
   reference falls back to background noise).
3. Footprints. As in the reference, the (h+1) x (w+1) latent-cell corners are masked averages of the
   true surface hits in a window around each corner, two triangles per latent pixel; a triangle is
   foreground if its three corners are opaque. A small rasteriser (below) covers each chart's texel
   centres with the triangles projected onto that chart, interpolating the depth.
4. Exact ownership. Along each texel column (chart, i, j) the nearest and the farthest crossing of
   this view's triangles own the cell in their own slab; the farthest only if its slab differs from
   the nearest's. So every cell belongs to at most one latent pixel of a view: disjoint sets of i.i.d.
   cells, hence independent pixels, each exactly N(0, 1) when its count is > 0. `Footprints.cells`
   exposes the owned cells so tests can check the disjointness directly. The slab is chosen per texel
   sample from its own depth, so no triangle "straddles" anything (the reference drops triangles that
   straddle its shells to background noise); the per-column jitter makes a surface moving in depth
   by d switch only a fraction d / slab of its cells instead of whole shells at once; slabs keep far
   apart surfaces on one column from sharing noise across views. No clipping: the lattices are unbounded.
5. Geometry in, noise out. Callers pass the true ray hits (origin + t_hit * direction), never a
   clip-space depth (the reference's mesh path mistakes that for the ray distance).
6. SDE re-injection, exact without a stored texture. Each cell evolves as
   W_k = A cos(Omega L_k) + B sin(Omega L_k), with A, B ~ N(0, I_C) and Omega ~ Cauchy(0, 1) per cell
   (all hashed) and L_k = sum over re-injections of -log(sqrt(1 - gamma)). For every k, W_k is exactly
   N(0, I_C) and i.i.d. over cells (a rotation of the Gaussian pair (A, B)), and the correlation
   between steps j < k is E[cos(Omega (L_k - L_j))] = exp(-(L_k - L_j)) = prod sqrt(1 - gamma): the
   first two moments of eps <- sqrt(1 - gamma) eps + sqrt(gamma) xi exactly, at O(1) cost per cell
   whatever the number of steps. A latent pixel sums a hundred cells or more, so its path over steps
   is Gaussian to the central limit. gamma = 1 starts a fresh, independent lattice.
7. Background pixels (no foreground triangle, or a footprint that owns no cell) take a fixed
   screen-space noise shared by all views and re-injected like the cells ("fixed"), or fresh noise
   at every call ("fresh").

Cost per view: the cells one view touches (at the default texel, 2 / (3 max(h, w)), about 50 per
latent pixel on a sphere of radius 0.6 seen from radius 2.4 with fovy 40; the count grows as
1 / radius^2 on the radial charts), a z-buffer pair per chart over the footprint's bounding box, and
the rasteriser's spans in chunks of `_CHUNK`; no state beyond the background noise. The texel is a
trade: at a texel 0.6 times as wide (about 150 cells per latent pixel)
the noise cost 1.5 to 1.7 times as much, and the correlation at corresponding surface points of two
views sat on the ideal footprint overlap just the same (`python -m server.bench noise`); at a texel
1.5 times as wide (about 22 cells) it cost 0.5 to 0.65 times as much and sat 0.008 below the ideal
at 30 degrees. All views of a query go through the footprints in one pass. On a CPU the time is a
few dozen elementwise passes over the bounding boxes' rows, the covered texels and the owned cells
(as many of each, give or take, at these texel sizes): what a triangle's rows share is worked out per
triangle, and the hashes run in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.noise.base import NoiseProvider, NoiseQuery, mix_in_fresh

_U64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """The int64 with the same bit pattern as the uint64 `value`."""
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = 0x9E3779B97F4A7C15
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_JITTER_SALT = _int64(0xC2B2AE3D27D4EB4F)


def splitmix64(x: int) -> int:
    """splitmix64's finaliser on a Python int: the reference for `hash64` (salts, tests)."""
    x &= _U64
    x = ((x ^ (x >> 30)) * _MUL1) & _U64
    x = ((x ^ (x >> 27)) * _MUL2) & _U64
    return x ^ (x >> 31)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of uint64 bit patterns held in int64 (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, a bijection of 64-bit patterns, on int64 tensors (products wrap mod 2^64).

    In place on two temporaries: on a CPU, fresh large tensors cost page faults that the arithmetic
    does not (half the hash's time)."""
    h = _shift_right(x, 30)
    h ^= x
    h *= _int64(_MUL1)
    t = _shift_right(h, 27)
    h ^= t
    h *= _int64(_MUL2)
    t = torch.bitwise_right_shift(h, 31, out=t)
    t &= (1 << 33) - 1
    h ^= t
    return h


def _uniform_pair(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent uniforms in (0, 1) from the top and bottom 24 bits of a 64-bit hash."""
    high, low = _shift_right(h, 40).to(torch.float32), ((h >> 8) & 0xFFFFFF).to(torch.float32)
    high += 0.5
    low += 0.5
    return high.mul_(2.0**-24), low.mul_(2.0**-24)


# Packed cell: chart (4 bits) | slab + 2^13 (14 bits) | i + 2^21 (22 bits) | j + 2^21 (22 bits) = 62 bits.
_SLAB_HALF, _TEXEL_HALF = 1 << 13, 1 << 21


def pack_cells(
    chart: torch.Tensor | int, i: torch.Tensor, j: torch.Tensor, slab: torch.Tensor
) -> torch.Tensor:
    """One int64 per lattice cell (distinct cells give distinct integers while |i|, |j| < 2^21 and
    |slab| < 2^13: `surface_footprints` keeps its points within `lattice_limit`)."""
    return chart | ((slab + _SLAB_HALF) << 4) | ((i + _TEXEL_HALF) << 18) | ((j + _TEXEL_HALF) << 40)


class HashedWhiteNoise:
    """C i.i.d. N(0, 1) values per lattice cell, computed on demand; re-injection is a time change.

    See the module docstring (6.) for why `reinject` keeps every step exactly N(0, 1) with the
    autocorrelation prod sqrt(1 - gamma) of the clean-flow SDE.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0  # advanced by gamma = 1: a fresh, independent lattice
        self.time = 0.0  # L = sum of -log(sqrt(1 - gamma)) since the epoch began

    def reinject(self, gamma: float) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
        if gamma == 1.0:
            self.epoch, self.time = self.epoch + 1, 0.0
        else:
            self.time += -0.5 * math.log1p(-gamma)

    def values(self, cells: torch.Tensor, channels: int) -> torch.Tensor:
        """[N, channels] float32 noise of the packed cells [N].

        Channel c's (A_c, B_c) is one Box-Muller pair (r_c cos theta_c, r_c sin theta_c), so
        A_c cos(phase) + B_c sin(phase) is r_c cos(theta_c - phase): one cosine a channel, and one
        hash a channel plus one for the Cauchy frequency. Every stream hashes the
        cell's hash again: with the cell's hash itself as channel 0's (as before), the summed noise of
        the views of `test_the_iid_test_rejects_averaged_and_bilinearly_resampled_noise` gave KS p <=
        0.013 on 3 of 12 seed sets; hashed again, 0.074 at the least.
        """
        salt = _int64(splitmix64(splitmix64(self.seed) ^ self.epoch))
        state = hash64(cells ^ salt)
        noise = torch.empty(channels, len(cells), dtype=torch.float32, device=cells.device)
        if self.time != 0.0:  # the Cauchy(0, 1) frequency times L, from a stream after the channels'
            phase = torch.tan(math.pi * (_uniform_pair(hash64(state + _int64(_GOLDEN * channels)))[0] - 0.5))
            phase *= self.time
        for c in range(channels):  # a stream at a time: the temporaries stay the size of `cells`
            u1, u2 = _uniform_pair(hash64(state + _int64(_GOLDEN * c)))
            angle = u2.mul_(2.0 * math.pi)
            if self.time != 0.0:
                angle -= phase
            noise[c] = angle.cos_().mul_(u1.log_().mul_(-2.0).sqrt_())
        return noise.t()


def latent_corner_mesh(
    points: torch.Tensor, opacity: torch.Tensor, latent_hw: tuple[int, int], threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The latent-cell corner meshes of a batch of views, points [B, H, W, 3], opacity [B, H, W, 1]:
    corners [B (h+1)(w+1), 3], faces [B 2hw, 3] (indices into all corners), face_ok [B 2hw].

    Corner (r, c) sits at render pixel boundary (r s_y, c s_x); its position is the mean of the opaque
    surface hits in a window of s rounded up to even around it, its opacity the window's mean opacity.
    Faces 2p and 2p + 1 are latent pixel p's two triangles (p row-major over views, then rows); a face
    is foreground when its three corners' opacity exceeds `threshold`.
    """
    views, height, width = points.shape[:3]
    h, w = latent_hw
    if height % h or width % w:
        raise ValueError(
            f"render size {height}x{width} must be an integer multiple of the latent grid {h}x{w}"
        )
    sy, sx = height // h, width // w
    ky, kx = sy + sy % 2, sx + sx % 2
    mask = (opacity > threshold).to(points.dtype)
    stacked = torch.cat([points * mask, mask, opacity], dim=-1).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(
        stacked, (ky, kx), stride=(sy, sx), padding=(ky // 2, kx // 2), count_include_pad=False
    )
    corners = (pooled[:, :3] / pooled[:, 3:4].clamp_min(1e-12)).permute(0, 2, 3, 1).reshape(-1, 3)
    corner_opaque = (pooled[:, 4] > threshold).reshape(-1)
    index = torch.arange(views * (h + 1) * (w + 1), device=points.device).reshape(views, h + 1, w + 1)
    a, b, c, d = index[:, :-1, :-1], index[:, :-1, 1:], index[:, 1:, :-1], index[:, 1:, 1:]
    faces = torch.stack([torch.stack([a, b, d], -1), torch.stack([a, d, c], -1)], dim=3).reshape(-1, 3)
    return corners, faces, corner_opaque[faces].all(dim=-1)


# The charts, each its own lattice (the cell key's first field): a surface point p lands in
#   radial charts 0-5, the cube map of directions: face (axis e, sign), u, v = p_a / t, p_b / t with
#     t = sign * p_e > 0 (a gnomonic projection from the origin, so triangles stay triangles and 1 / t
#     is affine over them), slab coordinate = the radius |p|;
#   parallel charts 6-8, the planes orthogonal to x, y, z: u, v = p_a, p_b, slab coordinate = p_e.
_CUBE = tuple((axis, sign) for axis in range(3) for sign in (1.0, -1.0))
_PLANE_AXES = ((1, 2), (2, 0), (0, 1))  # the (u, v) world axes of the chart along x, y, z
_CHARTS = len(_CUBE) + len(_PLANE_AXES)
_PLANE_TEXELS = 1.0  # a parallel chart's texel (world units) over the cube map's (gnomonic units)
# A triangle enters a cube face only if all its corners lie within 60 deg of its axis: every direction
# is within 54.7 deg of one axis, so each still has a face, and the oblique entries, whose gnomonic
# images are long slivers with wide bounding boxes, go (72.5 deg: CFD's steps 2.5 % dearer, same figures).
_MIN_COSINE = 0.5
_CHUNK = 1 << 17  # rasteriser texels per batch: bounds its memory at a few MB
_INT64_MAX, _INT64_MIN = (1 << 63) - 1, -(1 << 63)


def _sortable(depth: torch.Tensor) -> torch.Tensor:
    """int64 with the same order as the float32 depths (their bits, negatives' magnitude bits flipped)."""
    bits = depth.to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


def _unsortable(key: torch.Tensor) -> torch.Tensor:
    bits = key.to(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).view(torch.float32)


def chart_corners(corners: torch.Tensor, texels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners [V, 3] on every chart: [charts, V, 3] (u, v in texel units, depth q; smaller q is nearer)
    and [charts, V] whether a corner may enter the chart. Texel (i, j) has its centre at integer (i, j);
    a cube face has `texels` texels across [-1, 1] and q = -1 / t, a parallel chart q = p_e."""
    xyz = corners.t()
    face_axis = [axis for axis, _ in _CUBE]
    signs = torch.tensor([sign for _, sign in _CUBE], dtype=corners.dtype, device=corners.device)
    t = signs[:, None] * xyz[face_axis]  # [6, V]
    inside = t > _MIN_COSINE * corners.norm(dim=1)
    t = torch.where(inside, t, 1.0)
    u_axis, v_axis = ([_PLANE_AXES[axis][k] for axis in face_axis] for k in (0, 1))
    cube = torch.stack(
        [(xyz[u_axis] / t + 1.0) * texels / 2 - 0.5, (xyz[v_axis] / t + 1.0) * texels / 2 - 0.5, -1.0 / t], -1
    )
    size = _PLANE_TEXELS * 2.0 / texels
    u_axis, v_axis = ([axes[k] for axes in _PLANE_AXES] for k in (0, 1))
    plane = torch.stack([xyz[u_axis] / size - 0.5, xyz[v_axis] / size - 0.5, xyz], -1)  # [3, V, 3]
    allowed = torch.cat([inside, torch.ones_like(inside[: len(_PLANE_AXES)])])
    return torch.cat([cube, plane]), allowed


def rasterize_owners(
    tri: torch.Tensor, chart: torch.Tensor, texels: int, views: int = 1
) -> tuple[torch.Tensor, ...]:
    """For every texel of every chart covered by the triangles, its nearest and farthest triangle.

    tri [T, 3, 3]: per triangle corner (u, v, q) as `chart_corners` gives; chart [T]: each triangle's
    view and chart, view * (the number of charts) + chart, so each view has z-buffers of its own and
    one call serves a batch of views. Cube faces keep texels 0 <= i, j < `texels`. Written by hand
    because this is a z-buffer with integer (depth, triangle) keys over texel centres, not an image
    render: nvdiffrast needs CUDA and the project's differentiable rasterizer renders images.
    Vectorised scanlines over all charts at once (each chart's z-buffer is a region of one flat
    buffer): the barycentric weights are affine in the texel offset, so each (triangle, row of its
    bounding box) gets its span of inside columns in closed form, and each covered (triangle, texel)
    costs a few gathers and one multiply-add for its depth. What a triangle's rows share (its weights,
    their slopes, its z-buffer row start) is worked out once per triangle and gathered per row in one
    go. Returns i, j, near_triangle, near_q, far_triangle, far_q per covered texel; the texel's chart
    is its triangles'.
    """
    device, chart_of_triangle = tri.device, chart
    lo, hi = torch.aminmax(tri[:, :, :2], dim=1)
    lo, hi = lo.ceil(), hi.floor()
    cube = (chart % _CHARTS < len(_CUBE))[:, None]
    lo, hi = torch.where(cube, lo.clamp_min(0.0), lo), torch.where(cube, hi.clamp_max(texels - 1.0), hi)
    p = tri[:, :, :2] - lo[:, None]  # corners relative to the box's first texel
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    area2 = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    kept = torch.nonzero((area2.abs() > 1e-10) & (hi >= lo).all(dim=1)).squeeze(1)
    p, depth, area2, chart = p[kept], tri[kept, :, 2], area2[kept], chart[kept]
    lo, hi = lo[kept].long(), hi[kept].long()
    # each chart's z-buffer: the bounding box of its triangles, laid out one chart after the other
    origin = torch.full((views * _CHARTS, 2), _INT64_MAX, dtype=torch.int64, device=device)
    origin = origin.scatter_reduce(0, chart[:, None].expand(-1, 2), lo, "amin")
    end = torch.full((views * _CHARTS, 2), _INT64_MIN, dtype=torch.int64, device=device)
    end = end.scatter_reduce(0, chart[:, None].expand(-1, 2), hi, "amax")
    grid = (end - origin + 1).clamp_min(0)
    offset = torch.cumsum(grid[:, 0] * grid[:, 1], 0) - grid[:, 0] * grid[:, 1]
    # weight of corner k at offset (di, dj) from lo: cross(p[k+1] - q, p[k+2] - q) / area2, affine in (di, dj)
    x, y = p.unbind(-1)
    xa, ya, xb, yb = x.roll(-1, 1), y.roll(-1, 1), x.roll(-2, 1), y.roll(-2, 1)
    w = (xa * yb - ya * xb) / area2[:, None]  # [T, 3]
    w_di = (ya - yb) / area2[:, None]
    w_dj = (xb - xa) / area2[:, None]
    depth_slope = (w_dj * depth).sum(dim=1, keepdim=True)
    per_tri = torch.cat([w, w_di, w_dj, depth, depth_slope, (hi[:, 1:] - lo[:, 1:]).to(w.dtype)], dim=1)
    # the z-buffer index of the triangle's box's first texel, and its row stride
    corner = offset[chart] + (lo[:, 0] - origin[chart, 0]) * grid[chart, 1] + lo[:, 1] - origin[chart, 1]
    per_tri_int = torch.stack([corner, grid[chart, 1]], dim=1)
    # scanlines: one per (triangle, bounding-box row), with the span of columns inside all three edges
    rows = hi[:, 0] - lo[:, 0] + 1
    row_tri = torch.repeat_interleave(torch.arange(len(rows), device=device), rows)
    di = torch.arange(len(row_tri), device=device) - (torch.cumsum(rows, 0) - rows).index_select(0, row_tri)
    row = per_tri.index_select(0, row_tri)
    weight_at_0 = row[:, 0:3] + row[:, 3:6] * di[:, None].to(w.dtype)  # [R, 3] at dj = 0
    slope = row[:, 6:9]
    bound = (-1e-6 - weight_at_0) / torch.where(slope == 0, 1.0, slope)
    last_column = row[:, 13]
    lower = torch.where(slope > 0, bound, -math.inf).amax(dim=1)
    upper = torch.where(slope < 0, bound, math.inf).amin(dim=1)
    first = torch.minimum(lower.clamp_min(0.0), last_column + 1).ceil()
    last = torch.minimum(upper, last_column).clamp_min(-1.0).floor()
    blocked = ((slope == 0) & (weight_at_0 < -1e-6)).any(dim=1)
    count = torch.where(blocked, 0, (last - first + 1).clamp_min(0)).long()
    depth_slope = row[:, 12].contiguous()
    depth0 = (weight_at_0 * row[:, 9:12]).sum(dim=1) + depth_slope * first
    row_int = per_tri_int.index_select(0, row_tri)
    flat0 = row_int[:, 0] + di * row_int[:, 1] + first.long()
    del row, row_int, weight_at_0, slope, bound  # the rows' tables go before the z-buffers come
    row_tri = kept.index_select(0, row_tri)  # rows that cover nothing get no samples below
    near = torch.full(
        (int(offset[-1] + grid[-1, 0] * grid[-1, 1]),), _INT64_MAX, dtype=torch.int64, device=device
    )
    far = torch.full_like(near, _INT64_MIN)
    stop_at = torch.cumsum(count, 0)
    begin = stop_at - count
    flat_shift = flat0 - begin  # a sample's z-buffer index is this plus its index among all samples
    first_row = 0
    while first_row < len(count):
        base = int(begin[first_row])
        stop = max(int(torch.searchsorted(stop_at, base + _CHUNK, right=True)), first_row + 1)
        row = torch.repeat_interleave(torch.arange(first_row, stop, device=device), count[first_row:stop])
        sample = torch.arange(base, base + len(row), device=device)
        local = (sample - begin.index_select(0, row)).to(depth0.dtype)
        q = local.mul_(depth_slope.index_select(0, row)).add_(depth0.index_select(0, row))
        key = _sortable(q).mul_(1 << 32).add_(row_tri.index_select(0, row))
        flat = sample.add_(flat_shift.index_select(0, row))
        near.scatter_reduce_(0, flat, key, "amin")
        far.scatter_reduce_(0, flat, key, "amax")
        first_row = stop
    covered = torch.nonzero(near != _INT64_MAX).squeeze(1)
    near, far = near[covered], far[covered]
    near_tri, far_tri = near & 0xFFFFFFFF, far & 0xFFFFFFFF
    # the texel's chart is its nearest triangle's: its z-buffer's origin, start and row length
    layout = torch.cat([origin, offset[:, None], grid[:, 1:]], dim=1)
    layout = layout.index_select(0, chart_of_triangle.index_select(0, near_tri))
    local = covered - layout[:, 2]
    i = local.div(layout[:, 3], rounding_mode="floor")
    j = local - i * layout[:, 3] + layout[:, 1]
    return i + layout[:, 0], j, near_tri, _unsortable(near >> 32), far_tri, _unsortable(far >> 32)


def _slab_scale(chart: torch.Tensor, i: torch.Tensor, j: torch.Tensor, texels: int) -> torch.Tensor:
    """What turns a texel's depth q into what the slabs cut: on a cube face the radius |p| is
    t |(u, v, 1)| with q = -1 / t, so -|(u, v, 1)| / q; a parallel chart cuts q itself (0 here)."""
    u, v = ((k + 0.5) * 2.0 / texels - 1.0 for k in (i, j))
    return torch.where(chart < len(_CUBE), -torch.sqrt(1.0 + u * u + v * v), 0.0)


def _slab_coordinate(scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(scale < 0, scale / q, q)


@dataclass
class Footprints:
    """The lattice cells the latent pixels of a batch of views own: cell `cells[n]` belongs to latent
    pixel `owner[n]` over all views (view-major), that is pixel `pixel[n]` of view `view[n]`."""

    owner: torch.Tensor  # [N] int64, view * h * w + the row-major pixel of the view's h x w grid
    cells: torch.Tensor  # [N] int64, packed (chart, i, j, slab); all distinct within a view
    foreground: torch.Tensor  # [B, h, w] bool: the pixel has at least one foreground triangle

    @property
    def view(self) -> torch.Tensor:
        return self.owner // self.foreground[0].numel()

    @property
    def pixel(self) -> torch.Tensor:
        return self.owner % self.foreground[0].numel()


def lattice_limit(texels: int, slab: float) -> float:
    """The coordinate bound that keeps every surface point's cells distinct (`pack_cells`' ranges with a
    tenth to spare), from these host numbers, so the noise never reads the device's points back to
    check them. A job's shapes lie within a unit-radius grid, far inside it."""
    # A cube face's u, v stay within (1 / _MIN_COSINE + 1) * texels / 2 of the origin whatever |p| is.
    if (1.0 / _MIN_COSINE + 1.0) * texels / 2 + 1 >= _TEXEL_HALF:
        raise ValueError(f"{texels} texels across a cube face is too fine for the noise lattice")
    return 0.9 * min(_TEXEL_HALF * _PLANE_TEXELS / texels, _SLAB_HALF * slab) / math.sqrt(3.0) - 2.0 * slab


def surface_footprints(
    points: torch.Tensor,
    opacity: torch.Tensor,
    latent_hw: tuple[int, int],
    texel_size: float,
    slab: float,
    opacity_threshold: float = 0.1,
) -> Footprints:
    """The cells each latent pixel of each view integrates: points [B, H, W, 3] true hits, opacity
    [B, H, W, 1]. The views share the lattice (that is the consistency) but not their ownership, and
    one pass over the batch costs little more than one view.

    `texel_size` is the cube map's texel in gnomonic units (radians near a face's centre); the parallel
    charts use texels of `_PLANE_TEXELS` times that in world units.
    """
    views, pixels = points.shape[0], latent_hw[0] * latent_hw[1]
    corners, faces, face_ok = latent_corner_mesh(points, opacity, latent_hw, opacity_threshold)
    texels = max(1, round(2.0 / texel_size))
    limit = lattice_limit(texels, slab)
    corners = corners.clamp(-limit, limit)  # a far point shares the lattice's edge cells, never wraps
    uvq, allowed = chart_corners(corners, texels)
    kept = torch.nonzero(face_ok).squeeze(1)  # one wait for the size, shared by both selections
    faces = faces[kept]
    owner = kept // 2  # the latent pixel (over all views) of each face
    chart, face = torch.nonzero(allowed[:, faces].all(dim=-1), as_tuple=True)
    corner_index = (chart[:, None] * len(corners) + faces.index_select(0, face)).reshape(-1)
    tri = uvq.reshape(-1, 3).index_select(0, corner_index).reshape(-1, 3, 3)  # [T, 3, 3]
    owner = owner.index_select(0, face)  # now per triangle
    i, j, near, near_q, far, far_q = rasterize_owners(tri, owner // pixels * _CHARTS + chart, texels, views)
    chart = chart.index_select(0, near)  # a texel's chart is its triangles'
    # the packed cell without its slab field, then the column's jitter and each crossing's slab
    column = chart | ((i + _TEXEL_HALF) << 18) | ((j + _TEXEL_HALF) << 40)
    jitter = _uniform_pair(hash64((column | (_SLAB_HALF << 4)) ^ _JITTER_SALT))[0]
    scale = _slab_scale(chart, i, j, texels)
    near_slab = torch.floor(_slab_coordinate(scale, near_q) / slab + jitter).long()
    far_slab = torch.floor(_slab_coordinate(scale, far_q) / slab + jitter).long()
    extra = torch.nonzero((far != near) & (far_slab != near_slab)).squeeze(1)
    owned = owner.index_select(0, torch.cat([near, far.index_select(0, extra)]))
    slabs = torch.cat([near_slab, far_slab.index_select(0, extra)])
    cells = torch.cat([column, column.index_select(0, extra)]) | ((slabs + _SLAB_HALF) << 4)
    foreground = face_ok.reshape(views, *latent_hw, 2).any(dim=-1)
    return Footprints(owned, cells, foreground)


class ConsistentNoise(NoiseProvider):
    """CFD's noise provider: surface-attached integral noise from hashed lattice cells (module docstring).

    `background`: "fixed" (one screen-space noise per latent grid shared by all views and re-injected
    like the cells, as the reference's shaded stages) or "fresh" (new noise at every call).
    `texel_size` (the cube map's, see `surface_footprints`) defaults to 2 / (3 max(h, w)); `slab` is the
    slab thickness in world units.
    """

    def __init__(
        self,
        seed: int,
        device: torch.device | str,
        *,
        background: str = "fixed",
        texel_size: float | None = None,
        slab: float = 0.25,
        opacity_threshold: float = 0.1,
    ):
        super().__init__(seed, device)
        if background not in ("fixed", "fresh"):
            raise ValueError(f"background must be 'fixed' or 'fresh', got {background!r}")
        self.background_mode = background
        self.texel_size = texel_size
        self.slab = slab
        self.opacity_threshold = opacity_threshold
        self.texture = HashedWhiteNoise(seed)
        self.background: dict[tuple[int, int, int], torch.Tensor] = {}

    def texel_size_for(self, latent_hw: tuple[int, int]) -> float:
        return self.texel_size if self.texel_size is not None else 2.0 / (3 * max(latent_hw))

    def footprints(
        self, points: torch.Tensor, opacity: torch.Tensor, latent_hw: tuple[int, int]
    ) -> Footprints:
        """The cells each latent pixel of each view owns (points [B, H, W, 3], opacity [B, H, W, 1])."""
        return surface_footprints(
            points.to(self.device, torch.float32),
            opacity.to(self.device, torch.float32),
            latent_hw,
            self.texel_size_for(latent_hw),
            self.slab,
            self.opacity_threshold,
        )

    def integrate(self, query: NoiseQuery) -> tuple[torch.Tensor, torch.Tensor]:
        """Per view and latent pixel, the sum of its cells' noise [B, C, h, w] and their count [B, h, w]."""
        if query.points is None or query.opacity is None:
            raise ValueError("consistent noise needs the render's surface points and opacity")
        h, w = query.latent_hw
        views, channels = query.points.shape[0], query.channels
        foot = self.footprints(query.points, query.opacity, query.latent_hw)
        pixels = views * h * w
        # float64 sums (the same float32 noise whatever order a device adds in), over [C, N] rows; no
        # bincount: on a GPU it reads its input's range back to size its result
        values = self.texture.values(foot.cells, channels).t().to(torch.float64)  # [C, N], contiguous
        sums = torch.zeros(channels, pixels, dtype=torch.float64, device=self.device)
        sums = sums.index_add_(1, foot.owner, values).to(torch.float32)
        counts = torch.zeros(pixels, dtype=torch.int64, device=self.device)
        counts.index_add_(0, foot.owner, torch.ones_like(foot.owner))
        return sums.reshape(channels, views, h, w).transpose(0, 1), counts.reshape(views, h, w)

    def sample(self, query: NoiseQuery) -> torch.Tensor:
        return self.sample_with_counts(query)[0]

    def sample_with_counts(self, query: NoiseQuery) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise [B, C, h, w] and each latent pixel's cell count [B, h, w] (0: background noise)."""
        sums, counts = self.integrate(query)
        covered = (counts > 0)[:, None]
        noise = sums / counts.clamp_min(1).to(torch.float32).sqrt()[:, None]
        return torch.where(covered, noise, self._background(query)), counts

    def reinject(self, gamma: float) -> None:
        self.texture.reinject(gamma)
        if gamma == 0.0:
            return
        for key, eps in self.background.items():
            self.background[key] = mix_in_fresh(eps, gamma, self._randn(tuple(eps.shape)))

    def _background(self, query: NoiseQuery) -> torch.Tensor:
        shape = (query.channels, *query.latent_hw)
        if self.background_mode == "fresh":
            return self._randn((query.batch_size, *shape))
        if shape not in self.background:
            self.background[shape] = self._randn(shape)
        return self.background[shape].expand(query.batch_size, *shape)
