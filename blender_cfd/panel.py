"""3D Viewport › Sidebar › CFD: the settings, Generate / Cancel, progress, errors, and variants.

`draw` only reads state (scene settings, the session's phase/progress/error), so a test can call
it with a recording layout to see what each state shows.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import bpy
import bpy.utils.previews
import numpy as np

from . import environment, environment_ui, jobs, scene_objects, session
from .addon import preferences

PREVIEW_FILE = "preview.png"  # the picture each job writes beside its asset (server/pipeline/asset.py)
THUMBNAIL_SCALE = 3.0  # in units of the sidebar's line height
_thumbnails: bpy.utils.previews.ImagePreviewCollection | None = None  # keyed by file path


def _line_width(context: bpy.types.Context) -> int:
    """Characters that fit on one sidebar label (under 8 px each at UI scale 1, after the icon)."""
    if context.region is None:
        return 40
    return max(16, int(context.region.width / (8.0 * context.preferences.system.ui_scale)) - 4)


def _wrapped(layout: bpy.types.UILayout, text: str, width: int, icon: str = "NONE") -> None:
    """Labels do not wrap in Blender: split long messages into lines, the icon on the first."""
    for index, line in enumerate(textwrap.wrap(text, width) or [""]):
        layout.label(text=line, icon=icon if index == 0 else "BLANK1")


def format_seconds(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def estimate_device(device_pref: str) -> tuple[bool, str]:
    """(whether a GPU runs the job, its name) for the time estimate: the preference, or for Automatic
    the running server's device, else the environment check's, else a CPU."""
    if device_pref in ("CUDA", "MPS"):
        return True, "a GPU"
    if device_pref == "CPU":
        return False, "the CPU"
    report = environment_ui.environment_state().report
    found = session.get().server_info or (
        {"device": report.device, "device_name": report.device_name} if report is not None else {}
    )
    if found.get("device") in ("cuda", "mps"):
        return True, environment.device_label(found["device"], found.get("device_name", ""))
    return False, "the CPU" if found else "the CPU (no GPU found yet: Check the environment)"


class CFD_PT_generate(bpy.types.Panel):
    bl_label = "Text to 3D"
    bl_idname = "CFD_PT_generate"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "CFD"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        settings = context.scene.cfd
        job = session.get()

        col = layout.column()
        col.prop(settings, "prompt", text="")
        prefs = preferences()
        if jobs.prior_sources(prefs.prior, prefs.custom_prior)[0] == "shapes":
            shapes, colours = ", ".join(jobs.SHAPES_VOCABULARY), ", ".join(jobs.COLOURS_VOCABULARY)
            _wrapped(col, f"The Shapes prior knows {shapes} in {colours}", _line_width(context), icon="INFO")
        col.prop(settings, "negative_prompt")
        profile = jobs.profile_name(prefs.prior, prefs.custom_prior)
        if not settings.negative_prompt.strip() and jobs.negative_default(profile):
            col.label(text="Empty: the prior's default negative prompt", icon="INFO")
        row = col.row(align=True)
        row.prop(settings, "seed")
        row.operator("cfd.randomize_seed", text="", icon="FILE_REFRESH")
        col.prop(settings, "quality")
        _wrapped(col, jobs.presets_for(profile)[settings.quality].description, _line_width(context))
        col.prop(settings, "method")
        row = col.row(align=True)
        row.prop(settings, "guidance_override", text="", icon="GREASEPENCIL")
        if settings.guidance_override:
            row.prop(settings, "guidance_scale")
        else:
            row.label(text=f"Guidance: prior default ({jobs.guidance_default(profile)})")
        col.prop(settings, "size")

        box = layout.box()
        box.prop(settings, "camera_source")
        if settings.camera_source == "RIG":
            row = box.row(align=True)
            row.prop(settings, "camera_rig")
            row.operator("cfd.add_camera_rig", text="", icon="ADD")
            if settings.camera_rig is not None:
                rig = settings.camera_rig.cfd_rig
                col = box.column(align=True)
                for label, low, high in (
                    ("Elevation", "elevation_min", "elevation_max"),
                    ("Radius", "radius_min", "radius_max"),
                ):
                    row = col.row(align=True)
                    row.label(text=label)
                    row.prop(rig, low, text="")
                    row.prop(rig, high, text="")
                col.prop(rig, "fov")
        else:
            count = sum(1 for obj in context.selected_objects if obj.type == "CAMERA")
            box.label(text=f"{count} selected camera{'s' if count != 1 else ''}", icon="CAMERA_DATA")
        box.prop(settings, "init_shape")
        if settings.init_shape == "MESH":
            box.prop(settings, "init_object")

        if job.busy:
            progress = job.progress
            text = "Finishing" if job.finishing else progress.stage or job.phase.value
            if progress.queue_position:  # a shared server runs other clients' jobs first
                ahead = progress.queue_position
                text = f"Queued: {ahead} job{'s' if ahead != 1 else ''} ahead"
            elif job.job is not None and job.job.is_batch:
                text = f"{text} {progress.step}/{progress.total} done"
            elif progress.total:
                text = f"{text} {progress.step}/{progress.total} · ETA {format_seconds(progress.eta_s)}"
            row = layout.row(align=True)
            row.progress(factor=progress.fraction, type="BAR", text=text)
            row.operator("cfd.finish_now", text="", icon="CHECKMARK")  # keep it as it is now
            row.operator("cfd.cancel", text="", icon="X")
            if job.server_info:
                info = job.server_info
                device = environment.device_label(info.get("device", ""), info.get("device_name", ""))
                layout.label(text=f"on {device}")
        else:
            row = layout.row()
            row.scale_y = 1.5
            row.operator("cfd.generate", icon="PLAY")
            gpu, device = estimate_device(prefs.device)
            seconds = jobs.estimated_seconds(profile, settings.quality, gpu)
            layout.label(text=f"Estimated {jobs.format_duration(seconds)} on {device}", icon="TIME")
            if not settings.prompt.strip():
                layout.label(text="Type a prompt to generate", icon="INFO")
            draw_texture_selected(context, layout)

        if job.error is not None:
            box = layout.box()
            box.alert = True
            width = _line_width(context)
            _wrapped(box, job.error.message, width, icon="ERROR")
            if job.error.detail:
                _wrapped(box, job.error.detail, width, icon="BLANK1")
            if job.error.fix:
                _wrapped(box, job.error.fix, width, icon="INFO")
            col = box.column(align=True)  # one button a line: side by side, the sidebar cuts their labels
            if job.error.code in session.ENVIRONMENT_ERRORS:
                col.operator("cfd.check_environment", icon="CHECKMARK")
            col.operator("cfd.dismiss_error", icon="X")


def draw_texture_selected(context: bpy.types.Context, layout: bpy.types.UILayout) -> None:
    """Texture Selected with its UV choice; above the face limit, the way out instead."""
    target = scene_objects.texture_target(context)
    if target is None:
        return
    triangles = scene_objects.triangle_count(context, target)
    box = layout.box()
    if triangles > jobs.TEXTURE_FACE_LIMIT:
        limit = jobs.TEXTURE_FACE_LIMIT
        text = f"{target.name}: {triangles} triangles, above the {limit} limit of Texture Selected"
        _wrapped(box, text, _line_width(context), icon="ERROR")
        box.operator("cfd.decimate_copy", icon="MOD_DECIM")
        return
    row = box.row(align=True)
    row.operator("cfd.texture_selected", icon="TEXTURE")
    row.prop(context.scene.cfd, "fresh_uvs", text="", icon="UV")


class CFD_PT_variants(bpy.types.Panel):
    bl_label = "Variants"
    bl_idname = "CFD_PT_variants"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "CFD"
    bl_parent_id = "CFD_PT_generate"

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        row = layout.row(align=True)
        row.operator("cfd.reroll", icon="FILE_REFRESH")
        row.operator("cfd.regenerate", icon="RECOVER_LAST")
        row = layout.row(align=True)  # a batch: Variants seeds (of each listed prompt) on the server's Ray
        row.prop(context.scene.cfd, "variants", text="Variants")
        row.operator("cfd.variants", text="", icon="MOD_ARRAY")
        layout.prop(context.scene.cfd, "prompt_list")
        obj = context.active_object
        if obj is not None and "cfd_seed" in obj:
            col = layout.column(align=True)
            _wrapped(col, f"{obj.get('cfd_prompt', '')}", _line_width(context), icon="OBJECT_DATA")
            col.label(text=f"seed {obj['cfd_seed']} · {obj.get('cfd_settings', {}).get('method', '')}")
            if context.space_data is None or context.space_data.shading.type == "SOLID":
                text = "Solid shading shows its mean colour; Material Preview shows the texture"
                _wrapped(col, text, _line_width(context), icon="SHADING_TEXTURE")
        collection = bpy.data.collections.get(scene_objects.VARIANTS_COLLECTION)
        variants = [o for o in collection.objects if "cfd_job" in o] if collection is not None else []
        for variant in variants:  # each with its preview, so variants compare without the viewport
            row = layout.row()
            preview = thumbnail(variant)
            if preview is not None:
                row.template_icon(icon_value=preview.icon_id, scale=THUMBNAIL_SCALE)
            row.operator("cfd.select_variant", text=variant.name, depress=variant == obj).name = variant.name
            kept = variant.asset_data is not None
            row.operator("cfd.keep_asset", text="", icon="ASSET_MANAGER", depress=kept).name = variant.name
        row = layout.row()
        row.label(text=f"{len(variants)} variant{'s' if len(variants) != 1 else ''}")
        row.operator("cfd.open_output_folder", text="", icon="FILE_FOLDER")


def thumbnail(variant: bpy.types.Object) -> bpy.types.ImagePreview | None:
    """The preview image the job wrote beside the asset, loaded once; None if there is none (the
    folder moved, or a remote server wrote it)."""
    path = Path(variant.get("cfd_output", "")) / PREVIEW_FILE
    key = str(path)
    if key not in _thumbnails:
        if not path.is_file():
            return None
        first_view(_thumbnails.new(key), path)
    return _thumbnails[key]


def first_view(preview: bpy.types.ImagePreview, path: Path) -> None:
    """The preview PNG is a strip of square views side by side: an icon of the whole strip is a thin
    line, so the thumbnail is its first (leftmost) view."""
    image = bpy.data.images.load(str(path), check_existing=False)
    try:
        width, height = image.size
        pixels = np.empty(width * height * 4, dtype=np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    side = min(width, height)
    square = pixels.reshape(height, width, 4)[:side, :side]
    preview.image_size = (side, side)
    preview.image_pixels_float.foreach_set(np.ascontiguousarray(square).ravel())


CLASSES = (CFD_PT_generate, CFD_PT_variants)


def register() -> None:
    global _thumbnails
    _thumbnails = bpy.utils.previews.new()
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    bpy.utils.previews.remove(_thumbnails)
