"""The Blender extension in real bpy, one scenario per process: `blender_scenarios.py NAME ZIP OUT`.

Each installs the built extension zip into the user folder named by BLENDER_USER_RESOURCES, points
it at a real server subprocess (this interpreter, `--runner blender_fake_runner:run_job`, which the
caller puts on PYTHONPATH), runs the operators and drives the pump by hand (bpy as a module has no
event loop, so timers never fire). Checks are asserts; measurements and image paths go to
OUT/result.json for the pytest side. bpy can be imported once per process, and keeping Blender out
of the pytest process keeps its threads apart from the server's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import bpy
import numpy as np
from PIL import Image

MODULE = "bl_ext.user_default.blender_cfd"
SERVER_ARGS = "--runner blender_fake_runner:run_job --describe blender_fake_runner:describe"
TIMEOUT = 60.0


class RecordingLayout:
    """Stands in for `UILayout` in Panel.draw: records what would be drawn, as (kind, details)."""

    def __init__(self, log: list):
        object.__setattr__(self, "log", log)

    def __setattr__(self, name, value):  # alert, scale_y, enabled...
        self.log.append(("set", {name: value}))

    def _child(self, kind, **details):
        self.log.append((kind, details))
        return RecordingLayout(self.log)

    def row(self, **details):
        return self._child("row", **details)

    def column(self, **details):
        return self._child("column", **details)

    def box(self, **details):
        return self._child("box", **details)

    def grid_flow(self, **details):
        return self._child("grid_flow", **details)

    def prop(self, data, name, **details):
        self.log.append(("prop", {"name": name, **details}))

    def operator(self, idname, **details):
        self.log.append(("operator", {"idname": idname, **details}))
        return SimpleNamespace()

    def template_icon(self, **details):
        self.log.append(("template_icon", details))

    def label(self, **details):
        self.log.append(("label", details))

    def progress(self, **details):
        self.log.append(("progress", details))

    def separator(self, **details):
        self.log.append(("separator", details))


def draw_panels() -> list:
    """What the sidebar shows now: both panels drawn into one recording."""
    log: list = []
    panel = sys.modules[f"{MODULE}.blender_cfd.panel"]
    for cls in (panel.CFD_PT_generate, panel.CFD_PT_variants):
        cls.draw(SimpleNamespace(layout=RecordingLayout(log)), bpy.context)
    return log


class WithLayout:
    """A registered struct (the add-on preferences) seen through a recording layout, for its draw()."""

    def __init__(self, struct, log: list):
        self.struct = struct
        self.layout = RecordingLayout(log)

    def __getattr__(self, name):
        return getattr(self.struct, name)


def draw_preferences(prefs) -> list:
    log: list = []
    type(prefs).draw(WithLayout(prefs, log), bpy.context)
    return log


def shown(log: list, kind: str, **match) -> list[dict]:
    return [d for k, d in log if k == kind and all(d.get(key) == value for key, value in match.items())]


def container_of(log: list, idname: str) -> str:
    """The kind of layout (row, column, box) an operator's button was drawn into."""
    index = next(i for i, (kind, d) in enumerate(log) if kind == "operator" and d["idname"] == idname)
    return next(kind for kind, _ in reversed(log[:index]) if kind in ("row", "column", "box"))


def labels(log: list) -> str:
    return " | ".join(d.get("text", "") for k, d in log if k == "label")


def install(zip_path: str, out: Path):
    """Install and enable the zip like a user would, then point it at this interpreter's server."""
    assert bpy.ops.extensions.package_install_files(
        filepath=zip_path, repo="user_default", enable_on_install=True
    ) == {"FINISHED"}
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.python_path = sys.executable
    prefs.output_dir = str(out / "assets")
    os.environ["BLENDER_CFD_SERVER_ARGS"] = SERVER_ARGS
    return sys.modules[f"{MODULE}.blender_cfd.session"], prefs


def pump_until(ctl, condition, timeout: float = TIMEOUT, what: str = "condition") -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}; error: {ctl.error}"
        ctl.pump()
        time.sleep(0.01)
    return time.monotonic() - start


def set_panel(prompt: str, seed: int) -> None:
    settings = bpy.context.scene.cfd
    settings.prompt = prompt
    settings.seed = seed
    settings.quality = "DRAFT"
    settings.method = "CFD"


def reported_error(operator, **options) -> str:
    """In background mode an operator's ERROR report raises RuntimeError: return its text."""
    try:
        operator(**options)
    except RuntimeError as error:
        return str(error)
    raise AssertionError(f"{operator.idname()} should have reported an error")


def overlapping(obj) -> list[str]:
    """Visible meshes whose world bounding box meets this object's."""
    bounds = sys.modules[f"{MODULE}.blender_cfd.scene_objects"].world_bounds
    low, high = bounds(obj)
    return [
        other.name
        for other in bpy.context.scene.objects
        if other is not obj
        and other.type == "MESH"
        and other.visible_get()
        and all(a < b for a, b in zip(bounds(other)[0], high, strict=True))
        and all(a < b for a, b in zip(low, bounds(other)[1], strict=True))
    ]


def vertices_of(obj) -> np.ndarray:
    co = np.empty(len(obj.data.vertices) * 3, dtype=np.float32)
    obj.data.attributes["position"].data.foreach_get("vector", co)
    return co.reshape(-1, 3)


# ------------------------------------------------------------------------------------------- scenarios


def variants(zip_path: str, out: Path) -> dict:
    """Generate with streaming, Re-roll, Regenerate; check the objects; render them; one undo step."""
    ctl_module, prefs = install(zip_path, out)
    ctl = ctl_module.get()
    jobs = sys.modules[f"{MODULE}.blender_cfd.jobs"]
    scene = bpy.context.scene
    _, colour, shape = scene.cfd.prompt.split()
    assert colour in jobs.COLOURS_VOCABULARY and shape in jobs.SHAPES_VOCABULARY, "a default that it knows"
    assert "knows cube, sphere" in labels(draw_panels()) and bpy.ops.cfd.generate.poll()
    prefs.prior = "SD21"
    assert "knows" not in labels(draw_panels()), "other priors take any prompt"
    prefs.prior = "SHAPES"
    scene.cfd.prompt = "  "
    assert not bpy.ops.cfd.generate.poll(), "Generate is greyed out without a prompt"
    assert "Type a prompt" in labels(draw_panels())
    scene.cursor.location = (0.0, 0.0, 0.0)
    set_panel("a wooden toy", 7)
    idle = draw_panels()
    assert shown(idle, "operator", idname="cfd.generate") and not shown(idle, "progress"), idle
    assert "Type a prompt" not in labels(idle)

    assert bpy.ops.cfd.generate() == {"FINISHED"}
    assert ctl.busy and bpy.ops.cfd.generate.poll() is False, "Generate must be greyed out while a job runs"
    pump_until(ctl, lambda: ctl.job is not None and ctl.job.preview_step > 0, what="the first preview")
    preview = bpy.data.objects[ctl.job.object_name]
    mesh_pointer = preview.data.as_pointer()
    counts = set()
    running = None
    deadline = time.monotonic() + TIMEOUT
    while ctl.busy:
        assert time.monotonic() < deadline, "the job did not finish"
        ctl.pump()
        time.sleep(0.01)
        if ctl.busy and ctl.job.preview_step > 0:
            obj = bpy.data.objects[ctl.job.object_name]
            assert obj.data.as_pointer() == mesh_pointer, "previews must update the same mesh datablock"
            assert obj.data.color_attributes.get("cfd_preview_color") is not None, "preview lacks colours"
            counts.add(len(obj.data.vertices))
            running = running or draw_panels()
    assert ctl.error is None, ctl.error
    assert len(counts) >= 2, f"the stream should change topology once (vertex counts seen: {counts})"
    assert shown(running, "progress") and shown(running, "operator", idname="cfd.cancel"), running
    assert "on CPU" in labels(running), "the device by name, not the machine's architecture"
    progress = shown(running, "progress")[0]
    assert "ETA" in progress["text"] and 0.0 < progress["factor"] <= 1.0, progress

    first = bpy.data.objects["a wooden toy (seed 7)"]
    assert first.as_pointer() == preview.as_pointer(), "the streaming object becomes the variant"
    assert first.users_collection[0].name == "CFD Variants"
    assert tuple(first.location) == (2.0, 0.0, 0.0), "beside the cube at the cursor, on the ground"
    assert not overlapping(first), overlapping(first)
    assert first["cfd_prompt"] == "a wooden toy" and first["cfd_seed"] == 7
    assert first["cfd_settings"]["method"] == "CFD" and first["cfd_settings"]["quality"] == "DRAFT"
    assert json.loads(first["cfd_job"])["seed"] == 7
    assert Path(first["cfd_output"], "asset.glb").is_file(), "the asset stays in the output folder"
    assert first.data.uv_layers.get("UVMap") is not None and "cfd_preview_color" not in first.data.attributes
    material = first.active_material
    assert material.name == "a wooden toy (seed 7)"
    bsdf = material.node_tree.nodes["Principled BSDF"]
    link = bsdf.inputs["Base Color"].links[0]
    assert link.from_node.bl_idname == "ShaderNodeTexImage"
    image = link.from_node.image
    assert image.packed_file is not None and tuple(image.size) == (128, 128) and image.name == first.name
    with Image.open(io.BytesIO(image.packed_file.data)) as texture:
        texels = np.asarray(texture.convert("RGB"), np.float64) / 255.0
    uv = np.empty(len(first.data.loops) * 2, np.float32)
    first.data.uv_layers["UVMap"].data.foreach_get("uv", uv)
    rows, cols = (np.clip((coord * 128).astype(int), 0, 127) for coord in (1.0 - uv[1::2], uv[0::2]))
    srgb = texels[rows, cols]
    expected = np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4).mean(axis=0)
    assert np.abs(np.array(material.diffuse_color[:3]) - expected).max() < 0.01, "Solid view: the mean colour"
    assert tuple(first.color) == tuple(material.diffuse_color)
    assert bpy.context.view_layer.objects.active == first and first.select_get()
    selected = draw_panels()
    assert "seed 7" in labels(selected) and "Material Preview" in labels(selected), labels(selected)

    bpy.ops.cfd.reroll(wait=True)
    second = bpy.data.objects[ctl.last_variant]
    seed2 = second["cfd_seed"]
    assert seed2 != 7 and scene.cfd.seed == seed2 and second.name == f"a wooden toy (seed {seed2})"
    assert second.location.x > first.location.x + 1.0 and abs(second.location.y - first.location.y) < 1e-6
    assert not overlapping(second), overlapping(second)
    assert json.loads(second["cfd_job"]) == {**json.loads(first["cfd_job"]), "seed": seed2}
    v1, v2 = vertices_of(first), vertices_of(second)
    assert v1.shape != v2.shape or not np.allclose(v1, v2), "a new seed must give a different mesh"

    bpy.context.view_layer.objects.active = first
    scene.cfd.prompt = "something else"
    bpy.ops.cfd.regenerate(wait=True)
    third = bpy.data.objects[ctl.last_variant]
    assert scene.cfd.prompt == "a wooden toy" and scene.cfd.seed == 7, (
        "Regenerate loads the variant's settings"
    )
    assert third.name.startswith("a wooden toy (seed 7)") and third.name != first.name
    assert np.array_equal(vertices_of(third), v1), "same seed and settings must give the same mesh"
    assert not overlapping(third), "the regenerated variant takes a free spot"

    listed = draw_panels()
    buttons = shown(listed, "operator", idname="cfd.select_variant")
    assert [b["text"] for b in buttons] == [first.name, second.name, third.name], buttons
    assert len(shown(listed, "template_icon")) == 3, "each variant shows its preview"
    thumbnail = sys.modules[f"{MODULE}.blender_cfd.panel"].thumbnail  # icon ids need a window: check images
    # preview.png is a strip of two 128-px views: the thumbnail is the first, not the strip squeezed
    assert all(tuple(thumbnail(v).image_size) == (128, 128) for v in (first, second, third))
    previews = {thumbnail(v).as_pointer() for v in (first, second, third)}
    assert len(previews) == 3, "each its own job's preview.png"
    assert bpy.ops.cfd.select_variant(name=second.name) == {"FINISHED"}
    assert bpy.context.view_layer.objects.active == second and second.select_get() and not third.select_get()
    assert shown(draw_panels(), "operator", idname="cfd.select_variant", text=second.name)[0]["depress"]

    render = out / "variants.png"
    render_variants([first, second, third], render)

    assert "torch" not in sys.modules, "Blender's process must never import torch"
    last = third.name
    before = {obj.name for obj in bpy.data.objects}
    bpy.ops.ed.undo()
    after = {obj.name for obj in bpy.data.objects}
    assert before - after == {last}, f"one undo removes just the last variant: {before - after}"
    return {"render": str(render), "stream_vertex_counts": sorted(counts), "seeds": [7, seed2, 7]}


def render_variants(objects, path: Path) -> None:
    """Workbench, textured, from a camera in front of the row of variants."""
    scene = bpy.context.scene
    for obj in scene.objects:
        if obj.type == "MESH" and obj not in objects:
            obj.hide_render = True
    center = sum((obj.location for obj in objects), start=objects[0].location * 0) / len(objects)
    camera = bpy.data.objects["Camera"]
    camera.location = (center.x, center.y - 9.0, 3.0)
    camera.rotation_euler = (np.radians(72.0), 0.0, 0.0)
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.display.shading.light = "STUDIO"
    scene.display.shading.color_type = "TEXTURE"
    scene.render.resolution_x, scene.render.resolution_y = 720, 300
    scene.render.filepath = str(path)
    bpy.ops.render.render(write_still=True)
    assert path.is_file()


def interruptions(zip_path: str, out: Path) -> dict:
    """Cancel, delete the streaming object, load another file, kill the server, out of memory, no env."""
    ctl_module, prefs = install(zip_path, out)
    ctl = ctl_module.get()
    saved = out / "other.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(saved), copy=True)
    results = {}

    def start_slow(prompt: str = "a slow vase [slow]") -> object:
        set_panel(prompt, 3)
        assert bpy.ops.cfd.generate() == {"FINISHED"}
        pump_until(ctl, lambda: ctl.job is not None and ctl.job.preview_step > 0, what="a preview")
        return bpy.data.objects[ctl.job.object_name]

    # Cancel: the server confirms, the partial object goes, Generate works again.
    preview = start_slow()
    name = preview.name
    assert bpy.ops.cfd.cancel() == {"FINISHED"}
    assert name not in bpy.data.objects, "cancel removes the partial mesh"
    results["cancel_seconds"] = pump_until(ctl, lambda: not ctl.busy, what="cancelled")
    assert ctl.error is None and bpy.ops.cfd.generate.poll()

    # Deleting the streaming object cancels the job.
    preview = start_slow()
    bpy.data.objects.remove(preview)
    pump_until(ctl, lambda: not ctl.busy, what="cancel after deleting the object")
    assert ctl.error is None

    # Loading another file cancels it too (the load_pre handler), and nothing leaks into the new file.
    start_slow()
    bpy.ops.wm.open_mainfile(filepath=str(saved))
    assert ctl.phase.name == "CANCELLING", ctl.phase
    pump_until(ctl, lambda: not ctl.busy, what="cancel after loading a file")
    assert not [obj for obj in bpy.data.objects if obj.name.startswith("CFD preview")]

    # A killed server is reported; the panel shows why; Generate starts a new server.
    start_slow()
    process = ctl.connection.process
    os.kill(process.pid, signal.SIGKILL)
    pump_until(ctl, lambda: not ctl.busy, what="the crash to be noticed")
    assert ctl.error is not None and ctl.error.code == "server_exited", ctl.error
    assert ctl.error.message == "The generation server stopped unexpectedly", ctl.error
    assert "exit status -9 (SIGKILL)" in ctl.error.detail, ctl.error.detail
    crashed = draw_panels()
    text = labels(crashed)
    assert "The generation server stopped" in text and "(SIGKILL)" in text, text
    assert shown(crashed, "operator", idname="cfd.check_environment"), "the error box offers the check"
    buttons = {container_of(crashed, name) for name in ("cfd.check_environment", "cfd.dismiss_error")}
    assert buttons == {"column"}, "one button a line, so the sidebar does not cut their labels"
    assert shown(crashed, "operator", idname="cfd.generate"), "Generate is offered again"
    results["crash_panel"] = labels(crashed)
    set_panel("a recovered cup", 5)
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}
    assert ctl.error is None and "a recovered cup (seed 5)" in bpy.data.objects
    assert ctl.connection.process.pid != process.pid

    # A job error (out of memory) shows the server's message and fix; the partial object goes.
    set_panel("a heavy statue [oom]", 1)
    assert "out of memory" in reported_error(bpy.ops.cfd.generate, wait=True)
    assert ctl.error.code == "out_of_memory" and "render size" in ctl.error.fix, ctl.error
    assert not [obj for obj in bpy.data.objects if obj.name.startswith("CFD preview")]
    oom = draw_panels()
    assert "out of memory" in labels(oom) and shown(oom, "operator", idname="cfd.dismiss_error")
    results["oom_panel"] = labels(oom)
    bpy.ops.cfd.dismiss_error()
    assert ctl.error is None

    # Quitting (here: disabling the extension) stops the server.
    process = ctl.connection.process
    prefs.python_path = str(out / "no-such-python")
    bpy.ops.cfd.stop_server()
    assert process.poll() is not None, "Stop Server ends the process"
    assert "no-such-python" in reported_error(bpy.ops.cfd.generate)
    assert ctl.error.code == "no_environment" and "no-such-python" in ctl.error.message, ctl.error
    results["no_environment_panel"] = labels(draw_panels())
    prefs.python_path = sys.executable
    set_panel("a last cube", 2)
    assert bpy.ops.cfd.generate() == {"FINISHED"}
    process = ctl.connection.process
    bpy.ops.preferences.addon_disable(module=MODULE)
    assert process.poll() is not None, "disabling the extension (as quitting does) stops the server"
    return results


def pump_timing(zip_path: str, out: Path) -> dict:
    """Seconds per pump while a 50k-vertex preview streams in (new topology once, then in place)."""
    ctl_module, _ = install(zip_path, out)
    ctl = ctl_module.get()
    set_panel("a dense ball [50k]", 11)
    assert bpy.ops.cfd.generate() == {"FINISHED"}
    vertex_counts = set()
    deadline = time.monotonic() + TIMEOUT
    while ctl.busy:
        assert time.monotonic() < deadline, "the job did not finish"
        ctl.pump()
        time.sleep(0.01)
        if ctl.busy and ctl.job.preview_step > 0:
            vertex_counts.add(len(bpy.data.objects[ctl.job.object_name].data.vertices))
    assert ctl.error is None, ctl.error
    assert vertex_counts == {50178, 49954}, vertex_counts
    ticks = {kind: [1000 * seconds for seconds in values] for kind, values in ctl.stats.ticks.items()}
    assert len(ticks["mesh_in_place"]) >= 2 and len(ticks["mesh_new_topology"]) >= 2, ticks
    summary = {
        kind: {"ticks": len(ms), "median_ms": float(np.median(ms)), "max_ms": max(ms)}
        for kind, ms in ticks.items()
        if ms
    }
    return {"vertices": sorted(vertex_counts), "tick_ms": summary}


def environment(zip_path: str, out: Path) -> dict:
    """Check Environment on this interpreter and on a missing one; Set Up refuses while offline."""
    _, prefs = install(zip_path, out)
    environment_ui = sys.modules[f"{MODULE}.blender_cfd.environment_ui"]
    assert bpy.ops.cfd.check_environment() == {"FINISHED"}
    report = environment_ui.environment_state().report
    assert report.ok, report
    assert report.python_version == ".".join(map(str, sys.version_info[:3]))
    assert report.torch.startswith("2.") and report.device == "cpu", report
    rows = environment_ui.environment_state().rows()
    assert rows[0] == ("The server environment works", "CHECKMARK"), rows
    assert ("device: CPU", "BLANK1") in rows, "details are not marked as the state itself"
    good = [text for text, _ in rows]
    environment = sys.modules[f"{MODULE}.blender_cfd.environment"]
    assert prefs.torch_build == environment.default_torch_build(), "Set Up offers the build this machine runs"
    drawn = draw_preferences(prefs)
    assert shown(drawn, "operator", idname="cfd.check_environment")
    assert shown(drawn, "operator", idname="cfd.setup_environment")
    assert "torch 2." in labels(drawn) and "Allow Online Access" in labels(drawn), labels(drawn)
    assert {
        "python_path",
        "prior",
        "device",
        "precision",
        "output_dir",
        "remote_address",
        "remote_token",
        "remote_fingerprint",
    } <= {d["name"] for d in shown(drawn, "prop")}
    assert "custom_prior" not in {d["name"] for d in shown(drawn, "prop")}
    prefs.prior = "CUSTOM"
    assert "custom_prior" in {d["name"] for d in shown(draw_preferences(prefs), "prop")}
    prefs.prior = "SHAPES"

    prefs.python_path = str(out / "missing" / "python")
    assert "not found" in reported_error(bpy.ops.cfd.check_environment)
    report = environment_ui.environment_state().report
    assert not report.ok and "not found" in report.problem and "Set up Environment" in report.fix, report
    rows = environment_ui.environment_state().rows()
    assert rows[0][1] == "ERROR" and "CHECKMARK" not in {icon for _, icon in rows}, rows

    assert not bpy.app.online_access
    assert "online access" in reported_error(bpy.ops.cfd.setup_environment)
    assert "Online Access" in environment_ui.environment_state().rows()[0][0]
    assert not Path(bpy.utils.extension_path_user(MODULE, path="venv")).exists(), "nothing may be installed"
    return {"check_lines": good, "preferences": labels(drawn)}


def inputs(zip_path: str, out: Path) -> dict:
    """The orbit rig, the scene's selected cameras and a starting mesh reach the server as valid jobs."""
    ctl_module, _ = install(zip_path, out)
    ctl = ctl_module.get()
    scene = bpy.context.scene
    scene.cursor.location = (0.0, 3.0, 0.0)
    assert bpy.ops.cfd.add_camera_rig() == {"FINISHED"}
    rig = scene.cfd.camera_rig
    assert rig is not None and rig.display_type == "WIRE" and rig.hide_render
    edges = len(rig.data.edges)
    rig.cfd_rig.elevation_max = np.radians(60.0)
    rig.cfd_rig.radius_max = 3.0
    radius = np.linalg.norm(vertices_of(rig), axis=1)
    assert len(rig.data.edges) == edges and abs(radius.max() - 3.0) < 1e-5, "the gizmo follows its ranges"
    set_panel("a ringed planet", 21)
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    orbit = json.loads(bpy.data.objects[ctl.last_variant]["cfd_job"])["orbit"]
    assert orbit["elevation_deg"] == [-10.0, 60.0] and orbit["radius"] == [2.2, 3.0], orbit

    camera = bpy.data.objects["Camera"]
    bpy.context.view_layer.objects.active = camera
    for obj in scene.objects:
        obj.select_set(obj in (camera, bpy.data.objects["Cube"]))
    scene.cfd.camera_source = "SELECTED"
    scene.cfd.init_shape = "MESH"
    scene.cfd.init_object = bpy.data.objects["Cube"]
    drawn = draw_panels()
    assert "1 selected camera" in labels(drawn) and shown(drawn, "prop", name="init_object"), labels(drawn)
    set_panel("a camera-shy cube", 22)
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    job = json.loads(bpy.data.objects[ctl.last_variant]["cfd_job"])
    assert "orbit" not in job and job["init_shape"] == "mesh" and len(job["cameras"]) == 1
    c2w = np.array(job["cameras"][0]["c2w"])
    expected = np.array(camera.matrix_world)[:3, 3] - (0.0, 3.0, 0.0)
    np.testing.assert_allclose(c2w[:3, 3], expected, atol=1e-5)
    assert job["cameras"][0]["fovy_deg"] == np.degrees(camera.data.angle_y)
    camera.select_set(False)
    assert "Select at least one camera" in reported_error(bpy.ops.cfd.generate)
    return {"orbit": orbit, "camera_c2w": c2w.tolist()}


def prior_defaults(zip_path: str, out: Path) -> dict:
    """Guidance, presets, negative prompt and the time estimate follow the chosen prior; an override
    and the prior default both reach the server and come back on Regenerate."""
    ctl_module, prefs = install(zip_path, out)
    ctl = ctl_module.get()
    settings = bpy.context.scene.cfd
    set_panel("a wooden chair", 5)
    drawn = {}
    for prior in ("SHAPES", "SD21", "MVDREAM_SD21"):
        prefs.prior = prior
        for device in ("CPU", "CUDA"):
            prefs.device = device
            drawn[f"{prior} {device}"] = labels(draw_panels())
    shapes, sd = drawn["SHAPES CPU"], drawn["SD21 CPU"]
    assert "Guidance: prior default (the prior's own)" in shapes and "default negative" not in shapes
    assert "Guidance: prior default (70 / 50 / 50)" in sd and "default negative prompt" in sd, sd
    assert "Guidance: prior default (50 / 50 / 50)" in drawn["MVDREAM_SD21 CPU"]
    assert "1200 steps, 256 px mesh views" in sd and "300 steps, 64 px views" in shapes
    estimates = {key: text.split("Estimated ")[1].split(" | ")[0] for key, text in drawn.items()}
    assert estimates["SHAPES CPU"] == "about 60 s on the CPU" and estimates["SD21 CPU"].endswith(
        "h on the CPU"
    )
    assert estimates["SD21 CUDA"] == "about 4 min on a GPU", estimates
    assert not shown(draw_panels(), "prop", name="guidance_scale"), "no value to edit while it is the default"

    prefs.prior, prefs.device = "SD21", "CPU"
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    default_job = json.loads(bpy.data.objects[ctl.last_variant]["cfd_job"])
    settings.guidance_override, settings.guidance_scale = True, 12.0
    assert shown(draw_panels(), "prop", name="guidance_scale")
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    override_job = json.loads(bpy.data.objects[ctl.last_variant]["cfd_job"])
    bpy.context.view_layer.objects.active = bpy.data.objects[ctl.last_variant]
    settings.guidance_override = False
    assert bpy.ops.cfd.regenerate(wait=True) == {"FINISHED"}, ctl.error
    assert settings.guidance_override and settings.guidance_scale == 12.0, "Regenerate restores the override"
    return {"default_job": default_job, "override_job": override_job, "estimates": estimates}


@contextlib.contextmanager
def tcp_server(args: list[str]):
    """`serve --listen` on a free loopback port with the token "s3cret"; yields its address."""
    command = [sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0", "--token", "s3cret", *args]
    server = subprocess.Popen(
        command, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True
    )
    try:
        address = next(json.loads(line)["listening"] for line in server.stderr if '"listening"' in line)
        threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its log from blocking it
        yield address
        assert server.poll() is None, "leaving must not stop a server that others may use"
    finally:
        server.kill()
        server.wait()


def remote(zip_path: str, out: Path) -> dict:
    """A server started elsewhere (`serve --listen`, loopback TCP): the token is checked, jobs work."""
    _, prefs = install(zip_path, out)
    ctl = sys.modules[f"{MODULE}.blender_cfd.session"].get()
    with tcp_server([*SERVER_ARGS.split(), "--output-root", str(out / "remote_assets")]) as address:
        prefs.remote_address, prefs.remote_token = address, "wrong"
        set_panel("a remote teapot", 9)
        assert "token" in reported_error(bpy.ops.cfd.generate, wait=True)
        assert ctl.error.code == "unauthorized" and ctl.connection is None, ctl.error
        prefs.remote_token = "s3cret"
        assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
        variant = bpy.data.objects["a remote teapot (seed 9)"]
        assert (
            variant.active_material is not None
            and ctl.server_info["device_name"] == "blender-cfd fake runner"
        )
        ctl.shutdown()
    return {"address": address}


def remote_tls(zip_path: str, out: Path) -> dict:
    """A server beyond loopback over TLS, shared with a script: the pinned fingerprint reaches it,
    another is refused, the artist's job queues behind the script's and the panel says so."""
    _, prefs = install(zip_path, out)
    ctl = sys.modules[f"{MODULE}.blender_cfd.session"].get()
    wire = sys.modules[f"{MODULE}.server.wire.client"]
    cert, key = out / "server.crt", out / "server.key"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", "2", "-nodes"]
    openssl += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=blender-cfd"]
    subprocess.run(openssl, check=True, capture_output=True)  # the README's command, smaller and shorter
    command = [sys.executable, "-m", "server", "serve", "--listen", "127.0.0.1:0", "--allow-remote"]
    command += ["--tls-cert", str(cert), "--tls-key", str(key), "--token", "s3cret"]
    command += [*SERVER_ARGS.split(), "--output-root", str(out / "remote_assets")]
    server = subprocess.Popen(
        command, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True
    )
    try:
        announced: dict = {}
        for line in server.stderr:
            if line.startswith("{"):
                announced.update(json.loads(line))
            if "listening" in announced:
                break
        threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its log from blocking it
        address, fingerprint = announced["listening"], announced["tls_fingerprint"]
        prefs.remote_address, prefs.remote_token = address, "s3cret"
        set_panel("a pinned teapot", 3)

        prefs.remote_fingerprint = ("FF" if fingerprint.startswith("00") else "00") + fingerprint[2:]
        assert "certificate" in reported_error(bpy.ops.cfd.generate, wait=True)
        assert ctl.error.code == "certificate_mismatch" and fingerprint in ctl.error.detail, ctl.error
        assert ctl.connection is None and "CFD preview" not in " ".join(bpy.data.objects.keys())

        prefs.remote_fingerprint = ""  # plain TCP to a TLS server
        with contextlib.suppress(RuntimeError):  # reported at once if the server hung up before the job
            bpy.ops.cfd.generate()
        pump_until(ctl, lambda: ctl.error is not None, what="the refusal of plain TCP")
        assert ctl.error.code == "remote_closed" and "fingerprint" in ctl.error.fix, ctl.error

        prefs.remote_fingerprint = fingerprint.replace(":", " ").lower()  # pasted any which way
        host, port = address.rsplit(":", 1)
        script = wire.TcpConnection(host, int(port), "s3cret", fingerprint=fingerprint)
        script.hello(timeout=30)
        script.generate("script-job", {"prompt": "a script's mug [slow]", "seed": 1, "steps": 6})
        script.wait_for("progress", 30)
        assert bpy.ops.cfd.generate() == {"FINISHED"}
        pump_until(ctl, lambda: ctl.progress.queue_position == 1, what="the queue position")
        bar = shown(draw_panels(), "progress")[0]
        script.cancel("script-job")
        script_frames = [script.wait_for({"cancelled", "done", "error"}, 30)]
        script_frames += script.poll()
        assert ctl.wait(TIMEOUT) and ctl.error is None, ctl.error
        script_frames += script.poll()
        script.close()
        variant = bpy.data.objects["a pinned teapot (seed 3)"]
        assert variant.active_material is not None
        ctl.shutdown()
        assert server.poll() is None, "leaving must not stop a server that others may use"
    finally:
        server.kill()
        server.wait()
    assert script_frames[0].type == "cancelled" and {m.get("job_id") for m in script_frames} == {"script-job"}
    assert bar["text"] == "Queued: 1 job ahead" and bar["factor"] == 0.0, bar
    return {"address": address, "fingerprint": fingerprint, "queued_text": bar["text"]}


def blender_crash(zip_path: str, out: Path) -> dict:
    """Finish one asset, start another, then die like a crashing Blender (SIGKILL, no clean-up at all)."""
    ctl_module, _ = install(zip_path, out)
    ctl = ctl_module.get()
    set_panel("a sturdy mug", 4)
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}
    finished = bpy.data.objects["a sturdy mug (seed 4)"]["cfd_output"]
    set_panel("an unfinished mug [slow]", 5)
    assert bpy.ops.cfd.generate() == {"FINISHED"}
    pump_until(ctl, lambda: ctl.job is not None and ctl.job.preview_step > 0, what="a preview")
    result = {"server_pid": ctl.connection.process.pid, "finished_asset": finished}
    (out / "result.json").write_text(json.dumps(result))
    os.kill(os.getpid(), signal.SIGKILL)


def quick_shapes_job(out: Path, guidance_scale: float) -> dict:
    """'a red cube', seed 3, on the shipped shapes prior, as the panel builds it; a few quick steps."""
    jobs = sys.modules[f"{MODULE}.blender_cfd.jobs"]
    job = jobs.build_job(
        prompt="a red cube",
        negative_prompt="",
        seed=3,
        quality="DRAFT",
        method="CFD",
        guidance_scale=guidance_scale,
        init_shape="SPHERE",
        prior="SHAPES",
        device="CPU",
        precision="AUTO",
        output_dir=str(out / "assets"),
        orbit={},
    )
    return {
        **job,
        "steps": 6,
        "grid_resolution": 12,
        "render_size": 32,
        "texture_size": 128,
        "preview_max_fps": 30,
    }


def shapes_prior(zip_path: str, out: Path) -> dict:
    """The real generator on the shipped shapes prior (short jobs sent through the session, as
    Generate sends them): streamed previews, a textured variant from the real GLB, same seed ⇒ same mesh."""
    ctl_module, _ = install(zip_path, out)
    os.environ.pop("BLENDER_CFD_SERVER_ARGS")  # the real job runner, not the fake one
    ctl = ctl_module.get()
    job = quick_shapes_job(out, guidance_scale=7.5)
    names, previews = [], []
    for location in ((0.0, 0.0, 0.0), (2.0, 0.0, 0.0)):
        assert ctl.start(bpy.context, job, location) is not None, ctl.error
        pump_until(ctl, lambda: not ctl.busy, what="the job to finish")
        assert ctl.error is None, ctl.error
        assert "fake" not in ctl.server_info["device_name"]
        previews.append(ctl.stats.preview_delays[-1])
        names.append(ctl.last_variant)
    first, again = (bpy.data.objects[name] for name in names)
    assert first.name == "a red cube (seed 3)" and first.users_collection[0].name == "CFD Variants"
    image = (
        first.active_material.node_tree.nodes["Principled BSDF"].inputs["Base Color"].links[0].from_node.image
    )
    assert image.packed_file is not None and tuple(image.size) == (128, 128)
    pixels = np.array(image.pixels[:]).reshape(128, 128, 4)[::-1, :, :3]  # Blender's rows run bottom-up
    with Image.open(Path(first["cfd_output"]) / "a-red-cube.png") as baked:
        expected = np.asarray(baked.convert("RGB"), np.float64) / 255.0
    assert np.abs(pixels - expected).max() < 1e-3, "the variant shows the texture the server baked"
    assert np.array_equal(vertices_of(first), vertices_of(again)), "same seed and settings, same mesh"
    assert "torch" not in sys.modules, "Blender's process must never import torch"
    return {"variants": names, "preview_delay_ms": [1e3 * d for d in previews]}


def batch_variants(zip_path: str, out: Path) -> dict:
    """Variants: N new seeds of the selected variant as one batch, run by the real server on the test's
    Ray instance (CFD_TEST_RAY); each variant is imported as it arrives, beside the others, with the
    progress bar counting variants; a prompt list makes each listed prompt, on a server reached over TCP;
    an older server says why not."""
    ctl_module, prefs = install(zip_path, out)
    os.environ["BLENDER_CFD_SERVER_ARGS"] = f"--ray {os.environ['CFD_TEST_RAY']}"
    ctl = ctl_module.get()
    settings = bpy.context.scene.cfd
    assert ctl.start(bpy.context, quick_shapes_job(out, guidance_scale=10.0), (0.0, 0.0, 0.0)) is not None
    pump_until(ctl, lambda: not ctl.busy, timeout=300, what="the reference variant")
    reference = bpy.data.objects[ctl.last_variant]
    assert ctl.error is None and reference.name == "a red cube (seed 3)", ctl.error

    settings.variants = 3  # on two workers: the third arrives after the first two are in the scene
    assert bpy.ops.cfd.variants() == {"FINISHED"} and ctl.job.is_batch
    panel = draw_panels()
    assert shown(panel, "prop", name="variants") and shown(panel, "operator", idname="cfd.variants")
    assert "Variants 0/3 done" in shown(panel, "progress")[0]["text"]
    collection = bpy.data.collections["CFD Variants"]
    arrivals, started = {}, time.monotonic()  # variants in the scene -> when, and the progress then
    while ctl.busy:
        assert time.monotonic() - started < 300, f"the batch did not end; error: {ctl.error}"
        ctl.pump()
        in_scene = len(collection.objects) - 1
        if in_scene and in_scene not in arrivals:
            arrivals[in_scene] = (round(time.monotonic() - started, 1), ctl.progress.step, ctl.busy)
        time.sleep(0.05)
    assert ctl.error is None, ctl.error
    assert any(busy for _, _, busy in arrivals.values()), (
        f"a variant was in before the batch ended: {arrivals}"
    )
    assert all(step >= count for count, (_, step, _) in arrivals.items()), arrivals
    batch = [obj for obj in collection.objects if obj is not reference]
    seeds = sorted(obj["cfd_seed"] for obj in batch)
    assert len(batch) == 3 and len(set(seeds)) == 3 and 3 not in seeds, seeds
    for obj in batch:
        assert obj.name == f"a red cube (seed {obj['cfd_seed']})" and len(obj.data.polygons) > 0
        assert obj.active_material is not None and not overlapping(obj), overlapping(obj)
        assert obj.location.x > reference.location.x, "placed beside the variant it varies"
        assert (Path(obj["cfd_output"]) / "preview.png").is_file()
    xs = sorted(obj.location.x for obj in batch)
    assert xs[0] < xs[1] < xs[2], xs
    render_variants([reference, *batch], out / "batch_variants.png")

    # A prompt list (each listed prompt with each of Variants seeds, here one), sent to a server reached
    # over TCP with its token, as a cluster's head node is: the variants' GLBs come in their frames.
    ctl.shutdown()
    with tcp_server(
        ["--ray", os.environ["CFD_TEST_RAY"], "--output-root", str(out / "head_node")]
    ) as address:
        prefs.remote_address, prefs.remote_token = address, "s3cret"
        text = bpy.data.texts.new("level")
        text.write("a blue sphere\n# not a prompt\n\na green cone\n")
        settings.prompt_list, settings.variants = text, 1
        assert bpy.ops.cfd.variants(wait=True) == {"FINISHED"}, ctl.error
        ctl.shutdown()
    prefs.remote_address = ""
    listed = [obj for obj in collection.objects if obj is not reference and obj not in batch]
    assert sorted(obj["cfd_prompt"] for obj in listed) == ["a blue sphere", "a green cone"], listed
    assert all(len(obj.data.polygons) > 0 and not overlapping(obj) for obj in listed)
    assert "torch" not in sys.modules and "ray" not in sys.modules, "Blender never imports torch or Ray"

    # A server older than batches answers unknown_type: a clear message, and nothing is left running.
    os.environ["BLENDER_CFD_SERVER_ARGS"] = SERVER_ARGS.replace("blender_fake_runner", "blender_old_server")
    assert bpy.ops.cfd.variants() == {"FINISHED"}
    pump_until(ctl, lambda: not ctl.busy, what="the old server's answer")
    assert ctl.error.code == "batch_unsupported", ctl.error
    assert "older than Variants" in labels(draw_panels())
    render = str(out / "batch_variants.png")
    return {
        "arrivals": arrivals,
        "batch_x": xs,
        "seeds": seeds,
        "old_server": ctl.error.message,
        "render": render,
    }


def world_vertices(obj) -> np.ndarray:
    matrix = np.array(obj.matrix_world, dtype=np.float64)
    return vertices_of(obj).astype(np.float64) @ matrix[:3, :3].T + matrix[:3, 3]


def check_resting(obj, size: float, surface: float) -> dict:
    """Largest dimension `size` within 1 %, lowest vertex on `surface` within 1 mm, origin at the bottom
    centre of the bounds, upright (no rotation, unit scale)."""
    points = world_vertices(obj)
    low, high = points.min(axis=0), points.max(axis=0)
    largest = float((high - low).max())
    assert abs(largest - size) <= 0.01 * size, (obj.name, largest, size)
    assert abs(low[2] - surface) <= 1e-3, (obj.name, low[2], surface)
    bottom_centre = ((low[0] + high[0]) / 2, (low[1] + high[1]) / 2, low[2])
    np.testing.assert_allclose(tuple(obj.location), bottom_centre, atol=1e-4)
    assert tuple(obj.rotation_euler) == (0.0, 0.0, 0.0) and tuple(obj.scale) == (1.0, 1.0, 1.0)
    return {"largest": largest, "lowest_z": float(low[2])}


def datablocks() -> dict[str, set[str]]:
    return {
        kind: {d.name for d in getattr(bpy.data, kind)}
        for kind in ("objects", "meshes", "materials", "images")
    }


def orphans() -> set[str]:
    return {
        f"{kind}:{d.name}"
        for kind in ("meshes", "materials", "images")
        for d in getattr(bpy.data, kind)
        if d.users == 0
    }


def placement(zip_path: str, out: Path) -> dict:
    """Real size on the surface below the cursor (the ground, a raised plane, a box on it), Re-roll at
    the same size beside it, one undo step per variant, Finish now, and an older server's answer to it."""
    ctl_module, _ = install(zip_path, out)
    ctl = ctl_module.get()
    scene = bpy.context.scene
    for obj in list(scene.objects):
        bpy.data.objects.remove(obj)
    results = {}

    scene.cursor.location = (0.3, -0.2, 2.0)  # in the air above an empty scene: the ground plane z = 0
    set_panel("a small pot", 1)
    scene.cfd.size = 1.5
    assert shown(draw_panels(), "prop", name="size")
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    pot = bpy.data.objects[ctl.last_variant]
    results["empty_scene"] = check_resting(pot, 1.5, 0.0)
    np.testing.assert_allclose(tuple(pot.location.xy), (0.3, -0.2), atol=1e-6)
    assert pot["cfd_size"] == 1.5
    bpy.data.objects.remove(pot)

    plane_mesh = bpy.data.meshes.new("Table")
    plane_mesh.from_pydata([(-10, -10, 0), (10, -10, 0), (10, 10, 0), (-10, 10, 0)], [], [(0, 1, 2, 3)])
    table = bpy.data.objects.new("Table", plane_mesh)
    table.location = (0.0, 0.0, 0.75)
    scene.collection.objects.link(table)
    scene.cursor.location = (0.3, -0.2, 3.0)
    set_panel("a teapot", 2)
    scene.cfd.size = 0.8
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    first = bpy.data.objects[ctl.last_variant]
    results["raised_plane"] = check_resting(first, 0.8, 0.75)
    scene.cfd.size = 2.0  # Re-roll keeps its variant's size
    bpy.ops.cfd.reroll(wait=True)
    second = bpy.data.objects[ctl.last_variant]
    check_resting(second, 0.8, 0.75)
    assert second.location.x > first.location.x and abs(second.location.y - first.location.y) < 1e-6
    for obj in (first, second):
        assert set(overlapping(obj)) <= {"Table"}, overlapping(obj)  # it touches the table it stands on

    scene.cursor.location = (-3.0, 4.0, 0.75)  # a cursor placed on the table itself
    set_panel("a cup", 3)
    scene.cfd.size = 0.5
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    check_resting(bpy.data.objects[ctl.last_variant], 0.5, 0.75)

    assert bpy.ops.mesh.primitive_cube_add(size=1.0, location=(6.0, 6.0, 1.25)) == {"FINISHED"}
    box = bpy.context.active_object
    box.name = "Box"
    scene.cursor.location = (6.0, 6.0, 3.0)  # above a box standing on the table: on the box
    set_panel("a vase", 4)
    scene.cfd.size = 0.6
    bpy.ops.ed.undo_push(message="before the vase")
    before, orphans_before = datablocks(), orphans()
    assert bpy.ops.cfd.generate(wait=True) == {"FINISHED"}, ctl.error
    vase = bpy.data.objects[ctl.last_variant]
    results["on_a_box"] = check_resting(vase, 0.6, 1.75)
    assert set(overlapping(vase)) <= {"Box"}

    added = {kind: names - before[kind] for kind, names in datablocks().items()}
    assert all(added[kind] for kind in ("objects", "meshes", "materials", "images")), added
    bpy.ops.ed.undo()
    assert datablocks() == before, "one undo removes the variant with its mesh, material and image"
    assert orphans() == orphans_before, "and leaves no orphan datablocks"
    results["undo_removed"] = {kind: sorted(names) for kind, names in added.items()}

    # Finish now: the asset as it is, textured and written like a whole job's, job.json naming the step.
    set_panel("a slow lamp [slow]", 6)
    assert bpy.ops.cfd.generate() == {"FINISHED"}
    pump_until(ctl, lambda: ctl.job is not None and ctl.job.preview_step >= 2, what="two previews")
    running = draw_panels()
    assert shown(running, "operator", idname="cfd.finish_now") and shown(
        running, "operator", idname="cfd.cancel"
    )
    assert bpy.ops.cfd.finish_now() == {"FINISHED"}
    assert "Finishing" in shown(draw_panels(), "progress")[0]["text"] and not bpy.ops.cfd.finish_now.poll()
    pump_until(ctl, lambda: not ctl.busy, what="the finished asset")
    assert ctl.error is None, ctl.error
    lamp = bpy.data.objects[ctl.last_variant]
    assert lamp.name == "a slow lamp [slow] (seed 6)" and lamp.active_material is not None
    record = json.loads((Path(lamp["cfd_output"]) / "job.json").read_text())
    assert 2 <= record["stopped_at_step"] < 6, record
    known = set(bpy.data.objects.keys())
    assert bpy.ops.import_scene.gltf(filepath=str(Path(lamp["cfd_output"]) / "asset.glb")) == {"FINISHED"}
    imported = [bpy.data.objects[name] for name in set(bpy.data.objects.keys()) - known]
    assert any(obj.type == "MESH" and len(obj.data.polygons) > 0 for obj in imported), imported
    results["finished_at_step"] = record["stopped_at_step"]

    # An older server answers finish with unknown_type: a clear message, and the job runs on to its end.
    ctl.shutdown()
    os.environ["BLENDER_CFD_SERVER_ARGS"] = SERVER_ARGS.replace("blender_fake_runner", "blender_old_server")
    set_panel("an old lamp [slow]", 7)
    assert bpy.ops.cfd.generate() == {"FINISHED"}
    pump_until(ctl, lambda: ctl.job is not None and ctl.job.preview_step >= 1, what="a preview")
    bpy.ops.cfd.finish_now()
    pump_until(ctl, lambda: ctl.error is not None, what="the old server's answer")
    assert ctl.error.code == "finish_unsupported" and ctl.busy, ctl.error
    assert "older than Finish now" in labels(draw_panels())
    pump_until(ctl, lambda: not ctl.busy, what="the job's own end")
    old = bpy.data.objects[ctl.last_variant]
    assert old.name == "an old lamp [slow] (seed 7)"
    assert json.loads((Path(old["cfd_output"]) / "job.json").read_text())["stopped_at_step"] is None
    results["old_server_message"] = ctl.error.message
    return results


FRESH_SESSION = """
import json, sys
import bpy
path = sys.argv[1]
with bpy.data.libraries.load(path, assets_only=True) as (source, target):
    listed = list(source.objects)
    target.objects = list(listed)
obj = target.objects[0]
image = obj.active_material.node_tree.nodes["Image Texture"].image
print(json.dumps({
    "listed": listed,
    "description": obj.asset_data.description,
    "catalog_id": obj.asset_data.catalog_id,
    "tags": sorted(tag.name for tag in obj.asset_data.tags),
    "texture_packed": image.packed_file is not None,
    "texture_size": list(image.size),
    "faces": len(obj.data.polygons),
    "preview_size": list(obj.preview.image_size),
}))
"""


def keep_assets(zip_path: str, out: Path) -> dict:
    """Keep on a real shapes-prior variant: the asset's preview, description, tags and catalog; twice is
    once; a library folder gets its own .blend that a fresh session lists; then Finish now on a real job."""
    ctl_module, prefs = install(zip_path, out)
    os.environ.pop("BLENDER_CFD_SERVER_ARGS")  # the real job runner, not the fake one
    ctl = ctl_module.get()
    job = quick_shapes_job(out, guidance_scale=10.0)
    assert ctl.start(bpy.context, job, (0.0, 0.0, 0.0)) is not None, ctl.error
    pump_until(ctl, lambda: not ctl.busy, what="the job to finish")
    assert ctl.error is None, ctl.error
    cube = bpy.data.objects[ctl.last_variant]
    check_resting(cube, 1.0, 0.0)
    results = {}

    bpy.context.view_layer.objects.active = cube
    menu: list = []
    operators = sys.modules[f"{MODULE}.blender_cfd.operators"]
    operators.context_menu(SimpleNamespace(layout=RecordingLayout(menu)), bpy.context)
    assert shown(menu, "operator", idname="cfd.keep_asset"), "the object's context menu offers Keep"
    assert bpy.ops.cfd.keep_asset(name=cube.name) == {"FINISHED"}  # in an unsaved file
    assert not list(out.glob("*.cats.txt"))
    bpy.ops.wm.save_as_mainfile(filepath=str(out / "scene.blend"))  # its catalog file goes beside it
    data = cube.asset_data
    assert data is not None and data.description == "a red cube"
    assert sorted(tag.name for tag in data.tags) == ["CFD", "seed 3", "shapes"]
    catalogs = (out / "blender_assets.cats.txt").read_text()
    assert f"{data.catalog_id}:CFD/a red cube:CFD-a red cube" in catalogs, catalogs
    size = tuple(cube.preview.image_size)
    with Image.open(Path(cube["cfd_output"]) / "preview.png") as strip:
        first_view = np.asarray(strip.convert("RGBA"), np.float64)[: strip.height, : strip.height] / 255.0
    assert size == (first_view.shape[1], first_view.shape[0]) and first_view.shape[0] > 32, size
    pixels = np.array(cube.preview.image_pixels_float[:], np.float64).reshape(size[1], size[0], 4)[::-1]
    assert np.abs(pixels - first_view).max() < 1.5 / 255, "the preview holds the job's preview pixels"
    results["preview_size"] = size

    assert bpy.ops.cfd.keep_asset() == {"FINISHED"}  # again, from the active object
    assert [obj.name for obj in bpy.data.objects if obj.asset_data is not None] == [cube.name]
    assert len(cube.asset_data.tags) == 3 and (out / "blender_assets.cats.txt").read_text() == catalogs
    assert shown(draw_panels(), "operator", idname="cfd.keep_asset", depress=True), "the list shows it kept"

    library = out / "library"
    library.mkdir()
    theirs = "0d1f0b4e-52a8-4d9a-a3a6-5f3c0d9b1e77:Props/Chairs:Props-Chairs"
    (library / "blender_assets.cats.txt").write_text(f"# the artist's own\nVERSION 1\n\n{theirs}\n")
    prefs.asset_library_dir = str(library)
    assert bpy.ops.cfd.keep_asset(name=cube.name) == {"FINISHED"}
    files = sorted(p.name for p in library.iterdir())
    assert files == ["a red cube (seed 3).blend", "blender_assets.cats.txt"], files
    library_catalogs = (library / "blender_assets.cats.txt").read_text()
    assert theirs in library_catalogs and "CFD/a red cube:CFD-a red cube" in library_catalogs, (
        library_catalogs
    )
    assert bpy.ops.cfd.keep_asset(name=cube.name) == {"FINISHED"}
    assert sorted(p.name for p in library.iterdir()) == files, "keeping twice leaves one asset"
    assert (library / "blender_assets.cats.txt").read_text() == library_catalogs
    registered = bpy.context.preferences.filepaths.asset_libraries
    assert [lib.name for lib in registered if Path(lib.path).resolve() == library.resolve()] == ["CFD Assets"]

    fresh = subprocess.run(
        [sys.executable, "-c", FRESH_SESSION, str(library / files[0])],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    listed = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert listed["listed"] == [cube.name] and listed["description"] == "a red cube", listed
    assert listed["catalog_id"] == data.catalog_id and listed["catalog_id"] in library_catalogs
    assert listed["texture_packed"] and listed["texture_size"] == [128, 128] and listed["faces"] > 0, listed
    assert listed["preview_size"] == list(size), listed
    results["fresh_session"] = listed

    # Finish now on the real generator: job.json names the step, Blender's importer loads the GLB.
    long = {**job, "seed": 4, "steps": 400}
    assert ctl.start(bpy.context, long, (3.0, 0.0, 0.0)) is not None, ctl.error
    pump_until(ctl, lambda: ctl.progress.step >= 2, what="two steps")
    asked_at = ctl.progress.step
    ctl.finish_now()
    pump_until(ctl, lambda: not ctl.busy, what="the finished asset")
    assert ctl.error is None, ctl.error
    early = bpy.data.objects[ctl.last_variant]
    record = json.loads((Path(early["cfd_output"]) / "job.json").read_text())
    assert asked_at <= record["stopped_at_step"] < 400, (asked_at, record["stopped_at_step"])
    glb = next(Path(early["cfd_output"]).glob("*.glb"))
    known = set(bpy.data.objects.keys())
    assert bpy.ops.import_scene.gltf(filepath=str(glb)) == {"FINISHED"}
    imported = [bpy.data.objects[name] for name in set(bpy.data.objects.keys()) - known]
    assert any(obj.type == "MESH" and len(obj.data.polygons) > 0 for obj in imported), imported
    check_resting(early, 1.0, 0.0)
    results["finish_now"] = {"asked_at_step": asked_at, "stopped_at_step": record["stopped_at_step"]}
    assert "torch" not in sys.modules, "Blender's process must never import torch"
    return results


def corner_arrays(obj) -> tuple[np.ndarray, np.ndarray]:
    """Per triangle corner of the evaluated mesh: local positions [F,3,3] and active UVs [F,3,2]."""
    vertices, faces, uvs = sys.modules[f"{MODULE}.blender_cfd.scene_objects"].local_mesh(bpy.context, obj)
    return vertices[faces], uvs


def texture_selected(zip_path: str, out: Path) -> dict:
    """Texture Selected on the default cube (its UV map, a Subdivision modifier, a transform) with the
    real server and the shapes prior: a copy at the same transform whose mesh is the original's
    evaluated triangles and UVs, textured with the baked image; the original hidden and unchanged;
    Re-roll makes another copy; above the face limit the panel offers a decimated copy instead."""
    ctl_module, _ = install(zip_path, out)
    os.environ.pop("BLENDER_CFD_SERVER_ARGS")  # the real job runner
    ctl = ctl_module.get()
    jobs = sys.modules[f"{MODULE}.blender_cfd.jobs"]
    cube = bpy.data.objects["Cube"]
    assert cube.data.uv_layers.active is not None, "the default cube has a UV map"
    cube.modifiers.new("Subdivision", "SUBSURF").levels = 1
    cube.location, cube.rotation_euler, cube.scale = (1.0, 2.0, 0.5), (0.3, 0.0, 0.7), (1.0, 1.5, 1.0)
    bpy.context.view_layer.update()
    set_panel("a red cube", 5)
    bpy.ops.object.select_all(action="DESELECT")
    assert not bpy.ops.cfd.texture_selected.poll(), "greyed out without a selected mesh"
    cube.select_set(True)
    bpy.context.view_layer.objects.active = cube
    assert bpy.ops.cfd.texture_selected.poll() and shown(
        draw_panels(), "operator", idname="cfd.texture_selected"
    )
    positions, uvs = corner_arrays(cube)
    original = (vertices_of(cube).copy(), len(cube.data.materials), [m.name for m in cube.modifiers])

    assert bpy.ops.cfd.texture_selected(wait=True) == {"FINISHED"}, ctl.error
    copy = bpy.data.objects[ctl.last_variant]
    assert copy.name == "a red cube (seed 5)" and copy["cfd_source"] == "Cube"
    assert json.loads(copy["cfd_job"])["kind"] == "texture"
    bpy.context.view_layer.update()
    assert np.allclose(np.array(copy.matrix_world), np.array(cube.matrix_world), atol=1e-6, rtol=0), (
        "the copy sits where the original is"
    )
    got_positions, got_uvs = corner_arrays(copy)
    assert np.array_equal(got_positions, positions), "the copy's mesh is the original's, bitwise"
    assert np.abs(got_uvs - uvs).max() <= 2**-20, "and its UV map (glTF's 1 - v costs a last bit)"
    assert len(copy.data.vertices) == len(np.unique(positions.reshape(-1, 3), axis=0)), (
        "welded as the original"
    )
    link = copy.active_material.node_tree.nodes["Principled BSDF"].inputs["Base Color"].links[0]
    image = link.from_node.image
    size = tuple(image.size)
    pixels = np.array(image.pixels[:]).reshape(size[1], size[0], 4)[::-1, :, :3]
    with Image.open(Path(copy["cfd_output"]) / "a-red-cube.png") as baked:
        expected = np.asarray(baked.convert("RGB"), np.float64) / 255.0
    assert np.abs(pixels - expected).max() < 1e-3, "the copy's material shows the texture the server baked"
    red = np.array(copy.color[:3])
    assert red[0] > 2 * max(red[1], red[2]), f"the mean surface colour is red: {red}"
    assert not cube.visible_get() and copy.visible_get(), "the original is hidden, the copy shows"
    assert np.array_equal(vertices_of(cube), original[0]) and len(cube.data.materials) == original[1]
    assert [m.name for m in cube.modifiers] == original[2], "the original is never modified"

    assert bpy.ops.cfd.reroll(wait=True) == {"FINISHED"}, ctl.error
    second = bpy.data.objects[ctl.last_variant]
    assert second != copy and second["cfd_source"] == "Cube" and second["cfd_seed"] != 5
    assert np.array_equal(corner_arrays(second)[0], positions)
    assert second.visible_get() and not copy.visible_get(), "the newest copy shows, the others stay listed"

    jobs.TEXTURE_FACE_LIMIT = 40  # the subdivided cube has 24 quads: 48 triangles
    cube.hide_set(False)
    bpy.ops.object.select_all(action="DESELECT")
    cube.select_set(True)
    bpy.context.view_layer.objects.active = cube
    bpy.context.view_layer.update()  # unhidden: evaluated again (the UI's redraw does this itself)
    panel = draw_panels()
    said = labels(panel).replace(" | ", " ")  # the sidebar wraps the line
    assert shown(panel, "operator", idname="cfd.decimate_copy") and "48 triangles, above the 40" in said, said
    assert not shown(panel, "operator", idname="cfd.texture_selected"), "never textured silently"
    assert "Decimate a Copy" in reported_error(bpy.ops.cfd.texture_selected)
    assert bpy.ops.cfd.decimate_copy() == {"FINISHED"}
    decimated = bpy.context.active_object
    assert decimated != cube and decimated.modifiers[-1].type == "DECIMATE"
    assert sys.modules[f"{MODULE}.blender_cfd.scene_objects"].triangle_count(bpy.context, decimated) <= 40
    assert np.array_equal(vertices_of(cube), original[0]) and [m.name for m in cube.modifiers] == original[2]
    assert "torch" not in sys.modules, "Blender's process must never import torch"
    return {"copies": [copy.name, second.name]}


SCENARIOS = {
    f.__name__: f
    for f in (
        variants,
        inputs,
        interruptions,
        pump_timing,
        environment,
        remote,
        remote_tls,
        blender_crash,
        shapes_prior,
        placement,
        keep_assets,
        prior_defaults,
        texture_selected,
        batch_variants,
    )
}

if __name__ == "__main__":
    name, zip_file, out_dir = sys.argv[1:4]
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    result = SCENARIOS[name](zip_file, out_path)
    (out_path / "result.json").write_text(json.dumps(result, indent=2))
    session = sys.modules.get(f"{MODULE}.blender_cfd.session")
    if session is not None:
        session.get().shutdown()
    print(f"scenario {name}: ok")
