"""`serve --listen` against hostile and concurrent clients, and TLS with a pinned certificate.

TRANSPORT tests on a real `python -m server serve --listen 127.0.0.1:0` subprocess with the
model-free `tests.fake_runner` (see test_serve.py): nothing is buffered before the hello is
accepted (the server's memory is read from /proc), a silent stranger delays nobody, failed hellos
back off, several clients' jobs queue and stay apart, and TLS is reached only with the right
fingerprint (a self-signed certificate made by the openssl binary).
"""

from __future__ import annotations

import contextlib
import queue
import shlex
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from server import serve
from server.wire import protocol, tls
from server.wire.client import CertificateMismatch, ConnectionClosed, ServerError, TcpConnection
from tests import fake_runner
from tests.test_serve import FINAL, REPO, announced, job, tcp_server

TOKEN = "correct horse battery"


def address(log: Path) -> tuple[str, int]:
    host, port = announced(log, "listening").rsplit(":", 1)
    return host, int(port)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the most ever resident) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def client(log: Path, **options) -> TcpConnection:
    connection = TcpConnection(*address(log), token=TOKEN, **options)
    connection.hello(timeout=30)
    return connection


def frames_until_final(connection: TcpConnection, timeout: float = 20.0) -> list[protocol.Message]:
    frames = []
    deadline = time.monotonic() + timeout
    while not frames or frames[-1].type not in FINAL:
        message = connection.get(max(0.0, deadline - time.monotonic()))
        assert message is not None, f"no final frame within {timeout} s: {[f.type for f in frames]}"
        frames.append(message)
    return frames


# ------------------------------------------------------------------------------ before the hello


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_a_pre_hello_frame_announcing_a_huge_payload_is_refused_unread(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN) as (server, log):
        host, port = address(log)
        client(log).close()  # the server is warm: its hello is built, a connection was served
        before = memory_kib(server.pid)
        header = b'{"type":"hello","protocol":1,"client":"x"}'
        junk = bytes(1 << 20)
        sent = 0
        with socket.create_connection((host, port)) as attacker:
            attacker.sendall(protocol.PREFIX.pack(protocol.MAGIC, len(header), (1 << 30) - 1) + header)
            with pytest.raises(OSError):  # the server closes on us (reset or broken pipe)
                while sent < 200 << 20:
                    attacker.sendall(junk)
                    sent += len(junk)
            attacker.settimeout(5)
            answer = protocol.FrameReader(attacker.makefile("rb")).read()
        after = memory_kib(server.pid)
        # A second try: a header over the pre-hello limit (the post-hello limit is 16 times larger).
        with socket.create_connection((host, port)) as attacker:
            attacker.sendall(protocol.PREFIX.pack(protocol.MAGIC, protocol.HELLO_MAX_HEADER_BYTES + 1, 0))
            attacker.settimeout(5)
            too_big_header = protocol.FrameReader(attacker.makefile("rb")).read()
        assert client(log).ping() < 0.5  # the server carries on
    assert answer.type == "error" and answer.get("code") == protocol.MALFORMED_FRAME
    assert "exceeds the 0-byte limit" in answer.get("message")
    assert too_big_header.get("code") == protocol.MALFORMED_FRAME
    assert "65536-byte limit" in too_big_header.get("message")
    assert sent < 32 << 20, f"the server read {sent >> 20} MiB of a stranger's junk before refusing it"
    growth = after["VmHWM"] - before["VmHWM"]
    print(f"junk sent before the refusal: {sent >> 20} MiB; server memory {before} -> {after} KiB")
    assert growth < 4 << 10, f"the server's peak memory grew by {growth} KiB ({before} -> {after})"


def test_silent_or_trickling_strangers_delay_no_one(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN) as (_server, log):
        host, port = address(log)
        client(log).close()  # the first hello probes the environment; time the next ones
        strangers = [socket.create_connection((host, port)) for _ in range(serve.HANDSHAKES_PER_ADDRESS + 4)]
        strangers[0].sendall(protocol.MAGIC[:2])  # half a prefix, then nothing
        try:
            time.sleep(0.5)  # all are being served (and wait for their hello)
            waits = []
            for _ in range(3):
                start = time.monotonic()
                connection = client(log)
                waits.append(time.monotonic() - start)
                connection.close()
        finally:
            for stranger in strangers:
                stranger.close()
        text = log.read_text()
    assert max(waits) < 0.5, f"a legitimate hello waited {max(waits):.2f} s behind silent connections"
    assert "too many handshakes open; cut off the oldest, from 127.0.0.1" in text


def test_failed_hellos_from_one_address_back_off_and_are_logged(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN) as (_server, log):
        client(log).close()
        refusals = []
        for _ in range(3):
            guesser = TcpConnection(*address(log), token="guess")
            start = time.monotonic()
            with pytest.raises(ServerError) as caught:
                guesser.hello(timeout=10)
            refusals.append(time.monotonic() - start)
            assert caught.value.code == protocol.UNAUTHORIZED
            guesser.close()
        start = time.monotonic()
        client(log).close()  # the right token is not slowed down by the guesses
        rightful = time.monotonic() - start
        text = log.read_text()
    assert refusals[0] >= 0.2 and refusals[1] >= 0.45 and refusals[2] >= 0.95, refusals
    assert rightful < 0.5, rightful
    assert "failed hello #3 from 127.0.0.1 (wrong or missing token); answered after 1.00 s" in text


# --------------------------------------------------------------------------------- several clients


def test_jobs_of_several_clients_queue_and_each_sees_only_its_own(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN) as (_server, log):
        artist, script, third = client(log), client(log), client(log)
        artist.generate("artist-job", job("a chair", steps=30))
        artist.wait_for("progress", 5)
        script.generate("script-job", job("a lamp", steps=3))
        script.wait_for("accepted", 5)  # two sockets: only this wait fixes which job arrives first
        third.generate("third-job", job("a vase", steps=3))
        third.wait_for("accepted", 5)
        queued = [script.wait_for("progress", 5), third.wait_for("progress", 5)]
        script.cancel("artist-job")  # not its job: ignored
        third_moved_up = third.wait_for("progress", 10)  # the artist's job ended: one fewer ahead
        third.cancel("third-job")  # its own queued job: cancelled at once
        third_final = third.wait_for(FINAL, 5)
        artist_frames = frames_until_final(artist)
        script_frames = frames_until_final(script)
        artist.generate("artist-again", job(steps=2))  # the queue is free again: no position
        again = frames_until_final(artist)
        for connection in (artist, script, third):
            connection.close()
    assert [(m.get("stage"), m.get("queue_position")) for m in queued] == [("queued", 1), ("queued", 2)]
    assert third_moved_up.get("queue_position") == 1 and third_final.type == "cancelled"
    assert {m.get("job_id") for m in artist_frames} == {"artist-job"}
    assert {m.get("job_id") for m in script_frames} == {"script-job"}
    assert artist_frames[-1].type == "done" and script_frames[-1].type == "done"  # not cancelled by another
    running = [m for m in script_frames if m.type == "progress" and m.get("stage") != "queued"]
    assert running[0].received_at > artist_frames[-1].received_at  # it ran after the artist's job
    assert all("queue_position" not in m.header for m in again)
    assert (tmp_path / "artist-job" / "job.json").is_file()
    assert (tmp_path / "script-job" / "fake.glb").is_file()


def test_a_leaving_client_takes_its_jobs_along_and_no_one_elses(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN) as (_server, log):
        finished, leaving, staying = client(log), client(log), client(log)
        finished.generate("kept", job(steps=2))
        assert finished.wait_for(FINAL, 5).type == "done"
        leaving.generate("left-running", job(steps=10_000))
        leaving.wait_for("progress", 5)
        staying.generate("left-running", job(steps=2))  # another client's id: refused, not mixed up
        clash = staying.wait_for("error", 5)
        staying.generate("waits", job(steps=2))
        assert staying.wait_for("progress", 5).get("queue_position") == 1
        start = time.monotonic()
        leaving.close()
        frames = frames_until_final(staying)
        waited = time.monotonic() - start
        text = log.read_text()
        for connection in (finished, staying):
            connection.close()
    assert clash.get("code") == protocol.BAD_SETTINGS and "already used" in clash.get("message")
    assert frames[-1].type == "done" and frames[-1].get("job_id") == "waits"
    assert waited < 3.0, f"the next job started {waited:.1f} s after its owner left"
    assert "job left-running cancelled" in text
    assert (tmp_path / "kept" / "fake.glb").is_file()  # a finished asset stays on disk


def test_a_client_that_stops_reading_does_not_hold_the_device(tmp_path: Path, monkeypatch) -> None:
    """In process (`serve_tcp` on a thread) to shorten the send timeout: a client that floods hellos
    and reads nothing is dropped, its job cancelled, and the job queued behind it runs."""
    monkeypatch.setattr(serve, "SEND_TIMEOUT_SECONDS", 0.5)
    listening: queue.Queue[dict] = queue.Queue()
    options = {"runner": fake_runner.run_job, "describe": fake_runner.describe, "output_root": tmp_path}
    thread = threading.Thread(
        target=serve.serve_tcp,
        args=("127.0.0.1", 0, TOKEN),
        kwargs={**options, "announce": listening.put},
        daemon=True,
    )
    thread.start()
    host, port = listening.get(timeout=10)["listening"].rsplit(":", 1)
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((host, int(port)))
    stuck.sendall(protocol.client_hello("stuck", TOKEN) + protocol.generate("stuck-job", job(steps=10_000)))
    waiting = TcpConnection(host, int(port), TOKEN)
    waiting.hello(timeout=30)
    waiting.generate("waiting-job", job(steps=2))
    assert waiting.wait_for("progress", 5).get("queue_position") == 1

    def flood() -> None:
        with contextlib.suppress(OSError):  # until the server gives up on this client
            while True:
                stuck.sendall(protocol.client_hello("stuck") * 1000)  # each answered by a longer hello

    threading.Thread(target=flood, daemon=True).start()
    start = time.monotonic()
    frames = frames_until_final(waiting, timeout=30)
    waited = time.monotonic() - start
    waiting.shutdown()
    thread.join(15)
    waiting.close()
    stuck.close()
    assert frames[-1].type == "done" and frames[-1].get("job_id") == "waiting-job"
    assert waited < 15, f"the queued job waited {waited:.1f} s behind a client that reads nothing"
    assert not thread.is_alive()


# --------------------------------------------------------------------------------------------- TLS


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path, str]:
    """A certificate and key made with the README's command, and openssl's own fingerprint of it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl binary to make a self-signed certificate")
    assert tls.SELF_SIGNED_COMMAND in (REPO / "README.md").read_text()
    subprocess.run(shlex.split(tls.SELF_SIGNED_COMMAND), cwd=tmp_path, check=True, capture_output=True)
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    printed = subprocess.run(
        [openssl, "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return cert, key, printed.strip().rpartition("=")[2]


def test_tls_is_reached_with_the_pinned_fingerprint_and_refused_with_another(
    tmp_path: Path, self_signed
) -> None:
    cert, key, openssl_fingerprint = self_signed
    args = ["--listen", "127.0.0.1:0", "--allow-remote", "--token", TOKEN, "--tls-cert", str(cert)]
    with tcp_server(tmp_path, *args, "--tls-key", str(key)) as (_server, log):
        fingerprint = announced(log, "tls_fingerprint")
        host, port = address(log)
        wrong = ("FF:" if fingerprint.startswith("00") else "00:") + fingerprint[3:]  # not this one
        with pytest.raises(CertificateMismatch, match="the token was not sent"):
            TcpConnection(host, port, TOKEN, fingerprint=wrong)
        with pytest.raises(ConnectionClosed, match="--tls-cert"):
            TcpConnection(host, port, TOKEN).hello(timeout=10)  # plain TCP to a TLS server
        with pytest.raises(ValueError, match="64 hex digits"):
            TcpConnection(host, port, TOKEN, fingerprint="not a fingerprint")
        pasted = fingerprint.replace(":", "").lower()  # any way a user may paste it
        connection = client(log, fingerprint=pasted)
        connection.generate("over-tls", job(steps=3))
        frames = frames_until_final(connection)
        version = connection.socket.version()
        connection.close()
        text = log.read_text()
    assert fingerprint == openssl_fingerprint == tls.certificate_fingerprint(cert)
    assert frames[-1].type == "done" and frames[-1].blobs["glb"][0].startswith(b"not a real glb")
    assert version in ("TLSv1.2", "TLSv1.3")
    assert "failed hello" not in text  # the mismatched client never sent its hello (nor its token)


def test_a_tls_client_is_told_when_the_server_has_no_tls(tmp_path: Path) -> None:
    with (
        tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN) as (_server, log),
        pytest.raises(ConnectionClosed, match="no TLS handshake"),
    ):
        TcpConnection(*address(log), TOKEN, fingerprint="AB" * 32)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--allow-remote"], "refusing to serve beyond loopback in clear text"),
        (["--allow-remote", "--tls-cert", "server.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "missing.crt", "--tls-key", "missing.key"], "cannot use the TLS certificate"),
    ],
)
def test_serving_beyond_loopback_without_tls_refuses_to_start(tmp_path: Path, args, expected) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN, *args) as (server, log):
        assert server.wait(30) == 2
    text = log.read_text()
    assert expected in text and "openssl req -x509" in text
    if args == ["--allow-remote"]:
        assert "--insecure" in text and "SSH tunnel" in text


def test_insecure_allows_clear_text_beyond_loopback_when_asked(tmp_path: Path) -> None:
    args = ["--listen", "127.0.0.1:0", "--allow-remote", "--insecure", "--token", TOKEN]
    with tcp_server(tmp_path, *args) as (server, log):
        connection = client(log)
        assert connection.ping() < 0.5
        connection.shutdown()
        assert server.wait(5) == 0
        connection.close()


def test_shutdown_from_one_client_ends_the_others_jobs(tmp_path: Path) -> None:
    with tcp_server(tmp_path, "--listen", "127.0.0.1:0", "--token", TOKEN) as (server, log):
        worker, admin = client(log), client(log)
        worker.generate("long", job(steps=10_000))
        worker.wait_for("progress", 5)
        threading.Thread(target=admin.shutdown).start()
        assert server.wait(15) == 0
        with pytest.raises(ConnectionClosed):
            while True:
                worker.get(5)
        worker.close()
        admin.close()
    assert "job long cancelled" in log.read_text()
