"""The server process: handshake, ping, one job at a time, cancel, shutdown, disconnects, malformed
frames, typed errors, and TCP with a token.

Two kinds of tests. Logic tests run `serve()` in a thread over OS pipes with small runners.
TRANSPORT tests start the real `python -m server serve` subprocess (stdio and TCP) with
`--runner tests.fake_runner:run_job`, a model-free job that streams progress and meshes every
50 ms; the end-to-end tests with the real generator live elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from server.job.errors import Cancelled, JobSpecError, MissingWeightsError, NonFiniteError
from server.serve import classify_exception, serve
from server.wire import protocol
from server.wire.client import Connection, ConnectionClosed, ServerError, ServerProcess, TcpConnection
from tests import fake_runner

REPO = Path(__file__).resolve().parent.parent
FAKE = ["--runner", "tests.fake_runner:run_job", "--describe", "tests.fake_runner:describe"]
FINAL = {"done", "cancelled", "error"}


def job(prompt: str = "a chair", **settings) -> dict:
    return {"prompt": prompt, "preview_max_fps": 30, **settings}


# ------------------------------------------------------------------------------- error mapping


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_exceptions_map_to_typed_error_codes() -> None:
    import torch

    cases = {
        protocol.BAD_SETTINGS: JobSpecError("steps", "must be an integer in [1, 100000], got 0"),
        protocol.OUT_OF_MEMORY: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
        protocol.NAN: NonFiniteError("loss is NaN"),
        protocol.INTERNAL: raised(KeyError("missing")),
    }
    for code, exc in cases.items():
        assert classify_exception(exc)[0] == code, exc
    assert classify_exception(MemoryError())[0] == protocol.OUT_OF_MEMORY
    assert classify_exception(RuntimeError("MPS backend out of memory"))[0] == protocol.OUT_OF_MEMORY
    assert classify_exception(cases[protocol.BAD_SETTINGS])[2] == "change the steps setting"
    assert "fp16" in classify_exception(MemoryError())[2]
    message = classify_exception(cases[protocol.INTERNAL])[1]
    assert message.startswith("KeyError: 'missing' (at test_serve.py:") and "in raised)" in message


def test_missing_weights_maps_to_its_fix() -> None:
    code, message, fix = classify_exception(MissingWeightsError("owner/model", "run the download command"))
    assert code == protocol.MISSING_WEIGHTS and "owner/model" in message and fix == "run the download command"


# ------------------------------------------------------------------- logic tests, in a thread


class InProcessServer:
    """`serve()` on a thread, wired to a client `Connection` by two OS pipes."""

    def __init__(self, runner, output_root: Path, describe=fake_runner.describe):
        to_server_r, to_server_w = os.pipe()
        to_client_r, to_client_w = os.pipe()
        self._server_streams = (os.fdopen(to_server_r, "rb"), os.fdopen(to_client_w, "wb"))
        self.client_out = os.fdopen(to_server_w, "wb")
        self.client_in = os.fdopen(to_client_r, "rb")
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._serve, args=(runner, output_root, describe), daemon=True)
        self.thread.start()
        self.connection = Connection(self.client_in, lambda f: protocol.write_all(self.client_out, f), "test")

    def _serve(self, runner, output_root: Path, describe) -> None:
        stdin, stdout = self._server_streams
        self.exit_code = serve(stdin, stdout, runner=runner, describe=describe, output_root=output_root)
        with contextlib.suppress(OSError):  # the client may have stopped reading
            stdout.close()

    def end_input(self) -> None:
        with contextlib.suppress(OSError):
            self.client_out.close()

    def close(self) -> None:
        self.end_input()
        self.thread.join(10)
        self.client_in.close()
        for stream in self._server_streams:
            stream.close()


@pytest.fixture
def make_server(tmp_path: Path):
    servers = []

    def make(runner=fake_runner.run_job, describe=fake_runner.describe) -> InProcessServer:
        servers.append(InProcessServer(runner, tmp_path, describe))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def test_hello_is_required_first_and_versions_must_match(make_server) -> None:
    connection = make_server().connection
    connection.send(protocol.ping(1))
    with pytest.raises(ServerError, match="expected hello") as caught:
        connection.wait_for("pong", 5)
    assert caught.value.code == protocol.PROTOCOL_VERSION_MISMATCH
    connection.send(protocol.encode_frame({"type": "hello", "protocol": 2, "client": "future"}))
    with pytest.raises(ServerError, match="protocol 2") as caught:
        connection.wait_for("hello", 5)
    assert caught.value.code == protocol.PROTOCOL_VERSION_MISMATCH
    hello = connection.hello()
    assert hello.header["protocol"] == 1 and hello.header["device_name"] == "fake device"
    assert connection.ping() < 1.0


def test_a_broken_environment_is_reported_in_the_hello(make_server) -> None:
    def describe():
        raise OSError("libcudart.so.12: cannot open shared object file")

    connection = make_server(describe=describe).connection
    hello = connection.hello()
    assert hello.header["device"] == "unavailable" and "libcudart" in hello.header["environment_error"]
    assert connection.ping() < 1.0


def test_unknown_types_are_refused_and_the_server_stays_usable(make_server) -> None:
    connection = make_server().connection
    connection.hello()
    connection.send(protocol.encode_frame({"type": "teleport"}))
    with pytest.raises(ServerError, match="teleport") as caught:
        connection.wait_for("pong", 5)
    assert caught.value.code == protocol.UNKNOWN_TYPE
    assert connection.ping() < 1.0


def test_a_batch_without_ray_names_the_extra_and_bad_batches_name_their_field(
    make_server, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as in a server without the extra
    connection = make_server().connection
    connection.hello()
    for frame, field in (
        (protocol.batch("b0", job(), []), "seeds"),
        (protocol.batch("b1", job(), [0, -1]), "seeds"),
        (
            protocol.encode_frame(
                {"type": "batch", "job_id": "b2", "job": job(), "seeds": [0], "prompts": "a"}
            ),
            "prompts",
        ),
        (protocol.batch("b3", job(steps=0), [0]), "steps"),
        (protocol.batch("b4", job(), list(range(600)), prompts=["a", "b"]), "seeds"),
    ):
        connection.send(frame)
        refused = connection.wait_for(("accepted", "error"), 5)
        assert refused.get("code") == protocol.BAD_SETTINGS and refused.get("message").startswith(f"{field}:")
    connection.send(protocol.batch("b5", job(), [0, 1]))
    assert connection.wait_for(("accepted", "error"), 5).type == "accepted"
    refused = connection.wait_for(("batch_done", "error"), 10)
    assert refused.get("code") == protocol.MISSING_EXTRA and "Ray is not installed" in refused.get("message")
    assert "pip install -r requirements-ray.txt" in refused.get("fix")
    assert connection.ping() < 1.0, "the server stays usable"


def test_bad_job_ids_and_init_meshes_are_bad_settings(make_server) -> None:
    connection = make_server().connection
    connection.hello()
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    faces = np.array([[0, 1, 2], [0, 1, 3]], np.int32)
    cases = [
        (protocol.generate("../etc", job()), None),
        (protocol.generate("j1", job(), vertices, faces), "init_shape"),
        (protocol.generate("j2", job(init_shape="mesh")), "init_shape"),
        (protocol.generate("j3", job(init_shape="mesh"), vertices[:3], faces[:1]), "init_vertices"),
        (protocol.generate("j4", job(seed=-5)), "seed"),
    ]
    for frame, field in cases:
        connection.send(frame)
        error = connection.wait_for("error", 5) if field is None else connection.wait_for(FINAL, 5)
        assert error.type == "error" and error.header["code"] == protocol.BAD_SETTINGS
        assert error.header["message"].startswith(f"{field or 'job_id'}: ")
    wild = protocol.encode_frame(
        {"type": "generate", "job_id": "j5", "job": job(init_shape="mesh")},
        {"init_vertices": vertices, "init_faces": faces + 10},
    )
    connection.send(wild)
    assert connection.wait_for(FINAL, 5).header["message"].startswith("init_faces: ")


@dataclasses.dataclass
class Result:
    """A runner may return a result object with `to_dict()` instead of the done payload itself."""

    out_dir: str

    def to_dict(self) -> dict:
        return {
            "glb": "g",
            "preview_png": None,
            "job_json": "j",
            "out_dir": self.out_dir,
            "seconds": 1.0,
            "steps_per_second": 1.0,
        }


def test_the_runner_gets_the_init_mesh_and_a_default_output_dir(make_server, tmp_path: Path) -> None:
    seen = {}

    def runner(spec, init_mesh, emit, should_cancel):
        seen.update(spec=spec, init_mesh=init_mesh)
        emit.progress(1, 1, "only")
        return Result(spec.output_dir)

    connection = make_server(runner).connection
    connection.hello()
    vertices = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    faces = np.array([[0, 1, 2], [2, 3, 4]], np.int32)
    connection.generate("mesh-job", job(init_shape="mesh"), vertices, faces)
    accepted = connection.wait_for("accepted", 5)
    assert accepted.header["out_dir"] == str(tmp_path / "mesh-job")
    progress = connection.wait_for("progress", 5)
    assert progress.header["job_id"] == "mesh-job" and progress.header["stage"] == "only"
    done = connection.wait_for(FINAL, 5)
    assert done.type == "done" and done.header["out_dir"] == str(tmp_path / "mesh-job")
    np.testing.assert_array_equal(seen["init_mesh"][0], vertices)
    np.testing.assert_array_equal(seen["init_mesh"][1], faces)
    assert seen["spec"].output_dir == str(tmp_path / "mesh-job")


def test_runner_failures_become_typed_errors_and_the_server_stays_usable(make_server) -> None:
    failures = iter([MemoryError("no room for the render"), NonFiniteError("loss is NaN")])

    def runner(spec, init_mesh, emit, should_cancel):
        if spec.prompt == "incomplete":
            return {"glb": "only this"}  # a runner bug: the done payload lacks fields
        raise next(failures)

    connection = make_server(runner).connection
    connection.hello()
    expected = [
        (protocol.OUT_OF_MEMORY, "render size"),
        (protocol.NAN, "guidance"),
        (protocol.INTERNAL, "report"),
    ]
    for prompt, (code, fix) in zip(["a", "b", "incomplete"], expected, strict=True):
        connection.generate(f"job-{prompt}", job(prompt))
        assert connection.wait_for("accepted", 5).header["job_id"] == f"job-{prompt}"
        error = connection.wait_for(FINAL, 5)
        assert error.type == "error" and error.header["code"] == code and fix in error.header["fix"]
        assert error.header["job_id"] == f"job-{prompt}"
    assert connection.ping() < 1.0


def test_end_of_input_cancels_the_job_and_exits_cleanly(make_server) -> None:
    cancelled = threading.Event()

    def runner(spec, init_mesh, emit, should_cancel):
        while not should_cancel():
            time.sleep(0.01)
        cancelled.set()
        raise Cancelled(0)

    server = make_server(runner)
    server.connection.hello()
    server.connection.generate("long", job())
    server.connection.wait_for("accepted", 5)
    server.end_input()
    server.thread.join(5)
    assert cancelled.is_set() and not server.thread.is_alive() and server.exit_code == 0


def test_a_vanished_reader_stops_the_job(make_server) -> None:
    """If nobody reads the server's output any more, frames fail and the job is told to cancel."""
    stopped = threading.Event()

    def runner(spec, init_mesh, emit, should_cancel):
        for step in range(2000):
            if should_cancel():
                stopped.set()
                raise Cancelled(step)
            emit.progress(step, 2000, "spam", loss=float(step))
            time.sleep(0.001)
        return {}

    server = make_server(runner)
    server.connection.hello()
    server.connection.generate("orphan", job())
    server.connection.wait_for("accepted", 5)
    server.client_in.close()  # the client stops reading: the pipe breaks on the next write
    assert stopped.wait(5)


def test_a_malformed_frame_closes_the_connection_and_cancels_the_job(make_server) -> None:
    server = make_server()
    server.connection.hello()
    server.connection.generate("j", job(steps=10_000))
    server.connection.wait_for("accepted", 5)
    server.connection.send(b"NOPE" + bytes(12))
    with pytest.raises(ServerError) as caught:
        server.connection.wait_for("pong", 5)
    assert caught.value.code == protocol.MALFORMED_FRAME and "bad magic" in caught.value.message
    server.thread.join(5)
    assert server.exit_code == 1
    assert server.connection.wait_for("cancelled", 5).header["job_id"] == "j"


# ------------------------------------------------------------- TRANSPORT tests: real subprocess


@pytest.fixture
def stdio_server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(sys.executable, [*FAKE, "--output-root", str(tmp_path)], cwd=REPO)
    yield process
    process.close()


def test_transport_stdio_full_job_streams_meshes_and_writes_job_json(stdio_server: ServerProcess) -> None:
    hello = stdio_server.hello(timeout=30)
    assert hello.header["server_version"] and hello.header["python"]
    assert stdio_server.ping() < 0.5
    stdio_server.generate("job-1", job(steps=8, seed=11))
    accepted = stdio_server.wait_for("accepted", 5)
    messages = []
    while not messages or messages[-1].type not in FINAL:
        messages.append(stdio_server.get(5))
    done = messages[-1]
    assert done.type == "done", done.header
    steps = [m.header["step"] for m in messages if m.type == "progress"]
    assert steps == list(range(1, 9))
    meshes = [m for m in messages if m.type == "preview_mesh"]
    assert len(meshes) >= 2
    last = meshes[-1].arrays
    np.testing.assert_allclose(
        last["positions"], fake_runner.OCTAHEDRON[0] * (0.5 + 0.5 * meshes[-1].header["step"] / 8)
    )
    np.testing.assert_array_equal(last["faces"], fake_runner.OCTAHEDRON[1])
    assert last["colors"].dtype == np.uint8 and last["colors"].shape == (6, 3)
    saved = json.loads(Path(done.header["job_json"]).read_text())
    assert saved["seed"] == 11 and saved["output_dir"] == accepted.header["out_dir"] == done.header["out_dir"]


def test_transport_busy_cancel_and_reuse(stdio_server: ServerProcess) -> None:
    stdio_server.hello(timeout=30)
    stdio_server.generate("long", job(steps=10_000))
    stdio_server.wait_for("accepted", 5)
    stdio_server.wait_for("progress", 5)
    stdio_server.generate("second", job())
    busy = stdio_server.wait_for("error", 5)
    assert busy.header["code"] == protocol.BUSY and busy.header["job_id"] == "second"
    assert "long" in busy.header["message"] and "cancel" in busy.header["fix"]
    stdio_server.wait_for("progress", 5)  # the running job carries on
    start = time.monotonic()
    stdio_server.cancel("long")
    cancelled = stdio_server.wait_for("cancelled", 5)
    assert time.monotonic() - start < 1.0
    assert cancelled.header["job_id"] == "long" and cancelled.header["step"] >= 1
    stdio_server.generate("third", job(steps=2))
    assert stdio_server.wait_for(FINAL, 5).type == "done"


def test_transport_finish_now_delivers_the_asset_at_the_current_step(stdio_server: ServerProcess) -> None:
    stdio_server.hello(timeout=30)
    stdio_server.generate("long", job(steps=10_000))
    stdio_server.wait_for("accepted", 5)
    seen = stdio_server.wait_for("progress", 5).header["step"]
    stdio_server.finish("some-other-job")  # not running: ignored, the job carries on
    stdio_server.wait_for("progress", 5)
    start = time.monotonic()
    stdio_server.finish("long")
    done = stdio_server.wait_for(FINAL, 5)
    assert done.type == "done" and time.monotonic() - start < 1.0, done.header
    stopped = done.header["stopped_at_step"]
    assert seen < stopped < 10_000
    assert json.loads(Path(done.header["job_json"]).read_text())["stopped_at_step"] == stopped
    stdio_server.generate("whole", job(steps=2))
    done = stdio_server.wait_for(FINAL, 5)
    assert done.type == "done" and done.header["stopped_at_step"] is None


def test_transport_bad_settings_and_job_failures_leave_the_server_usable(stdio_server: ServerProcess) -> None:
    stdio_server.hello(timeout=30)
    stdio_server.generate("bad", job(render_size=100))
    error = stdio_server.wait_for("error", 5)
    assert error.header["code"] == protocol.BAD_SETTINGS and error.header["message"].startswith(
        "render_size:"
    )
    for prompt, code in [
        ("fail:memory", protocol.OUT_OF_MEMORY),
        ("fail:nan", protocol.NAN),
        ("fail:internal", protocol.INTERNAL),
    ]:
        stdio_server.generate("failing", job(prompt))
        assert stdio_server.wait_for(FINAL, 5).header["code"] == code
    assert stdio_server.ping() < 0.5


def test_transport_shutdown_exits_zero_even_mid_job(stdio_server: ServerProcess) -> None:
    stdio_server.hello(timeout=30)
    stdio_server.generate("long", job(steps=10_000))
    stdio_server.wait_for("accepted", 5)
    stdio_server.shutdown()
    assert stdio_server.process.wait(5) == 0
    with pytest.raises(ConnectionClosed, match="exited with code 0"):
        while True:
            stdio_server.get(5)


def test_transport_malformed_frame_gets_an_error_then_the_server_exits(stdio_server: ServerProcess) -> None:
    stdio_server.hello(timeout=30)
    stdio_server.send(protocol.MAGIC + b"\xff" * 12)  # a 4 GiB header length
    with pytest.raises(ServerError, match="exceeds") as caught:
        stdio_server.wait_for("pong", 5)
    assert caught.value.code == protocol.MALFORMED_FRAME
    assert stdio_server.process.wait(5) == 1
    assert any("malformed frame" in line for line in stdio_server.stderr_tail)


def _gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie nobody reaped counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_transport_killing_the_client_stops_the_server(tmp_path: Path) -> None:
    client_script = f"""
import sys, time
from server.wire.client import ServerProcess
server = ServerProcess(sys.executable, {[*FAKE, "--output-root", str(tmp_path)]!r}, cwd={str(REPO)!r})
server.hello(timeout=30)
server.generate("long", {{"prompt": "x", "steps": 10000}})
server.wait_for("progress", 10)
print(server.process.pid, flush=True)
time.sleep(60)
"""
    client = subprocess.Popen(
        [sys.executable, "-c", client_script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        server_pid = int(client.stdout.readline())
        assert not _gone(server_pid)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(5)
        deadline = time.monotonic() + 5
        while not _gone(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(server_pid), "the server outlived its client"
    finally:
        client.kill()
        client.wait()
        client.stdout.close()


# ---------------------------------------------------------------------------------- TCP transport


@contextlib.contextmanager
def tcp_server(
    tmp_path: Path, *args: str, env: dict | None = None
) -> Iterator[tuple[subprocess.Popen, Path]]:
    log = tmp_path / "tcp_server.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", *FAKE, "--output-root", str(tmp_path), *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def announced(log: Path, key: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("{") and key in (fields := json.loads(line)):
                return fields[key]
        time.sleep(0.05)
    raise TimeoutError(f"the server announced no {key!r}: {log.read_text()}")


def test_transport_tcp_requires_the_token_and_binds_to_loopback(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", env={"BLENDER_CFD_TOKEN": "correct horse"}) as (
        server,
        log,
    ):
        host, port = announced(log, "listening").rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        assert '{"token"' not in log.read_text()  # given by the environment, so not printed

        intruder = TcpConnection(host, int(port), token="wrong")
        with pytest.raises(ServerError) as caught:
            intruder.hello(timeout=10)
        assert caught.value.code == protocol.UNAUTHORIZED
        with pytest.raises(ConnectionClosed):
            intruder.get(5)
        intruder.close()

        impatient = TcpConnection(host, int(port), token="correct horse")
        impatient.send(protocol.ping(1))  # no hello first: refused before anything is revealed
        with pytest.raises(ServerError, match="hello carrying the server's token"):
            impatient.wait_for("pong", 5)
        impatient.close()

        client = TcpConnection(host, int(port), token="correct horse")
        assert client.hello(timeout=30).header["device_name"] == "fake device"
        assert client.ping() < 0.5
        client.generate("tcp-job", job(steps=3))
        assert client.wait_for(FINAL, 5).type == "done"
        client.generate("left-behind", job(steps=10_000))
        client.wait_for("progress", 5)
        client.close()  # a dropped client: its job is cancelled and the server waits for the next

        again = TcpConnection(host, int(port), token="correct horse")
        again.hello(timeout=10)
        again.generate("next", job(steps=2))
        assert again.wait_for(FINAL, 5).type == "done"  # not busy: the dropped client's job stopped
        again.shutdown()
        assert server.wait(5) == 0
        again.close()
    assert "job left-behind cancelled" in log.read_text()


def test_transport_tcp_generates_and_prints_a_token_when_none_is_given(tmp_path: Path) -> None:
    env = {"BLENDER_CFD_TOKEN": ""}
    with tcp_server(tmp_path, "--listen", "localhost:0", env=env) as (server, log):
        token = announced(log, "token")
        host, port = announced(log, "listening").rsplit(":", 1)
        assert len(token) >= 24
        client = TcpConnection(host, int(port), token=token)
        client.hello(timeout=30)
        client.shutdown()
        assert server.wait(5) == 0
        client.close()


def test_transport_tcp_refuses_a_non_loopback_address_without_allow_remote(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "0.0.0.0:0", "--token", "t") as (server, log):
        assert server.wait(30) == 2
    assert "not a loopback address" in log.read_text()
