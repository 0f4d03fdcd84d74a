"""Protocol v1: every message round-trips, the reader survives short reads, bad frames raise
ProtocolError naming the problem, and the decoder never hangs or raises anything else on fuzz."""

from __future__ import annotations

import io
import json
import os
import struct
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.wire import protocol
from server.wire.protocol import ProtocolError, decode_frame, encode_frame

RNG = np.random.default_rng(7)
POSITIONS = RNG.normal(size=(50, 3)).astype(np.float32)
FACES = RNG.integers(0, 50, size=(80, 3)).astype(np.int32)
COLORS = RNG.integers(0, 256, size=(50, 3)).astype(np.uint8)
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3


def frame_with_header(header_bytes: bytes, payload: bytes = b"") -> bytes:
    return protocol.PREFIX.pack(protocol.MAGIC, len(header_bytes), len(payload)) + header_bytes + payload


def frame_with_descriptors(
    arrays: list | None = None, blobs: list | None = None, payload: bytes = b""
) -> bytes:
    header = {"type": "x"}
    if arrays is not None:
        header["arrays"] = arrays
    if blobs is not None:
        header["blobs"] = blobs
    return frame_with_header(json.dumps(header).encode(), payload)


class TrickleStream(io.RawIOBase):
    """A pipe-like stream: each readinto returns at most `chunk` bytes."""

    def __init__(self, data: bytes, chunk: int):
        self._data, self._pos, self._chunk = data, 0, chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(self._chunk, len(buffer), len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


# ------------------------------------------------------------------------------------ round trips

ROUND_TRIPS = [
    (protocol.client_hello("blender 5.0", token="s3cret"), "hello", {"protocol": 1, "client": "blender 5.0"}),
    (protocol.client_hello("blender 5.0"), "hello", {"protocol": 1}),
    (
        protocol.server_hello("0.1.0", "3.11.7", "2.13.0", "12.8", "cuda", "H100", vram_gb=80.0),
        "hello",
        {"protocol": 1, "device": "cuda", "device_name": "H100", "cuda": "12.8", "vram_gb": 80.0},
    ),
    (protocol.ping(17), "ping", {"id": 17}),
    (protocol.pong("abc"), "pong", {"id": "abc"}),
    (
        protocol.generate("j1", {"prompt": "a chair", "seed": 3}),
        "generate",
        {"job": {"prompt": "a chair", "seed": 3}},
    ),
    (
        protocol.texture_mesh(
            "j1",
            {"prompt": "a red cube"},
            np.zeros((4, 3), np.float32),
            np.array([[0, 1, 2], [0, 2, 3]]),
            np.zeros((2, 3, 2), np.float32),
        ),
        "texture_mesh",
        {"job_id": "j1", "job": {"prompt": "a red cube"}},
    ),
    (protocol.cancel("j1"), "cancel", {"job_id": "j1"}),
    (protocol.finish("j1"), "finish", {"job_id": "j1"}),
    (protocol.shutdown(), "shutdown", {}),
    (protocol.accepted("j1", "/tmp/out/j1"), "accepted", {"job_id": "j1", "out_dir": "/tmp/out/j1"}),
    (
        protocol.progress("j1", 5, 100, "geometry", 812.5, 0.25, 12.0, 3.5),
        "progress",
        {
            "step": 5,
            "total": 100,
            "stage": "geometry",
            "t": 812.5,
            "loss": 0.25,
            "eta_s": 12.0,
            "elapsed_s": 3.5,
        },
    ),
    (
        protocol.texture("j1", 9, PNG, 512, 256, final=True),
        "texture",
        {"width": 512, "height": 256, "final": True},
    ),
    (
        protocol.done("j1", "/o/a.glb", "/o/a.png", "/o/job.json", "/o", 12.5, 8.0, seed=3),
        "done",
        {"glb": "/o/a.glb", "preview_png": "/o/a.png", "job_json": "/o/job.json", "seconds": 12.5, "seed": 3},
    ),
    (protocol.cancelled("j1", 42), "cancelled", {"job_id": "j1", "step": 42}),
    (
        protocol.batch("b1", {"prompt": "a chair", "steps": 50}, [0, 3], ["a chair", "a lamp"]),
        "batch",
        {
            "job_id": "b1",
            "job": {"prompt": "a chair", "steps": 50},
            "seeds": [0, 3],
            "prompts": ["a chair", "a lamp"],
        },
    ),
    (
        protocol.batch_done(
            "b1", 1, [{"prompt": "a", "seed": 1, "error": "e"}], [], [{"prompt": "a", "seed": 2}], 9.5
        ),
        "batch_done",
        {"job_id": "b1", "assets": 1, "failed": [{"prompt": "a", "seed": 1, "error": "e"}], "seconds": 9.5},
    ),
    (
        protocol.error(None, protocol.BUSY, "job j0 runs", "wait"),
        "error",
        {"job_id": None, "code": "busy", "message": "job j0 runs", "fix": "wait"},
    ),
]


@pytest.mark.parametrize(
    ("frame", "kind", "expected"), ROUND_TRIPS, ids=[f"{r[1]}-{i}" for i, r in enumerate(ROUND_TRIPS)]
)
def test_header_round_trip(frame: bytes, kind: str, expected: dict) -> None:
    message = decode_frame(frame)
    assert message.type == kind
    assert message.header["type"] == kind
    for key, value in expected.items():
        assert message.header[key] == value
    assert "arrays" not in message.header and "blobs" not in message.header


def test_every_message_type_has_a_round_trip_case() -> None:
    kinds = {decode_frame(frame).type for frame, _, _ in ROUND_TRIPS}
    decoded_with_arrays = {decode_frame(protocol.preview_mesh("j", 1, POSITIONS, FACES, COLORS)).type}
    assert kinds | decoded_with_arrays == protocol.CLIENT_MESSAGES | protocol.SERVER_MESSAGES


def test_preview_mesh_arrays_round_trip_exactly() -> None:
    message = decode_frame(
        protocol.preview_mesh("j1", 7, POSITIONS.astype(np.float64), FACES.astype(np.int64), COLORS)
    )
    assert message.header == {"type": "preview_mesh", "job_id": "j1", "step": 7}
    assert {k: (v.dtype.str, v.shape) for k, v in message.arrays.items()} == {
        "positions": ("<f4", (50, 3)),
        "faces": ("<i4", (80, 3)),
        "colors": ("|u1", (50, 3)),
    }
    np.testing.assert_array_equal(message.arrays["positions"], POSITIONS)
    np.testing.assert_array_equal(message.arrays["faces"], FACES)
    np.testing.assert_array_equal(message.arrays["colors"], COLORS)


def test_generate_carries_the_init_mesh() -> None:
    message = decode_frame(protocol.generate("j2", {"prompt": "p", "init_shape": "mesh"}, POSITIONS, FACES))
    assert message.header["job"] == {"prompt": "p", "init_shape": "mesh"}
    np.testing.assert_array_equal(message.arrays["init_vertices"], POSITIONS)
    np.testing.assert_array_equal(message.arrays["init_faces"], FACES)
    with pytest.raises(ProtocolError, match="go together"):
        protocol.generate("j2", {}, POSITIONS, None)


def test_texture_blob_round_trips() -> None:
    message = decode_frame(protocol.texture("j1", 3, PNG, 4, 4))
    assert message.blobs == {"png": (PNG, "image/png")}
    assert message.header["final"] is False


def test_arbitrary_arrays_and_blobs_keep_values_dtypes_shapes_and_alignment() -> None:
    arrays = {
        "scalar": np.array(3.5, dtype=">f8"),  # big-endian input is sent little-endian
        "strided": np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2],  # non-contiguous
        "empty": np.zeros((0, 3), dtype=np.float32),
        "mask": np.array([True, False, True]),
        "half": np.linspace(-1, 1, 5, dtype=np.float16),
        "odd": np.arange(3, dtype=np.uint8),  # 3 bytes: the next array must be re-aligned
        "after_odd": np.arange(3, dtype=np.float64),
    }
    blobs = {"a": (b"abc", "text/plain"), "b": (b"", "application/octet-stream")}
    frame = encode_frame({"type": "custom", "n": 1}, arrays, blobs)
    message = decode_frame(frame)
    assert message.type == "custom" and message.header == {"type": "custom", "n": 1}
    for name, value in arrays.items():
        decoded = message.arrays[name]
        assert decoded.shape == value.shape and decoded.dtype == value.dtype.newbyteorder("<")
        np.testing.assert_array_equal(decoded, value)
    assert message.blobs == blobs
    descriptors = json.loads(frame[16 : 16 + struct.unpack(">I", frame[4:8])[0]])["arrays"]
    assert all(d["offset"] % protocol.ALIGNMENT == 0 for d in descriptors)


def test_progress_turns_non_finite_numbers_into_null() -> None:
    message = decode_frame(protocol.progress("j", 1, 2, "s", t=float("inf"), loss=float("nan")))
    assert message.header["loss"] is None and message.header["t"] is None


def test_the_queue_position_is_additive_to_progress() -> None:
    plain = decode_frame(protocol.progress("j", 3, 10, "shape"))
    queued = decode_frame(protocol.progress("j", 0, 10, "queued", queue_position=2))
    assert "queue_position" not in plain.header  # what an older client already reads, unchanged
    assert queued.header["queue_position"] == 2 and queued.header["stage"] == "queued"


# --------------------------------------------------------------------------------- encoder refusals


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: encode_frame({"no": "type"}), '"type"'),
        (lambda: encode_frame(["type"]), "must be a dict"),
        (lambda: encode_frame({"type": "x", "arrays": []}), "reserved"),
        (lambda: encode_frame({"type": "x", "v": float("nan")}), "not JSON-serialisable"),
        (lambda: encode_frame({"type": "x", "v": object()}), "not JSON-serialisable"),
        (lambda: encode_frame({"type": "x"}, {"a": np.array(["text"])}), "dtype"),
        (lambda: encode_frame({"type": "x"}, {"a": np.zeros(2, np.complex64)}), "dtype"),
        (lambda: encode_frame({"type": "x"}, {"a": [1, 2]}), "numpy array"),
        (lambda: encode_frame({"type": "x"}, {"": np.zeros(2)}), "non-empty"),
        (lambda: encode_frame({"type": "x", "big": "x" * (protocol.MAX_HEADER_BYTES + 1)}), "limit"),
        (lambda: protocol.error(None, "oops", "m"), "unknown error code"),
        (lambda: protocol.preview_mesh("j", 1, POSITIONS[:, :2], FACES), r"\[N, 3\]"),
        (lambda: protocol.preview_mesh("j", 1, POSITIONS, FACES + 50), "outside"),
        (lambda: protocol.preview_mesh("j", 1, POSITIONS, FACES, COLORS[:10]), "colors"),
    ],
)
def test_encoder_rejects_bad_input(call, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        call()


# ------------------------------------------------------------------------------------------ reader


def test_reader_reassembles_frames_from_short_reads_and_stops_cleanly() -> None:
    frames = [protocol.ping(1), protocol.preview_mesh("j", 2, POSITIONS, FACES, COLORS), protocol.shutdown()]
    reader = protocol.FrameReader(TrickleStream(b"".join(frames), chunk=7))
    messages = list(reader)
    assert [m.type for m in messages] == ["ping", "preview_mesh", "shutdown"]
    np.testing.assert_array_equal(messages[1].arrays["positions"], POSITIONS)
    assert reader.read() is None  # still a clean end of stream


def test_reader_over_a_real_pipe_with_a_multi_megabyte_frame() -> None:
    positions = RNG.normal(size=(200_000, 3)).astype(np.float32)  # 2.4 MB: many pipe-sized reads
    faces = np.arange(300_000, dtype=np.int32).reshape(-1, 3) % 200_000
    frame = protocol.preview_mesh("j", 1, positions, faces)
    read_fd, write_fd = os.pipe()

    def write() -> None:
        with open(write_fd, "wb", buffering=0) as out:
            protocol.write_all(out, frame)
            protocol.write_all(out, protocol.ping(2))

    writer = threading.Thread(target=write)
    writer.start()
    with open(read_fd, "rb", buffering=0) as stream:  # raw FileIO: short reads
        reader = protocol.FrameReader(stream)
        mesh, ping, end = reader.read(), reader.read(), reader.read()
    writer.join()
    np.testing.assert_array_equal(mesh.arrays["positions"], positions)
    np.testing.assert_array_equal(mesh.arrays["faces"], faces)
    assert ping.type == "ping" and end is None


def test_empty_stream_is_a_clean_end() -> None:
    assert protocol.read_frame(io.BytesIO(b"")) is None


@pytest.mark.parametrize("cut", [1, 15, 16, 20, -1])
def test_end_of_stream_inside_a_frame_is_an_error(cut: int) -> None:
    frame = protocol.texture("j", 1, PNG, 4, 4)
    with pytest.raises(ProtocolError, match="end of stream inside the"):
        protocol.read_frame(io.BytesIO(frame[:cut]))


BAD_FRAMES = [
    (b"XXXX" + protocol.ping(1)[4:], "bad magic"),
    (protocol.PREFIX.pack(protocol.MAGIC, protocol.MAX_HEADER_BYTES + 1, 0), "header of .* exceeds"),
    (
        protocol.PREFIX.pack(protocol.MAGIC, 2, protocol.MAX_PAYLOAD_BYTES + 1) + b"{}",
        "payload of .* exceeds",
    ),
    (frame_with_header(b"[1, 2]"), "must be a JSON object"),
    (frame_with_header(b'{"type": '), "not valid JSON"),
    (frame_with_header(b"\xff\xfe{}"), "not valid UTF-8"),
    (frame_with_header(b'{"type": "x", "v": NaN}'), "NaN"),
    (frame_with_header(b"[" * 100_000), "nested too deeply|not valid JSON"),
    (frame_with_header(b'{"step": 1}'), '"type"'),
    (frame_with_header(b'{"type": 5}'), '"type"'),
    (frame_with_descriptors(arrays={"name": "a"}), "list of objects"),
    (frame_with_descriptors(arrays=[{"dtype": "<f4", "shape": [1], "offset": 0, "nbytes": 4}]), '"name"'),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": "<f4", "shape": [2], "offset": 0, "nbytes": 8}], payload=b"1234"
        ),
        "beyond the 4-byte payload",
    ),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": "<f4", "shape": [1], "offset": -4, "nbytes": 4}], payload=b"1234"
        ),
        "offset must be a non-negative integer",
    ),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": ">f4", "shape": [1], "offset": 0, "nbytes": 4}], payload=b"1234"
        ),
        "dtype '>f4'",
    ),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": "|O", "shape": [1], "offset": 0, "nbytes": 8}], payload=bytes(8)
        ),
        "dtype '|O'",
    ),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": "<f4", "shape": [3], "offset": 0, "nbytes": 8}], payload=bytes(8)
        ),
        "takes 12 bytes, not nbytes=8",
    ),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": "<f4", "shape": [-1], "offset": 0, "nbytes": 4}], payload=bytes(4)
        ),
        "shape entry",
    ),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": "<f4", "shape": 4, "offset": 0, "nbytes": 4}], payload=bytes(4)
        ),
        "shape must be a list",
    ),
    (
        frame_with_descriptors(
            arrays=[{"name": "a", "dtype": "|u1", "shape": [1], "offset": 0, "nbytes": 1}] * 2,
            payload=bytes(1),
        ),
        "repeats a name",
    ),
    (
        frame_with_descriptors(blobs=[{"name": "b", "offset": 0, "nbytes": 5, "mime": "x"}], payload=b"1234"),
        "blob 'b' spans",
    ),
    (
        frame_with_descriptors(blobs=[{"name": "b", "offset": 0, "nbytes": 1, "mime": 3}], payload=b"1234"),
        "mime",
    ),
    (
        frame_with_descriptors(blobs=[{"name": "b", "offset": True, "nbytes": 1, "mime": "x"}], payload=b"1"),
        "offset",
    ),
]


@pytest.mark.parametrize(("frame", "match"), BAD_FRAMES, ids=[m for _, m in BAD_FRAMES])
def test_bad_frames_raise_protocol_error_naming_the_problem(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.read_frame(io.BytesIO(frame))


def test_reader_limits_can_be_tightened() -> None:
    frame = protocol.texture("j", 1, bytes(2000), 4, 4)
    with pytest.raises(ProtocolError, match="payload of 2000 bytes exceeds the 1000-byte limit"):
        protocol.read_frame(io.BytesIO(frame), max_payload_bytes=1000)


def test_decode_frame_refuses_trailing_bytes() -> None:
    with pytest.raises(ProtocolError, match="3 bytes follow"):
        decode_frame(protocol.ping(1) + b"abc")


def test_a_lying_payload_length_does_not_allocate_it() -> None:
    """A frame claiming 1 GiB but ending early fails without reserving a gigabyte first."""
    frame = (
        protocol.PREFIX.pack(protocol.MAGIC, 13, protocol.MAX_PAYLOAD_BYTES)
        + b'{"type":"x"}'
        + b" "
        + bytes(10)
    )
    import tracemalloc

    tracemalloc.start()
    with pytest.raises(ProtocolError, match="end of stream inside the payload"):
        protocol.read_frame(io.BytesIO(frame))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20


# ------------------------------------------------------------------------------------------- fuzz

FUZZ_LIMITS = {"max_header_bytes": 1 << 16, "max_payload_bytes": 1 << 16}
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = [
    protocol.ping(1),
    protocol.preview_mesh("j", 2, POSITIONS[:5], FACES[:3] % 5, COLORS[:5]),
    protocol.texture("j", 1, PNG[:40], 2, 2),
    protocol.generate("j", {"prompt": "x", "cameras": [{"c2w": np.eye(4).tolist(), "fovy_deg": 40}]}),
]


def decode_all(data: bytes) -> list:
    """Read frames until the end; only ProtocolError may escape, and it must terminate."""
    reader = protocol.FrameReader(TrickleStream(data, chunk=5), **FUZZ_LIMITS)
    messages = []
    try:
        for message in reader:
            assert isinstance(message.header, dict) and isinstance(message.type, str)
            messages.append(message)
    except ProtocolError:
        pass
    return messages


@FUZZ_SETTINGS
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_all(data)
    decode_all(protocol.MAGIC + data)


@FUZZ_SETTINGS
@given(st.sampled_from(VALID), st.data())
def test_fuzz_truncated_frames(frame: bytes, data) -> None:
    cut = data.draw(st.integers(0, len(frame) - 1))
    if cut == 0:
        assert protocol.read_frame(io.BytesIO(b"")) is None
        return
    with pytest.raises(ProtocolError):
        protocol.read_frame(io.BytesIO(frame[:cut]), **FUZZ_LIMITS)


@FUZZ_SETTINGS
@given(st.sampled_from(VALID), st.data())
def test_fuzz_corrupted_bytes_and_lengths(frame: bytes, data) -> None:
    corrupted = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(corrupted) - 1))
        corrupted[position] = data.draw(st.integers(0, 255))
    decode_all(bytes(corrupted))


@FUZZ_SETTINGS
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=20,
    ),
    st.binary(max_size=64),
)
def test_fuzz_arbitrary_json_headers(header, payload: bytes) -> None:
    decode_all(frame_with_header(json.dumps(header).encode(), payload))
    if isinstance(header, dict):
        decode_all(
            frame_with_header(
                json.dumps({**header, "type": "x", "arrays": header.get("arrays", [header])}).encode(),
                payload,
            )
        )


ANY_VALUE = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
DESCRIPTOR = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["a", "b", ""]) | ANY_VALUE,
        "dtype": st.sampled_from([*sorted(protocol.DTYPES), "<c8", "|O", ">f4", "<U2"]) | ANY_VALUE,
        "shape": st.lists(st.integers(-2, 2**40) | ANY_VALUE, max_size=40) | ANY_VALUE,
        "offset": st.integers(-8, 80) | ANY_VALUE,
        "nbytes": st.integers(-8, 80) | ANY_VALUE,
        "mime": ANY_VALUE,
    },
)


@FUZZ_SETTINGS
@given(st.lists(DESCRIPTOR, max_size=3), st.lists(DESCRIPTOR, max_size=3), st.binary(max_size=64))
def test_fuzz_payload_descriptors(arrays: list, blobs: list, payload: bytes) -> None:
    header = {"type": "x", "arrays": arrays, "blobs": blobs}
    messages = decode_all(frame_with_header(json.dumps(header).encode(), payload))
    for message in messages:  # whatever decoded is consistent with its descriptor
        for descriptor in arrays:
            array = message.arrays[descriptor["name"]]
            assert list(array.shape) == descriptor["shape"] and array.nbytes == descriptor["nbytes"]
