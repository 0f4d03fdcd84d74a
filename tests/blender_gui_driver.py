"""Runs inside a real Blender window (4.2+, e.g. via /work/shared/tools/blender_gui.sh): drives the CFD
panel the way a user would and screenshots each state. Optional end-to-end check, started by
tests/blender_gui_check.py, which also runs the server on loopback TCP and writes the config read here
(its pid too: the last step kills it, as a crash would).

Here timers and the event loop run, so the extension's own timer pumps the stream (nothing here
calls `pump()`). Steps are a generator: each `yield` is seconds to wait, or a condition to wait for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import addon_utils
import bpy

MODULE = "bl_ext.user_default.blender_cfd"
CONFIG = json.loads(Path("/tmp/cfdgui/config.json").read_text())
SHOTS = Path(CONFIG["shots"])
LOG = SHOTS / "driver.log"


def log(text: str) -> None:
    with LOG.open("a") as handle:
        handle.write(f"{time.strftime('%H:%M:%S')} {text}\n")


def shot(name: str) -> None:
    subprocess.run(["import", "-window", "root", str(SHOTS / f"{name}.png")], check=True)
    log(f"screenshot {name}")


def xdotool(*args: str) -> None:
    subprocess.run(["xdotool", *args], check=True)


def view3d():
    window = bpy.context.window_manager.windows[0]
    area = max((a for a in window.screen.areas if a.type == "VIEW_3D"), key=lambda a: a.width * a.height)
    return window, area


def session():
    return sys.modules[f"{MODULE}.blender_cfd.session"].get()


def run_operator(operator: str, /, **options) -> set:
    window, area = view3d()
    region = next(r for r in area.regions if r.type == "WINDOW")
    with bpy.context.temp_override(window=window, area=area, region=region):
        result = getattr(bpy.ops.cfd, operator)(**options)
    log(f"cfd.{operator} -> {result}; error: {session().error}")
    return result


def steps():
    """A newcomer's session in the factory startup scene (its cube at the 3D cursor, Solid shading)."""
    addon_utils.enable(MODULE, default_set=True)
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.remote_address = CONFIG["address"]
    prefs.remote_token = CONFIG["token"]
    prefs.output_dir = CONFIG["assets"]
    xdotool("key", "Escape")  # the splash
    window, area = view3d()
    area.spaces.active.show_region_ui = True
    yield 1.0
    ui = next(r for r in area.regions if r.type == "UI")
    log(f"window {window.width}x{window.height}, sidebar x={ui.x} y={ui.y} {ui.width}x{ui.height}")
    x, y = CONFIG["tab"]  # screen pixels of the CFD tab (origin top-left), with the Item tab present
    xdotool("mousemove", str(x), str(y), "click", "1")
    yield 1.5
    shot("1_idle")  # the default prompt and what the Shapes prior knows

    settings = bpy.context.scene.cfd
    settings.prompt = ""
    area.tag_redraw()  # a property set from a script does not redraw the sidebar by itself
    yield 0.5
    shot("2_empty_prompt")  # Generate greyed out, and why

    settings.prompt, settings.seed, settings.quality = "a red cube", 7, "DRAFT"
    run_operator("generate")
    yield lambda: session().job is not None and session().job.preview_step >= 40
    yield 0.3
    shot("3_running")  # beside the cube, framed, the device by name
    yield lambda: not session().busy
    yield 0.5
    first = bpy.data.objects.get(session().last_variant)
    log(f"first result at {tuple(first.location)}, solid colour {tuple(first.active_material.diffuse_color)}")
    shot("4_first_result")  # in its colour in Solid shading

    run_operator("reroll")
    yield lambda: not session().busy
    yield 0.5
    shot("5_variants")  # the variant list with thumbnails
    variants = sorted(o.name for o in bpy.data.objects if "cfd_job" in o)
    window, area = view3d()
    with bpy.context.temp_override(window=window, area=area):
        bpy.ops.ed.undo()
    yield 0.5
    after_undo = sorted(o.name for o in bpy.data.objects if "cfd_job" in o)
    log(f"variants {variants}; after one undo {after_undo}")
    with bpy.context.temp_override(window=window, area=area):
        bpy.ops.ed.redo()
    yield 0.5

    yield from asset_browser()

    settings = bpy.context.scene.cfd  # undo and redo reallocated the scene: fetch it again
    settings.prompt = "a blue torus"
    run_operator("generate")
    yield lambda: session().job is not None and session().job.preview_step >= 1
    os.kill(CONFIG["server_pid"], signal.SIGKILL)
    yield lambda: not session().busy
    yield 0.5
    shot("6_server_stopped")  # the error box, its buttons readable
    log(f"objects: {sorted(o.name for o in bpy.data.objects)}")
    Path("/shot.request").write_text("done")


def asset_browser():
    """Keep both variants into an asset library folder, then show that library in the Asset Browser."""
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.asset_library_dir = str(Path(CONFIG["shots"]).parent / "library")
    for variant in sorted(o.name for o in bpy.data.objects if "cfd_job" in o):
        run_operator("keep_asset", name=variant)
    yield 0.5
    _, area = view3d()
    area.ui_type = "ASSETS"
    yield 1.0  # the browser makes its parameters when it first draws
    params = area.spaces.active.params
    try:
        params.asset_library_reference = "CFD Assets"
    except TypeError as error:  # an older Blender names libraries differently: the current file's
        log(f"library 'CFD Assets' not offered ({error}); showing the current file's assets")
        params.asset_library_reference = "LOCAL"
    params.display_size = 128 if isinstance(params.display_size, int) else "LARGE"
    yield 4.0  # the library's .blend files are read and their previews loaded in the background
    shot("7_asset_browser")
    area.ui_type = "VIEW_3D"
    yield 0.5


_steps = steps()
_waiting = None


def tick():
    """The driver's own timer: advance the steps; a condition is polled every 0.2 s."""
    global _waiting
    try:
        if _waiting is not None and not _waiting():
            return 0.2
        _waiting = None
        wait = next(_steps)
    except StopIteration:
        return None
    except Exception:
        log(traceback.format_exc())
        Path("/shot.request").write_text("failed")
        return None
    if callable(wait):
        _waiting = wait
        return 0.2
    return wait


bpy.app.timers.register(tick, first_interval=3.0)
