"""Add-on preferences: the server's interpreter and environment, defaults, output folder, remote server."""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, StringProperty

from . import environment, environment_ui, jobs
from .addon import ADDON_ID, user_folder

DEVICE_ITEMS = [
    ("AUTO", "Automatic", "CUDA if available, then Apple Metal, else CPU"),
    ("CUDA", "CUDA", "NVIDIA GPU"),
    ("MPS", "Metal", "Apple GPU"),
    ("CPU", "CPU", "Slow, but runs anywhere (the shapes prior is made for it)"),
]
PRECISION_ITEMS = [
    ("AUTO", "Automatic", "fp16 on GPUs, fp32 on the CPU"),
    ("FP16", "fp16", "Half precision: half the memory (not on older GTX 16xx cards)"),
    ("BF16", "bf16", "bfloat16: for GPUs that support it"),
    ("FP32", "fp32", "Full precision: most memory, always works"),
]
BUILD_ITEMS = [
    ("CUDA", "CUDA", "PyTorch built for NVIDIA GPUs (CUDA 12.8)"),
    ("CPU", "CPU", "PyTorch without GPU support (smaller download)"),
]


class CFDPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    python_path: StringProperty(
        name="Server Python",
        description="Interpreter with torch that runs the server (empty: the environment Set Up creates)",
        subtype="FILE_PATH",
    )
    torch_build: EnumProperty(
        name="PyTorch Build", items=BUILD_ITEMS, default=environment.default_torch_build()
    )
    prior: EnumProperty(name="Prior", items=jobs.PRIOR_ITEMS, default="SHAPES")
    custom_prior: StringProperty(
        name="Model",
        description="A hub id (owner/name), a local diffusers folder, or an MVDream checkpoint (.pt)",
    )
    device: EnumProperty(name="Device", items=DEVICE_ITEMS, default="AUTO")
    precision: EnumProperty(name="Precision", items=PRECISION_ITEMS, default="AUTO")
    output_dir: StringProperty(
        name="Output Folder",
        description="Where finished assets are written (empty: the extension's user folder)",
        subtype="DIR_PATH",
    )
    asset_library_dir: StringProperty(
        name="Asset Library Folder",
        description=(
            "Keep also writes each kept variant into its own .blend here and lists the folder among "
            "Blender's asset libraries, so every project's Asset Browser shows it (empty: the current file)"
        ),
        subtype="DIR_PATH",
    )
    frame_first_result: BoolProperty(
        name="Frame the First Result",
        description="Centre the 3D view on a scene's first generated result, so it is in sight as it grows",
        default=True,
    )
    remote_address: StringProperty(
        name="Remote Server", description="host:port of a server started with --listen (empty: run locally)"
    )
    remote_token: StringProperty(name="Token", description="The remote server's token", subtype="PASSWORD")
    remote_fingerprint: StringProperty(
        name="Certificate Fingerprint",
        description=(
            "SHA-256 fingerprint the server printed at start (serve --tls-cert): the connection is "
            "encrypted and a server with another certificate is refused. Empty: plain TCP, for loopback "
            "or an SSH tunnel"
        ),
    )

    def server_python(self) -> Path | None:
        return environment.resolve_python(self.python_path, user_folder("venv", create=False))

    def output_folder(self) -> Path:
        if self.output_dir.strip():
            return Path(bpy.path.abspath(self.output_dir.strip()))
        return user_folder("outputs")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        box = layout.box()
        box.label(text="Server Environment", icon="CONSOLE")
        box.prop(self, "python_path")
        row = box.row()
        row.operator("cfd.check_environment", icon="CHECKMARK")
        row.prop(self, "torch_build", text="")
        row.operator("cfd.setup_environment", icon="IMPORT")
        for text, icon in environment_ui.environment_state().rows():
            box.label(text=text, icon=icon)
        if not bpy.app.online_access:
            box.label(text="Set up needs Allow Online Access (Preferences › System › Network)", icon="INFO")

        col = layout.column()
        col.prop(self, "prior")
        if self.prior == "CUSTOM":
            col.prop(self, "custom_prior")
        row = col.row()
        row.prop(self, "device")
        row.prop(self, "precision")
        col.prop(self, "output_dir")
        col.label(text=f"Assets go to {self.output_folder()}")
        col.prop(self, "asset_library_dir")
        col.prop(self, "frame_first_result")
        box = layout.box()
        box.label(text="Remote Server (optional)", icon="URL")
        box.prop(self, "remote_address")
        box.prop(self, "remote_token")
        box.prop(self, "remote_fingerprint")
        if self.remote_address.strip() and not self.remote_fingerprint.strip():
            box.label(text="No fingerprint: not encrypted (fine over an SSH tunnel)", icon="INFO")


def register() -> None:
    bpy.utils.register_class(CFDPreferences)


def unregister() -> None:
    bpy.utils.unregister_class(CFDPreferences)
