"""Read the server's binary glTF (GLB) into numpy arrays, with no Blender calls.

Format logic stays apart from `bpy` (as Blender's own glTF add-on does) so it can be tested in plain
pytest. Only what the server writes is supported: triangle primitives with POSITION, optional
TEXCOORD_0 / COLOR_0, and a base-colour texture stored as an embedded PNG or JPEG. glTF is +Y up with
UV row 0 at the top; the result is in Blender's frame (+Z up, UV origin bottom-left).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

GLB_MAGIC = b"glTF"
CHUNK_JSON = 0x4E4F534A
CHUNK_BIN = 0x004E4942
COMPONENT_DTYPES = {5120: "<i1", 5121: "<u1", 5122: "<i2", 5123: "<u2", 5125: "<u4", 5126: "<f4"}
TYPE_SIZES = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
# glTF (+Y up, -Z forward) to Blender (+Z up): (x, y, z) -> (x, -z, y).
Y_UP_TO_Z_UP = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


class GlbError(ValueError):
    """The file is not a GLB this reader understands; the message says what was wrong."""


@dataclass
class GlbMesh:
    positions: np.ndarray  # [N, 3] float32, Blender frame, welded
    faces: np.ndarray  # [F, 3] int32 into positions
    corner_uvs: np.ndarray | None  # [F, 3, 2] float32, origin bottom-left (UV seams live here)
    colors: np.ndarray | None  # [N, 4] float32 in [0, 1]
    texture: bytes | None  # the base-colour image file (PNG or JPEG bytes)
    texture_mime: str | None


def read_glb(data: bytes) -> GlbMesh:
    """All triangle primitives of the default scene, in world space, merged into one welded mesh.

    glTF splits vertices along UV seams; Blender keeps UVs per face corner, so vertices at the same
    position are welded again (as Blender's importer does) and smooth shading shows no seams.
    """
    gltf, binary = _split_chunks(data)
    scene = gltf.get("scenes", [{}])[gltf.get("scene", 0)]
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
    material_ids: list[int] = []
    stack = [(index, np.eye(4)) for index in scene.get("nodes", [])]
    while stack:
        index, parent = stack.pop()
        node = gltf["nodes"][index]
        world = parent @ _node_matrix(node)
        stack.extend((child, world) for child in node.get("children", []))
        if "mesh" not in node:
            continue
        for primitive in gltf["meshes"][node["mesh"]]["primitives"]:
            if primitive.get("mode", 4) != 4:
                raise GlbError(
                    f"primitive mode {primitive['mode']} is not supported (only triangles, mode 4)"
                )
            parts.append(_read_primitive(gltf, binary, primitive, Y_UP_TO_Z_UP @ world))
            if "material" in primitive:
                material_ids.append(primitive["material"])
    if not parts:
        raise GlbError("the GLB holds no mesh")
    offsets = np.cumsum([0] + [len(p[0]) for p in parts[:-1]])
    positions = np.concatenate([p[0] for p in parts]).astype(np.float32)
    faces = np.concatenate([p[1] + off for p, off in zip(parts, offsets, strict=True)])
    uvs = np.concatenate([p[2] for p in parts]) if all(p[2] is not None for p in parts) else None
    colors = np.concatenate([p[3] for p in parts]) if all(p[3] is not None for p in parts) else None
    texture, mime = _base_color_image(gltf, binary, material_ids[0]) if material_ids else (None, None)
    welded, first, inverse = np.unique(positions, axis=0, return_index=True, return_inverse=True)
    return GlbMesh(
        positions=welded,
        faces=inverse.reshape(-1)[faces].astype(np.int32),
        corner_uvs=None if uvs is None else uvs[faces].astype(np.float32),
        colors=None if colors is None else colors[first],
        texture=texture,
        texture_mime=mime,
    )


def _split_chunks(data: bytes) -> tuple[dict, bytes]:
    if len(data) < 20 or data[:4] != GLB_MAGIC:
        raise GlbError("not a GLB file (missing 'glTF' magic)")
    _, version, length = struct.unpack_from("<4sII", data, 0)
    if version != 2:
        raise GlbError(f"GLB version {version} is not supported (only 2)")
    if length > len(data):
        raise GlbError(f"GLB truncated: header says {length} bytes, file has {len(data)}")
    json_length, json_type = struct.unpack_from("<II", data, 12)
    if json_type != CHUNK_JSON:
        raise GlbError("the first GLB chunk is not JSON")
    gltf = json.loads(data[20 : 20 + json_length])
    binary = b""
    offset = 20 + json_length
    if offset + 8 <= length:
        bin_length, bin_type = struct.unpack_from("<II", data, offset)
        if bin_type == CHUNK_BIN:
            binary = data[offset + 8 : offset + 8 + bin_length]
    return gltf, binary


def _node_matrix(node: dict) -> np.ndarray:
    if "matrix" in node:
        return np.asarray(node["matrix"], dtype=np.float64).reshape(4, 4).T  # glTF stores column-major
    x, y, z, w = node.get("rotation", (0.0, 0.0, 0.0, 1.0))
    rotation = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.asarray(node.get("scale", (1.0, 1.0, 1.0)))
    matrix[:3, 3] = node.get("translation", (0.0, 0.0, 0.0))
    return matrix


def _accessor(gltf: dict, binary: bytes, index: int) -> np.ndarray:
    accessor = gltf["accessors"][index]
    dtype = np.dtype(COMPONENT_DTYPES[accessor["componentType"]])
    width = TYPE_SIZES[accessor["type"]]
    count = accessor["count"]
    view = gltf["bufferViews"][accessor["bufferView"]]
    start = view.get("byteOffset", 0) + accessor.get("byteOffset", 0)
    stride = view.get("byteStride", dtype.itemsize * width)
    if start + stride * (count - 1) + dtype.itemsize * width > len(binary):
        raise GlbError(f"accessor {index} reads past the end of the binary chunk")
    rows = np.ndarray(
        (count, width), dtype=dtype, buffer=binary, offset=start, strides=(stride, dtype.itemsize)
    )
    values = rows.astype(np.float64 if dtype.kind == "f" else np.int64)
    if accessor.get("normalized"):
        values = values / np.iinfo(dtype).max
    return values


def _read_primitive(
    gltf: dict, binary: bytes, primitive: dict, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    attributes = primitive["attributes"]
    positions = _accessor(gltf, binary, attributes["POSITION"])
    positions = positions @ matrix[:3, :3].T + matrix[:3, 3]
    if "indices" in primitive:
        faces = _accessor(gltf, binary, primitive["indices"]).reshape(-1, 3)
    else:
        faces = np.arange(len(positions)).reshape(-1, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= len(positions)):
        raise GlbError("a face index points past the vertex array")
    if np.linalg.det(matrix[:3, :3]) < 0:  # a mirroring transform flips the winding
        faces = faces[:, ::-1]
    uvs = None
    if "TEXCOORD_0" in attributes:
        uvs = _accessor(gltf, binary, attributes["TEXCOORD_0"]).astype(np.float32)
        uvs[:, 1] = 1.0 - uvs[:, 1]
    colors = None
    if "COLOR_0" in attributes:
        color = _accessor(gltf, binary, attributes["COLOR_0"])
        colors = np.ones((len(color), 4), dtype=np.float32)
        colors[:, : color.shape[1]] = color
    return positions, faces, uvs, colors


def _base_color_image(gltf: dict, binary: bytes, material_index: int) -> tuple[bytes | None, str | None]:
    material = gltf.get("materials", [])[material_index]
    texture_ref = material.get("pbrMetallicRoughness", {}).get("baseColorTexture")
    if texture_ref is None:
        return None, None
    image = gltf["images"][gltf["textures"][texture_ref["index"]]["source"]]
    if "bufferView" not in image:
        raise GlbError("the base-colour image is not embedded in the GLB")
    view = gltf["bufferViews"][image["bufferView"]]
    start = view.get("byteOffset", 0)
    return bytes(binary[start : start + view["byteLength"]]), image.get("mimeType", "image/png")
