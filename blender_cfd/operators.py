"""`bpy.ops.cfd.*`: generate, cancel, re-roll, regenerate, and the helpers around them.

Operators only gather values and call the controller; the job starts and returns at once (the
asset arrives through the pump). `wait=True` blocks until it is done, for scripts under
`blender -b`, where no timer ever runs.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

import bpy
import numpy as np
from bpy.props import BoolProperty
from mathutils import Vector

from . import controller as job_controller
from . import environment, jobs, scene_objects
from .preferences import preferences, user_folder

VARIANT_GAP = 0.5  # scene units between neighbouring variants
OBJECT_EXTENT = 1.0  # generated objects live in [-1, 1]^3


# ---------------------------------------------------------------------------------- job building


def job_from_panel(context: bpy.types.Context, location) -> tuple[dict, tuple[np.ndarray, np.ndarray] | None]:
    """The job the sidebar describes, and the starting mesh if it names one (ValueError: what is missing)."""
    settings = context.scene.cfd
    prefs = preferences()
    if not settings.prompt.strip():
        raise ValueError("Type a prompt first")
    orbit = cameras = None
    if settings.camera_source == "RIG":
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
    return job, init_mesh(context, job)


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
    last = job_controller.get().last_variant
    obj = bpy.data.objects.get(last) if last else None
    return obj if is_variant(obj) and context.scene.objects.get(obj.name) else None


def beside(context: bpy.types.Context, obj: bpy.types.Object) -> tuple[float, float, float]:
    """A free spot to the right (+X) of a variant, skipping spots other variants already take."""
    step = obj.dimensions.x / 2 + OBJECT_EXTENT * max(obj.scale) + VARIANT_GAP
    taken = [v.location for v in context.scene.objects if is_variant(v) or v.name.startswith("CFD preview")]
    spot = obj.location + Vector((step, 0.0, 0.0))
    while any((spot - other).length < step / 2 for other in taken):
        spot += Vector((step, 0.0, 0.0))
    return tuple(spot)


def start_job(operator, context, job: dict, location, mesh=None) -> set[str]:
    ctl = job_controller.get()
    if ctl.start(context, job, location, mesh) is None:
        operator.report({"ERROR"}, f"{ctl.error.message}. {ctl.error.fix}")
        return {"CANCELLED"}
    if operator.wait:
        ctl.wait()
        if ctl.error is not None:
            operator.report({"ERROR"}, f"{ctl.error.message}. {ctl.error.fix}")
            return {"CANCELLED"}
    return {"FINISHED"}


def _poll_idle(cls, context) -> bool:
    if job_controller.get().busy:
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
        return _poll_idle(cls, context)

    def execute(self, context):
        location = tuple(context.scene.cursor.location)
        try:
            job, mesh = job_from_panel(context, location)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return start_job(self, context, job, location, mesh)


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
        try:
            if reference is not None:
                job = machine_job(jobs.decode_job(reference["cfd_job"]))
                location = beside(context, reference)
            else:
                location = tuple(context.scene.cursor.location)
                job, _ = job_from_panel(context, location)
            job = jobs.with_seed(job, jobs.new_seed(np.random.default_rng(), avoid=job["seed"]))
            mesh = init_mesh(context, job)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        context.scene.cfd.seed = job["seed"]
        return start_job(self, context, job, location, mesh)


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
        settings.quality = jobs.quality_of(job) or settings.quality
        settings.init_shape = {v: k for k, v in jobs.INIT_SHAPES.items()}.get(job["init_shape"], "SPHERE")
        try:
            mesh = init_mesh(context, job)
        except ValueError as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        return start_job(self, context, job, beside(context, variant), mesh)


class CFD_OT_cancel(bpy.types.Operator):
    """Stop the running job (the partial mesh is removed)"""

    bl_idname = "cfd.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return job_controller.get().busy

    def execute(self, context):
        job_controller.get().cancel()
        return {"FINISHED"}


class CFD_OT_dismiss_error(bpy.types.Operator):
    """Hide the error message"""

    bl_idname = "cfd.dismiss_error"
    bl_label = "Dismiss"

    def execute(self, context):
        job_controller.get().error = None
        return {"FINISHED"}


class CFD_OT_stop_server(bpy.types.Operator):
    """Stop the generation server and free its (GPU) memory; the next job starts it again"""

    bl_idname = "cfd.stop_server"
    bl_label = "Stop Server"

    def execute(self, context):
        job_controller.get().shutdown()
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


class CFD_OT_open_output_folder(bpy.types.Operator):
    """Open the folder finished assets are written to"""

    bl_idname = "cfd.open_output_folder"
    bl_label = "Open Output Folder"

    def execute(self, context):
        bpy.ops.wm.path_open(filepath=str(preferences().output_folder()))
        return {"FINISHED"}


# ---------------------------------------------------------------------------------- environment


@dataclass
class EnvironmentState:
    """What the preferences show under the environment buttons; threads fill it, the UI reads it."""

    checking: threading.Thread | None = None
    report: environment.EnvironmentReport | None = None
    setup: environment.CommandRunner | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def icon(self) -> str:
        if self.report is not None and not self.report.ok:
            return "ERROR"
        if self.setup is not None and self.setup.returncode not in (None, 0):
            return "ERROR"
        return "INFO"

    def lines(self) -> list[str]:
        if self.checking is not None and self.checking.is_alive():
            return ["Checking the server environment…"]
        lines = list(self.notes)
        if self.setup is not None:
            if self.setup.returncode is None:
                lines.append("Setting up (this downloads a few GB)…")
            elif self.setup.returncode != 0:
                lines.append(f"Set up failed (log: {self.setup.log_path})")
            lines += self.setup.last_lines()[-3:] if self.setup.returncode != 0 else []
        if self.report is not None:
            lines += [line for line in self.report.lines() if line]
        server = job_controller.get().server_info
        if server:
            lines.append(f"Server running: torch {server.get('torch')} on {server.get('device_name')}")
        return lines


_environment = EnvironmentState()


def environment_state() -> EnvironmentState:
    return _environment


def _environment_timer() -> float | None:
    job_controller.tag_redraw()
    checking = _environment.checking is not None and _environment.checking.is_alive()
    setting_up = _environment.setup is not None and _environment.setup.returncode is None
    if setting_up or checking:
        return 0.5
    if _environment.setup is not None and _environment.setup.returncode == 0 and _environment.report is None:
        _start_check()  # set up finished: show what it made
        return 0.5
    return None


def _start_check() -> None:
    python = preferences().server_python()

    def check() -> None:
        _environment.report = environment.probe(python)

    _environment.report = None
    _environment.checking = threading.Thread(target=check, daemon=True)
    _environment.checking.start()
    if bpy.app.background:  # no timer would ever show the result
        _environment.checking.join()
    elif not bpy.app.timers.is_registered(_environment_timer):
        bpy.app.timers.register(_environment_timer, first_interval=0.5)


class CFD_OT_check_environment(bpy.types.Operator):
    """Start the server's Python and show its version, torch, CUDA and device, or what is missing"""

    bl_idname = "cfd.check_environment"
    bl_label = "Check Environment"

    def execute(self, context):
        _environment.notes = []
        _start_check()
        report = _environment.report
        if report is not None:
            self.report(
                {"INFO"} if report.ok else {"ERROR"}, " · ".join(line for line in report.lines() if line)
            )
        return {"FINISHED"}


class CFD_OT_setup_environment(bpy.types.Operator):
    """Create a Python environment for the server and install its packages (downloads a few GB)"""

    bl_idname = "cfd.setup_environment"
    bl_label = "Set up Environment"

    @classmethod
    def poll(cls, context):
        if _environment.setup is not None and _environment.setup.returncode is None:
            cls.poll_message_set("Set up is already running")
            return False
        return True

    def invoke(self, context, event):
        return context.window_manager.invoke_confirm(self, event)

    def execute(self, context):
        if not bpy.app.online_access:
            _environment.notes = ["Blender is offline: enable Allow Online Access (Preferences › System)"]
            self.report({"ERROR"}, "Set up needs online access: enable it in Preferences › System › Network")
            return {"CANCELLED"}
        prefs = preferences()
        commands = environment.setup_commands(
            user_folder("venv", create=False), prefs.torch_build, base_python=sys.executable
        )
        _environment.report = None
        _environment.notes = []
        _environment.setup = environment.CommandRunner(commands, user_folder("logs") / "setup.log")
        _environment.setup.start()
        prefs.python_path = ""  # use the environment being made
        if bpy.app.background:
            _environment.setup.join()
            _start_check()
        else:
            bpy.app.timers.register(_environment_timer, first_interval=0.5)
        return {"FINISHED"}


CLASSES = (
    CFD_OT_generate,
    CFD_OT_reroll,
    CFD_OT_regenerate,
    CFD_OT_cancel,
    CFD_OT_dismiss_error,
    CFD_OT_stop_server,
    CFD_OT_randomize_seed,
    CFD_OT_add_camera_rig,
    CFD_OT_open_output_folder,
    CFD_OT_check_environment,
    CFD_OT_setup_environment,
)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    if bpy.app.timers.is_registered(_environment_timer):
        bpy.app.timers.unregister(_environment_timer)
