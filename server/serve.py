"""Run the server Blender talks to: protocol v1 frames on stdin/stdout, or on TCP with --listen.

Blender starts this as a child process and speaks to it over pipes (no port to configure or
collide), which is the default. `--listen HOST:PORT` serves TCP clients instead, on the loopback
interface unless `--allow-remote` (which wants TLS, `--tls-cert/--tls-key`, or `--insecure`), and
requires a token in the client's hello. Each connection has its own thread: its handshake runs
under its own deadline and size limits, so a silent or hostile stranger delays nobody and is
buffered nothing. Jobs of all connections queue for the device in arrival order; one runs at a
time in a worker thread, and each connection receives only its own jobs' frames. The reader loops
stay responsive for ping, cancel and finish. A `batch` (many variants of one job) is one entry of the
queue: its thread runs it on Ray (`--ray`, the optional extra, imported only then) and streams each
variant as it finishes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hmac
import importlib
import ipaddress
import json
import logging
import os
import platform
import re
import secrets
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from server import __version__
from server.batch.jobs import BatchJob, batch_jobs
from server.job.errors import Cancelled, JobSpecError, MissingExtraError, MissingWeightsError, NonFiniteError
from server.job.events import JobEvents
from server.job.fixed_mesh import FixedMesh
from server.job.spec import JobSpec
from server.wire import protocol, tls

log = logging.getLogger("server.serve")

# run_job(spec, init_mesh, emit, should_cancel) -> the done payload: a dict, or an object with to_dict()
Runner = Callable[[JobSpec, tuple[np.ndarray, np.ndarray] | None, JobEvents, Callable[[], bool]], Any]
Describe = Callable[[], dict]

TOKEN_ENV = "BLENDER_CFD_TOKEN"
CANCEL_WAIT_SECONDS = 10.0  # how long a disconnect or shutdown waits for a cancelled job to return
HELLO_TIMEOUT_SECONDS = 10.0  # TCP: a connection must finish TLS and authenticate this soon, or it is dropped
HANDSHAKES_PER_ADDRESS = 16  # TCP: handshakes one address may have open; a newer one cuts off the oldest
HANDSHAKES_IN_ALL = 256
BACKOFF_FIRST_SECONDS = 0.25  # TCP: a failed hello is answered this late, doubling per failure ...
BACKOFF_MAX_SECONDS = 8.0  # ... up to this
BACKOFF_FORGET_SECONDS = 300.0  # an address's failures are forgotten after this long without one
SEND_TIMEOUT_SECONDS = 120.0  # TCP: a client that takes no frame for this long is dropped, freeing the device
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # also names the job's output folder
OOM_FIX = "lower the render size or batch size, use precision fp16, or run on the CPU (device cpu)"
NAN_FIX = "lower the guidance scale, use precision fp32, or try another seed"
RESYNC_FIX = "the byte stream is out of sync; reconnect (the extension restarts the server)"
MAX_BATCH_VARIANTS = 1024  # prompts x seeds in one `batch` message


def default_runner(spec: JobSpec, init_mesh, emit: JobEvents, should_cancel: Callable[[], bool]) -> dict:
    """The real generator, imported on first use so the server answers hello and ping at once.
    A texture job's `init_mesh` is the `FixedMesh` it keeps."""
    if spec.kind == "texture":
        from server.pipeline.texture import run_texture_job

        return run_texture_job(spec, init_mesh, emit, should_cancel)
    from server.pipeline.run import run_job

    return run_job(spec, init_mesh, emit, should_cancel)


def hello_fields(device: str, device_name: str) -> dict[str, Any]:
    """The hello's fields before torch is asked anything: versions, and the device as given."""
    return {
        "server_version": __version__,
        "python": platform.python_version(),
        "torch": None,
        "cuda": None,
        "device": device,
        "device_name": device_name,
    }


def describe_environment() -> dict[str, Any]:
    """Fields of the server's hello: versions and the device a job with device "auto" gets."""
    info = hello_fields("cpu", platform.processor() or platform.machine())
    try:
        import torch

        from server.device import detect_device
    except ImportError:
        return info
    info.update(torch=torch.__version__, cuda=torch.version.cuda)
    device = detect_device()
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        vram_gb = round(properties.total_memory / 2**30, 1)
        info.update(device="cuda", device_name=properties.name, vram_gb=vram_gb)
    elif device == "mps":
        info.update(device="mps", device_name="Apple GPU (MPS)")
    return info


def _loaded_class(module: str, name: str) -> type | None:
    """A class from a module only if something already imported it (never import torch here)."""
    return getattr(sys.modules.get(module), name, None)


def classify_exception(exc: BaseException) -> tuple[str, str, str]:
    """(code, message, fix) of the `error` frame for an exception raised by a job."""
    if isinstance(exc, JobSpecError):
        return protocol.BAD_SETTINGS, str(exc), getattr(exc, "fix", f"change the {exc.field} setting")
    if isinstance(exc, MissingWeightsError):
        return protocol.MISSING_WEIGHTS, str(exc), exc.fix
    if isinstance(exc, MissingExtraError):
        return protocol.MISSING_EXTRA, str(exc), exc.fix
    torch_oom = _loaded_class("torch.cuda", "OutOfMemoryError")
    is_oom = isinstance(exc, MemoryError) or (torch_oom is not None and isinstance(exc, torch_oom))
    if is_oom or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return protocol.OUT_OF_MEMORY, f"out of memory: {exc}", OOM_FIX
    if isinstance(exc, NonFiniteError):
        return protocol.NAN, str(exc) or "the optimisation produced NaN values", NAN_FIX
    last_line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})"
    return protocol.INTERNAL, last_line + where, "see the server log for the traceback, and please report it"


class FrameWriter:
    """The one way frames leave the server: the reader loop and the job thread share it under a lock.

    A failed write means the client is gone; the writer then stays `broken` and the job's
    `should_cancel` turns true, so an orphaned job stops instead of computing for nobody.
    `on_broken` (TCP: shut the socket) then ends the connection's reader too.
    """

    def __init__(self, write: Callable[[bytes], None], on_broken: Callable[[], None] | None = None):
        self._write = write
        self._on_broken = on_broken
        self._lock = threading.Lock()
        self.broken = False

    def send(self, frame: bytes) -> bool:
        with self._lock:
            if self.broken:
                return False
            try:
                self._write(frame)
            except (OSError, ValueError) as error:  # ValueError: write to a closed file
                log.warning("client unreachable (%s); dropping further frames", error)
                self.broken = True
                if self._on_broken is not None:
                    with contextlib.suppress(OSError):
                        self._on_broken()
                return False
            return True


@dataclasses.dataclass
class _Job:
    job_id: str
    spec: JobSpec
    init_mesh: tuple[np.ndarray, np.ndarray] | FixedMesh | None
    writer: FrameWriter  # the connection that sent it: the only one that sees its frames or may cancel it
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    finish: threading.Event = dataclasses.field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    announced: threading.Event = dataclasses.field(default_factory=threading.Event)  # `accepted` was sent
    batch: list[BatchJob] | None = None  # a `batch` message's variants, run on Ray instead of `spec`

    def should_cancel(self) -> bool:
        return self.cancel.is_set() or self.writer.broken


def _job_of(message: protocol.Message) -> Any:
    """The job dict of a generate or texture_mesh frame; the latter's kind is always "texture"."""
    job = message.get("job")
    if message.type == protocol.TEXTURE_MESH and isinstance(job, dict):
        if job.get("kind", "texture") != "texture":
            raise JobSpecError("kind", f'must be "texture" in a texture_mesh message, got {job["kind"]!r}')
        return {**job, "kind": "texture"}
    if isinstance(job, dict) and job.get("kind") == "texture":
        raise JobSpecError("kind", '"texture" jobs come in a texture_mesh message, which carries the mesh')
    return job


def _init_mesh(
    spec: JobSpec, arrays: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | FixedMesh | None:
    """The starting mesh carried by a generate frame, checked against `init_shape`; a texture job's
    mesh, checked whole (`FixedMesh.from_arrays`)."""
    if spec.kind == "texture":
        return FixedMesh.from_arrays(
            arrays.get("mesh_vertices"), arrays.get("mesh_faces"), arrays.get("mesh_uvs")
        )
    vertices, faces = arrays.get("init_vertices"), arrays.get("init_faces")
    if spec.init_shape != "mesh":
        if vertices is not None or faces is not None:
            raise JobSpecError("init_shape", f'is {spec.init_shape!r} but a mesh was sent; use "mesh"')
        return None
    if vertices is None or faces is None:
        raise JobSpecError("init_shape", 'is "mesh" but the frame has no init_vertices / init_faces arrays')
    if vertices.ndim != 2 or vertices.shape[1] != 3 or vertices.dtype.kind != "f" or len(vertices) < 4:
        raise JobSpecError("init_vertices", f"must be float [N>=4, 3], got {vertices.dtype} {vertices.shape}")
    if not np.isfinite(vertices).all():
        raise JobSpecError("init_vertices", "contains NaN or infinite coordinates")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype.kind not in "iu" or len(faces) < 1:
        raise JobSpecError("init_faces", f"must be integer [F>=1, 3], got {faces.dtype} {faces.shape}")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise JobSpecError("init_faces", f"indices must lie in 0..{len(vertices) - 1}")
    return vertices.astype(np.float32), faces.astype(np.int32)


class Server:
    """Protocol state shared by every connection: the runner, the device description, the job queue.

    One job runs at a time (`_job`); jobs of other connections wait in `_queue` in arrival order.
    A connection has at most one job, running or queued, as over stdin/stdout.
    """

    def __init__(
        self,
        runner: Runner | None = None,
        describe: Describe | None = None,
        output_root: Path | str = "outputs",
        token: str | None = None,
        ray_address: str = "auto",
    ):
        self.runner = runner or default_runner
        self.ray_address = ray_address  # where a batch runs (Ray is joined on the first batch)
        self.describe = describe or describe_environment
        self.output_root = Path(output_root).resolve()
        self.token = token
        self._info: dict[str, Any] | None = None
        self._job: _Job | None = None
        self._queue: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._info_lock = threading.Lock()  # TCP handshakes run in parallel: probe the environment once

    def serve_connection(
        self,
        reader: protocol.FrameReader,
        writer: FrameWriter,
        on_greeted: Callable[[], None] | None = None,
        on_refused: Callable[[], None] | None = None,
    ) -> str:
        """Handle one client until it leaves. Returns why: "eof", "shutdown", "malformed" or "refused".

        `on_refused` runs before a failed hello is answered (TCP: the back-off). Whatever the
        reason it leaves, the client's jobs are cancelled first: nobody is left to receive their frames.
        """
        greeted = False
        try:
            while True:
                try:
                    message = reader.read()
                except protocol.ProtocolError as error:
                    log.error("malformed frame: %s; closing the connection (stream out of sync)", error)
                    writer.send(protocol.error(None, protocol.MALFORMED_FRAME, str(error), RESYNC_FIX))
                    return "malformed"
                except (OSError, ValueError) as error:  # reset, timeout, closed file
                    log.info("connection lost: %s", error)
                    return "eof"
                if message is None:
                    log.info("the client closed the connection")
                    return "eof"
                if not greeted:
                    greeted = self._hello(message, writer, on_refused)
                    if greeted and on_greeted is not None:
                        on_greeted()
                    if not greeted and self.token is not None:
                        return "refused"
                    continue
                if message.type == protocol.SHUTDOWN:
                    log.info("shutdown requested")
                    return "shutdown"
                try:
                    self._dispatch(message, writer)
                except Exception as exc:  # a server bug must not end the session
                    log.exception("handling %r failed", message.type)
                    writer.send(protocol.error(None, *classify_exception(exc)))
        finally:
            self.cancel_jobs(writer, wait_s=CANCEL_WAIT_SECONDS)

    def cancel_jobs(self, owner: FrameWriter | None, wait_s: float) -> None:
        """Cancel `owner`'s jobs (every job when None): queued ones are dropped, the running one is
        stopped and waited for. Finished assets stay on disk."""
        with self._lock:
            dropped = [job for job in self._queue if owner is None or job.writer is owner]
            for job in dropped:
                self._queue.remove(job)
            running = self._job if self._job is not None and owner in (None, self._job.writer) else None
            waiting = list(self._queue)
        for job in dropped:
            log.info("job %s cancelled while queued", job.job_id)
        if dropped:
            self._tell_positions(waiting)
        if running is None:
            return
        running.cancel.set()
        running.thread.join(wait_s)
        if running.thread.is_alive():
            log.warning("job %s did not stop within %.0f s of being cancelled", running.job_id, wait_s)

    def _server_info(self) -> dict[str, Any]:
        """The hello fields. A broken torch install is reported here rather than killing the server,
        so the extension can show it (`environment_error`) and still ping, cancel and shut down."""
        with self._info_lock:
            if self._info is None:
                base = hello_fields("unavailable", "")
                try:
                    self._info = {**base, **self.describe()}
                except Exception as error:
                    log.exception("probing the environment failed")
                    self._info = {**base, "environment_error": f"{type(error).__name__}: {error}"}
            return self._info

    def _hello(
        self, message: protocol.Message, writer: FrameWriter, on_refused: Callable[[], None] | None = None
    ) -> bool:
        """Answer the handshake; the token is checked before anything about the server is revealed."""
        if self.token is not None:
            given = message.get("token") if message.type == protocol.HELLO else None
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                log.warning("refused a client: wrong or missing token")
                if on_refused is not None:
                    on_refused()
                writer.send(
                    protocol.error(
                        None,
                        protocol.UNAUTHORIZED,
                        "the first frame must be a hello carrying the server's token",
                        f"use the token the server printed, or set it with --token / {TOKEN_ENV}",
                    )
                )
                return False
        if message.type != protocol.HELLO:
            writer.send(
                protocol.error(
                    None,
                    protocol.PROTOCOL_VERSION_MISMATCH,
                    f"expected hello before {message.type!r}",
                    f'send hello{{"protocol": {protocol.PROTOCOL_VERSION}, "client": ...}} first',
                )
            )
            return False
        if message.get("protocol") != protocol.PROTOCOL_VERSION:
            writer.send(
                protocol.error(
                    None,
                    protocol.PROTOCOL_VERSION_MISMATCH,
                    f"the client speaks protocol {message.get('protocol')!r}; this server speaks "
                    f"{protocol.PROTOCOL_VERSION}",
                    "install matching versions of the Blender extension and the server",
                )
            )
            return False
        log.info("hello from %r", message.get("client"))
        writer.send(protocol.server_hello(**self._server_info()))
        return True

    def _dispatch(self, message: protocol.Message, writer: FrameWriter) -> None:
        if message.type == protocol.HELLO:
            writer.send(protocol.server_hello(**self._server_info()))
        elif message.type == protocol.PING:
            writer.send(protocol.pong(message.get("id")))
        elif message.type in (protocol.GENERATE, protocol.TEXTURE_MESH):
            self._generate(message, writer)
        elif message.type == protocol.CANCEL:
            self._cancel(message.get("job_id"), writer)
        elif message.type == protocol.FINISH:
            self._finish(message.get("job_id"), writer)
        elif message.type == protocol.BATCH:
            self._batch(message, writer)
        else:
            writer.send(
                protocol.error(
                    message.get("job_id") if isinstance(message.get("job_id"), str) else None,
                    protocol.UNKNOWN_TYPE,
                    f"unknown message type {message.type!r}; this server knows "
                    f"{', '.join(sorted(protocol.CLIENT_MESSAGES))}",
                    "install matching versions of the Blender extension and the server",
                )
            )

    @staticmethod
    def _job_id(message: protocol.Message, writer: FrameWriter) -> str | None:
        """The message's job id, or None after telling the client why it cannot name a job."""
        job_id = message.get("job_id")
        if isinstance(job_id, str) and JOB_ID.fullmatch(job_id):
            return job_id
        writer.send(
            protocol.error(
                job_id if isinstance(job_id, str) else None,
                protocol.BAD_SETTINGS,
                f"job_id: must be 1 to 64 letters, digits, '_', '.' or '-', got {job_id!r}",
                "send a job id such as a UUID's hex string",
            )
        )
        return None

    def _generate(self, message: protocol.Message, writer: FrameWriter) -> None:
        job_id = self._job_id(message, writer)
        if job_id is None:
            return
        try:
            spec = JobSpec.from_dict(_job_of(message))
            init_mesh = _init_mesh(spec, message.arrays)
        except JobSpecError as error:
            self._refuse(job_id, error, writer)
            return
        self._enqueue(_Job(job_id, self._with_output(spec, job_id), init_mesh, writer))

    def _refuse(self, job_id: str, error: JobSpecError, writer: FrameWriter) -> None:
        log.info("job %s refused: %s", job_id, error)
        fix = getattr(error, "fix", f"change the {error.field} setting")
        writer.send(protocol.error(job_id, protocol.BAD_SETTINGS, str(error), fix))

    def _with_output(self, spec: JobSpec, job_id: str) -> JobSpec:
        """Without an output folder of its own, a job writes into the server's ROOT/JOB_ID."""
        if spec.output_dir is None:
            return dataclasses.replace(spec, output_dir=str(self.output_root / job_id))
        return spec

    def _batch(self, message: protocol.Message, writer: FrameWriter) -> None:
        """A batch of variants: checked here like a job's settings, then queued as one job."""
        batch_id = self._job_id(message, writer)
        if batch_id is None:
            return
        try:
            job, seeds, prompts = _batch_fields(message)
            settings = {k: v for k, v in job.items() if k not in ("prompt", "seed")}
            spec = JobSpec.from_dict({**settings, "prompt": prompts[0], "seed": seeds[0]})
        except JobSpecError as error:
            self._refuse(batch_id, error, writer)
            return
        spec = self._with_output(spec, batch_id)
        variants = batch_jobs(prompts, seeds, {**settings, "output_dir": spec.output_dir})
        self._enqueue(_Job(batch_id, spec, None, writer, batch=variants))

    def _enqueue(self, job: _Job) -> None:
        """Queue a checked job (or batch) behind the others, unless its connection already has one."""
        job_id, spec, writer = job.job_id, job.spec, job.writer
        with self._lock:
            active = [self._job, *self._queue] if self._job is not None else list(self._queue)
            own = next((other for other in active if other.writer is writer), None)
            own_state = "running" if own is not None and own is self._job else "queued"
            clash = any(other.job_id == job_id for other in active)
            if own is None and not clash:
                self._queue.append(job)
                position = len(active)
                if self._job is None:
                    self._start_next()
        if own is not None:
            writer.send(
                protocol.error(
                    job_id,
                    protocol.BUSY,
                    f"job {own.job_id} is still {own_state}; a connection runs one job at a time",
                    f"cancel job {own.job_id} or wait until it is done",
                )
            )
            return
        if clash:  # another client's job: the same id would share its output folder
            writer.send(
                protocol.error(
                    job_id,
                    protocol.BAD_SETTINGS,
                    f"job_id: {job_id!r} is already used by a job running or queued on this server",
                    "send a unique job id such as a UUID's hex string",
                )
            )
            return
        log.info(
            "%s %s accepted: %d steps of %s, prior %r, %d ahead of it",
            "job" if job.batch is None else f"batch of {len(job.batch)} variants,",
            job_id,
            spec.steps,
            spec.method,
            spec.prior,
            position,
        )
        try:
            writer.send(protocol.accepted(job_id, spec.output_dir))
            if position:
                writer.send(protocol.progress(job_id, 0, spec.steps, "queued", queue_position=position))
        finally:  # its thread waits for this, and the device with it
            job.announced.set()

    def _start_next(self) -> None:
        """With the lock held and no job running: start the first queued job in its thread."""
        if self._queue:
            job = self._job = self._queue.popleft()
            job.thread = threading.Thread(
                target=self._run, args=(job,), name=f"job-{job.job_id}", daemon=True
            )
            job.thread.start()

    def _tell_positions(self, waiting: list[_Job]) -> None:
        """The queue moved: tell each waiting job's client how many jobs now run before it."""
        for position, job in enumerate(waiting, start=1):
            if job.announced.is_set():  # else `_generate` is about to send its first position
                job.writer.send(
                    protocol.progress(job.job_id, 0, job.spec.steps, "queued", queue_position=position)
                )

    def _cancel(self, job_id: Any, writer: FrameWriter) -> None:
        """Cancel a job of this connection: a queued one ends at once, a running one at its next step."""
        with self._lock:
            queued = next((j for j in self._queue if j.job_id == job_id and j.writer is writer), None)
            if queued is not None:
                self._queue.remove(queued)
            running = self._job if self._job is not None and self._job.writer is writer else None
            waiting = list(self._queue)
        if queued is not None:
            log.info("job %s cancelled while queued", job_id)
            writer.send(protocol.cancelled(job_id, 0))
            self._tell_positions(waiting)
        elif running is not None and running.job_id == job_id:
            log.info("cancelling job %s", job_id)
            running.cancel.set()
        else:  # it already ended (its final frame is on its way), or it is not this client's job
            log.info("cancel for %r ignored: this connection has no such job", job_id)

    def _finish(self, job_id: Any, writer: FrameWriter) -> None:
        """Finish now: this connection's running job stops optimising after its current step and
        delivers its asset (a queued job has nothing to deliver yet: it runs when its turn comes)."""
        with self._lock:
            job = self._job if self._job is not None and self._job.writer is writer else None
        if job is not None and job.job_id == job_id:
            log.info("finishing job %s now", job_id)
            job.finish.set()
        else:  # it already ended (its final frame is on its way), or it is not this client's running job
            log.info("finish for %r ignored: this connection runs no such job", job_id)

    def _run(self, job: _Job) -> None:
        """The worker thread: run the job, turn its outcome into exactly one final frame, start the next."""
        job.announced.wait()
        started = time.monotonic()
        try:
            final = self._run_job(job) if job.batch is None else self._run_batch(job)
            log.info("job %s done in %.1f s", job.job_id, time.monotonic() - started)
        except Cancelled as cancelled:
            final = protocol.cancelled(job.job_id, cancelled.step)
            log.info("job %s cancelled after step %d", job.job_id, cancelled.step)
        except Exception as exc:
            code, message, fix = classify_exception(exc)
            log.error("job %s failed (%s)", job.job_id, code, exc_info=exc)
            final = protocol.error(job.job_id, code, message, fix)
        with self._lock:  # free the slot before the final frame, so the client may start the next job on it
            self._job = None
            self._start_next()
            waiting = list(self._queue)
        job.writer.send(final)
        self._tell_positions(waiting)

    def _run_job(self, job: _Job) -> bytes:
        """One job through the runner; its `done` frame with the GLB bytes."""
        events = JobEvents(
            job.job_id, job.writer.send, job.spec.preview_max_fps, should_finish=job.finish.is_set
        )
        result = self.runner(job.spec, job.init_mesh, events, job.should_cancel)
        payload = result.to_dict() if hasattr(result, "to_dict") else result  # a dict, or a result object
        glb = Path(payload["glb"]) if payload.get("glb") else None
        glb_bytes = glb.read_bytes() if glb is not None and glb.is_file() else None
        return protocol.done(job.job_id, glb_bytes=glb_bytes, **payload)

    def _run_batch(self, job: _Job) -> bytes:
        """A batch on Ray (imported only now): each variant streamed as it finishes; `batch_done` last,
        or `cancelled` (step: the variants delivered) when the client cancelled it."""
        from server.batch.streamed import run_streamed

        result = run_streamed(
            job.job_id,
            job.batch,
            Path(job.spec.output_dir),
            job.writer.send,
            self.ray_address,
            job.should_cancel,
            job.finish.is_set,
        )
        if job.should_cancel():
            raise Cancelled(len(result["assets"]))
        return protocol.batch_done(
            job.job_id,
            len(result["assets"]),
            result["failed"],
            result["retried"],
            result["cancelled"],
            result["seconds"],
        )


def _batch_fields(message: protocol.Message) -> tuple[dict, list[int], list[str]]:
    """A `batch` message's job dict, seeds and prompts (default: the job's prompt), or JobSpecError."""
    job, seeds, prompts = message.get("job"), message.get("seeds"), message.get("prompts")
    if not isinstance(job, dict):
        raise JobSpecError("job", f"must be an object of job settings, got {type(job).__name__}")
    if job.get("kind", "generate") != "generate":
        raise JobSpecError("kind", "a batch generates variants; texture meshes one by one (texture_mesh)")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise JobSpecError("seeds", f"must be a non-empty list of non-negative integers, got {seeds!r}")
    if prompts is None:
        prompts = [job.get("prompt")]
    elif not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise JobSpecError("prompts", f"must be a non-empty list of strings, got {prompts!r}")
    if len(prompts) * len(seeds) > MAX_BATCH_VARIANTS:
        raise JobSpecError(
            "seeds",
            f"{len(prompts)} prompts x {len(seeds)} seeds make more than {MAX_BATCH_VARIANTS} variants",
        )
    return job, list(seeds), prompts


def _stream_writer(stream: BinaryIO) -> FrameWriter:
    return FrameWriter(lambda frame: protocol.write_all(stream, frame))


def serve(
    stdin: BinaryIO,
    stdout: BinaryIO,
    *,
    runner: Runner | None = None,
    describe: Describe | None = None,
    output_root: Path | str = "outputs",
    ray_address: str = "auto",
) -> int:
    """Serve one client over a pair of byte streams until it leaves; the process exit code."""
    server = Server(runner, describe, output_root, ray_address=ray_address)
    why = server.serve_connection(protocol.FrameReader(stdin), _stream_writer(stdout))
    return 1 if why == "malformed" else 0


def _is_loopback(host: str) -> bool:
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


class _SocketStream:
    """A socket as `FrameReader` reads it, under an optional overall deadline: the handshake's.

    A timeout per read alone would let a client that sends a byte every few seconds stay forever.
    After the hello an idle client may stay, but a send that waits SEND_TIMEOUT_SECONDS fails.
    """

    def __init__(self, sock: socket.socket, deadline: float | None):
        self.sock = sock
        self.deadline = deadline

    def readinto(self, buffer: memoryview) -> int:
        while True:
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no hello within {HELLO_TIMEOUT_SECONDS:g} s")
                self.sock.settimeout(remaining)
            try:
                return self.sock.recv_into(buffer)
            except TimeoutError:
                if self.deadline is not None:
                    raise  # else only sends time out: an authenticated client may be quiet

    def lift_deadline(self) -> None:
        self.deadline = None
        self.sock.settimeout(SEND_TIMEOUT_SECONDS)


@dataclasses.dataclass(eq=False)
class _Knock:
    """A connection still in its handshake: the socket to shut if a newer one needs its place."""

    address: str
    sock: socket.socket


class Doorkeeper:
    """Who may knock on a TCP server: handshakes open per address (and in all), and the back-off
    of failed hellos.

    When an address (or the server) has no room for another handshake, its oldest one is cut off:
    a legitimate hello takes milliseconds, so a crowd of silent connections cannot keep it out.
    Each failed hello from an address is logged and answered later than the one before (doubling
    up to BACKOFF_MAX_SECONDS), so guessing the token is slow.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._knocks: dict[_Knock, None] = {}  # in arrival order: the oldest first
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (failures, when the last was)

    def admit(self, address: str, sock: socket.socket) -> _Knock:
        """A place for one more handshake; `release` it when the handshake ends, either way."""
        knock = _Knock(address, sock)
        with self._lock:
            same = [other for other in self._knocks if other.address == address]
            victim = None
            if len(same) >= HANDSHAKES_PER_ADDRESS:
                victim = same[0]
            elif len(self._knocks) >= HANDSHAKES_IN_ALL:
                victim = next(iter(self._knocks))
            if victim is not None:
                del self._knocks[victim]
            self._knocks[knock] = None
        if victim is not None:
            log.warning("too many handshakes open; cut off the oldest, from %s", victim.address)
            with contextlib.suppress(OSError):
                victim.sock.shutdown(socket.SHUT_RDWR)
        return knock

    def release(self, knock: _Knock) -> None:
        with self._lock:
            self._knocks.pop(knock, None)

    def failed(self, address: str, why: str) -> float:
        """Record a failed hello; returns the seconds to wait before answering it."""
        now = time.monotonic()
        with self._lock:
            count, last = self._failures.get(address, (0, now))
            count = 1 if now - last > BACKOFF_FORGET_SECONDS else count + 1
            self._failures[address] = (count, now)
            if len(self._failures) > 4096:  # many addresses: forget the quiet ones
                for stale in [a for a, (_, t) in self._failures.items() if now - t > BACKOFF_FORGET_SECONDS]:
                    del self._failures[stale]
        delay = min(BACKOFF_FIRST_SECONDS * 2 ** (count - 1), BACKOFF_MAX_SECONDS)
        log.warning("failed hello #%d from %s (%s); answered after %.2f s", count, address, why, delay)
        return delay


def _serve_client(
    server: Server,
    connection: socket.socket,
    knock: _Knock,
    tls_context: ssl.SSLContext | None,
    doorkeeper: Doorkeeper,
    stop: threading.Event,
) -> None:
    """One TCP client on its own thread: TLS and hello under one deadline and the pre-hello size
    limits, then its session. Shutdown from an authenticated client sets `stop`."""
    deadline = time.monotonic() + HELLO_TIMEOUT_SECONDS
    peer = knock.address
    greeted = False
    try:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_context is not None:
            connection.settimeout(HELLO_TIMEOUT_SECONDS)
            try:
                connection = knock.sock = tls_context.wrap_socket(connection, server_side=True)
            except OSError as error:  # ssl.SSLError too: a plain-TCP client, a wrong version, a timeout
                log.warning("TLS handshake with %s failed: %s", peer, error)
                return
        stream = _SocketStream(connection, deadline)
        reader = protocol.FrameReader(
            stream, protocol.HELLO_MAX_HEADER_BYTES, protocol.HELLO_MAX_PAYLOAD_BYTES
        )

        def on_greeted() -> None:
            nonlocal greeted
            greeted = True
            doorkeeper.release(knock)
            stream.lift_deadline()
            reader.max_header_bytes = protocol.MAX_HEADER_BYTES
            reader.max_payload_bytes = protocol.MAX_PAYLOAD_BYTES

        why = server.serve_connection(
            reader,
            FrameWriter(connection.sendall, on_broken=lambda: connection.shutdown(socket.SHUT_RDWR)),
            on_greeted=on_greeted,
            on_refused=lambda: time.sleep(doorkeeper.failed(peer, "wrong or missing token")),
        )
        if why == "malformed" and not greeted:
            doorkeeper.failed(peer, "malformed or oversized first frame")
        log.info("connection from %s ended (%s)", peer, why)
        if why == "shutdown":
            stop.set()
    finally:
        doorkeeper.release(knock)
        connection.close()


def serve_tcp(
    host: str,
    port: int,
    token: str,
    *,
    allow_remote: bool = False,
    tls_context: ssl.SSLContext | None = None,
    insecure: bool = False,
    runner: Runner | None = None,
    describe: Describe | None = None,
    output_root: Path | str = "outputs",
    announce: Callable[[dict], None] | None = None,
    ray_address: str = "auto",
) -> int:
    """Serve TCP clients, each on its own thread, until one sends shutdown; the process exit code.

    The bound address (port 0 picks a free one) is announced as {"listening": "HOST:PORT"}.
    """
    if not allow_remote and not _is_loopback(host):
        log.error("refusing to listen on %s: not a loopback address (pass --allow-remote to expose it)", host)
        return 2
    if allow_remote and tls_context is None and not insecure:
        log.error(
            "refusing to serve beyond loopback in clear text: the token, prompts and meshes would cross the "
            "network unencrypted. Give --tls-cert/--tls-key (a self-signed pair: %s), or reach the server "
            "through an SSH tunnel, or pass --insecure on a network you trust",
            tls.SELF_SIGNED_COMMAND,
        )
        return 2
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server = Server(runner, describe, output_root, token, ray_address)
    doorkeeper = Doorkeeper()
    stop = threading.Event()
    with socket.create_server((host, port), family=family) as listener:
        bound_host, bound_port = listener.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        (announce or _announce)({"listening": f"{shown}:{bound_port}"})
        listener.settimeout(0.2)  # look at `stop` this often
        while not stop.is_set():
            try:
                connection, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as error:  # e.g. out of file descriptors: keep serving those connected
                log.warning("accepting a connection failed: %s", error)
                time.sleep(0.2)
                continue
            log.info("connection from %s", address[0])
            connection.settimeout(None)
            knock = doorkeeper.admit(address[0], connection)
            threading.Thread(
                target=_serve_client,
                args=(server, connection, knock, tls_context, doorkeeper, stop),
                name=f"client-{address[0]}",
                daemon=True,
            ).start()
    server.cancel_jobs(None, wait_s=CANCEL_WAIT_SECONDS)
    return 0


def _announce(fields: dict) -> None:
    print(json.dumps(fields), file=sys.stderr, flush=True)


def _claim_stdout() -> BinaryIO:
    """Keep the real stdout for frames only. Everything else that writes there (print, tqdm, C
    libraries writing to file descriptor 1) is sent to stderr, so it cannot corrupt the stream."""
    sys.stdout.flush()
    frames_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    if sys.platform == "win32":
        import msvcrt

        msvcrt.setmode(frames_fd, os.O_BINARY)
    return os.fdopen(frames_fd, "wb")


def _load_function(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise SystemExit(f"expected MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 0 picks a free one), got {value!r}")
    return host.strip("[]"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen", type=_parse_listen, metavar="HOST:PORT", help="serve TCP instead of stdin/stdout"
    )
    parser.add_argument("--token", help=f"TCP token clients must send (default ${TOKEN_ENV}, else generated)")
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow --listen on a non-loopback host (wants TLS)"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PEM", help="TCP: serve TLS with this certificate")
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="TCP: the certificate's private key")
    parser.add_argument(
        "--insecure", action="store_true", help="allow --allow-remote without TLS (a network you trust)"
    )
    parser.add_argument(
        "--output-root", type=Path, default=Path("outputs"), help="default output: ROOT/JOB_ID"
    )
    parser.add_argument(
        "--runner", metavar="MODULE:FUNCTION", help="job function instead of server.pipeline.run.run_job"
    )
    parser.add_argument(
        "--describe", metavar="MODULE:FUNCTION", help="hello fields function instead of the torch probe"
    )
    parser.add_argument(
        "--ray",
        default="auto",
        metavar="ADDRESS",
        help='where `batch` messages run: "auto" (Ray on this machine, started on the first batch) or a '
        "cluster address such as ray://head:10001; needs the Ray extra (requirements-ray.txt)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    options = {
        "runner": _load_function(args.runner) if args.runner else None,
        "describe": _load_function(args.describe) if args.describe else None,
        "output_root": args.output_root,
        "ray_address": args.ray,
    }
    if args.listen is None:
        frames_out = _claim_stdout()
        code = serve(sys.stdin.buffer, frames_out, **options)
        log.info("exiting with code %d", code)
        return code
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        token = secrets.token_urlsafe(24)
        _announce({"token": token})
    host, port = args.listen
    try:
        tls_context = _tls_context(args.tls_cert, args.tls_key)
    except ValueError as error:
        log.error("%s", error)
        return 2
    return serve_tcp(
        host,
        port,
        token,
        allow_remote=args.allow_remote,
        tls_context=tls_context,
        insecure=args.insecure,
        **options,
    )


def _tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The TLS context of --tls-cert/--tls-key, its fingerprint announced; None without them.
    ValueError says why they cannot be used."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError(f"--tls-cert and --tls-key go together; make a pair with: {tls.SELF_SIGNED_COMMAND}")
    try:
        context = tls.server_context(cert, key)
        fingerprint = tls.certificate_fingerprint(cert)
    except (OSError, ValueError, ssl.SSLError) as error:
        raise ValueError(
            f"cannot use the TLS certificate {cert} with key {key}: {error}; "
            f"make a self-signed pair with: {tls.SELF_SIGNED_COMMAND}"
        ) from error
    log.info("TLS certificate SHA-256 fingerprint %s: enter it in the extension's preferences", fingerprint)
    _announce({"tls_fingerprint": fingerprint})
    return context
