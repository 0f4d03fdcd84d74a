"""Client side of protocol v1: start the server as a child process (pipes) or connect over TCP.

The Blender extension imports this module (as `<extension>.server.wire.client`), so it imports only
the standard library, numpy and `protocol` (never torch, never bpy). A reader thread decodes frames
into a queue; Blender's main thread drains it with `poll()` from a timer and never blocks. The
blocking helpers (`hello`, `ping`, `wait_for`) are for start-up, scripts and tests.
"""

from __future__ import annotations

import contextlib
import hmac
import queue
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:  # inside the server package; the extension's copy sits next to protocol.py instead
    from server.wire import protocol, tls
except ImportError:  # pragma: no cover - the extension's layout
    from . import protocol, tls  # type: ignore[no-redef]

Message = protocol.Message


class ConnectionClosed(RuntimeError):
    """The server went away; `str()` says why (and, for a child process, how it exited)."""


class CertificateMismatch(ConnectionClosed):
    """The TLS server's certificate is not the pinned one: nothing (no token) was sent to it."""


class ServerError(RuntimeError):
    """An `error` frame answering a connection-level request (hello, ...)."""

    def __init__(self, message: Message):
        self.code = message.get("code")
        self.message = message.get("message")
        self.fix = message.get("fix")
        self.job_id = message.get("job_id")
        text = f"{self.code}: {self.message}"
        super().__init__(f"{text} ({self.fix})" if self.fix else text)


class Connection:
    """Frames to and from a server over a readable stream and a write function.

    Incoming messages are queued by a daemon thread. `poll()` and `get()` hand them out in order;
    after the stream ends they report `closed_reason` (`alive` turns false).
    """

    token: str | None = None

    def __init__(self, stream: BinaryIO, write: Callable[[bytes], None], name: str):
        self._stream = stream
        self._write = write
        self._write_lock = threading.Lock()
        self._queue: queue.Queue[Message | None] = queue.Queue()
        self._stash: deque[Message] = deque()  # read by wait_for but not what it waited for
        self._ended = False
        self.closed_reason: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            for message in protocol.FrameReader(self._stream):
                message.received_at = time.perf_counter()
                self._queue.put(message)
            self.closed_reason = "the server closed the connection"
        except protocol.ProtocolError as error:
            self.closed_reason = f"malformed frame from the server: {error}"
        except (OSError, ValueError) as error:
            self.closed_reason = f"connection lost: {error}"
        finally:
            self._queue.put(None)

    @property
    def alive(self) -> bool:
        return not self._ended

    def _closed_error(self) -> ConnectionClosed:
        return ConnectionClosed(self.closed_reason or "the connection is closed")

    def _next_from_queue(self, timeout: float | None) -> Message | None:
        """The next new message, None on timeout; raises ConnectionClosed at the end."""
        if self._ended:
            raise self._closed_error()
        try:
            message = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if message is None:
            self._ended = True
            raise self._closed_error()
        return message

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message in arrival order, or None after `timeout` seconds."""
        if self._stash:
            return self._stash.popleft()
        return self._next_from_queue(timeout)

    def poll(self) -> list[Message]:
        """Every message available now, without blocking (empty once the connection has ended)."""
        messages = list(self._stash)
        self._stash.clear()
        while not self._ended:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                break
            if message is None:
                self._ended = True
            else:
                messages.append(message)
        return messages

    def wait_for(self, types: str | Iterable[str], timeout: float) -> Message:
        """Block until a message of one of `types` arrives; others are kept for `get`/`poll`.

        A connection-level error (job_id null) raises `ServerError`; job errors are kept.
        """
        wanted = {types} if isinstance(types, str) else set(types)
        deadline = time.monotonic() + timeout
        while True:
            message = self._next_from_queue(max(0.0, deadline - time.monotonic()))
            if message is None:
                raise TimeoutError(f"no {'/'.join(sorted(wanted))} from the server within {timeout:g} s")
            if message.type in wanted:
                return message
            if message.type == protocol.ERROR and message.get("job_id") is None:
                raise ServerError(message)
            self._stash.append(message)

    def send(self, frame: bytes) -> None:
        with self._write_lock:
            try:
                self._write(frame)
            except (OSError, ValueError) as error:
                raise ConnectionClosed(f"cannot send to the server: {error}") from error

    def hello(self, client: str = "blender-cfd", timeout: float = 120.0) -> Message:
        """Handshake; returns the server's hello (versions, device). The first hello may take
        seconds: the server probes torch and the GPU."""
        self.send(protocol.client_hello(client, self.token))
        return self.wait_for(protocol.HELLO, timeout)

    def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time in seconds."""
        ping_id = f"{time.monotonic_ns()}"
        start = time.perf_counter()
        self.send(protocol.ping(ping_id))
        while True:
            pong = self.wait_for(protocol.PONG, timeout)
            if pong.get("id") == ping_id:
                return time.perf_counter() - start

    def generate(
        self,
        job_id: str,
        job: dict[str, Any],
        init_vertices: np.ndarray | None = None,
        init_faces: np.ndarray | None = None,
    ) -> None:
        """Start a job; `accepted` (or an error) follows, then progress, previews and one final frame."""
        self.send(protocol.generate(job_id, job, init_vertices, init_faces))

    def texture_mesh(
        self,
        job_id: str,
        job: dict[str, Any],
        vertices: np.ndarray,
        faces: np.ndarray,
        uvs: np.ndarray | None = None,
    ) -> None:
        """Start a texture job on this mesh (kept exactly); the same frames follow as for `generate`.
        A server too old for it answers an `unknown_type` error (`texture_unsupported` words it)."""
        self.send(protocol.texture_mesh(job_id, job, vertices, faces, uvs))

    def batch(self, batch_id: str, job: dict, seeds: list[int], prompts: list[str] | None = None) -> None:
        """Many variants of `job` on the server's Ray, each arriving as its own `done` (`protocol.batch`)."""
        self.send(protocol.batch(batch_id, job, seeds, prompts))

    def cancel(self, job_id: str) -> None:
        self.send(protocol.cancel(job_id))

    def finish(self, job_id: str) -> None:
        """Stop the job's optimisation now and still get its whole asset (a `done` frame)."""
        self.send(protocol.finish(job_id))

    def shutdown(self) -> None:
        self.send(protocol.shutdown())


def texture_unsupported(error: protocol.Message) -> str | None:
    """The user's words for an old server's `unknown_type` answer to a texture_mesh frame, else None."""
    if error.get("code") != protocol.UNKNOWN_TYPE or protocol.TEXTURE_MESH not in str(error.get("message")):
        return None
    return (
        "this server cannot texture a mesh (it is older than the extension); update the server "
        "(Set up environment, or install the server of the same version)"
    )


class ServerProcess(Connection):
    """`python -m server serve` as a child process, talking over its stdin/stdout pipes.

    `python` is the interpreter of the server's environment (not Blender's). The child gets its
    own process group / session, so stopping it never signals Blender. stderr (the server's log)
    is drained by a thread into `stderr_tail` and, when given, `log_path`.
    """

    def __init__(
        self,
        python: str | Path,
        args: Sequence[str] = (),
        cwd: str | Path | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
    ):
        command = [str(python), "-m", "server", "serve", *args]
        if sys.platform == "win32":
            platform_options = {
                "creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
            }
        else:
            platform_options = {"start_new_session": True}
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            **platform_options,
        )
        self.stderr_tail: deque[str] = deque(maxlen=200)
        self._log = open(log_path, "a", encoding="utf-8") if log_path is not None else None  # noqa: SIM115
        self._stderr_reader = threading.Thread(target=self._drain_stderr, name="server-stderr", daemon=True)
        self._stderr_reader.start()
        super().__init__(self.process.stdout, self._write_stdin, "server")

    def _write_stdin(self, frame: bytes) -> None:
        self.process.stdin.write(frame)
        self.process.stdin.flush()

    def _drain_stderr(self) -> None:
        for raw in self.process.stderr:
            line = raw.decode("utf-8", errors="replace").rstrip()
            self.stderr_tail.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()

    def _closed_error(self) -> ConnectionClosed:
        code = self.process.poll()
        exit_text = "" if code is None else f"; the server exited with code {code}"
        last = f"; last log line: {self.stderr_tail[-1]}" if self.stderr_tail else ""
        return ConnectionClosed(f"{self.closed_reason or 'the connection is closed'}{exit_text}{last}")

    def close(self, timeout: float = 5.0) -> int:
        """Ask the server to exit, then terminate, then kill; returns its exit code."""
        if self.process.poll() is None:
            try:
                self.shutdown()
                self.process.stdin.close()  # end of stream also makes the server exit
            except (ConnectionClosed, OSError):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(2.0)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        self._reader.join(2.0)
        self._stderr_reader.join(2.0)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr, self._log):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        return self.process.returncode

    def kill(self) -> None:
        """Immediate stop (frees GPU memory for sure); `close()` afterwards collects it."""
        self.process.kill()


class TcpConnection(Connection):
    """A connection to `python -m server serve --listen HOST:PORT`; `token` goes in the hello.

    With `fingerprint` (the SHA-256 the server printed for its certificate) the connection is TLS,
    and a server whose certificate has another fingerprint is refused (`CertificateMismatch`)
    before anything is sent. ValueError: the fingerprint is not one.
    """

    def __init__(self, host: str, port: int, token: str, timeout: float = 10.0, fingerprint: str = ""):
        self.token = token
        pinned = tls.normalise_fingerprint(fingerprint) if fingerprint.strip() else None
        self.tls = pinned is not None
        self.socket = socket.create_connection((host, port), timeout=timeout)
        if pinned is not None:
            self.socket = _pinned_tls(self.socket, f"{host}:{port}", pinned)
        self.socket.settimeout(None)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(self.socket.makefile("rb"), self.socket.sendall, "tcp")

    def hello(self, client: str = "blender-cfd", timeout: float = 120.0) -> Message:
        try:
            return super().hello(client, timeout)
        except ConnectionClosed as closed:
            if self.tls:
                raise
            raise ConnectionClosed(
                f"{closed}; if the server was started with --tls-cert, enter the certificate fingerprint "
                "it printed (the extension's preferences, or fingerprint=...)"
            ) from closed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes the reader thread with end of stream
        self._reader.join(2.0)
        self._stream.close()
        self.socket.close()


def _pinned_tls(raw: socket.socket, address: str, pinned: str) -> ssl.SSLSocket:
    """TLS over `raw`, kept only if the server's certificate has the pinned fingerprint."""
    try:
        wrapped = tls.client_context().wrap_socket(raw)
    except (ssl.SSLError, OSError) as error:
        raw.close()
        raise ConnectionClosed(
            f"no TLS handshake with {address} ({error}); start the server with --tls-cert/--tls-key, "
            "or clear the fingerprint for a server without TLS (loopback or an SSH tunnel)"
        ) from error
    presented = tls.fingerprint(wrapped.getpeercert(binary_form=True))
    if not hmac.compare_digest(presented, pinned):
        wrapped.close()
        raise CertificateMismatch(
            f"the server at {address} presented a certificate with SHA-256 fingerprint {presented}, not the "
            f"pinned {pinned}: refused, the token was not sent. If you replaced the server's certificate, "
            "enter the fingerprint it now prints; otherwise something else answers at that address"
        )
    return wrapped
