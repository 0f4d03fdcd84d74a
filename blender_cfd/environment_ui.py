"""The server environment in the preferences: Check and Set up, and the state they show while running.

`environment` does the work without bpy; this module runs it in threads and keeps what the
preferences draw (`environment_state()`), beside the two operators that fill it.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

import bpy

from . import environment, session
from .addon import preferences, user_folder


@dataclass
class EnvironmentState:
    """What the preferences show under the environment buttons; threads fill it, the UI reads it."""

    checking: threading.Thread | None = None
    report: environment.EnvironmentReport | None = None
    setup: environment.CommandRunner | None = None
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str]]:
        """(text, icon) lines: a check mark when the environment works, ERROR on what failed, the
        details beside them without an icon of their own."""
        if self.checking is not None and self.checking.is_alive():
            return [("Checking the server environment…", "SORTTIME")]
        rows = [(note, "ERROR") for note in self.notes]
        if self.setup is not None:
            if self.setup.returncode is None:
                rows.append(("Setting up (this downloads a few GB)…", "SORTTIME"))
            elif self.setup.returncode != 0:
                rows.append((f"Set up failed (log: {self.setup.log_path})", "ERROR"))
                rows += [(line, "BLANK1") for line in self.setup.last_lines()[-3:]]
        if self.report is not None and self.report.ok:
            rows.append(("The server environment works", "CHECKMARK"))
            rows += [(line, "BLANK1") for line in self.report.lines()]
        elif self.report is not None:
            rows += [(self.report.problem, "ERROR"), (self.report.fix, "INFO")]
        server = session.get().server_info
        if server:
            device = environment.device_label(server.get("device", ""), server.get("device_name", ""))
            rows.append((f"Server running: torch {server.get('torch')} on {device}", "INFO"))
        return rows


_environment = EnvironmentState()


def environment_state() -> EnvironmentState:
    """The one state the preferences draw and the environment operators fill."""
    return _environment


def _environment_timer() -> float | None:
    session.tag_redraw()
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


CLASSES = (CFD_OT_check_environment, CFD_OT_setup_environment)


def register() -> None:
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister() -> None:
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    if bpy.app.timers.is_registered(_environment_timer):
        bpy.app.timers.unregister(_environment_timer)
