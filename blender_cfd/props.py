"""The panel's settings (`Scene.cfd`) and the orbit rig's ranges (`Object.cfd_rig`)."""

from __future__ import annotations

import math

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from . import jobs, scene_objects

HALF_PI = math.pi / 2
QUALITY_ITEMS = [(key, preset.label, preset.description) for key, preset in jobs.QUALITY_PRESETS.items()]
METHOD_ITEMS = [
    ("CFD", "CFD", "Consistent Flow Distillation: 3D-consistent noise, sharp and diverse results (default)"),
    ("FSD", "FSD", "Flow Score Distillation: fixed noise per view, for comparison"),
    ("SDS", "SDS", "Score Distillation Sampling: fresh noise every step, for comparison"),
]
CAMERA_ITEMS = [
    ("RIG", "Orbit Rig", "Sample cameras from an orbit rig's elevation / radius ranges"),
    ("SELECTED", "Selected Cameras", "Use the scene's selected camera objects as the views"),
]
INIT_ITEMS = [
    ("SPHERE", "Sphere", "Start from a sphere"),
    ("MESH", "Mesh", "Start from a mesh object (the selected one if none is picked)"),
]


def _is_rig(_self, obj: bpy.types.Object) -> bool:
    return obj.cfd_rig.is_rig


def _is_mesh(_self, obj: bpy.types.Object) -> bool:
    return obj.type == "MESH" and not obj.cfd_rig.is_rig


class CFDSettings(bpy.types.PropertyGroup):
    """What to generate; a finished variant stores these as custom properties for Regenerate."""

    prompt: StringProperty(
        name="Prompt",
        description="What to make; the Shapes prior knows a colour and a shape, e.g. a blue torus",
        default="a red cube",
    )
    negative_prompt: StringProperty(name="Negative", description="What to avoid", default="")
    seed: IntProperty(name="Seed", description="Same seed and settings give the same asset", min=0, default=0)
    quality: EnumProperty(name="Quality", items=QUALITY_ITEMS, default="STANDARD")
    method: EnumProperty(name="Method", items=METHOD_ITEMS, default="CFD")
    guidance_override: BoolProperty(
        name="Override Guidance",
        description="Off: each stage uses its prior's guidance (the CFD reference's for Stable Diffusion "
        "and MVDream, 10 for the Shapes prior); on: the value below for every stage",
        default=False,
    )
    guidance_scale: FloatProperty(
        name="Guidance",
        description="Classifier-free guidance for every stage: the Shapes prior's is 10, the CFD reference's "
        "Stable Diffusion stages 70 / 50 / 50, MVDream 50",
        min=1.0,
        max=200.0,
        default=10.0,
    )
    camera_source: EnumProperty(name="Cameras", items=CAMERA_ITEMS, default="RIG")
    camera_rig: PointerProperty(
        name="Rig", type=bpy.types.Object, poll=_is_rig, description="Orbit rig (none: default ranges)"
    )
    size: FloatProperty(
        name="Size",
        description="The result's largest dimension; it stands on the surface below the 3D cursor",
        subtype="DISTANCE",
        unit="LENGTH",
        min=0.001,
        soft_max=100.0,
        default=1.0,
    )
    init_shape: EnumProperty(name="Start", items=INIT_ITEMS, default="SPHERE")
    init_object: PointerProperty(name="Mesh", type=bpy.types.Object, poll=_is_mesh)
    fresh_uvs: BoolProperty(
        name="Fresh UVs",
        description="Texture selected: bake into a new UV unwrap instead of the mesh's own UV map",
        default=False,
    )
    variants: IntProperty(
        name="Variants",
        description="How many seeds the Variants button sends as one batch (the server runs it on Ray)",
        min=1,
        max=64,
        default=4,
    )
    prompt_list: PointerProperty(
        name="Prompts",
        type=bpy.types.Text,
        description="A text of prompts, one a line: Variants makes each of them with every seed",
    )


def _rebuild_rig(self, context) -> None:
    scene_objects.update_rig_mesh(self.id_data)


class CFDRigSettings(bpy.types.PropertyGroup):
    """Camera ranges of an orbit rig; its wireframe shows them in the viewport (object units)."""

    is_rig: BoolProperty(default=False, options={"HIDDEN"})
    elevation_min: FloatProperty(
        name="Elevation Min",
        subtype="ANGLE",
        min=-HALF_PI,
        max=HALF_PI,
        default=math.radians(-10.0),
        update=_rebuild_rig,
    )
    elevation_max: FloatProperty(
        name="Elevation Max",
        subtype="ANGLE",
        min=-HALF_PI,
        max=HALF_PI,
        default=math.radians(45.0),
        update=_rebuild_rig,
    )
    radius_min: FloatProperty(name="Radius Min", min=1.05, max=20.0, default=2.2, update=_rebuild_rig)
    radius_max: FloatProperty(name="Radius Max", min=1.05, max=20.0, default=2.6, update=_rebuild_rig)
    fov: FloatProperty(
        name="Field of View",
        description="Vertical",
        subtype="ANGLE",
        min=0.1,
        max=2.5,
        default=math.radians(40.0),
    )


CLASSES = (CFDSettings, CFDRigSettings)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.cfd = PointerProperty(type=CFDSettings)
    bpy.types.Object.cfd_rig = PointerProperty(type=CFDRigSettings)


def unregister() -> None:
    del bpy.types.Object.cfd_rig
    del bpy.types.Scene.cfd
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
