"""`bpy.ops.cfd.*`: generate, cancel, re-roll, regenerate, and the helpers around them.

Operators only gather values and call the session with the server; the job starts and returns at once (the
asset arrives through the pump). `wait=True` blocks until it is done, for scripts under
`blender -b`, where no timer ever runs.
"""

from __future__ import annotations

import bpy
import numpy as np
from bpy.props import BoolProperty, StringProperty

from . import jobs, scene_objects, session
from .addon import preferences

VARIANT_GAP = 0.5  # scene units between neighbouring variants
OBJECT_EXTENT = 1.0  # generated objects live in [-1, 1]^3
PLACEMENT_SLACK = 1e-4  # scene units: rounding, so that a spot just placed clear of a box stays clear


# ---------------------------------------------------------------------------------- job building


def job_from_panel(context: bpy.types.Context, location) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
    """The job the sidebar describes, and the starting mesh if it names one (ValueError: what is missing)."""
    job = panel_job(context, location)
    return job, init_mesh(context, job)


def panel_job(context: bpy.types.Context, location, scene_cameras: bool = True) -> dict:
    """The job the sidebar describes (ValueError: what is missing). Without `scene_cameras` the
    orbit rig is used whatever the camera source (a texture job sees its mesh scaled to the views)."""
    settings = context.scene.cfd
    prefs = preferences()
    if not settings.prompt.strip():
        raise ValueError("Type a prompt first")
    orbit = cameras = None
    if settings.camera_source == "RIG" or not scene_cameras:
        rig = settings.camera_rig
        orbit = {}  # the server's default ranges
        if rig is not None:
            ranges = rig.cfd_rig
            orbit = jobs.orbit_ranges(
                (ranges.elevation_min, ranges.elevation_max),
                (ranges.radius_min, ranges.radius_max),
                ranges.fov,
            )
    else:
        selected = [obj for obj in context.selected_objects if obj.type == "CAMERA"]
        if not selected:
            raise ValueError("Select at least one camera, or use the orbit rig")
        cameras = jobs.explicit_cameras(scene_objects.camera_matrices(selected, location))
    job = jobs.build_job(
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt,
        seed=settings.seed,
        quality=settings.quality,
        method=settings.method,
        guidance_scale=settings.guidance_scale,
        init_shape=settings.init_shape,
        prior=prefs.prior,
        custom_prior=prefs.custom_prior,
        device=prefs.device,
        precision=prefs.precision,
        output_dir=str(prefs.output_folder()),
        orbit=orbit,
        cameras=cameras,
    )
    return job


def texture_target(context: bpy.types.Context) -> bpy.types.Object | None:
    """The mesh Texture selected works on: the active object when it is a selected mesh (not a rig)."""
    obj = context.active_object
    if obj is None or obj.type != "MESH" or not obj.select_get() or obj.cfd_rig.is_rig:
        return None
    return obj


def send_texture_job(operator, context, job: dict, source: bpy.types.Object) -> set[str]:
    """Texture `source` as it is now (modifiers applied, local space, active UV map), keeping it: the
    result is a copy at its transform. Above the face limit it refuses and names the way out."""
    triangles = scene_objects.triangle_count(context, source)
    if triangles > jobs.TEXTURE_FACE_LIMIT:
        operator.report(
            {"ERROR"},
            f"{source.name} has {triangles} triangles, above the limit of {jobs.TEXTURE_FACE_LIMIT}: "
            "click Decimate a Copy and texture the copy",
        )
        return {"CANCELLED"}
    vertices, faces, uvs = scene_objects.local_mesh(context, source)
    if context.scene.cfd.fresh_uvs or job.get("uv_mode") == "unwrap":
        uvs = None
    ctl = session.get()
    if ctl.start(context, job, tuple(source.location), source=source, surface=(vertices, faces, uvs)) is None:
        operator.report({"ERROR"}, f"{ctl.error.message}. {ctl.error.fix}")
        return {"CANCELLED"}
    return finish_if_waiting(operator, ctl)


def init_mesh(context: bpy.types.Context, job: dict) -> tuple[np.ndarray, np.ndarray] | None:
    if job["init_shape"] != "mesh":
        return None
    settings = context.scene.cfd
    obj = settings.init_object
    if obj is None and context.active_object is not None and context.active_object.type == "MESH":
        obj = context.active_object
    if obj is None:
        raise ValueError("Pick the mesh to start from (or start from a sphere)")
    return jobs.normalized_init_mesh(*scene_objects.mesh_triangles(context, obj))


def machine_job(job: dict) -> dict:
    prefs = preferences()
    return jobs.with_machine(
        job, device=prefs.device, precision=prefs.precision, output_dir=str(prefs.output_folder())
    )


def is_variant(obj: bpy.types.Object | None) -> bool:
    return obj is not None and isinstance(obj.get("cfd_job"), str)


def reference_variant(context: bpy.types.Context) -> bpy.types.Object | None:
    """The variant Re-roll starts from: the active one, else the last one finished in this session."""
    if is_variant(context.active_object):
        return context.active_object
    last = session.get().last_variant
    obj = bpy.data.objects.get(last) if last else None
    return obj if is_variant(obj) and context.scene.objects.get(obj.name) else None


def free_spot(context: bpy.types.Context, start) -> tuple[float, float, float]:
    """Where a new result goes: `start`, else the nearest spot to its right (+X) where the result's box
    ([-1, 1]^3 and a gap) overlaps no visible object's bounds, so it is never hidden inside another.
    Generate starts from the 3D cursor, Re-roll and Regenerate from their variant: one rule for all."""
    half = OBJECT_EXTENT + VARIANT_GAP - PLACEMENT_SLACK  # touching within the slack is not overlapping
    boxes = [
        scene_objects.world_bounds(obj)
        for obj in context.scene.objects
        if obj.type in scene_objects.GEOMETRY_TYPES and obj.visible_get() and not obj.cfd_rig.is_rig
    ]
    spot = np.array(start, dtype=np.float64)
    while True:
        ends = [high[0] for low, high in boxes if np.all((low < spot + half) & (spot - half < high))]
        if not ends:
            return tuple(map(float, spot))
        spot[0] = max(ends) + OBJECT_EXTENT + VARIANT_GAP  # clear of the rightmost box in the way: x grows


def generate_location(context: bpy.types.Context) -> tuple[float, float, float]:
    """Beside whatever is at the 3D cursor; exactly there when the scene's own cameras frame the cursor."""
    cursor = context.scene.cursor.location
    return tuple(cursor) if context.scene.cfd.camera_source == "SELECTED" else free_spot(context, cursor)


def send_job(operator, context, job: dict, location, mesh=None) -> set[str]:
    """Start `job` in the session; with the operator's `wait`, block until its asset is in.

    The scene's first result is framed in the 3D views as it starts, so a newcomer watches it grow."""
    ctl = session.get()
    first = not any(is_variant(obj) for obj in context.scene.objects)
    if ctl.start(context, job, location, mesh) is None:
        operator.report({"ERROR"}, f"{ctl.error.message}. {ctl.error.fix}")
        return {"CANCELLED"}
    if first and preferences().frame_first_result:
        scene_objects.frame_in_views(context, location, OBJECT_EXTENT)
    return finish_if_waiting(operator, ctl)


def finish_if_waiting(operator, ctl: session.Session) -> set[str]:
    """With the operator's `wait`, block until the started job's asset is in (or it failed)."""
    if operator.wait:
        ctl.wait()
        if ctl.error is not None:
            operator.report({"ERROR"}, f"{ctl.error.message}. {ctl.error.fix}")
            return {"CANCELLED"}
    return {"FINISHED"}


def _poll_idle(cls, context) -> bool:
    if session.get().busy:
        cls.poll_message_set("A job is running: wait for it or cancel it")
        return False
    return True


WAIT = BoolProperty(
    name="Wait",
    description="Block until the asset is done (for scripts and background mode, where timers do not run)",
    default=False,
    options={"SKIP_SAVE"},
)


# ---------------------------------------------------------------------------------- job operators


class CFD_OT_generate(bpy.types.Operator):
    """Generate a textured mesh from the prompt; it streams into the scene while it forms"""

    bl_idname = "cfd.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER"}  # noqa: RUF012 (no UNDO: the finished asset pushes its own step)

    wait: WAIT

    @classmethod
    def poll(cls, context):
        if not context.scene.cfd.prompt.strip():
            cls.poll_message_set("Type a prompt first: Generate makes what it describes")
            return False
        return _poll_idle(cls, context)

    def execute(self, context):
        location = generate_location(context)
        try:
            job, mesh = job_from_panel(context, location)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return send_job(self, context, job, location, mesh)


class CFD_OT_texture_selected(bpy.types.Operator):
    """Texture the selected mesh from the prompt, keeping its shape: a textured copy appears in its
    place (the original is hidden, never changed)"""

    bl_idname = "cfd.texture_selected"
    bl_label = "Texture Selected"
    bl_options = {"REGISTER"}  # noqa: RUF012 (the finished copy pushes its own undo step)

    wait: WAIT

    @classmethod
    def poll(cls, context):
        if texture_target(context) is None:
            cls.poll_message_set("Select a mesh object to texture")
            return False
        if not context.scene.cfd.prompt.strip():
            cls.poll_message_set("Type a prompt first: it describes the texture")
            return False
        return _poll_idle(cls, context)

    def execute(self, context):
        source = texture_target(context)
        try:
            job = panel_job(context, tuple(source.location), scene_cameras=False)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        settings = context.scene.cfd
        return send_texture_job(
            self, context, jobs.texture_job(job, settings.quality, settings.fresh_uvs), source
        )


class CFD_OT_decimate_copy(bpy.types.Operator):
    """Make a decimated copy of the selected mesh, under the face limit of Texture Selected (the
    original is not changed); then texture the copy"""

    bl_idname = "cfd.decimate_copy"
    bl_label = "Decimate a Copy"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012

    @classmethod
    def poll(cls, context):
        return texture_target(context) is not None

    def execute(self, context):
        source = texture_target(context)
        ratio = jobs.decimate_ratio(scene_objects.triangle_count(context, source))
        copy = scene_objects.decimated_copy(context, source, ratio)
        source.hide_set(True)
        self.report({"INFO"}, f"{copy.name}: {scene_objects.triangle_count(context, copy)} triangles")
        return {"FINISHED"}


class CFD_OT_reroll(bpy.types.Operator):
    """Same settings as the selected (or last) variant with a new seed, placed beside it"""

    bl_idname = "cfd.reroll"
    bl_label = "Re-roll"
    bl_options = {"REGISTER"}  # noqa: RUF012

    wait: WAIT

    @classmethod
    def poll(cls, context):
        return _poll_idle(cls, context)

    def execute(self, context):
        reference = reference_variant(context)
        source = bpy.data.objects.get(reference.get("cfd_source", "")) if reference is not None else None
        if source is not None:  # a textured copy: texture its original again with a new seed
            job = machine_job(jobs.decode_job(reference["cfd_job"]))
            job = jobs.with_seed(job, jobs.new_seed(np.random.default_rng(), avoid=job["seed"]))
            context.scene.cfd.seed = job["seed"]
            return send_texture_job(self, context, job, source)
        try:
            if reference is not None:
                job = machine_job(jobs.decode_job(reference["cfd_job"]))
                location = free_spot(context, reference.location)
            else:
                location = generate_location(context)
                job, _ = job_from_panel(context, location)
            job = jobs.with_seed(job, jobs.new_seed(np.random.default_rng(), avoid=job["seed"]))
            mesh = init_mesh(context, job)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        context.scene.cfd.seed = job["seed"]
        return send_job(self, context, job, location, mesh)


class CFD_OT_regenerate(bpy.types.Operator):
    """Load the selected variant's settings into the panel and generate it again (same seed: same asset)"""

    bl_idname = "cfd.regenerate"
    bl_label = "Regenerate"
    bl_options = {"REGISTER"}  # noqa: RUF012

    wait: WAIT

    @classmethod
    def poll(cls, context):
        if not is_variant(context.active_object):
            cls.poll_message_set("Select a generated variant")
            return False
        return _poll_idle(cls, context)

    def execute(self, context):
        variant = context.active_object
        job = machine_job(jobs.decode_job(variant["cfd_job"]))
        settings = context.scene.cfd
        for name in jobs.PANEL_FIELDS:
            setattr(settings, name, job[name])
        settings.method = job["method"].upper()
        source = bpy.data.objects.get(variant.get("cfd_source", ""))
        if source is not None:  # a textured copy: the same job on its original again
            return send_texture_job(self, context, job, source)
        settings.quality = jobs.quality_of(job) or settings.quality
        settings.init_shape = {v: k for k, v in jobs.INIT_SHAPES.items()}.get(job["init_shape"], "SPHERE")
        try:
            mesh = init_mesh(context, job)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return send_job(self, context, job, free_spot(context, variant.location), mesh)


class CFD_OT_cancel(bpy.types.Operator):
    """Stop the running job (the partial mesh is removed)"""

    bl_idname = "cfd.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return session.get().busy

    def execute(self, context):
        session.get().cancel()
        return {"FINISHED"}


class CFD_OT_dismiss_error(bpy.types.Operator):
    """Hide the error message"""

    bl_idname = "cfd.dismiss_error"
    bl_label = "Dismiss"

    def execute(self, context):
        session.get().error = None
        return {"FINISHED"}


class CFD_OT_stop_server(bpy.types.Operator):
    """Stop the generation server and free its (GPU) memory; the next job starts it again"""

    bl_idname = "cfd.stop_server"
    bl_label = "Stop Server"

    def execute(self, context):
        session.get().shutdown()
        return {"FINISHED"}


# ---------------------------------------------------------------------------------- scene helpers


class CFD_OT_randomize_seed(bpy.types.Operator):
    """Pick a random seed"""

    bl_idname = "cfd.randomize_seed"
    bl_label = "Random Seed"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012

    def execute(self, context):
        settings = context.scene.cfd
        settings.seed = jobs.new_seed(np.random.default_rng(), avoid=settings.seed)
        return {"FINISHED"}


class CFD_OT_add_camera_rig(bpy.types.Operator):
    """Add an orbit rig at the 3D cursor: its wireframe shows where the cameras may be"""

    bl_idname = "cfd.add_camera_rig"
    bl_label = "Add Camera Rig"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012

    def execute(self, context):
        rig = scene_objects.create_rig(context.scene, tuple(context.scene.cursor.location))
        settings = context.scene.cfd
        settings.camera_source = "RIG"
        settings.camera_rig = rig
        return {"FINISHED"}


class CFD_OT_select_variant(bpy.types.Operator):
    """Select this variant: Re-roll and Regenerate start from the selected one"""

    bl_idname = "cfd.select_variant"
    bl_label = "Select Variant"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012

    name: StringProperty(name="Variant", options={"SKIP_SAVE"})

    def execute(self, context):
        obj = context.scene.objects.get(self.name)
        if obj is None:
            self.report({"ERROR"}, f"No variant named {self.name} in this scene")
            return {"CANCELLED"}
        scene_objects.select_only(context, obj)
        return {"FINISHED"}


class CFD_OT_open_output_folder(bpy.types.Operator):
    """Open the folder finished assets are written to"""

    bl_idname = "cfd.open_output_folder"
    bl_label = "Open Output Folder"

    def execute(self, context):
        bpy.ops.wm.path_open(filepath=str(preferences().output_folder()))
        return {"FINISHED"}


CLASSES = (
    CFD_OT_generate,
    CFD_OT_texture_selected,
    CFD_OT_decimate_copy,
    CFD_OT_reroll,
    CFD_OT_regenerate,
    CFD_OT_cancel,
    CFD_OT_dismiss_error,
    CFD_OT_stop_server,
    CFD_OT_randomize_seed,
    CFD_OT_add_camera_rig,
    CFD_OT_select_variant,
    CFD_OT_open_output_folder,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
