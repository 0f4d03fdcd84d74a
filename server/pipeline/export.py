"""Turn an optimised mesh and its colour field into a textured asset: GLB, and OBJ + MTL + PNG.

Pipeline: `clean_mesh` (weld, drop floaters and degenerate faces) -> `decimate` -> `unwrap` (xatlas)
-> `bake` (evaluate the colour field at every texel's surface point) -> `export_glb` / `export_obj`.
Decimation comes before unwrapping because xatlas is the slow stage on CPU (tens of seconds at 50k
faces). The colour field is any callable on world-space points, so this module needs no torch.

Conventions: our world is Z up (Blender); glTF and OBJ files are Y up, and Blender's importers turn
Y up back into Z up, so both writers rotate by `Z_UP_TO_Y_UP`. Texture images are [H, W, 3] uint8
with row 0 = top (PIL); UVs have v up (trimesh, Blender), so texel (row r, column c) is centred at
u = (c + 0.5) / W, v = 1 - (r + 0.5) / H. Every file is written atomically (temporary file in the
same folder, then `os.replace`), so a reader never sees a half-written asset.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fast_simplification
import numpy as np
import trimesh
import xatlas
from PIL import Image
from scipy.ndimage import distance_transform_edt

ColorFn = Callable[[np.ndarray], np.ndarray]  # points [M,3] float32 world space -> rgb [M,3] in [0,1]

# Blender's glTF and OBJ importers map a file's (x, y, z) to Blender's (x, -z, y). Writing
# (x, z, -y) (a -90 degree rotation about X) therefore brings our Z-up object back upright.
Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

_RASTER_CHUNK = 1 << 20  # candidate texels per rasterisation chunk (bounds its memory to ~150 MB)
_COLOR_CHUNK = 1 << 16  # points per colour-function call


def clean_mesh(
    vertices: np.ndarray, faces: np.ndarray, min_component_fraction: float = 0.02, weld_digits: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """Weld coincident vertices, drop degenerate/duplicate faces and floating fragments.

    A fragment is a set of faces connected through shared edges whose surface area is below
    `min_component_fraction` of the largest such set's area (area rather than face count, so the
    decision does not depend on how finely each part happens to be tessellated).
    Returns (vertices float32 [N,3], faces int64 [F,3]).
    """
    mesh = trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(faces, np.int64), process=False)
    mesh.merge_vertices(digits_vertex=weld_digits)
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.update_faces(mesh.unique_faces())
    if len(mesh.faces) > 0:
        labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
        area = np.bincount(labels, weights=mesh.area_faces)
        mesh.update_faces(area[labels] >= min_component_fraction * area.max())
    mesh.remove_unreferenced_vertices()
    return mesh.vertices.astype(np.float32), mesh.faces.astype(np.int64)


def decimate(
    vertices: np.ndarray, faces: np.ndarray, target_faces: int, aggression: float = 7.0
) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation (fast_simplification) down to about `target_faces`; smaller meshes pass through."""
    vertices = np.asarray(vertices, np.float32)
    faces = np.asarray(faces, np.int64)
    if len(faces) <= target_faces:
        return vertices, faces
    v, f = fast_simplification.simplify(
        vertices.astype(np.float64), faces.astype(np.int32), target_count=int(target_faces), agg=aggression
    )
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    return v.astype(np.float32), f.astype(np.int64)


def unwrap(
    vertices: np.ndarray, faces: np.ndarray, resolution: int = 1024, padding: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xatlas UV atlas that fills exactly one `resolution`^2 square, each chart ringed by `padding` texels.

    Charts end up at least 2 * padding + 1 texels apart (xatlas pads every chart and, with `bilinear`,
    adds one more texel), so bilinear filtering and the first mip levels never mix two charts.

    Returns (vmapping int64 [N'] into `vertices`, faces int64 [F,3] into the split vertices,
    uvs float32 [N',2] in [0,1], v up). xatlas only *estimates* the scale from `resolution`, and its
    atlas comes out larger (840 texels for 512 here), which would shrink the padding when baked at
    `resolution`. So the charts are computed once (the slow part) and then re-packed from their UVs
    at an explicit texel density, lowered until everything fits one atlas of exactly that size.
    """
    pack = xatlas.PackOptions()
    pack.padding = int(padding)
    pack.resolution = int(resolution)
    pack.bilinear = True
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    atlas.generate(xatlas.ChartOptions(), pack)
    vmapping, faces_uv, uvs = atlas.get_mesh(0)

    # Re-pack. In UV-mesh mode the density is texels per UV unit; the charts' UV area A caps it at
    # resolution / sqrt(A) (100 % use of the square). Step down from there until the charts fit one
    # atlas, then bisect between the last failure and the fit to waste less of the square.
    corners = uvs[faces_uv].astype(np.float64)
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    uv_area = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).sum()

    def pack_at(density: float) -> xatlas.Atlas | None:
        repacked = xatlas.Atlas()
        repacked.add_uv_mesh(np.ascontiguousarray(uvs, np.float32), np.ascontiguousarray(faces_uv, np.uint32))
        pack.texels_per_unit = density
        repacked.generate(xatlas.ChartOptions(), pack)
        return repacked if repacked.atlas_count == 1 else None

    too_big = resolution / np.sqrt(uv_area)
    density = 0.9 * too_big
    fit = pack_at(density)
    while fit is None:
        if density < 1e-3 * too_big:
            raise RuntimeError(f"xatlas could not fit {len(faces)} faces into one {resolution}^2 atlas")
        too_big, density = density, 0.9 * density
        fit = pack_at(density)
    for _ in range(3):
        trial = np.sqrt(density * too_big)
        better = pack_at(trial)
        if better is None:
            too_big = trial
        else:
            fit, density = better, trial
    vm2, faces2, uvs2 = fit.get_mesh(0)
    return vmapping[vm2].astype(np.int64), faces2.astype(np.int64), uvs2.astype(np.float32)


def _texel_hits(uvs: np.ndarray, faces: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Every (face, row, column, barycentrics) of a texel centre inside a face, in chunks.

    For every face, the texel centres in its bounding box are enumerated and kept when inside.
    Row 0 = top, so row = (1 - v) * size - 0.5.
    """
    xy = np.stack([uvs[:, 0] * size - 0.5, (1.0 - uvs[:, 1]) * size - 0.5], axis=1).astype(np.float64)
    tri = xy[faces]  # [F,3,2]
    lo = np.maximum(np.ceil(tri.min(axis=1)), 0).astype(np.int64)
    hi = np.minimum(np.floor(tri.max(axis=1)), size - 1).astype(np.int64)
    span = np.maximum(hi - lo + 1, 0)  # [F,2] bbox width (x) and height (y) in texels
    count = span[:, 0] * span[:, 1]
    e1 = tri[:, 1] - tri[:, 0]
    e2 = tri[:, 2] - tri[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    usable = np.flatnonzero((count > 0) & (np.abs(det) > 1e-12))
    bounds = np.searchsorted(np.cumsum(count[usable]), np.arange(_RASTER_CHUNK, count.sum(), _RASTER_CHUNK))
    for chunk in np.split(usable, bounds):
        n = count[chunk]
        f = np.repeat(chunk, n)
        k = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # index within the face's bbox
        col = lo[f, 0] + k % span[f, 0]
        row = lo[f, 1] + k // span[f, 0]
        dx = col - tri[f, 0, 0]
        dy = row - tri[f, 0, 1]
        b1 = (dx * e2[f, 1] - dy * e2[f, 0]) / det[f]
        b2 = (e1[f, 0] * dy - e1[f, 1] * dx) / det[f]
        b0 = 1.0 - b1 - b2
        inside = (b0 >= -1e-9) & (b1 >= -1e-9) & (b2 >= -1e-9)
        yield f[inside], row[inside], col[inside], np.stack([b0[inside], b1[inside], b2[inside]], axis=1)


def rasterize_uv(uvs: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which face covers each texel centre, and where: (face id [S,S] int64, -1 = none; barycentrics [S,S,3]).

    Written by hand because no installed library rasterises on CPU with barycentrics (nvdiffrast is
    CUDA-only). Charts do not overlap (`uv_problem` checks a mesh's own UVs), so there is no depth test.
    """
    face_id = np.full((size, size), -1, np.int64)
    bary = np.zeros((size, size, 3), np.float64)
    for f, r, c, b in _texel_hits(uvs, faces, size):
        face_id[r, c] = f
        bary[r, c] = b
    return face_id, bary


def uv_problem(uvs: np.ndarray, faces: np.ndarray, size: int, overlap_limit: float = 0.01) -> str | None:
    """Why a mesh's own UV layout cannot take a baked texture of `size`^2, or None when it can.

    Out of the unit square beyond half a texel (a tiling or UDIM layout), or overlapping (mirrored or
    stacked islands: one texel would have to hold two colours) beyond `overlap_limit` of the covered
    texels (texel centres exactly on a shared edge count twice, so a small share is no overlap).
    """
    uvs = np.asarray(uvs, np.float64)
    slack = 0.5 / size  # within half a texel of the border (a subdivided map's rounding) still bakes
    outside = (uvs < -slack) | (uvs > 1.0 + slack)
    if outside.any():
        share = outside.any(axis=1)[np.asarray(faces)].any(axis=1).mean()
        return f"{share:.0%} of the faces have UVs outside the unit square [0, 1]"
    hits = np.zeros(size * size, np.int64)
    for _, r, c, _ in _texel_hits(uvs, np.asarray(faces, np.int64), size):
        np.add.at(hits, r * size + c, 1)
    covered = np.count_nonzero(hits)
    if covered == 0:
        return f"the UV islands cover no texel of a {size}^2 texture: they have no area"
    overlap = np.count_nonzero(hits > 1) / covered
    if overlap > overlap_limit:
        return f"UV islands overlap on {overlap:.0%} of their texels (mirrored or stacked islands)"
    return None


def bake(
    vertices: np.ndarray,
    faces_uv: np.ndarray,
    uvs: np.ndarray,
    vmapping: np.ndarray,
    color_fn: ColorFn,
    size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Bake `color_fn` into a size x size texture of the UV layout from `unwrap`.

    Every covered texel gets the colour at its 3-D surface point; every other texel (seam padding
    and background) copies its nearest covered texel, so bilinear filtering and mipmaps near chart
    borders read the chart's own colours, never black. Returns (texture uint8 [size,size,3] row 0 =
    top, covered bool [size,size]).
    """
    face_id, bary = rasterize_uv(np.asarray(uvs, np.float64), np.asarray(faces_uv, np.int64), size)
    covered = face_id >= 0
    if not covered.any():
        raise ValueError("the UV layout covers no texel centre; increase the texture size")
    corners = np.asarray(vertices, np.float64)[np.asarray(vmapping)[faces_uv[face_id[covered]]]]  # [M,3,3]
    points = np.einsum("mk,mkd->md", bary[covered], corners).astype(np.float32)
    chunks = [points[i : i + _COLOR_CHUNK] for i in range(0, len(points), _COLOR_CHUNK)]
    colors = np.concatenate([np.asarray(color_fn(chunk), np.float32) for chunk in chunks])
    texture = np.zeros((size, size, 3), np.uint8)
    texture[covered] = np.round(np.clip(colors, 0.0, 1.0) * 255.0).astype(np.uint8)
    _, (rows, cols) = distance_transform_edt(~covered, return_indices=True)
    return texture[rows, cols], covered


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the target folder, then rename over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(texture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(texture, np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _welded_normals(vertices: np.ndarray, faces_uv: np.ndarray, vmapping: np.ndarray) -> np.ndarray:
    """Vertex normals of the welded mesh [N,3]: computed before the UV seams split it, so no shading seams."""
    welded = trimesh.Trimesh(np.asarray(vertices, np.float64), np.asarray(vmapping)[faces_uv], process=False)
    return np.asarray(welded.vertex_normals)


def export_glb(
    path: str | Path,
    vertices: np.ndarray,
    faces_uv: np.ndarray,
    uvs: np.ndarray,
    vmapping: np.ndarray,
    texture: np.ndarray,
    roughness: float = 0.9,
) -> Path:
    """Write a binary glTF: one mesh, base-colour texture, metallic 0, welded normals, Y up."""
    path = Path(path)
    normals = _welded_normals(vertices, faces_uv, vmapping)[vmapping] @ Z_UP_TO_Y_UP.T
    material = trimesh.visual.material.PBRMaterial(
        name="cfd_material",
        baseColorTexture=Image.fromarray(np.asarray(texture, np.uint8), "RGB"),
        metallicFactor=0.0,
        roughnessFactor=float(roughness),
    )
    mesh = trimesh.Trimesh(
        vertices=np.asarray(vertices, np.float64)[vmapping] @ Z_UP_TO_Y_UP.T,
        faces=np.asarray(faces_uv, np.int64),
        vertex_normals=normals,
        visual=trimesh.visual.TextureVisuals(uv=np.asarray(uvs, np.float64), material=material),
        process=False,
    )
    scene = trimesh.Scene({path.stem: mesh})  # the key names the object in Blender
    _write_atomic(path, scene.export(file_type="glb"))
    return path


def export_obj(
    out_dir: str | Path,
    vertices: np.ndarray,
    faces_uv: np.ndarray,
    uvs: np.ndarray,
    vmapping: np.ndarray,
    texture: np.ndarray,
    name: str = "asset",
) -> dict[str, Path]:
    """Write `name`.obj + `name`.mtl + `name`.png (Y up); returns their paths under keys obj, mtl, png.

    Written by hand rather than with trimesh, whose MTL says Kd/Ks 0.4 (a grey, shiny look in
    Blender): ours says Kd 1 1 1, Ks 0 0 0, map_Kd. Positions and normals stay welded (`v`/`vn` per
    original vertex) and only texture coordinates are split, so the OBJ importer rebuilds a closed
    mesh with UV seams. The PNG and MTL are written before the OBJ that refers to them.
    """
    out_dir = Path(out_dir)
    paths = {"obj": out_dir / f"{name}.obj", "mtl": out_dir / f"{name}.mtl", "png": out_dir / f"{name}.png"}
    positions = np.asarray(vertices, np.float64) @ Z_UP_TO_Y_UP.T
    normals = _welded_normals(vertices, faces_uv, vmapping) @ Z_UP_TO_Y_UP.T
    vt = np.asarray(faces_uv, np.int64) + 1
    v = np.asarray(vmapping, np.int64)[faces_uv] + 1
    corner = np.stack([v, vt, v], axis=2).reshape(-1, 9)  # per face: v/vt/vn for its three corners

    text = io.StringIO()
    text.write(f"# blender-cfd textured asset\nmtllib {paths['mtl'].name}\no {name}\n")
    np.savetxt(text, positions, fmt="v %.6f %.6f %.6f")
    np.savetxt(text, np.asarray(uvs, np.float64), fmt="vt %.6f %.6f")
    np.savetxt(text, normals, fmt="vn %.6f %.6f %.6f")
    text.write("usemtl cfd_material\ns 1\n")
    np.savetxt(text, corner, fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    mtl = (
        "# blender-cfd material\nnewmtl cfd_material\n"
        "Ka 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 10\nd 1\nillum 1\n"
        f"map_Kd {paths['png'].name}\n"
    )
    _write_atomic(paths["png"], png_bytes(texture))
    _write_atomic(paths["mtl"], mtl.encode())
    _write_atomic(paths["obj"], text.getvalue().encode())
    return paths


@dataclass(frozen=True)
class UVAtlas:
    """A mesh cleaned, decimated and unwrapped once, to be baked as often as its colours change
    (the server bakes milestone textures of the frozen geometry and the final asset from one atlas)."""

    vertices: np.ndarray  # [N, 3] welded
    faces_uv: np.ndarray  # [F, 3] into the UV vertices
    uvs: np.ndarray  # [M, 2]
    vmapping: np.ndarray  # [M] UV vertex -> welded vertex
    texture_size: int
    stats: dict

    def bake(self, color_fn: ColorFn) -> tuple[np.ndarray, np.ndarray]:
        return bake(self.vertices, self.faces_uv, self.uvs, self.vmapping, color_fn, self.texture_size)


def prepare_atlas(
    vertices: np.ndarray,
    faces: np.ndarray,
    texture_size: int = 1024,
    target_faces: int = 20000,
    padding: int = 2,
    min_component_fraction: float = 0.02,
) -> UVAtlas:
    """Clean, decimate and unwrap; `stats` holds the face/vertex counts and per-stage seconds."""
    seconds: dict[str, float] = {}
    stats: dict = {"faces_in": len(faces), "seconds": seconds}

    start = time.perf_counter()
    vertices, faces = clean_mesh(vertices, faces, min_component_fraction)
    seconds["clean"] = time.perf_counter() - start
    stats["faces_clean"] = len(faces)
    if len(faces) == 0:
        raise ValueError("the mesh has no faces left after cleaning")

    start = time.perf_counter()
    vertices, faces = decimate(vertices, faces, target_faces)
    seconds["decimate"] = time.perf_counter() - start
    stats["faces"] = len(faces)
    stats["vertices"] = len(vertices)

    start = time.perf_counter()
    vmapping, faces_uv, uvs = unwrap(vertices, faces, texture_size, padding)
    seconds["unwrap"] = time.perf_counter() - start
    stats["uv_vertices"] = len(vmapping)
    return UVAtlas(vertices, faces_uv, uvs, vmapping, texture_size, stats)


def atlas_from_uvs(
    vertices: np.ndarray, faces: np.ndarray, corner_uvs: np.ndarray, texture_size: int
) -> UVAtlas:
    """An atlas of a mesh's own UVs [F, 3, 2] (per face corner), nothing cleaned or moved: corners that
    share a vertex and a UV share one UV vertex, so the asset splits vertices only at the UV seams."""
    corner_vertex = np.asarray(faces, np.int64).reshape(-1)
    corner_uv = np.asarray(corner_uvs, np.float32).reshape(-1, 2)
    keys = np.concatenate([corner_vertex[:, None].astype(np.float64), corner_uv.astype(np.float64)], axis=1)
    unique, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # UV vertices in the order the corners first use them
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    stats = {"faces": len(faces), "vertices": len(vertices), "uv_vertices": len(unique), "seconds": {}}
    return UVAtlas(
        np.asarray(vertices, np.float32),
        rank[inverse.reshape(-1)].reshape(-1, 3),
        corner_uv[first[order]],
        corner_vertex[first[order]],
        texture_size,
        stats,
    )


def fresh_atlas(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int = 2) -> UVAtlas:
    """A new xatlas unwrap of the mesh as it is: no cleaning or decimation, so no vertex moves."""
    start = time.perf_counter()
    vmapping, faces_uv, uvs = unwrap(vertices, faces, texture_size, padding)
    stats = {
        "faces": len(faces),
        "vertices": len(vertices),
        "uv_vertices": len(vmapping),
        "seconds": {"unwrap": time.perf_counter() - start},
    }
    return UVAtlas(np.asarray(vertices, np.float32), faces_uv, uvs, vmapping, texture_size, stats)


def bake_and_export(
    vertices: np.ndarray,
    faces: np.ndarray,
    color_fn: ColorFn,
    out_dir: str | Path,
    texture_size: int = 1024,
    target_faces: int = 20000,
    padding: int = 2,
    min_component_fraction: float = 0.02,
    name: str = "asset",
    write_obj: bool = True,
    atlas: UVAtlas | None = None,
) -> dict:
    """The whole export for the server: clean, decimate, unwrap (or take `atlas`, prepared from
    this mesh before), bake, write GLB (+ OBJ/MTL/PNG).

    Returns {"glb": Path, "obj"/"mtl"/"png": Path (if write_obj), "stats": {...}} where stats holds
    the face/vertex counts after each stage, texture coverage and per-stage seconds.
    """
    out_dir = Path(out_dir)
    if atlas is None:
        atlas = prepare_atlas(vertices, faces, texture_size, target_faces, padding, min_component_fraction)
    stats = {**atlas.stats, "seconds": dict(atlas.stats["seconds"])}
    seconds = stats["seconds"]
    vertices, faces_uv, uvs, vmapping = atlas.vertices, atlas.faces_uv, atlas.uvs, atlas.vmapping

    start = time.perf_counter()
    texture, covered = atlas.bake(color_fn)
    seconds["bake"] = time.perf_counter() - start
    stats["texture_size"] = atlas.texture_size
    stats["coverage"] = float(covered.mean())

    start = time.perf_counter()
    result: dict = {"glb": export_glb(out_dir / f"{name}.glb", vertices, faces_uv, uvs, vmapping, texture)}
    seconds["glb"] = time.perf_counter() - start
    if write_obj:
        start = time.perf_counter()
        result.update(export_obj(out_dir, vertices, faces_uv, uvs, vmapping, texture, name))
        seconds["obj"] = time.perf_counter() - start
    result["stats"] = stats
    return result
