"""Differentiable triangle rasterization with nvdiffrast's semantics, written in plain PyTorch.

Why this is hand-written: nvdiffrast, the reference, runs only on CUDA and is not on PyPI, and no
installable package offers a differentiable rasterizer for CPU torch (pytorch3d and kaolin ship no
CPU wheels, mitsuba is a path tracer with its own autodiff). The three ops below reproduce
nvdiffrast's `rasterize`, `interpolate` and `antialias` with vectorised torch code that runs on CPU
and CUDA alike. When `nvdiffrast.torch` is importable and the tensors live on CUDA, `backend="auto"`
hands the work to it instead; the torch code is the reference the tests check.

Conventions (nvdiffrast's):
- `pos` is in OpenGL clip space, [B, N, 4] (one vertex buffer per image, "instanced mode").
- `rast[b, y, x] = (u, v, z/w, triangle_id + 1)`, all zeros where no triangle covers the pixel.
  Row 0 is the bottom of the image (clip y = -1); pixel (x, y) is sampled at its centre, at
  normalised device coordinates ((2x + 1) / W - 1, (2y + 1) / H - 1).
- (u, v) are perspective-correct barycentrics: vertex 0 has (1, 0), vertex 1 (0, 1), vertex 2 (0, 0).
  They are differentiable w.r.t. `pos`; z/w carries no gradient. Coverage is point-sampled, so it
  has no gradient: silhouette gradients come only from `antialias`.

Triangles are rasterized in 2-D homogeneous coordinates, so one crossing the camera plane (some
vertices at w <= 0) is drawn exactly where it lies in front of the near plane, as nvdiffrast's
clipping does. Known differences from nvdiffrast: no `rast_db` output and no texture ops (the mesh
pipeline samples a texture field at interpolated world points instead); a pixel centre exactly on
an edge belongs to every triangle sharing that edge (no top-left fill rule) and the depth test then
keeps the lowest triangle id, like a GL_LESS test in draw order; no sub-pixel vertex snapping; an
edge shared by more than two triangles counts as a silhouette edge in `antialias`.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

Backend = Literal["auto", "torch", "nvdiffrast"]

# Bounding-box pixels of the triangles the torch rasterizer handles at once (an upper bound on the
# candidates it tests, ~150 bytes of temporaries each): bounds peak memory at a few hundred MB.
CHUNK_CANDIDATES = 1 << 21

# Slack (in pixels) added to bounding boxes and row spans so that rounding cannot drop a pixel whose
# centre the exact inside test accepts.
_SLACK = 1e-3

# antialias: crossings may lie this far (in pixels) outside the segment between the two pixel
# centres and still count, as in nvdiffrast.
_CROSSING_SLACK = 1.0 / 16.0


def rasterize(
    pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int], backend: Backend = "auto"
) -> torch.Tensor:
    """Rasterize triangles `tri` [F, 3] of clip-space vertices `pos` [B, N, 4] to rast [B, H, W, 4]."""
    if pos.dim() != 3 or pos.shape[-1] != 4:
        raise ValueError(f"pos must be [B, N, 4] clip-space positions, got {tuple(pos.shape)}")
    height, width = int(resolution[0]), int(resolution[1])
    if _use_nvdiffrast(backend, pos):
        dr = _nvdiffrast()
        context = _cuda_context(pos.device)
        rast, _ = dr.rasterize(context, pos.float().contiguous(), tri.int().contiguous(), (height, width))
        return rast
    return _rasterize_torch(pos, tri.long(), height, width)


def interpolate(
    attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """Per-pixel perspective-correct interpolation of vertex attributes -> [B, H, W, C].

    `attr` is [N, C], [1, N, C] (shared by all images) or [B, N, C]. Empty pixels get zeros.
    Differentiable w.r.t. `attr` and, through (u, v) in `rast`, w.r.t. the clip positions.
    Unlike nvdiffrast, returns only the interpolated image (no screen-space derivatives).
    """
    if attr.dim() == 2:
        attr = attr.unsqueeze(0)
    if _use_nvdiffrast(backend, attr, rast):
        out, _ = _nvdiffrast().interpolate(attr.float().contiguous(), rast, tri.int().contiguous())
        return out
    batch, height, width, _ = rast.shape
    flat = rast.reshape(-1, 4)
    pix = torch.nonzero(flat[:, 3] > 0).squeeze(1)
    face = flat[pix, 3].long() - 1
    image = pix // (height * width) if attr.shape[0] > 1 else torch.zeros_like(pix)
    corners = attr[image[:, None], tri.long()[face]]  # [P, 3, C]
    u, v = flat[pix, 0:1], flat[pix, 1:2]
    values = u * corners[:, 0] + v * corners[:, 1] + (1.0 - u - v) * corners[:, 2]
    out = values.new_zeros(batch * height * width, attr.shape[-1]).index_put((pix,), values)
    return out.view(batch, height, width, -1)


def antialias(
    color: torch.Tensor,
    rast: torch.Tensor,
    pos: torch.Tensor,
    tri: torch.Tensor,
    topology: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Analytic antialiasing of silhouette edges, as nvdiffrast does; the source of silhouette gradients.

    For each horizontally or vertically adjacent pixel pair with different triangle ids, take the
    triangle of the nearer pixel (background is farthest), find where the segment between the two
    pixel centres leaves it, and if that edge is a silhouette (no neighbour triangle across it, or the
    neighbour folds back on screen) and is closer to perpendicular to the segment than parallel,
    blend: with the crossing at distance d in [0, 1] from the near pixel's centre, the near pixel
    moves towards the far pixel's colour by 0.5 - d if d < 0.5, otherwise the far pixel moves towards
    the near one's colour by d - 0.5 (the 1-D box-filter coverage). Blends use the input colours and
    add up. The gradient reaches `color` and, through d, the two vertices of the edge.

    `topology` = `opposite_vertices(tri)` may be passed to reuse it across calls (torch backend).
    """
    if _use_nvdiffrast(backend, color, rast, pos):
        dr = _nvdiffrast()
        return dr.antialias(
            color.float().contiguous(), rast, pos.float().contiguous(), tri.int().contiguous()
        )
    if topology is None:
        topology = opposite_vertices(tri, pos.shape[-2])
    return _antialias_torch(color, rast, pos, tri.long(), topology)


def opposite_vertices(tri: torch.Tensor, num_vertices: int | None = None) -> torch.Tensor:
    """For edge i of each triangle (the edge opposite its vertex i), the vertex of the other triangle
    across that edge: [F, 3] int64, -1 where the edge is a boundary or is shared by more than two
    triangles. Shared vertices must share indices (weld the mesh first). `num_vertices`, when known,
    spares reading the largest index back from the device."""
    tri = tri.long()
    num_faces = tri.shape[0]
    if num_faces == 0:
        return tri.new_empty(0, 3)
    start_v, end_v = tri.roll(-1, dims=1), tri.roll(-2, dims=1)
    lo, hi = torch.minimum(start_v, end_v), torch.maximum(start_v, end_v)
    key = (lo * (int(tri.max()) + 1 if num_vertices is None else num_vertices) + hi).reshape(-1)
    order = torch.argsort(key, stable=True)
    _, group, counts = torch.unique_consecutive(key[order], return_inverse=True, return_counts=True)
    group_start = (torch.cumsum(counts, 0) - counts)[group]
    sorted_position = torch.arange(3 * num_faces, device=tri.device)
    partner = order[(2 * group_start + 1 - sorted_position).clamp(0, 3 * num_faces - 1)]
    opposite_sorted = torch.where(counts[group] == 2, tri.reshape(-1)[partner], -1)
    return torch.empty_like(opposite_sorted).index_put((order,), opposite_sorted).view(num_faces, 3)


# --------------------------------------------------------------------------------------------------
# torch backend


def _rasterize_torch(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int) -> torch.Tensor:
    batch = pos.shape[0]
    with torch.no_grad():
        depth, face = _depth_test(pos.detach(), tri, height, width)
    pix = torch.nonzero(face >= 0).squeeze(1)
    face = face[pix]
    image = pix // (height * width)
    y, x = (pix // width) % height, pix % width
    u, v = _barycentrics(pos, tri, image, face, x, y, height, width)
    values = torch.stack([u, v, depth[pix], (face + 1).to(pos.dtype)], dim=1)
    rast = pos.new_zeros(batch * height * width, 4).index_put((pix,), values)
    return rast.view(batch, height, width, 4)


def _pixel_ndc(index: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    return (2 * index + 1 - size).to(dtype) / size


def _barycentrics(
    pos: torch.Tensor,
    tri: torch.Tensor,
    image: torch.Tensor,
    face: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perspective-correct barycentrics of pixel centres, straight from homogeneous coordinates.

    A point with barycentrics b on the clip-space triangle projects to the pixel's NDC (a, c) when
    sum_i b_i (x_i - a w_i) = 0 and sum_i b_i (y_i - c w_i) = 0, so b is the normalised cross product
    of those two 3-vectors. No division by w, hence well-conditioned and differentiable w.r.t. pos.
    """
    corners = pos[image[:, None], tri[face]]  # [P, 3, 4]
    a = _pixel_ndc(x, width, pos.dtype)[:, None]
    c = _pixel_ndc(y, height, pos.dtype)[:, None]
    weights = torch.linalg.cross(
        corners[..., 0] - a * corners[..., 3], corners[..., 1] - c * corners[..., 3], dim=1
    )
    total = weights.sum(1)
    return weights[:, 0] / total, weights[:, 1] / total


def _triangle_setup(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int):
    """Per (image, triangle): linear forms in pixel NDC (a, c) and integer pixel bounding boxes.

    The unnormalised barycentric weights of `_barycentrics` are exactly linear in (a, c):
    e_i = alpha_i + beta_i a + gamma_i c, and z/w = sum_i e_i z_i / det(x, y, w). Signs are flipped so
    that a pixel centre is inside iff all three e_i >= 0: that also puts the surface point in front of
    the camera (w > 0), so triangles crossing the camera plane need no clipping (2-D homogeneous
    rasterization), and the near and far planes are the per-pixel test -1 <= z/w <= 1. Each e_i
    depends only on the edge opposite vertex i and flips sign exactly when that edge is listed in
    reverse, so two triangles sharing an edge never both miss a pixel centre (no cracks).
    """
    corners = pos[:, tri]  # [B, F, 3, 4]
    x, y, z, w = corners.unbind(-1)
    xj, yj, wj = x.roll(-1, -1), y.roll(-1, -1), w.roll(-1, -1)
    xk, yk, wk = x.roll(-2, -1), y.roll(-2, -1), w.roll(-2, -1)
    alpha, beta, gamma = xj * yk - xk * yj, wk * yj - wj * yk, xk * wj - xj * wk
    det = (alpha * w).sum(-1)
    valid = (w > 0).any(-1) & (det != 0)
    sign = torch.where(det < 0, -1.0, 1.0).to(pos.dtype)[..., None]
    alpha, beta, gamma = alpha * sign, beta * sign, gamma * sign
    inv_det = 1.0 / torch.where(valid, det.abs(), 1.0)
    # [B, F, 12]: blocks (constant, a, c), each holding the coefficients of (e_0, e_1, e_2, z/w)
    forms = torch.cat(
        [
            torch.cat([e, (e * z).sum(-1, keepdim=True) * inv_det[..., None]], -1)
            for e in (alpha, beta, gamma)
        ],
        -1,
    )

    # Projected vertices bound the triangle only when all are in front; otherwise search the whole image.
    in_front = (w > 0).all(-1)
    safe_w = torch.where(in_front[..., None], w, 1.0)
    boxes = []
    for coord, size in ((x, width), (y, height)):
        screen = ((coord / safe_w + 1.0) * (size / 2)).clamp(-2.0, size + 2.0)
        lo = torch.where(in_front, torch.ceil(screen.amin(-1) - 0.5 - _SLACK).long(), 0).clamp(min=0)
        hi = torch.where(in_front, torch.floor(screen.amax(-1) - 0.5 + _SLACK).long(), size - 1).clamp(
            max=size - 1
        )
        boxes += [lo, torch.where(valid, hi - lo + 1, 0).clamp(min=0)]
    return (forms, *boxes)


def _depth_test(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int):
    """Nearest covering triangle per pixel: enumerate candidate pixels, test them, scatter-min z-buffer.

    Returns (z/w [B*H*W], triangle index [B*H*W], -1 where empty). Chunked over triangles so that no
    more than about CHUNK_CANDIDATES bounding-box pixels are handled at once.
    """
    batch, num_faces = pos.shape[0], tri.shape[0]
    num_pixels = batch * height * width
    zbuf = torch.full((num_pixels,), torch.inf, dtype=pos.dtype, device=pos.device)
    fbuf = torch.full((num_pixels,), num_faces, dtype=torch.long, device=pos.device)
    forms, x0, box_w, y0, box_h = (t.flatten(0, 1) for t in _triangle_setup(pos, tri, height, width))
    area = box_w * box_h
    slots = torch.nonzero(area > 0).squeeze(1)
    ends = torch.cumsum(area[slots], 0)
    start = 0
    while start < len(slots):
        limit = (int(ends[start - 1]) if start > 0 else 0) + CHUNK_CANDIDATES
        stop = max(int(torch.searchsorted(ends, ends.new_tensor([limit]), right=True)), start + 1)
        chunk = slots[start:stop]
        candidates = _candidates(
            forms[chunk], x0[chunk], box_w[chunk], y0[chunk], box_h[chunk], height, width
        )
        _depth_test_chunk(chunk, *candidates, num_faces, height, width, zbuf, fbuf)
        start = stop
    covered = fbuf < num_faces
    return torch.where(covered, zbuf, 0.0), torch.where(covered, fbuf, -1)


def _candidates(forms, x0, box_w, y0, box_h, height: int, width: int):
    """Pixels to test: per triangle, per bounding-box row, the span between the row's edge crossings.

    Spans are widened by _SLACK and the exact inside test follows, so thin triangles cost about their
    covered pixels plus one or two per row instead of their whole bounding box.
    Returns (triangle index into the chunk, x, y, e_0..e_2 and z/w at each candidate pixel).
    """
    device = forms.device
    row_tri = torch.repeat_interleave(torch.arange(len(forms), device=device), box_h)
    row_first = torch.repeat_interleave(torch.cumsum(box_h, 0) - box_h, box_h, output_size=len(row_tri))
    py = y0[row_tri] + torch.arange(len(row_tri), device=device) - row_first
    row_forms = forms.index_select(0, row_tri)
    # Along a row, each form is offset + slope * a (the same arithmetic as the exact test below).
    offset = row_forms[:, 0:4] + row_forms[:, 8:12] * _pixel_ndc(py, height, forms.dtype)[:, None]
    slope = row_forms[:, 4:8]
    edge_offset, edge_slope = offset[:, :3], slope[:, :3]
    root = -edge_offset / torch.where(edge_slope == 0, 1.0, edge_slope)
    lower = torch.where(edge_slope > 0, root, -torch.inf).amax(1)
    upper = torch.where(edge_slope < 0, root, torch.inf).amin(1)
    never = ((edge_slope == 0) & (edge_offset < 0)).any(1)
    box_x0, box_x1 = x0[row_tri], x0[row_tri] + box_w[row_tri] - 1
    x_lo = torch.ceil(((lower + 1) * width - 1).clamp(-4.0, 2 * width + 4) / 2 - _SLACK).long()
    x_hi = torch.floor(((upper + 1) * width - 1).clamp(-4.0, 2 * width + 4) / 2 + _SLACK).long()
    x_lo, x_hi = torch.maximum(x_lo, box_x0), torch.minimum(x_hi, box_x1)
    span = torch.where(never, 0, (x_hi - x_lo + 1).clamp(min=0))

    total = int(span.sum())
    pixel_row = torch.repeat_interleave(torch.arange(len(span), device=device), span, output_size=total)
    pixel_first = torch.repeat_interleave(torch.cumsum(span, 0) - span, span, output_size=total)
    px = x_lo[pixel_row] + torch.arange(total, device=device) - pixel_first
    a = _pixel_ndc(px, width, forms.dtype)[:, None]
    values = offset.index_select(0, pixel_row) + slope.index_select(0, pixel_row) * a  # e_0, e_1, e_2, z/w
    return row_tri[pixel_row], px, py[pixel_row], values


def _depth_test_chunk(slots, owner, px, py, values, num_faces, height, width, zbuf, fbuf) -> None:
    z = values[:, 3]
    # Each selection's size is one wait for the device, so each mask is turned into indices once.
    keep = torch.nonzero((values[:, :3] >= 0).all(1) & (z >= -1.0) & (z <= 1.0)).squeeze(1)
    slot, z = slots[owner[keep]], z[keep]
    key = ((slot // num_faces) * height + py[keep]) * width + px[keep]
    face = slot % num_faces
    before = zbuf.clone()
    zbuf.scatter_reduce_(0, key, z, "amin")
    fbuf.masked_fill_(zbuf < before, num_faces)  # a nearer fragment in this chunk displaces earlier winners
    win = torch.nonzero(z == zbuf[key]).squeeze(1)
    fbuf.scatter_reduce_(0, key[win], face[win], "amin")


def _antialias_torch(
    color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor, topology: torch.Tensor
) -> torch.Tensor:
    batch, height, width, channels = color.shape
    ids, zw = rast[..., 3].detach(), rast[..., 2].detach()
    horizontal = torch.nonzero(ids[:, :, 1:] != ids[:, :, :-1])
    vertical = torch.nonzero(ids[:, 1:, :] != ids[:, :-1, :])
    image, y0, x0 = torch.cat([horizontal, vertical]).unbind(1)
    down = torch.arange(len(image), device=image.device) >= len(horizontal)
    pix0 = (image * height + y0) * width + x0
    pix1 = pix0 + torch.where(down, width, 1)

    # The nearer pixel's triangle owns the discontinuity; background counts as farthest.
    flat_ids, flat_z = ids.reshape(-1), zw.reshape(-1)
    tri0, tri1 = flat_ids[pix0].long() - 1, flat_ids[pix1].long() - 1
    use1 = (tri0 < 0) | ((tri1 >= 0) & ~(flat_z[pix0] < flat_z[pix1]))
    face = torch.where(use1, tri1, tri0)
    toward = torch.where(use1, -1.0, 1.0).to(pos.dtype)  # direction of the other pixel along the pair
    ref_x = x0 + (use1 & ~down).long()
    ref_y = y0 + (use1 & down).long()

    with torch.no_grad():
        corner_ids = tri[face]
        sx, sy = _pixel_offsets(pos.detach()[image[:, None], corner_ids], ref_x, ref_y, height, width)
        # Work along the pair's axis: swap x and y for vertical pairs (this flips every area's sign alike).
        ex, ey = torch.where(down[:, None], sy, sx), torch.where(down[:, None], sx, sy)
        xj, yj, xk, yk = ex.roll(-1, 1), ey.roll(-1, 1), ex.roll(-2, 1), ey.roll(-2, 1)
        dx, dy = xk - xj, yk - yj
        straddles = torch.signbit(yj) != torch.signbit(yk)
        crossing = toward[:, None] * (xj * dy - yj * dx) / torch.where(straddles, dy, 1.0)
        crossing = torch.where(straddles, crossing, -torch.inf)
        edge = crossing.argmax(1, keepdim=True)  # where the segment leaves the triangle
        dist = crossing.gather(1, edge).squeeze(1)
        steep = (dy.abs() >= dx.abs()).gather(1, edge).squeeze(1)
        found = torch.nonzero(steep & (dist > -_CROSSING_SLACK) & (dist < 1.0 + _CROSSING_SLACK)).squeeze(1)

        # Silhouette test of the crossed edge: no neighbour across it, or the neighbour's far vertex lies
        # on the same side of the edge as this triangle's own (the surface folds back on screen).
        edge, ex, ey = edge[found], ex[found], ey[found]
        wing = topology[face[found, None], edge].squeeze(1)
        wing_x, wing_y = _pixel_offsets(
            pos.detach()[image[found], wing.clamp(min=0)][:, None], ref_x[found], ref_y[found], height, width
        )
        if_down = down[found, None]
        wing_x, wing_y = torch.where(if_down, wing_y, wing_x), torch.where(if_down, wing_x, wing_y)
        xj, yj = ex.gather(1, (edge + 1) % 3), ey.gather(1, (edge + 1) % 3)
        xk, yk = ex.gather(1, (edge + 2) % 3), ey.gather(1, (edge + 2) % 3)
        area = (ex[:, 1] - ex[:, 0]) * (ey[:, 2] - ey[:, 0]) - (ex[:, 2] - ex[:, 0]) * (ey[:, 1] - ey[:, 0])
        wing_area = ((xj - wing_x) * (yk - wing_y) - (xk - wing_x) * (yj - wing_y)).squeeze(1)
        silhouette = torch.nonzero((wing < 0) | (torch.signbit(wing_area) == torch.signbit(area))).squeeze(1)
        keep = found[silhouette]
        edge = edge[silhouette]

    image, down, toward, pix0, pix1 = image[keep], down[keep], toward[keep], pix0[keep], pix1[keep]
    ends = torch.cat(
        [corner_ids[keep].gather(1, (edge + 1) % 3), corner_ids[keep].gather(1, (edge + 2) % 3)], 1
    )
    ex, ey = _pixel_offsets(pos[image[:, None], ends], ref_x[keep], ref_y[keep], height, width)
    ex, ey = torch.where(down[:, None], ey, ex), torch.where(down[:, None], ex, ey)
    dx, dy = ex[:, 1] - ex[:, 0], ey[:, 1] - ey[:, 0]
    dist = toward * (ex[:, 0] * dy - ey[:, 0] * dx) / dy
    inside = (dist.detach() > 0) & (dist.detach() < 1)
    dist = torch.where(inside, dist, dist.detach().clamp(0.0, 1.0))  # saturated blends get no gradient
    weight = toward * (0.5 - dist)

    flat = color.reshape(-1, channels)
    delta = weight[:, None].to(color.dtype) * (flat[pix1] - flat[pix0])
    target = torch.where(weight > 0, pix0, pix1)
    return flat.index_add(0, target, delta).view(batch, height, width, channels)


def _pixel_offsets(corners: torch.Tensor, ref_x, ref_y, height: int, width: int):
    """Screen position (pixels) of clip-space points [K, M, 4] relative to pixel centres (ref_x, ref_y)."""
    inv_w = 1.0 / corners[..., 3]
    sx = (corners[..., 0] * inv_w + 1.0) * (width / 2) - (ref_x[:, None] + 0.5)
    sy = (corners[..., 1] * inv_w + 1.0) * (height / 2) - (ref_y[:, None] + 0.5)
    return sx, sy


# --------------------------------------------------------------------------------------------------
# nvdiffrast backend (optional, CUDA only)


@functools.cache
def _nvdiffrast():
    try:
        import nvdiffrast.torch as dr
    except ImportError:
        return None
    return dr


@functools.cache
def _cuda_context(device: torch.device):
    return _nvdiffrast().RasterizeCudaContext(device=device)


def _use_nvdiffrast(backend: Backend, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "nvdiffrast":
        if _nvdiffrast() is None:
            raise RuntimeError("backend='nvdiffrast' needs the nvdiffrast package (CUDA only); use 'torch'")
        if not on_cuda:
            raise ValueError("backend='nvdiffrast' needs CUDA tensors; use 'torch' on CPU")
        return True
    if backend == "auto":
        return on_cuda and _nvdiffrast() is not None
    raise ValueError(f"unknown rasterizer backend {backend!r}; expected 'auto', 'torch' or 'nvdiffrast'")
