"""Textured export: clean -> decimate -> unwrap -> bake -> GLB / OBJ, checked by reloading the files
with trimesh and by importing them with Blender's own glTF and OBJ importers (bpy 5.0.1)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from server.pipeline import export

CENTER = np.array([0.1, -0.05, 0.05])
SEMI_AXES = np.array([0.5, 0.7, 0.9])  # Z extent 1.8 differs from Y extent 1.4: a tipped object shows
LO, HI = CENTER - SEMI_AXES, CENTER + SEMI_AXES
TEXTURE = 256


def color_fn(points: np.ndarray) -> np.ndarray:
    """Smooth and never black: (R, G, B) grow with (x, y, z) across the ellipsoid, in [0.15, 0.85]."""
    return np.clip(0.15 + 0.7 * (points - LO) / (HI - LO), 0.15, 0.85).astype(np.float32)


def ellipsoid(subdivisions: int = 3) -> tuple[np.ndarray, np.ndarray]:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    return sphere.vertices * SEMI_AXES + CENTER, sphere.faces


def with_fragment(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add a floating speck (0.6 % of the ellipsoid's area) like the ones DMTet leaves behind."""
    speck = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    return (
        np.concatenate([vertices, speck.vertices + np.array([0.8, 0.8, -0.85])]),
        np.concatenate([faces, speck.faces + len(vertices)]),
    )


def sample(image: np.ndarray, uv: np.ndarray, bilinear: bool = False) -> np.ndarray:
    """Look up an [H,W,3] uint8 image (row 0 = top) at v-up UVs; returns floats in [0, 1]."""
    h, w = image.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = (1.0 - uv[:, 1]) * h - 0.5
    if not bilinear:
        rows, cols = np.clip(np.round(y), 0, h - 1).astype(int), np.clip(np.round(x), 0, w - 1).astype(int)
        return image[rows, cols] / 255
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def texel(row: np.ndarray, col: np.ndarray) -> np.ndarray:
        return image[np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)].astype(np.float64)

    top = texel(y0, x0) * (1 - fx) + texel(y0, x0 + 1) * fx
    bottom = texel(y0 + 1, x0) * (1 - fx) + texel(y0 + 1, x0 + 1) * fx
    return (top * (1 - fy) + bottom * fy) / 255


def chart_image(faces_uv: np.ndarray, face_id: np.ndarray) -> np.ndarray:
    """Per texel: the UV chart (faces connected through shared UV edges) covering it, -1 if none."""
    labels = trimesh.graph.connected_component_labels(
        trimesh.graph.face_adjacency(faces_uv), node_count=len(faces_uv)
    )
    return np.where(face_id >= 0, labels[np.maximum(face_id, 0)], -1)


@pytest.fixture(scope="module")
def asset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    vertices, faces = with_fragment(*ellipsoid())
    out = tmp_path_factory.mktemp("asset")
    result = export.bake_and_export(
        vertices, faces, color_fn, out, texture_size=TEXTURE, target_faces=100_000, name="ellipsoid"
    )
    Image.open(result["png"]).save("/tmp/test_export_texture.png")
    return result


def test_clean_mesh_welds_and_drops_fragments_and_degenerate_faces() -> None:
    vertices, faces = ellipsoid()
    soup = vertices[faces].reshape(-1, 3)  # every face with its own three vertices
    twin = 3 + int(np.flatnonzero((soup[3:] == soup[0]).all(axis=1))[0])  # a copy of vertex 0 in another face
    soup = np.concatenate([soup, [(soup[0] + soup[1]) / 2]])  # for a zero-area face of distinct vertices
    degenerate = [[0, 0, 1], [0, twin, 1], [0, 1, len(soup) - 1]]
    soup_faces = np.concatenate([np.arange(len(faces) * 3).reshape(-1, 3), degenerate])
    mixed_v, mixed_f = with_fragment(soup, soup_faces)

    clean_v, clean_f = export.clean_mesh(mixed_v, mixed_f, min_component_fraction=0.02)
    assert len(clean_v) == len(vertices) and len(clean_f) == len(faces)
    assert np.allclose(clean_v.min(0), vertices.min(0), atol=1e-6)
    assert np.allclose(clean_v.max(0), vertices.max(0), atol=1e-6)  # the speck at (0.8, 0.8, -0.85) is gone
    assert trimesh.Trimesh(clean_v, clean_f, process=False).is_watertight

    _, kept_f = export.clean_mesh(mixed_v, mixed_f, min_component_fraction=0.0)
    assert len(kept_f) == len(faces) + 80  # the threshold, not the welding, is what removed the speck


def test_decimate_reaches_target_and_keeps_shape() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=5)  # 20480 faces
    vertices, faces = export.decimate(sphere.vertices, sphere.faces, target_faces=4000)
    assert abs(len(faces) - 4000) <= 0.05 * 4000
    radius = np.linalg.norm(vertices, axis=1)
    assert radius.min() > 0.97 and radius.max() < 1.01
    assert faces.max() < len(vertices)
    _, small_f = export.decimate(sphere.vertices, sphere.faces, target_faces=50_000)
    assert len(small_f) == len(sphere.faces)


def test_rasterize_uv_barycentrics_reproduce_texel_centres() -> None:
    uvs = np.array([[0.1, 0.1], [0.9, 0.2], [0.3, 0.8], [0.95, 0.95]])
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    size = 64
    face_id, bary = export.rasterize_uv(uvs, faces, size)
    rows, cols = np.nonzero(face_id >= 0)
    centre = np.stack([(cols + 0.5) / size, 1.0 - (rows + 0.5) / size], axis=1)  # row 0 = top, v up
    rebuilt = np.einsum("mk,mkd->md", bary[rows, cols], uvs[faces[face_id[rows, cols]]])
    np.testing.assert_allclose(rebuilt, centre, atol=1e-12)
    assert (bary[rows, cols] >= -1e-9).all()
    area = 0.5 * (0.8 * 0.7 - 0.1 * 0.2) + 0.5 * abs(0.05 * 0.6 - 0.75 * (-0.6))  # shoelace per triangle
    assert abs(len(rows) / size**2 - area) < 0.02  # texel centres inside ~ area
    # uv (0.15, 0.15) near vertex 0 lies in face 0; its mirror image (0.15, 0.85) lies in no face
    assert face_id[54, 9] == 0 and face_id[9, 9] == -1 and face_id[16, 51] == 1


@pytest.mark.parametrize("padding", [2, 4])
def test_unwrap_fills_one_atlas_and_keeps_charts_apart(padding: int) -> None:
    rng = np.random.default_rng(0)
    vertices, faces = ellipsoid(subdivisions=4)
    vertices = vertices * (1 + 0.03 * rng.standard_normal((len(vertices), 1)))  # bumpy: many charts
    vmapping, faces_uv, uvs = export.unwrap(vertices, faces, resolution=TEXTURE, padding=padding)
    assert len(faces_uv) == len(faces) and vmapping.max() < len(vertices)
    np.testing.assert_array_equal(np.sort(vmapping[faces_uv], axis=1), np.sort(faces, axis=1))
    assert uvs.min() >= 0 and 0.9 < uvs.max() <= 1  # the layout spans the square it was packed into

    face_id, _ = export.rasterize_uv(uvs, faces_uv, TEXTURE)
    chart = chart_image(faces_uv, face_id)
    assert chart.max() > 20
    reach = 2 * padding  # texels of two charts are > 2 * padding apart at this resolution (Chebyshev)
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            a = chart[max(dy, 0) : TEXTURE + min(dy, 0), max(dx, 0) : TEXTURE + min(dx, 0)]
            b = chart[max(-dy, 0) : TEXTURE + min(-dy, 0), max(-dx, 0) : TEXTURE + min(-dx, 0)]
            assert not ((a >= 0) & (b >= 0) & (a != b)).any(), (dy, dx)


def test_bake_bilinear_reads_own_chart_everywhere() -> None:
    rng = np.random.default_rng(1)
    vertices, faces = ellipsoid(subdivisions=4)
    vertices = vertices * (1 + 0.03 * rng.standard_normal((len(vertices), 1)))
    size = 512  # ~20 texels per triangle, like 15-20k faces at 1024 (fewer, and charts get too thin)
    vmapping, faces_uv, uvs = export.unwrap(vertices, faces, resolution=size, padding=2)
    texture, covered = export.bake(vertices, faces_uv, uvs, vmapping, color_fn, size)
    assert texture.shape == (size, size, 3) and texture.dtype == np.uint8
    assert 0.2 < covered.mean() < 0.9
    assert texture.min() >= np.floor(0.15 * 255) - 1  # every texel filled: nothing left black

    # Random surface points, half of them within 2 % of a triangle edge (where charts end).
    face = rng.integers(0, len(faces_uv), 20000)
    bary = rng.dirichlet([1, 1, 1], len(face))
    edge = rng.random(len(face)) < 0.5
    bary[edge, rng.integers(0, 3, edge.sum())] = 0.02 * rng.random(edge.sum())
    bary /= bary.sum(1, keepdims=True)
    uv = np.einsum("mk,mkd->md", bary, uvs[faces_uv[face]])
    points = np.einsum("mk,mkd->md", bary, vertices[vmapping[faces_uv[face]]])
    error = np.abs(sample(texture, uv, bilinear=True) - color_fn(points))
    assert error.max() < 0.06 and error.mean() < 0.005


def glb_json(path: Path) -> dict:
    data = path.read_bytes()
    length, kind = struct.unpack_from("<I4s", data, 12)
    assert kind == b"JSON"
    return json.loads(data[20 : 20 + length])


def test_glb_reloads_with_texture_uvs_and_upright_axes(asset: dict) -> None:
    path = asset["glb"]
    gltf = glb_json(path)
    attributes = gltf["meshes"][0]["primitives"][0]["attributes"]
    assert {"POSITION", "NORMAL", "TEXCOORD_0"} <= attributes.keys()
    assert gltf["materials"][0]["pbrMetallicRoughness"]["metallicFactor"] == 0.0

    scene = trimesh.load(path, process=False)
    assert len(scene.geometry) == 1
    mesh = next(iter(scene.geometry.values()))  # (force="mesh" would drop the file's normals)
    material = mesh.visual.material
    assert material.baseColorTexture.size == (TEXTURE, TEXTURE)
    assert material.metallicFactor == 0.0 and material.roughnessFactor == pytest.approx(0.9)
    world = mesh.vertices @ export.Z_UP_TO_Y_UP  # file (Y up) -> our world (Z up)
    np.testing.assert_allclose(mesh.vertices.min(0), [LO[0], LO[2], -HI[1]], atol=1e-5)  # Y up in the file
    np.testing.assert_allclose(world.min(0), LO, atol=1e-5)
    np.testing.assert_allclose(world.max(0), HI, atol=1e-5)  # the speck is gone, the ellipsoid upright

    texture = np.asarray(material.baseColorTexture.convert("RGB"))
    error = np.abs(sample(texture, mesh.visual.uv) - color_fn(world))
    assert error.max() < 0.06  # fails with a vertically flipped image: UV v up vs row 0 = top

    key = np.round(mesh.vertices, 5)  # split copies of one vertex along UV seams share its normal
    _, group = np.unique(key, axis=0, return_inverse=True)
    group = group.ravel()
    spread = np.abs(mesh.vertex_normals - mesh.vertex_normals[np.unique(group, return_index=True)[1]][group])
    assert len(np.unique(group)) < len(mesh.vertices) and spread.max() < 1e-6
    center_in_file = CENTER @ export.Z_UP_TO_Y_UP.T
    assert np.einsum("ij,ij->i", mesh.vertex_normals, mesh.vertices - center_in_file).min() > 0  # outward


def test_obj_mtl_png_reload(asset: dict) -> None:
    mtl = asset["mtl"].read_text()
    assert "Kd 1 1 1" in mtl and "Ks 0 0 0" in mtl and f"map_Kd {asset['png'].name}" in mtl
    assert f"mtllib {asset['mtl'].name}" in asset["obj"].read_text()
    assert Image.open(asset["png"]).size == (TEXTURE, TEXTURE)
    assert not [p for p in asset["obj"].parent.iterdir() if p.name.endswith(".tmp")]

    mesh = trimesh.load(asset["obj"], force="mesh", process=False)
    world = mesh.vertices @ export.Z_UP_TO_Y_UP
    np.testing.assert_allclose(world.min(0), LO, atol=1e-5)
    np.testing.assert_allclose(world.max(0), HI, atol=1e-5)
    texture = np.asarray(mesh.visual.material.image.convert("RGB"))
    assert np.abs(sample(texture, mesh.visual.uv) - color_fn(world)).max() < 0.06


def test_bake_and_export_reports_stages(asset: dict) -> None:
    stats = asset["stats"]
    assert stats["faces_in"] == 1280 + 80 and stats["faces_clean"] == 1280 and stats["faces"] == 1280
    assert set(stats["seconds"]) == {"clean", "decimate", "unwrap", "bake", "glb", "obj"}
    assert all(s >= 0 for s in stats["seconds"].values())
    assert 0.2 < stats["coverage"] < 0.9


def test_failed_write_leaves_previous_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vertices, faces = ellipsoid(subdivisions=1)
    vmapping, faces_uv, uvs = export.unwrap(vertices, faces, resolution=64, padding=2)
    texture, _ = export.bake(vertices, faces_uv, uvs, vmapping, color_fn, 64)
    path = tmp_path / "a.glb"
    path.write_bytes(b"previous asset")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(export.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        export.export_glb(path, vertices, faces_uv, uvs, vmapping, texture)
    assert path.read_bytes() == b"previous asset"
    assert [p.name for p in tmp_path.iterdir()] == ["a.glb"]  # no temporary file left behind
    monkeypatch.undo()
    export.export_glb(path, vertices, faces_uv, uvs, vmapping, texture)
    assert path.read_bytes()[:4] == b"glTF"


BLENDER_SCRIPT = """
import json, sys
import bpy
import numpy as np
from mathutils import Vector

def inspect(importer, path):
    bpy.ops.wm.read_factory_settings(use_empty=True)
    importer(filepath=path)
    meshes = [o for o in bpy.data.objects if o.type == "MESH"]
    obj = meshes[0]
    bsdf = next(n for n in obj.active_material.node_tree.nodes if n.type == "BSDF_PRINCIPLED")
    links = bsdf.inputs["Base Color"].links
    image = links[0].from_node.image if links and links[0].from_node.type == "TEX_IMAGE" else None
    corners = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
    mesh = obj.data
    world = np.array([obj.matrix_world @ v.co for v in mesh.vertices])
    loop_vertex = np.zeros(len(mesh.loops), np.int64)
    mesh.loops.foreach_get("vertex_index", loop_vertex)
    uv = np.zeros(2 * len(mesh.loops), np.float32)
    mesh.uv_layers.active.data.foreach_get("uv", uv)
    pixels = np.zeros(image.size[0] * image.size[1] * 4, np.float32) if image else None
    if image:
        image.pixels.foreach_get(pixels)
    return {
        "mesh_objects": len(meshes),
        "object_name": obj.name,
        "image_size": list(image.size) if image else None,
        "metallic": bsdf.inputs["Metallic"].default_value,
        "roughness": bsdf.inputs["Roughness"].default_value,
        "bbox_min": [min(c[i] for c in corners) for i in range(3)],
        "bbox_max": [max(c[i] for c in corners) for i in range(3)],
        "loop_points": world[loop_vertex].tolist(),
        "loop_uvs": uv.reshape(-1, 2).tolist(),
        "pixels_bottom_up": pixels.tolist() if image else None,
    }

glb, obj, out = sys.argv[1:4]
result = {"glb": inspect(bpy.ops.import_scene.gltf, glb), "obj": inspect(bpy.ops.wm.obj_import, obj)}
with open(out, "w") as handle:
    json.dump(result, handle)
"""


@pytest.fixture(scope="module")
def blender_import(asset: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Import both files with Blender's own importers in a bpy 5.0.1 subprocess (isolated user folders)."""
    tmp = tmp_path_factory.mktemp("blender")
    env = dict(os.environ, BLENDER_USER_RESOURCES=str(tmp / "user"), OMP_WAIT_POLICY="PASSIVE")
    out = tmp / "result.json"
    command = [sys.executable, "-c", BLENDER_SCRIPT, str(asset["glb"]), str(asset["obj"]), str(out)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("kind", ["glb", "obj"])
def test_blender_importer_gives_upright_textured_object(blender_import: dict, kind: str) -> None:
    result = blender_import[kind]
    assert result["mesh_objects"] == 1 and result["object_name"] == "ellipsoid"
    assert result["image_size"] == [TEXTURE, TEXTURE]
    assert result["metallic"] == 0.0 and result["roughness"] == pytest.approx(0.9, abs=1e-3)
    np.testing.assert_allclose(result["bbox_min"], LO, atol=1e-4)  # Z extent 1.8 on Z: standing, not lying
    np.testing.assert_allclose(result["bbox_max"], HI, atol=1e-4)

    # What Blender shows: its image (row 0 = bottom) at its UVs equals the colour field at the vertex.
    image = np.array(result["pixels_bottom_up"]).reshape(TEXTURE, TEXTURE, 4)[::-1, :, :3]
    seen = sample(np.round(image * 255).astype(np.uint8), np.array(result["loop_uvs"]))
    assert np.abs(seen - color_fn(np.array(result["loop_points"]))).max() < 0.06
