"""`bpy.ops.cfd.*`: generate, finish now, cancel, re-roll, variants (a batch on Ray), regenerate, and the
helpers around them.

Operators only gather values and call the session with the server; the job starts and returns at once (the
asset arrives through the pump). `wait=True` blocks until it is done, for scripts under
`blender -b`, where no timer ever runs.
"""

from __future__ import annotations

import bpy
import numpy as np
from bpy.props import BoolProperty, StringProperty

from . import assets, jobs, scene_objects, session
from .addon import preferences

VARIANT_GAP = 0.5  # scene units between neighbouring variants
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
        guidance_scale=settings.guidance_scale if settings.guidance_override else None,
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
    started = session.get().start(
        context, job, tuple(source.location), source=source, surface=(vertices, faces, uvs)
    )
    return started_or_reported(operator, started is not None)


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


def variant_source(context: bpy.types.Context) -> tuple[dict, tuple[float, float, float], float, bool]:
    """What Re-roll and Variants vary: the selected (or last) variant's job, its place and size (True);
    else the panel's job, at the spot Generate would use (False). ValueError: what is missing."""
    reference = reference_variant(context)
    size = result_size(context, reference)
    if reference is not None:
        return machine_job(jobs.decode_job(reference["cfd_job"])), tuple(reference.location), size, True
    location = generate_location(context)
    job, _ = job_from_panel(context, result_centre(location, size))
    return job, location, size, False


def free_spot(context: bpy.types.Context, start, size: float) -> tuple[float, float, float]:
    """Where a new result's bottom centre goes: on the surface below `start`, else the nearest spot to its
    right (+X) where the result's box (`size` wide and high, plus a gap around it) overlaps no visible
    object's bounds but those of the surface it rests on, so it is never hidden inside another.
    Generate starts from the 3D cursor, Re-roll and Regenerate from their variant: one rule for all."""
    half = size / 2 + VARIANT_GAP - PLACEMENT_SLACK  # touching within the slack is not overlapping
    boxes = [
        (obj.name, scene_objects.world_bounds(obj))
        for obj in context.scene.objects
        if obj.type in scene_objects.GEOMETRY_TYPES and obj.visible_get() and not obj.cfd_rig.is_rig
    ]
    spot = np.array(start, dtype=np.float64)
    while True:
        spot[2], support = scene_objects.surface_below(context, (spot[0], spot[1], start[2]))
        low = spot + np.array([-half, -half, PLACEMENT_SLACK])
        high = spot + np.array([half, half, size - PLACEMENT_SLACK])
        ends = [
            box_high[0]
            for name, (box_low, box_high) in boxes
            if name != support and np.all((box_low < high) & (low < box_high))
        ]
        if not ends:
            return tuple(map(float, spot))
        spot[0] = max(ends) + size / 2 + VARIANT_GAP  # clear of the rightmost box in the way: x grows


def result_size(context: bpy.types.Context, variant: bpy.types.Object | None = None) -> float:
    """The size a result is made at: its variant's for Re-roll and Regenerate, else the panel's."""
    if variant is not None and "cfd_size" in variant:
        return float(variant["cfd_size"])
    return float(context.scene.cfd.size)


def generate_location(context: bpy.types.Context) -> tuple[float, float, float]:
    """Beside whatever is at the 3D cursor, on the surface below it; centred on the cursor when the
    scene's own cameras frame it (they look at the cursor, so the result fills what they see)."""
    cursor = tuple(context.scene.cursor.location)
    size = result_size(context)
    if context.scene.cfd.camera_source == "SELECTED":
        return (cursor[0], cursor[1], cursor[2] - size / 2)
    return free_spot(context, cursor, size)


def result_centre(location, size: float) -> tuple[float, float, float]:
    """The centre of the box a result standing on `location` fills: what cameras and views aim at."""
    return (location[0], location[1], location[2] + size / 2)


def send_job(operator, context, job: dict, location, size: float, mesh=None) -> set[str]:
    """Start `job` in the session; with the operator's `wait`, block until its asset is in.

    The scene's first result is framed in the 3D views as it starts, so a newcomer watches it grow."""
    ctl = session.get()
    first = not any(is_variant(obj) for obj in context.scene.objects)
    started = ctl.start(context, job, location, mesh, size) is not None
    if started and first and preferences().frame_first_result:
        scene_objects.frame_in_views(context, result_centre(location, size), size / 2)
    return started_or_reported(operator, started)


def started_or_reported(operator, started: bool) -> set[str]:
    """The operator's result once the session was asked to start: the session's error reported if it
    could not; with the operator's `wait`, after the job (or batch) ended."""
    ctl = session.get()
    if started and operator.wait:
        ctl.wait()
        started = ctl.error is None
    if not started:
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
        location, size = generate_location(context), result_size(context)
        try:
            job, mesh = job_from_panel(context, result_centre(location, size))
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return send_job(self, context, job, location, size, mesh)


class CFD_OT_texture_selected(bpy.types.Operator):
    """Texture the selected mesh from the prompt, keeping its shape: a textured copy appears in its
    place (the original is hidden, never changed)"""

    bl_idname = "cfd.texture_selected"
    bl_label = "Texture Selected"
    bl_options = {"REGISTER"}  # noqa: RUF012 (the finished copy pushes its own undo step)

    wait: WAIT

    @classmethod
    def poll(cls, context):
        if scene_objects.texture_target(context) is None:
            cls.poll_message_set("Select a mesh object to texture")
            return False
        if not context.scene.cfd.prompt.strip():
            cls.poll_message_set("Type a prompt first: it describes the texture")
            return False
        return _poll_idle(cls, context)

    def execute(self, context):
        source = scene_objects.texture_target(context)
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
        return scene_objects.texture_target(context) is not None

    def execute(self, context):
        source = scene_objects.texture_target(context)
        ratio = jobs.decimate_ratio(scene_objects.triangle_count(context, source))
        copy = scene_objects.decimated_copy(context, source, ratio)
        source.hide_set(True)
        self.report({"INFO"}, f"{copy.name}: {scene_objects.triangle_count(context, copy)} triangles")
        return {"FINISHED"}


class _NewSeeds:
    """Re-roll and Variants: new seeds of the selected (or last) variant, whenever no job runs."""

    bl_options = {"REGISTER"}  # noqa: RUF012

    wait: WAIT

    @classmethod
    def poll(cls, context):
        return _poll_idle(cls, context)


class CFD_OT_reroll(_NewSeeds, bpy.types.Operator):
    """Same settings as the selected (or last) variant with a new seed, placed beside it"""

    bl_idname = "cfd.reroll"
    bl_label = "Re-roll"

    def execute(self, context):
        reference = reference_variant(context)
        source = bpy.data.objects.get(reference.get("cfd_source", "")) if reference is not None else None
        if source is not None:  # a textured copy: texture its original again with a new seed
            job = machine_job(jobs.decode_job(reference["cfd_job"]))
            job = jobs.with_seed(job, jobs.new_seed(np.random.default_rng(), avoid=job["seed"]))
            context.scene.cfd.seed = job["seed"]
            return send_texture_job(self, context, job, source)
        try:
            job, location, size, from_variant = variant_source(context)
            if from_variant:
                location = free_spot(context, location, size)
            job = jobs.with_seed(job, jobs.new_seed(np.random.default_rng(), avoid=job["seed"]))
            mesh = init_mesh(context, job)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        context.scene.cfd.seed = job["seed"]
        return send_job(self, context, job, location, size, mesh)


class CFD_OT_variants(_NewSeeds, bpy.types.Operator):
    """Variants of the selected (or last) variant as one batch the server runs on Ray: Variants new seeds,
    of every prompt of the prompt list when one is set; each arrives beside the others as it finishes"""

    bl_idname = "cfd.variants"
    bl_label = "Variants"

    def execute(self, context):
        settings = context.scene.cfd
        try:
            job, start, size, _ = variant_source(context)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        if job["init_shape"] == "mesh":
            self.report(
                {"ERROR"}, "Variants start from a sphere: set Start to Sphere, or Re-roll one at a time"
            )
            return {"CANCELLED"}
        if job.get("kind") == "texture":
            self.report({"ERROR"}, "A textured copy is re-textured one at a time: use Re-roll")
            return {"CANCELLED"}
        prompts = None
        if settings.prompt_list is not None:
            prompts = jobs.prompt_lines(settings.prompt_list.as_string())
            if not prompts:
                self.report({"ERROR"}, f"The prompt list {settings.prompt_list.name!r} has no prompts")
                return {"CANCELLED"}
        seeds = jobs.new_seeds(np.random.default_rng(), settings.variants, avoid=job["seed"])
        place = lambda ctx: free_spot(ctx, start, size)  # noqa: E731 (each variant where it fits then)
        started = session.get().start_batch(context, job, seeds, prompts, place, size)
        return started_or_reported(self, started is not None)


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
        settings.guidance_override = job.get("guidance_scale") is not None
        if settings.guidance_override:
            settings.guidance_scale = job["guidance_scale"]
        settings.method = job["method"].upper()
        source = bpy.data.objects.get(variant.get("cfd_source", ""))
        if source is not None:  # a textured copy: the same job on its original again
            return send_texture_job(self, context, job, source)
        settings.quality = jobs.quality_of(job) or settings.quality
        settings.init_shape = {v: k for k, v in jobs.INIT_SHAPES.items()}.get(job["init_shape"], "SPHERE")
        settings.size = size = result_size(context, variant)
        try:
            mesh = init_mesh(context, job)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return send_job(self, context, job, free_spot(context, variant.location, size), size, mesh)


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


class CFD_OT_finish_now(bpy.types.Operator):
    """Stop optimising now and keep the result: it is textured and delivered like a finished job"""

    bl_idname = "cfd.finish_now"
    bl_label = "Finish Now"

    @classmethod
    def poll(cls, context):
        ctl = session.get()
        if ctl.finishing:
            cls.poll_message_set("Finishing: the asset is being baked")
            return False
        return ctl.busy and ctl.job is not None and ctl.job.cancel_sent_at is None

    def execute(self, context):
        session.get().finish_now()
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


class CFD_OT_keep_asset(bpy.types.Operator):
    """Keep this variant as an asset: its preview, prompt, tags and a "CFD" catalog; with an asset library
    folder in the preferences, also in its own .blend there, for every project's Asset Browser"""

    bl_idname = "cfd.keep_asset"
    bl_label = "Keep as Asset"
    bl_options = {"REGISTER", "UNDO"}  # noqa: RUF012

    name: StringProperty(name="Variant", description="Empty: the active object", options={"SKIP_SAVE"})

    def execute(self, context):
        obj = context.scene.objects.get(self.name) if self.name else context.active_object
        if not is_variant(obj):
            self.report({"ERROR"}, "Select a generated variant to keep (its job makes its asset data)")
            return {"CANCELLED"}
        try:
            written = assets.keep(obj, assets.library_folder())
        except (OSError, RuntimeError) as error:
            self.report(
                {"ERROR"}, f"Cannot write the asset library: {error}. Check the folder in the preferences"
            )
            return {"CANCELLED"}
        where = f" and {written}" if written is not None else " in this file"
        self.report({"INFO"}, f"Kept {obj.name} as an asset{where}")
        return {"FINISHED"}


def context_menu(self, context) -> None:
    """The object's context menu (right click in the viewport) offers Keep on a variant."""
    if is_variant(context.active_object):
        self.layout.separator()
        self.layout.operator(CFD_OT_keep_asset.bl_idname, icon="ASSET_MANAGER")


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
    CFD_OT_variants,
    CFD_OT_regenerate,
    CFD_OT_cancel,
    CFD_OT_finish_now,
    CFD_OT_dismiss_error,
    CFD_OT_stop_server,
    CFD_OT_randomize_seed,
    CFD_OT_add_camera_rig,
    CFD_OT_select_variant,
    CFD_OT_keep_asset,
    CFD_OT_open_output_folder,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.VIEW3D_MT_object_context_menu.append(context_menu)


def unregister() -> None:
    bpy.types.VIEW3D_MT_object_context_menu.remove(context_menu)
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
