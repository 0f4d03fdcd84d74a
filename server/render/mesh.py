"""Per-view rendering of a triangle mesh for the optimiser: project, rasterize, shade, composite.

Inputs follow the shared conventions: world Z up, cameras as Blender camera-to-world matrices with a
vertical field of view (`server.render.cameras`). Every image returned is [B, H, W, C] with row 0 = top;
the rasterizer (`server.render.raster`) works bottom-up like nvdiffrast and this module flips once at the end.

Shading follows DreamFusion and uses the constants of `server.render.shading`, so the optimiser's renders
look like the shapes prior's training images: "albedo" (unlit colour), "lambertian"
(albedo * (ambient + diffuse * max(0, n.l)), light near the camera), "textureless" (white albedo,
lit) and "normal" ((n + 1) / 2 of the world normal). The composited `rgb` and the `opacity` go
through `antialias`, which is where silhouette gradients come from (as in threestudio).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from server.render.raster import Backend, antialias, interpolate, rasterize
from server.render.shading import AMBIENT, BACKGROUND, DIFFUSE, LIGHT_JITTER

Shading = Literal["albedo", "lambertian", "textureless", "normal"]
ColorFn = Callable[[torch.Tensor], torch.Tensor]
BackgroundFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MeshRender:
    """One batch of views. Images are [B, H, W, C], row 0 = top; background pixels hold zeros unless noted."""

    rgb: torch.Tensor  # [B,H,W,3] shaded foreground over the background, antialiased, in [0, 1]
    albedo: torch.Tensor  # [B,H,W,3] colour function at the hit points (white without one)
    opacity: torch.Tensor  # [B,H,W,1] antialiased coverage in [0, 1]: carries silhouette gradients
    mask: torch.Tensor  # [B,H,W,1] hard coverage 0/1 (no gradient)
    normal: torch.Tensor  # [B,H,W,3] unit world-space normals
    points: torch.Tensor  # [B,H,W,3] world ray hits: camera position + depth * unit ray direction
    depth: torch.Tensor  # [B,H,W,1] distance from the camera position to the hit along the ray
    light_dir: torch.Tensor | None  # [B,3] unit direction towards the light, None if unlit
    c2w: torch.Tensor  # [B,4,4] the cameras, Blender convention
    fovy: torch.Tensor  # [B] radians


def lambert(
    albedo: torch.Tensor,
    normal: torch.Tensor,
    light_dir: torch.Tensor,
    ambient: float = AMBIENT,
    diffuse: float = DIFFUSE,
) -> torch.Tensor:
    """albedo * (ambient + diffuse * max(0, n . l)); all arguments broadcast over leading dimensions."""
    n_dot_l = (normal * light_dir).sum(-1, keepdim=True).clamp(min=0.0)
    return albedo * (ambient + diffuse * n_dot_l)


def sample_light_dirs(
    camera_positions: torch.Tensor, generator: torch.Generator | None = None, jitter: float = LIGHT_JITTER
) -> torch.Tensor:
    """Unit light directions [B, 3]: towards each camera from the origin plus Gaussian jitter, normalised."""
    towards_camera = F.normalize(camera_positions, dim=-1)
    draw_device = generator.device if generator is not None else camera_positions.device
    noise = torch.randn(
        towards_camera.shape, generator=generator, device=draw_device, dtype=towards_camera.dtype
    )
    return F.normalize(towards_camera + jitter * noise.to(camera_positions.device), dim=-1)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unnormalised face normals [F, 3] (length = twice the area; outward for counter-clockwise faces)."""
    corners = vertices[faces]
    return torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals [N, 3]."""
    per_corner = face_normals(vertices, faces).repeat_interleave(3, 0)
    return F.normalize(torch.zeros_like(vertices).index_add(0, faces.reshape(-1), per_corner), dim=-1)


def clip_positions(
    vertices: torch.Tensor, c2w: torch.Tensor, fovy: torch.Tensor, aspect: float, near: float, far: float
) -> torch.Tensor:
    """World vertices [N, 3] -> OpenGL clip positions [B, N, 4] for each camera (`cameras.perspective`)."""
    world_to_clip = perspective_matrices(fovy, aspect, near, far) @ torch.linalg.inv(c2w.to(torch.float64))
    homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=1)
    return homogeneous @ world_to_clip.to(vertices.dtype).transpose(1, 2)


def perspective_matrices(fovy: torch.Tensor, aspect: float, near: float, far: float) -> torch.Tensor:
    """`cameras.perspective` for each field of view [B], float64 [B, 4, 4] on fovy's device: built
    there, so that no camera is read back to the host."""
    f = 1.0 / torch.tan(fovy.detach().to(torch.float64) / 2.0)
    projection = torch.zeros(len(f), 4, 4, dtype=torch.float64, device=fovy.device)
    projection[:, 0, 0] = f / aspect
    projection[:, 1, 1] = f
    projection[:, 2, 2] = (far + near) / (near - far)
    projection[:, 2, 3] = 2.0 * far * near / (near - far)
    projection[:, 3, 2] = -1.0
    return projection


def pixel_rays(c2w: torch.Tensor, fovy: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Unit world ray directions through pixel centres, [B, H, W, 3], row 0 = top (`cameras.camera_rays`),
    computed in float64 on the cameras' device."""
    tan_y = torch.tan(fovy.detach().to(torch.float64) / 2.0)[:, None, None]
    tan_x = tan_y * width / height
    device = c2w.device
    xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5) / width * 2.0 - 1.0
    ys = 1.0 - (torch.arange(height, dtype=torch.float64, device=device) + 0.5) / height * 2.0
    gx = (xs[None, None, :] * tan_x).expand(-1, height, -1)
    gy = (ys[None, :, None] * tan_y).expand(-1, -1, width)
    dirs_cam = torch.stack([gx, gy, -torch.ones_like(gx)], dim=-1)  # [B, H, W, 3]
    dirs = dirs_cam @ c2w.detach().to(torch.float64)[:, None, :3, :3].transpose(-1, -2)
    dirs = dirs / torch.linalg.vector_norm(dirs, dim=-1, keepdim=True)
    return dirs.to(c2w.dtype)


def render_mesh(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    c2w: torch.Tensor,
    fovy: torch.Tensor,
    resolution: int | tuple[int, int],
    color_fn: ColorFn | None = None,
    shading: Shading = "lambertian",
    light_dir: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    background: torch.Tensor | tuple[float, float, float] | BackgroundFn = BACKGROUND,
    ambient: float = AMBIENT,
    diffuse: float = DIFFUSE,
    normals: Literal["vertex", "face"] = "vertex",
    near: float = 0.1,
    far: float = 100.0,
    backend: Backend = "auto",
) -> MeshRender:
    """Render one mesh (vertices [N, 3] world, faces [F, 3]) from B cameras (c2w [B, 4, 4], fovy [B]).

    color_fn maps world points [M, 3] to albedo [M, 3] in [0, 1] and is called once, on the covered
    pixels only. light_dir [B, 3] or [3] points towards the light; when None and the shading needs
    one it is drawn with `sample_light_dirs` from `generator`. background is an RGB colour (tuple or
    tensor [3] / [B, 3]) or a function of the unit view directions [B, H, W, 3] (row 0 = top)
    returning [B, H, W, 3]. normals: "vertex" interpolates area-weighted vertex normals, "face"
    uses flat face normals. Gradients reach the vertices through barycentrics (interior) and
    antialias (silhouettes), and color_fn's parameters through the albedo.
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    dtype, device = vertices.dtype, vertices.device
    faces = faces.to(device=device, dtype=torch.long)
    c2w = c2w.to(device=device, dtype=dtype)
    batch = c2w.shape[0]
    fovy = fovy.to(device=device, dtype=dtype).reshape(-1).expand(batch)

    pos = clip_positions(vertices, c2w, fovy, width / height, near, far)
    rast = rasterize(pos, faces, (height, width), backend=backend)
    mask = (rast[..., 3:] > 0).to(dtype)

    # Images are bottom-up (rasterizer layout) from here until the final flip.
    view_dirs = pixel_rays(c2w, fovy, height, width)  # row 0 = top, as the background function expects
    dirs = view_dirs.flip(1)
    origins = c2w[:, None, None, :3, 3]
    hit = interpolate(vertices, rast, faces, backend=backend)
    depth = ((hit - origins) * dirs).sum(-1, keepdim=True) * mask
    points = (origins + depth * dirs) * mask

    if normals == "vertex":
        normal = F.normalize(
            interpolate(vertex_normals(vertices, faces), rast, faces, backend=backend), dim=-1
        )
    elif normals == "face":
        face_ids = (rast[..., 3].long() - 1).clamp(min=0)
        normal = F.normalize(face_normals(vertices, faces), dim=-1)[face_ids] * mask
    else:
        raise ValueError(f"normals must be 'vertex' or 'face', got {normals!r}")

    if color_fn is None:
        albedo = mask.expand(-1, -1, -1, 3)
    else:
        covered = torch.nonzero(mask.reshape(-1)).squeeze(1)
        values = color_fn(points.reshape(-1, 3)[covered])
        albedo = values.new_zeros(batch * height * width, 3).index_put((covered,), values)
        albedo = albedo.view(batch, height, width, 3)

    light = None
    if shading in ("lambertian", "textureless"):
        light = (
            sample_light_dirs(c2w[:, :3, 3], generator) if light_dir is None else light_dir.to(device, dtype)
        )
        light = F.normalize(light.expand(batch, 3), dim=-1)
        lit_albedo = albedo if shading == "lambertian" else mask.expand(-1, -1, -1, 3)
        foreground = lambert(lit_albedo, normal, light[:, None, None, :], ambient, diffuse)
    elif shading == "albedo":
        foreground = albedo
    elif shading == "normal":
        foreground = (normal + 1.0) / 2.0
    else:
        raise ValueError(f"unknown shading {shading!r}; expected albedo, lambertian, textureless or normal")

    if callable(background):
        back = background(view_dirs).flip(1)
    else:
        back = torch.as_tensor(background, device=device, dtype=dtype).reshape(-1, 1, 1, 3)
    composite = foreground * mask + back * (1.0 - mask)
    # One antialias pass for colour and coverage: the blends are per channel, so this equals two calls.
    smooth = antialias(torch.cat([composite, mask], -1), rast, pos, faces, backend=backend).clamp(0.0, 1.0)

    return MeshRender(
        rgb=smooth[..., :3].flip(1),
        albedo=albedo.flip(1),
        opacity=smooth[..., 3:].flip(1),
        mask=mask.flip(1),
        normal=normal.flip(1),
        points=points.flip(1),
        depth=depth.flip(1),
        light_dir=light,
        c2w=c2w,
        fovy=fovy,
    )
