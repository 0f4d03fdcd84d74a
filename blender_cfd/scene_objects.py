"""Everything the extension creates in the scene: streaming preview, final variants, orbit rigs.

Only main-thread code calls these. Datablocks are passed in by the caller, which resolves them by
name every time (undo and file loads reallocate them). Bulk data goes through `foreach_set` on the
attribute API with float32 / int32 arrays: in place that is well under a millisecond for 50k
vertices, where `from_pydata` takes hundreds.
"""

from __future__ import annotations

import math
from pathlib import Path

import bpy
import numpy as np
from mathutils import Vector

from . import camera_rig
from .glb import GlbMesh

VARIANTS_COLLECTION = "CFD Variants"
# Object types with a surface that could hide a new result (cameras, lights and empties cannot).
GEOMETRY_TYPES = frozenset({"MESH", "CURVE", "SURFACE", "META", "FONT", "VOLUME", "POINTCLOUD", "CURVES"})
FRAME_DISTANCE = 6.0  # view distance per unit of a framed result's half size: it and its neighbours in sight
PREVIEW_COLOR_ATTRIBUTE = "cfd_preview_color"
NAME_LIMIT = 63  # bytes in a Blender ID name
GENERATION_EXTENT = 1.0  # the server's results live in [-1, 1]^3: a streamed preview is scaled from it
RAY_LIFT = 1e-3  # scene units: a ray starts this far above its point, so a cursor on a surface finds it
RAY_HITS = 32  # a ray passes at most this many hidden, rig or inside-out hits before it gives up


def variant_name(prompt: str, seed: int) -> str:
    """'<prompt> (seed N)', shortening the prompt so the whole name fits in a Blender ID name."""
    suffix = f" (seed {seed})"
    text = " ".join(prompt.split()) or "untitled"
    budget = NAME_LIMIT - len(suffix.encode())
    if len(text.encode()) > budget:
        while len(text.encode()) > budget - len("…".encode()):
            text = text[:-1]
        text = text.rstrip() + "…"
    return text + suffix


def variants_collection(scene: bpy.types.Scene) -> bpy.types.Collection:
    collection = bpy.data.collections.get(VARIANTS_COLLECTION)
    if collection is None:
        collection = bpy.data.collections.new(VARIANTS_COLLECTION)
    if scene.collection.children.get(collection.name) is None:
        scene.collection.children.link(collection)
    return collection


def fill_mesh(mesh: bpy.types.Mesh, positions: np.ndarray, faces: np.ndarray) -> None:
    """Replace the mesh's geometry in place (same datablock: object, materials and modifiers stay)."""
    faces = np.ascontiguousarray(faces, dtype=np.int32)
    mesh.clear_geometry()
    mesh.vertices.add(len(positions))
    mesh.loops.add(faces.size)
    mesh.polygons.add(len(faces))
    mesh.attributes["position"].data.foreach_set(
        "vector", np.ascontiguousarray(positions, np.float32).ravel()
    )
    mesh.attributes[".corner_vert"].data.foreach_set("value", faces.ravel())
    mesh.polygons.foreach_set("loop_start", np.arange(0, faces.size, 3, dtype=np.int32))
    mesh.update()


def move_vertices(mesh: bpy.types.Mesh, positions: np.ndarray) -> None:
    """New positions for the same topology: the fast path of streaming."""
    mesh.attributes["position"].data.foreach_set(
        "vector", np.ascontiguousarray(positions, np.float32).ravel()
    )
    mesh.update()


def _srgb_to_linear_table() -> np.ndarray:
    c = np.arange(256, dtype=np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


SRGB_TO_LINEAR = _srgb_to_linear_table()


def set_vertex_colors(mesh: bpy.types.Mesh, colors: np.ndarray) -> None:
    """Per-vertex sRGB colours ([N, 3] uint8) into the preview colour attribute.

    A float attribute written through a lookup table: 50k colours take under a millisecond, where
    a byte attribute's `color_srgb` goes through Blender's per-item path (about 10 ms).
    """
    attribute = mesh.color_attributes.get(PREVIEW_COLOR_ATTRIBUTE)
    if attribute is None:
        attribute = mesh.color_attributes.new(PREVIEW_COLOR_ATTRIBUTE, "FLOAT_COLOR", "POINT")
        mesh.color_attributes.active_color = attribute
    rgba = np.ones((len(colors), 4), dtype=np.float32)
    rgba[:, :3] = SRGB_TO_LINEAR[colors[:, :3]]
    attribute.data.foreach_set("color", rgba.ravel())


def apply_preview(
    mesh: bpy.types.Mesh,
    positions: np.ndarray,
    faces: np.ndarray,
    colors: np.ndarray | None,
    same_topology: bool,
) -> None:
    """Show one streamed mesh; `same_topology` (the caller compared face arrays) keeps the fast path."""
    if same_topology and len(mesh.vertices) == len(positions) and len(mesh.polygons) == len(faces):
        move_vertices(mesh, positions)
    else:
        fill_mesh(mesh, positions, faces)
    if colors is not None:
        set_vertex_colors(mesh, colors)


def _principled(material: bpy.types.Material) -> tuple[bpy.types.NodeTree, bpy.types.Node]:
    if not material.use_nodes:  # off by default in 4.x, always on (and deprecated) in 5.x
        material.use_nodes = True
    tree = material.node_tree
    bsdf = next((n for n in tree.nodes if n.bl_idname == "ShaderNodeBsdfPrincipled"), None)
    if bsdf is None:
        bsdf = tree.nodes.new("ShaderNodeBsdfPrincipled")
        output = next(n for n in tree.nodes if n.bl_idname == "ShaderNodeOutputMaterial")
        tree.links.new(bsdf.outputs["BSDF"], output.inputs["Surface"])
    return tree, bsdf


def preview_material() -> bpy.types.Material:
    """Shared material that shows the streamed vertex colours (Material Preview / Rendered)."""
    name = "CFD Preview"
    material = bpy.data.materials.get(name)
    if material is None:
        material = bpy.data.materials.new(name)
        tree, bsdf = _principled(material)
        color = tree.nodes.new("ShaderNodeVertexColor")
        color.layer_name = PREVIEW_COLOR_ATTRIBUTE
        color.location = (bsdf.location.x - 300, bsdf.location.y)
        tree.links.new(color.outputs["Color"], bsdf.inputs["Base Color"])
        bsdf.inputs["Roughness"].default_value = 0.8
    return material


def create_preview_object(
    scene: bpy.types.Scene, name: str, location: tuple[float, float, float], size: float
) -> bpy.types.Object:
    """An empty mesh object in the variants collection that the stream fills in place: the server's
    [-1, 1]^3 scaled to the result's size, standing on `location` (the result's bottom centre)."""
    mesh = bpy.data.meshes.new(name)
    mesh.materials.append(preview_material())
    obj = bpy.data.objects.new(name, mesh)
    half = size / (2 * GENERATION_EXTENT)
    obj.location = Vector(location) + Vector((0.0, 0.0, GENERATION_EXTENT * half))
    obj.scale = (half, half, half)
    variants_collection(scene).objects.link(obj)
    return obj


def resting_positions(positions: np.ndarray, size: float) -> np.ndarray:
    """The mesh scaled so its largest dimension is `size`, with its origin at the bottom centre of its
    bounds: placed at a point of a surface, it stands on it at real size."""
    low, high = positions.min(axis=0).astype(np.float64), positions.max(axis=0).astype(np.float64)
    largest = float((high - low).max())
    if largest <= 0.0:
        raise ValueError("the result has no extent to scale")
    bottom_centre = np.array([(low[0] + high[0]) / 2, (low[1] + high[1]) / 2, low[2]])
    return ((positions - bottom_centre) * (size / largest)).astype(np.float32)


def surface_below(
    context: bpy.types.Context, point, ignore: frozenset[str] = frozenset()
) -> tuple[float, str | None]:
    """The height of the first upward-facing surface of a visible mesh straight below `point`, and
    that mesh's name; the ground plane (z = 0, no object) where there is none. A ray that starts inside
    a mesh meets its underside from within first: no surface to stand on, so the ray goes on."""
    depsgraph = context.evaluated_depsgraph_get()
    origin = Vector(point) + Vector((0.0, 0.0, RAY_LIFT))
    down = Vector((0.0, 0.0, -1.0))
    for _ in range(RAY_HITS):
        hit, location, normal, _index, obj, _matrix = context.scene.ray_cast(depsgraph, origin, down)
        if not hit:
            break
        original = obj.original if obj is not None else None
        if (
            normal.z > 0.0
            and original is not None
            and original.type == "MESH"
            and original.visible_get()
            and not original.cfd_rig.is_rig
            and original.name not in ignore
        ):
            return float(location.z), original.name
        origin = location + down * RAY_LIFT
    return 0.0, None


def remove_object(obj: bpy.types.Object) -> None:
    mesh = obj.data
    bpy.data.objects.remove(obj)
    if isinstance(mesh, bpy.types.Mesh) and mesh.users == 0:
        bpy.data.meshes.remove(mesh)


def show_image(name: str, path: Path) -> bpy.types.Image:
    """Load or reload an image datablock from a file that the stream overwrites."""
    image = bpy.data.images.get(name)
    if image is None or Path(bpy.path.abspath(image.filepath)) != path:
        if image is not None:
            bpy.data.images.remove(image)
        image = bpy.data.images.load(str(path), check_existing=False)
        image.name = name
    else:
        image.reload()
    return image


def packed_image(name: str, data: bytes, extension: str) -> bpy.types.Image:
    """An image packed into the .blend straight from the file's bytes (the GLB's embedded texture).

    Packing the original PNG keeps the file small and lossless, needs no temporary file, and the
    .blend stays complete when moved; the size comes from the packed file itself.
    """
    image = bpy.data.images.new(name, 1, 1)
    image.source = "FILE"
    image.filepath_raw = f"//textures/{bpy.path.clean_name(name)}{extension}"  # where Unpack would write
    image.pack(data=data, data_len=len(data))
    return image


def textured_material(name: str, image: bpy.types.Image) -> bpy.types.Material:
    """Principled BSDF whose base colour is the image, through the mesh's UV map."""
    material = bpy.data.materials.new(name)
    tree, bsdf = _principled(material)
    node = tree.nodes.new("ShaderNodeTexImage")
    node.image = image
    node.location = (bsdf.location.x - 320, bsdf.location.y)
    tree.links.new(node.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.8
    return material


def finish_variant(
    obj: bpy.types.Object,
    asset: GlbMesh,
    name: str,
    properties: dict,
    location=None,
    size: float | None = None,
    kept: tuple[np.ndarray, np.ndarray] | None = None,
) -> bpy.types.Object:
    """Turn the streaming object into the final asset: UV-textured mesh, material, name, properties.

    A generated result is `size` across its largest dimension, its origin (the bottom centre) at
    `location`. A texture job's copy keeps the transform it streamed at, and `kept`, the sent
    (vertices, triangles): when the asset's triangles are those, the mesh is built from them, welded
    as the original is, with the asset's UVs."""
    mesh = obj.data
    uvs = welded_uvs(asset, *kept) if kept is not None else None
    if uvs is not None:
        fill_mesh(mesh, kept[0], kept[1])
    elif kept is not None:
        fill_mesh(mesh, asset.positions, asset.faces)
        uvs = asset.corner_uvs
    else:
        fill_mesh(mesh, resting_positions(asset.positions, size), asset.faces)
        obj.location = location
        obj.rotation_euler = (0.0, 0.0, 0.0)
        obj.scale = (1.0, 1.0, 1.0)
        uvs = asset.corner_uvs
    if uvs is not None:
        layer = mesh.uv_layers.new(name="UVMap")
        layer.data.foreach_set("uv", np.ascontiguousarray(uvs, np.float32).ravel())
    if asset.colors is not None and len(asset.colors) == len(mesh.vertices):
        attribute = mesh.color_attributes.new("Color", "FLOAT_COLOR", "POINT")
        attribute.data.foreach_set("color", np.ascontiguousarray(asset.colors, np.float32).ravel())
    mesh.polygons.foreach_set("use_smooth", np.ones(len(asset.faces), dtype=bool))
    mesh.materials.clear()
    if asset.texture is not None:
        extension = ".jpg" if asset.texture_mime == "image/jpeg" else ".png"
        image = packed_image(name, asset.texture, extension)
        material = textured_material(name, image)
        if uvs is not None:  # Solid view's colours: the material's and the object's
            material.diffuse_color = obj.color = mean_surface_colour(image, uvs)
        mesh.materials.append(material)
    obj.name = name
    mesh.name = name
    for key, value in properties.items():
        obj[key] = value
    return obj


def world_bounds(obj: bpy.types.Object) -> tuple[np.ndarray, np.ndarray]:
    """The object's bounding box in world space (lowest and highest corner)."""
    corners = np.array([obj.matrix_world @ Vector(corner) for corner in obj.bound_box], dtype=np.float64)
    return corners.min(axis=0), corners.max(axis=0)


def frame_in_views(context: bpy.types.Context, location, half_size: float) -> int:
    """Centre every 3D view on a new result and zoom to fit it; returns how many views were framed."""
    framed = 0
    window_manager = context.window_manager
    for window in window_manager.windows if window_manager is not None else ():
        for area in window.screen.areas:
            if area.type == "VIEW_3D":
                view = area.spaces.active.region_3d
                view.view_location = location
                view.view_distance = FRAME_DISTANCE * half_size
                framed += 1
    return framed


def mean_surface_colour(image: bpy.types.Image, corner_uvs: np.ndarray) -> tuple[float, float, float, float]:
    """The texture averaged where the mesh's UVs look (not the atlas' empty gaps), as linear RGBA:
    what Solid shading shows, which otherwise draws every result the same grey."""
    width, height = image.size
    pixels = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)  # sRGB values of the 8-bit file, rows bottom-up like V
    uv = corner_uvs.reshape(-1, 2)
    cols = np.clip((uv[:, 0] * width).astype(int), 0, width - 1)
    rows = np.clip((uv[:, 1] * height).astype(int), 0, height - 1)
    srgb = pixels.reshape(height, width, 4)[rows, cols, :3]
    linear = SRGB_TO_LINEAR[np.clip(np.round(srgb * 255), 0, 255).astype(int)].mean(axis=0)
    return (*map(float, linear), 1.0)


def select_only(context: bpy.types.Context, obj: bpy.types.Object) -> None:
    for other in context.view_layer.objects:
        other.select_set(False)
    if obj.name in context.view_layer.objects:
        obj.select_set(True)
        context.view_layer.objects.active = obj


def update_rig_mesh(obj: bpy.types.Object) -> None:
    """Redraw a rig's wireframe from its ranges: two bands (min / max radius) between the elevations."""
    if obj is None or not isinstance(obj.data, bpy.types.Mesh):
        return
    rig = obj.cfd_rig
    vertices, edges = camera_rig.rig_wireframe(
        (math.degrees(rig.elevation_min), math.degrees(rig.elevation_max)), (rig.radius_min, rig.radius_max)
    )
    mesh = obj.data
    mesh.clear_geometry()
    mesh.vertices.add(len(vertices))
    mesh.edges.add(len(edges))
    mesh.attributes["position"].data.foreach_set("vector", vertices.astype(np.float32).ravel())
    mesh.edges.foreach_set("vertices", edges.astype(np.int32).ravel())
    mesh.update()


def create_rig(scene: bpy.types.Scene, location: tuple[float, float, float]) -> bpy.types.Object:
    mesh = bpy.data.meshes.new("CFD Camera Rig")
    obj = bpy.data.objects.new("CFD Camera Rig", mesh)
    obj.location = location
    obj.display_type = "WIRE"
    obj.hide_render = True
    obj.cfd_rig.is_rig = True
    scene.collection.objects.link(obj)
    update_rig_mesh(obj)
    return obj


def mesh_triangles(context: bpy.types.Context, obj: bpy.types.Object) -> tuple[np.ndarray, np.ndarray]:
    """The evaluated mesh (modifiers applied) as triangles, rotated and scaled like the object."""
    vertices, faces, _ = local_mesh(context, obj)
    linear = np.array(obj.matrix_world, dtype=np.float64)[:3, :3]
    return (vertices @ linear.T).astype(np.float32), faces


def camera_matrices(cameras: list[bpy.types.Object], center) -> list[tuple[np.ndarray, float]]:
    """Each selected camera as (camera-to-world relative to `center`, vertical field of view)."""
    views = []
    for camera in cameras:
        c2w = np.array(camera.matrix_world.normalized(), dtype=np.float64)
        c2w[:3, 3] -= np.asarray(center, dtype=np.float64)
        views.append((c2w, float(camera.data.angle_y)))
    return views


# ---------------------------------------------------------------------------------- Texture selected


def local_mesh(
    context: bpy.types.Context, obj: bpy.types.Object
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What Texture selected sends: the evaluated mesh (modifiers applied) in the object's local space,
    as (vertices float32 [N,3], triangles int32 [F,3], the active UV map per triangle corner [F,3,2] or
    None). The object itself is only read."""
    evaluated = obj.evaluated_get(context.evaluated_depsgraph_get())
    mesh = evaluated.to_mesh()
    try:
        mesh.calc_loop_triangles()
        vertices = np.empty(len(mesh.vertices) * 3, dtype=np.float32)
        mesh.attributes["position"].data.foreach_get("vector", vertices)
        faces = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
        mesh.loop_triangles.foreach_get("vertices", faces)
        uvs = None
        layer = mesh.uv_layers.active
        if layer is not None:
            loops = np.empty(len(mesh.loop_triangles) * 3, dtype=np.int32)
            mesh.loop_triangles.foreach_get("loops", loops)
            loop_uvs = np.empty(len(mesh.loops) * 2, dtype=np.float32)
            layer.uv.foreach_get("vector", loop_uvs)
            uvs = loop_uvs.reshape(-1, 2)[loops].reshape(-1, 3, 2)
    finally:
        evaluated.to_mesh_clear()
    return vertices.reshape(-1, 3), faces.reshape(-1, 3), uvs


def triangle_count(context: bpy.types.Context, obj: bpy.types.Object) -> int:
    """Triangles of the evaluated mesh, without building them: a polygon of n corners makes n - 2."""
    evaluated = obj.evaluated_get(context.evaluated_depsgraph_get())
    mesh = evaluated.data
    return len(mesh.loops) - 2 * len(mesh.polygons) if isinstance(mesh, bpy.types.Mesh) else 0


def place_like(obj: bpy.types.Object, source: bpy.types.Object) -> None:
    """The same transform as `source`, so a textured copy sits exactly where the original is."""
    obj.matrix_world = source.matrix_world.copy()


def welded_uvs(asset: GlbMesh, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray | None:
    """The asset's corner UVs [F,3,2] when its triangles are the sent ones in the same order (the
    server keeps them so), else None: then the asset's own split mesh is used."""
    if asset.corner_uvs is None or len(asset.faces) != len(faces):
        return None
    if not np.array_equal(asset.positions[asset.faces], vertices[faces]):
        return None
    return np.asarray(asset.corner_uvs, np.float32).reshape(-1, 3, 2)


def decimated_copy(context: bpy.types.Context, obj: bpy.types.Object, ratio: float) -> bpy.types.Object:
    """A copy of `obj` with a Decimate modifier at `ratio`, selected; the original is not touched."""
    copy = obj.copy()
    copy.data = obj.data.copy()
    copy.name = f"{obj.name} (decimated)"
    for collection in obj.users_collection:
        collection.objects.link(copy)
    modifier = copy.modifiers.new("CFD Decimate", "DECIMATE")
    modifier.ratio = ratio
    select_only(context, copy)
    context.view_layer.update()  # evaluate the modifier now, so the copy's triangles can be counted
    return copy


def texture_target(context: bpy.types.Context) -> bpy.types.Object | None:
    """The mesh Texture selected works on: the active object when it is a selected mesh (not a rig)."""
    obj = context.active_object
    if obj is None or obj.type != "MESH" or not obj.select_get() or obj.cfd_rig.is_rig:
        return None
    return obj
