"""The add-on's session with the server: one connection, at most one job, and `pump()`, its main-thread step.

The server runs in its own process (or at a remote address); the client's reader thread decodes
frames into a queue. `pump()` drains that queue on Blender's main thread, applies only the newest
preview mesh and texture, and turns the final frame into a variant. In Blender a timer calls
`tick()` (which pumps and redraws); without an event loop (bpy as a module, `blender -b`) timers
never fire, so scripts and tests call `pump()` or `wait()` directly.

The job may be a batch (Variants): the server runs it on Ray and sends each variant as its own `done`,
which becomes a new variant at once, beside the others; `batch_done` ends it.

Datablocks are looked up by name on every pump: undo and file loads free the Python objects.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import bpy
import numpy as np
from bpy.app.handlers import persistent

from ..server.wire import client, protocol
from . import environment, glb, jobs, scene_objects
from .addon import preferences, user_folder

TICK_BUSY_SECONDS = 0.05
TICK_IDLE_SECONDS = 0.5
CANCEL_TIMEOUT_SECONDS = 15.0  # then the server is killed: a job must not hold the GPU forever
CONNECT_TIMEOUT_SECONDS = 5.0
SERVER_ARGS_ENV = "BLENDER_CFD_SERVER_ARGS"  # development / tests: extra `serve` arguments (a test runner)
PREVIEW_TEXTURE = "CFD Preview Texture"
DEFAULT_SIZE = 1.0  # metres across a result's largest dimension (the panel's Size)
# Error codes whose fix lives in the server's environment: the error box offers "Check Environment".
ENVIRONMENT_ERRORS = frozenset(
    {"no_environment", "server_exited", protocol.MISSING_WEIGHTS, protocol.MISSING_EXTRA}
)


class Phase(Enum):
    IDLE = "Idle"
    STARTING = "Starting server"
    RUNNING = "Running"
    CANCELLING = "Cancelling"


@dataclass
class Progress:
    step: int = 0
    total: int = 0
    stage: str = ""
    eta_s: float | None = None
    elapsed_s: float | None = None
    queue_position: int | None = None  # a shared server: jobs that run before this one

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0


@dataclass
class JobError:
    code: str
    message: str  # the headline, in the user's words
    fix: str = ""
    detail: str = ""  # what a bug report needs (an exit status, the server's last error line)


@dataclass
class ActiveJob:
    """The job this session streams: what was sent, and the preview object it grows in."""

    job_id: str
    job: dict
    scene: str
    object_name: str
    location: tuple[float, float, float]  # where the result's bottom centre goes
    size: float  # its largest dimension, in scene units
    cancel_sent_at: float | None = None
    finish_sent_at: float | None = None  # "Finish now" was asked: the asset comes as a normal end's
    faces: np.ndarray | None = None  # topology of the last applied preview
    preview_step: int = -1
    source: str | None = None  # a texture job's original object (hidden while its copy streams)
    kept: tuple[np.ndarray, np.ndarray] | None = None  # a texture job's sent vertices and triangles
    # A batch (Variants): no preview object; each finished variant is placed where `place` says then.
    place: Callable[[bpy.types.Context], tuple[float, float, float]] | None = None

    @property
    def is_batch(self) -> bool:
        return self.place is not None


TICK_KINDS = ("mesh_in_place", "mesh_new_topology", "texture", "finish", "idle")


@dataclass
class PumpStats:
    """Seconds per pump by what the tick did (see `TICK_KINDS`); a frame at 60 Hz is ~16 ms."""

    ticks: dict[str, deque] = field(default_factory=lambda: {kind: deque(maxlen=1000) for kind in TICK_KINDS})
    # Seconds from a preview mesh's arrival (the reader thread) to its display (applied by a pump).
    preview_delays: deque = field(default_factory=lambda: deque(maxlen=1000))


class Session:
    """One server connection and at most one job; everything here runs on Blender's main thread."""

    def __init__(self) -> None:
        self.connection: client.Connection | None = None
        self.server_info: dict | None = None
        self.job: ActiveJob | None = None
        self.phase = Phase.IDLE
        self.progress = Progress()
        self.error: JobError | None = None
        self.last_variant: str | None = None
        self.stats = PumpStats()

    @property
    def busy(self) -> bool:
        return self.phase is not Phase.IDLE

    # ------------------------------------------------------------------------------ starting

    def start(
        self,
        context: bpy.types.Context,
        job: dict,
        location: tuple[float, float, float],
        init_mesh: tuple[np.ndarray, np.ndarray] | None = None,
        size: float = DEFAULT_SIZE,
        source: bpy.types.Object | None = None,
        surface: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
    ) -> str | None:
        """Send a job and create the object it streams into; None (and `error` set) if it cannot start.
        The result stands on `location` (its bottom centre), `size` across its largest dimension.

        With `source` and its `surface` (`scene_objects.local_mesh`), a texture job: the object streams
        at the source's transform and becomes its textured copy; the source is hidden meanwhile."""
        connection = self._idle_connection()
        if connection is None:
            return None
        job_id = uuid.uuid4().hex[:16]
        obj = scene_objects.create_preview_object(context.scene, f"CFD preview {job_id[:6]}", location, size)
        self.job = ActiveJob(job_id, job, context.scene.name, obj.name, tuple(location), float(size))
        self.progress = Progress(total=int(job.get("steps", 0)), stage="Starting")
        if source is not None:
            scene_objects.place_like(obj, source)
            self.job.source, self.job.kept = source.name, surface[:2]
            started = self._sent(lambda: connection.texture_mesh(job_id, job, *surface))
            if started is not None:
                source.hide_set(True)
            return started
        vertices, faces = init_mesh if init_mesh is not None else (None, None)
        return self._sent(lambda: connection.generate(job_id, job, vertices, faces))

    def start_batch(
        self,
        context: bpy.types.Context,
        job: dict,
        seeds: list[int],
        prompts: list[str] | None,
        place: Callable[[bpy.types.Context], tuple[float, float, float]],
        size: float = DEFAULT_SIZE,
    ) -> str | None:
        """Send a batch (every prompt, default the job's, with every seed) for the server to run on Ray;
        each variant lands where `place` says when it arrives. None (and `error` set) if it cannot start."""
        connection = self._idle_connection()
        if connection is None:
            return None
        batch_id = uuid.uuid4().hex[:16]
        start = place(context)
        self.job = ActiveJob(batch_id, job, context.scene.name, "", start, float(size), place=place)
        self.progress = Progress(total=len(seeds) * len(prompts or [job["prompt"]]), stage="Variants")
        return self._sent(lambda: connection.batch(batch_id, job, seeds, prompts))

    def _idle_connection(self) -> client.Connection | None:
        """The connection a new job goes on (None, `error` set, if there is none)."""
        if self.busy:
            raise RuntimeError("a job is already running")
        self.error = None
        return self._connection()

    def _sent(self, send: Callable[[], None]) -> str | None:
        """Send the frame that starts `self.job`; its id, or None when the server is gone."""
        try:
            send()
        except client.ConnectionClosed as closed:
            self._server_gone(str(closed))
            return None
        self.phase = Phase.STARTING
        ensure_timer()
        return self.job.job_id

    def _connection(self) -> client.Connection | None:
        if self.connection is not None and self.connection.alive:
            return self.connection
        self._drop_connection()
        prefs = preferences()
        try:
            if prefs.remote_address.strip():
                host, _, port = prefs.remote_address.strip().rpartition(":")
                connection = client.TcpConnection(
                    host.strip("[]"),
                    int(port),
                    prefs.remote_token,
                    timeout=CONNECT_TIMEOUT_SECONDS,
                    fingerprint=prefs.remote_fingerprint,
                )
            else:
                python = prefs.server_python()
                if python is None or not python.exists():
                    self.error = JobError(
                        "no_environment",
                        "No server environment yet" if python is None else f"Python not found: {python}",
                        "Preferences › Add-ons › CFD: click Set up Environment, or pick a Python with torch",
                    )
                    return None
                args = ["--output-root", str(prefs.output_folder())]
                args += shlex.split(os.environ.get(SERVER_ARGS_ENV, ""))
                connection = client.ServerProcess(
                    python,
                    args,
                    cwd=environment.EXTENSION_ROOT,
                    env=environment.server_environment(),
                    log_path=user_folder("logs") / "server.log",
                )
            connection.send(protocol.client_hello("blender-cfd", connection.token))
        except client.CertificateMismatch as error:
            self.error = JobError(
                "certificate_mismatch",
                "The remote server's certificate does not match the fingerprint in the preferences",
                "If its certificate was replaced, enter the fingerprint the server prints now; "
                "otherwise another machine answers at that address",
                detail=str(error),
            )
            return None
        except (OSError, ValueError, client.ConnectionClosed) as error:
            self.error = JobError(
                "no_environment",
                f"Cannot start or reach the server: {error}",
                "Check the interpreter or remote address in the extension's preferences",
            )
            return None
        self.connection = connection
        return connection

    # ------------------------------------------------------------------------------ cancelling

    def cancel(self, remove_object: bool = True) -> None:
        """Ask the server to stop; the phase stays CANCELLING until it confirms (or is killed)."""
        job = self.job
        if job is None or job.cancel_sent_at is not None or self.connection is None:
            return
        job.cancel_sent_at = time.monotonic()
        self.phase = Phase.CANCELLING
        self.progress.stage = "Cancelling"
        if remove_object:
            self._remove_preview()
        try:
            self.connection.cancel(job.job_id)
        except client.ConnectionClosed as closed:
            self._server_gone(str(closed))

    def finish_now(self) -> None:
        """Ask the server to stop optimising and deliver the asset as it is now (a normal `done`)."""
        job = self.job
        if job is None or job.cancel_sent_at is not None or job.finish_sent_at is not None:
            return
        if self.connection is None:
            return
        job.finish_sent_at = time.monotonic()
        try:
            self.connection.finish(job.job_id)
        except client.ConnectionClosed as closed:
            self._server_gone(str(closed))

    @property
    def finishing(self) -> bool:
        return self.job is not None and self.job.finish_sent_at is not None

    def on_file_load(self) -> None:
        """Another .blend is loading: its objects replace ours, so stop the job without touching them."""
        self.cancel(remove_object=False)
        self.last_variant = None

    def shutdown(self) -> None:
        """Stop the server (quitting Blender, disabling the extension, or "Stop Server")."""
        if self.job is not None and self.job.cancel_sent_at is None:
            self.cancel(remove_object=False)
        self._drop_connection()
        self.job = None
        self.phase = Phase.IDLE

    # ------------------------------------------------------------------------------ the pump

    def pump(self) -> None:
        """Apply what arrived since the last call. Never blocks; call it from the main thread."""
        started = time.perf_counter()
        kind = self._pump()
        if kind is not None:
            self.stats.ticks[kind].append(time.perf_counter() - started)

    def _pump(self) -> str | None:
        """One pump; returns what the tick did (one of `TICK_KINDS`) for the stats."""
        connection = self.connection
        if connection is None:
            return None
        latest_mesh = latest_texture = None
        delivered = False  # a batch's variant came in
        for message in connection.poll():
            kind = message.type
            if kind == protocol.HELLO:
                self.server_info = dict(message.header)
                continue
            if kind == protocol.PONG:
                continue
            if kind == protocol.ERROR and message.get("job_id") is None:
                self._fail(_message_error(message))
                self._drop_connection()
                return None
            job = self.job
            if job is None or job.job_id not in (message.get("job_id"), message.get("batch_id")):
                continue  # a frame of a job we already let go of
            if kind in (protocol.ACCEPTED, protocol.PROGRESS) and self.phase is Phase.STARTING:
                self.phase = Phase.RUNNING
            if kind == protocol.PROGRESS:
                self.progress = Progress(
                    message.get("step", 0),
                    message.get("total", 0),
                    message.get("stage", ""),
                    message.get("eta_s"),
                    message.get("elapsed_s"),
                    message.get("queue_position"),
                )
            elif kind == protocol.PREVIEW_MESH:
                latest_mesh = message
            elif kind == protocol.TEXTURE:
                latest_texture = message
            elif kind == protocol.DONE and job.is_batch:
                if job.cancel_sent_at is None:
                    self._finish_batch_variant(message)
                    delivered = True
            elif kind == protocol.BATCH_DONE:
                self._end_batch(message)
                return "finish"
            elif kind == protocol.DONE:
                finished = job.cancel_sent_at is None
                if finished:
                    self._finish(message)
                self._end_job()
                return "finish" if finished else None
            elif kind == protocol.CANCELLED:
                self._end_job()
                return None
            elif kind == protocol.ERROR and message.get("code") == protocol.UNKNOWN_TYPE and job.is_batch:
                self._fail(
                    JobError(
                        "batch_unsupported",
                        "This server cannot run batches of variants (it is older than Variants)",
                        "Update the server to the extension's version, with the Ray extra "
                        "(pip install -r requirements-ray.txt); Generate and Re-roll still work",
                        detail=message.get("message", ""),
                    )
                )
                return None
            elif kind == protocol.ERROR and message.get("code") == protocol.UNKNOWN_TYPE and self.finishing:
                job.finish_sent_at = None  # an older server: the job itself runs on to its end
                self.error = JobError(
                    "finish_unsupported",
                    "This server cannot finish a job early (it is older than Finish now)",
                    "The job runs to its end, or Cancel it; update the server to the extension's version",
                    detail=message.get("message", ""),
                )
            elif kind == protocol.ERROR:
                self._fail(_message_error(message))
                return None
        if not connection.alive:
            self._server_gone(connection.closed_reason or "the connection closed")
            return None
        job = self.job
        if job is None:
            return None
        if job.cancel_sent_at is not None:
            if time.monotonic() - job.cancel_sent_at > CANCEL_TIMEOUT_SECONDS:
                self._drop_connection()  # it did not stop: kill it, the next job starts a fresh one
                self._end_job()
            return None
        if job.is_batch:
            return "finish" if delivered else "idle"
        obj = self._preview_object()
        if obj is None:  # the user deleted it (or undid past it): nothing left to stream into
            self.cancel(remove_object=False)
            return None
        kind = "texture" if latest_texture is not None else "idle"
        if latest_mesh is not None:
            kind = "mesh_in_place" if self._apply_mesh(obj, latest_mesh) else "mesh_new_topology"
        if latest_texture is not None:
            self._apply_texture(latest_texture)
        return kind

    def wait(self, timeout: float = 3600.0, interval: float = 0.02) -> bool:
        """Pump until the job ends (scripts and `blender -b`, where no timer runs); True if it ended."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            self.pump()
            time.sleep(interval)
        return not self.busy

    def tick(self) -> float | None:
        """The timer's body: pump, redraw the sidebar, and say when to come back (None: stop)."""
        self.pump()
        tag_redraw()
        if self.busy:
            return TICK_BUSY_SECONDS
        if self.connection is not None:
            return TICK_IDLE_SECONDS
        return None

    # ------------------------------------------------------------------------------ applying

    def _preview_object(self) -> bpy.types.Object | None:
        job = self.job
        scene = bpy.data.scenes.get(job.scene) if job is not None else None
        obj = bpy.data.objects.get(job.object_name) if scene is not None else None
        if obj is None or scene.objects.get(obj.name) is None or not isinstance(obj.data, bpy.types.Mesh):
            return None
        return obj

    def _apply_mesh(self, obj: bpy.types.Object, message: protocol.Message) -> bool:
        """Show a preview mesh; True if it only moved vertices (same faces as the last one)."""
        job = self.job
        faces = message.arrays["faces"]
        same = job.faces is not None and np.array_equal(faces, job.faces)
        scene_objects.apply_preview(
            obj.data, message.arrays["positions"], faces, message.arrays.get("colors"), same_topology=same
        )
        job.faces = faces
        job.preview_step = message.get("step", 0)
        if message.received_at is not None:
            self.stats.preview_delays.append(time.perf_counter() - message.received_at)
        return same

    def _apply_texture(self, message: protocol.Message) -> None:
        png, _ = message.blobs["png"]
        path = user_folder("cache") / "preview_texture.png"
        path.write_bytes(png)
        scene_objects.show_image(PREVIEW_TEXTURE, path)

    def _finish(self, message: protocol.Message) -> None:
        """The final frame: read the GLB and turn the streaming object into the named variant."""
        job = self.job
        try:
            asset = glb.read_glb(self._glb_bytes(message))
        except (OSError, glb.GlbError) as error:
            self._fail(
                JobError("bad_asset", f"Cannot read the finished asset: {error}", _output_fix(message))
            )
            return
        out_dir = str(message.get("out_dir", ""))
        scene = bpy.data.scenes.get(job.scene)
        if scene is None:
            return
        obj = self._preview_object() or scene_objects.create_preview_object(
            scene, "CFD variant", job.location, job.size
        )
        name = scene_objects.variant_name(job.job["prompt"], job.job["seed"])
        properties = {**jobs.variant_properties(job.job, out_dir), "cfd_size": job.size}
        if job.source is not None:
            properties["cfd_source"] = job.source
            for other in scene.objects:  # the newest copy shows; earlier ones stay listed as variants
                if other.get("cfd_source") == job.source and other != obj:
                    other.hide_set(True)
        scene_objects.finish_variant(obj, asset, name, properties, job.location, job.size, job.kept)
        scene_objects.select_only(bpy.context, obj)
        self.last_variant = obj.name
        undo_push(f"CFD: {obj.name}")

    def _finish_batch_variant(self, message: protocol.Message) -> None:
        """A batch's variant arrived: a new object in the "CFD Variants" collection, beside the others."""
        job = self.job
        scene = bpy.data.scenes.get(job.scene)
        if scene is None:
            return
        try:
            asset = glb.read_glb(self._glb_bytes(message))
        except (OSError, glb.GlbError) as error:  # the others still come: the batch goes on
            self.error = JobError(
                "bad_asset", f"Cannot read a finished variant: {error}", _output_fix(message)
            )
            return
        variant_job = {**job.job, "prompt": message.get("prompt"), "seed": message.get("seed")}
        location = job.place(bpy.context)
        obj = scene_objects.create_preview_object(scene, "CFD variant", location, job.size)
        name = scene_objects.variant_name(variant_job["prompt"], variant_job["seed"])
        out_dir = str(message.get("out_dir", ""))
        properties = {**jobs.variant_properties(variant_job, out_dir), "cfd_size": job.size}
        scene_objects.finish_variant(obj, asset, name, properties, location, job.size)
        scene_objects.select_only(bpy.context, obj)
        self.last_variant = obj.name
        undo_push(f"CFD: {obj.name}")

    def _end_batch(self, message: protocol.Message) -> None:
        """The batch's last frame: done, or an error naming the variants that failed (the rest are in)."""
        failed = message.get("failed") or []
        self._end_job()
        if failed:
            first = failed[0]
            self.error = JobError(
                "batch_failed",
                f"{len(failed)} variant{'s' if len(failed) != 1 else ''} failed; the others are in the scene",
                "Change that setting or prompt and send the batch again",
                detail=f"{first.get('prompt')!r} seed {first.get('seed')}: {first.get('error')}",
            )

    @staticmethod
    def _glb_bytes(message: protocol.Message) -> bytes:
        if "glb" in message.blobs:  # a remote server may send the file itself
            return message.blobs["glb"][0]
        return Path(message.get("glb")).read_bytes()

    # ------------------------------------------------------------------------------ endings

    def _remove_preview(self) -> None:
        """The streaming object goes; a texture job's original shows again."""
        obj = self._preview_object()
        if obj is not None:
            scene_objects.remove_object(obj)
        source = bpy.data.objects.get(self.job.source) if self.job is not None and self.job.source else None
        if source is not None:
            source.hide_set(False)

    def _end_job(self) -> None:
        self.job = None
        self.phase = Phase.IDLE

    def _fail(self, error: JobError) -> None:
        self.error = error
        if self.job is not None and self.job.cancel_sent_at is None:
            self._remove_preview()
        self._end_job()

    def _server_gone(self, reason: str) -> None:
        """The server process exited or the connection broke: report it, so Generate can start anew."""
        connection = self.connection
        details = [reason]
        if isinstance(connection, client.ServerProcess):
            with contextlib.suppress(subprocess.TimeoutExpired):  # its output ended: it is exiting
                details.append(exit_status(connection.process.wait(timeout=2.0)))
            errors = [line for line in connection.stderr_tail if "Error" in line]
            if errors:  # e.g. "ModuleNotFoundError: No module named 'torch'"
                details.append(errors[-1])
        had_job = self.job is not None and self.job.cancel_sent_at is None
        greeted = self.server_info is not None
        self._drop_connection()
        if had_job and isinstance(connection, client.TcpConnection):
            self._fail(_remote_gone(connection, greeted, "; ".join(details)))
        elif had_job:
            self._fail(
                job_error(
                    "server_exited",
                    "The generation server stopped unexpectedly",
                    "Generate starts a new server; if it fails again, click Check Environment",
                    detail="; ".join(details),
                )
            )
        self._end_job()

    def _drop_connection(self) -> None:
        connection, self.connection = self.connection, None
        self.server_info = None
        if connection is None:
            return
        if isinstance(connection, client.ServerProcess):
            if connection.process.poll() is None and self.job is not None:
                connection.kill()  # a job is still running in it: do not wait for it to notice
            connection.close(timeout=2.0)
        else:  # a remote server keeps running for other sessions; leaving cancels our job there
            connection.close()


def job_error(code: str, message: str, fix: str = "", detail: str = "") -> JobError:
    """An error for the panel; a missing package in the server's environment gets the setup fix."""
    if "No module named" in message + detail:
        return JobError(
            "no_environment",
            message,
            "The server's Python lacks a package: click Set up Environment (or pip install requirements.txt)",
            detail,
        )
    return JobError(code, message, fix[:1].upper() + fix[1:], detail)


def _remote_gone(connection: client.TcpConnection, greeted: bool, detail: str) -> JobError:
    """A remote server's connection ended: before its hello that is most often TLS or the address."""
    if greeted:
        return JobError(
            "remote_closed",
            "The connection to the remote server broke",
            "Generate connects again; if it fails, check that the server still runs",
            detail,
        )
    fix = "Check the address and token in the extension's preferences"
    if not connection.tls:
        fix += "; a server started with --tls-cert also needs the certificate fingerprint it printed"
    return JobError("remote_closed", "The remote server closed the connection without answering", fix, detail)


def exit_status(code: int) -> str:
    """Says 'exit status -9 (SIGKILL)': the number to search for, and the signal's name where it has one."""
    try:
        return f"exit status {code} ({signal.Signals(-code).name})" if code < 0 else f"exit status {code}"
    except ValueError:  # not a signal this platform knows
        return f"exit status {code}"


def _message_error(message: protocol.Message) -> JobError:
    unsupported = client.texture_unsupported(message)
    if unsupported is not None:
        return JobError("unknown_type", unsupported, "Update the server, or use Generate")
    return job_error(message.get("code", "internal"), message.get("message", ""), message.get("fix") or "")


def _output_fix(message: protocol.Message) -> str:
    return f"The server wrote it to {message.get('out_dir') or 'its output folder'}"


# ---------------------------------------------------------------------------------- Blender glue

_session: Session | None = None


def get() -> Session:
    global _session
    if _session is None:
        _session = Session()
    return _session


def _timer() -> float | None:
    return get().tick()


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=0.0, persistent=True)


def tag_redraw() -> None:
    window_manager = bpy.context.window_manager
    if window_manager is None:
        return
    for window in window_manager.windows:
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "PREFERENCES"}:
                area.tag_redraw()


def undo_push(message: str) -> None:
    """One undo step for the finished asset. Timers run without a window in context: lend one."""
    window_manager = bpy.context.window_manager
    if bpy.context.window is None and window_manager is not None and window_manager.windows:
        with bpy.context.temp_override(window=window_manager.windows[0]):
            bpy.ops.ed.undo_push(message=message)
    else:
        bpy.ops.ed.undo_push(message=message)


@persistent
def _on_load_pre(*_args) -> None:
    if _session is not None:
        _session.on_file_load()


def _on_exit() -> None:
    if _session is not None:
        _session.shutdown()


def register() -> None:
    bpy.app.handlers.load_pre.append(_on_load_pre)
    atexit.register(_on_exit)


def unregister() -> None:
    _on_exit()
    atexit.unregister(_on_exit)
    if _on_load_pre in bpy.app.handlers.load_pre:
        bpy.app.handlers.load_pre.remove(_on_load_pre)
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)
