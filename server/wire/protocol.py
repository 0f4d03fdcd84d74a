"""Protocol v1 between Blender and the generation server: length-prefixed frames on any byte stream.

A frame is `MAGIC` | uint32 big-endian header length | uint64 big-endian payload length | header |
payload. The header is a UTF-8 JSON object that always has "type"; numpy arrays and opaque blobs
(PNG, GLB) travel as raw bytes in the payload, described by `header["arrays"]` and
`header["blobs"]`. Raw bytes because a 50k-vertex mesh costs milliseconds this way and about a
second as JSON lists.

This module is the contract: the Blender extension imports it (through `server.wire.client`), so it
imports only the standard library and numpy. Every message type has a constructor below that
returns the encoded frame; `FrameReader.read` / `read_frame` turn a stream back into `Message`s.

Versioning. The hello's `protocol` must match exactly, so `PROTOCOL_VERSION` changes only when a
message changes meaning or a field every peer relies on changes. New message types and new optional
header fields extend version 1 instead: a receiver ignores header fields it does not know, and a
server answers a type it does not know with `unknown_type` (the client turns that into "update the
server", so an older server keeps working for everything else). Extensions of v1 so far: `finish`
(stop after the current step and deliver), `done`'s `stopped_at_step`, `texture_mesh` (texture the
client's own mesh, kept exactly), `progress`'s `queue_position` (jobs ahead on a shared server),
`batch` / `batch_done` (many variants of one job, run on the server's Ray) with the error code
`missing_extra`, and the pre-hello size limits `HELLO_MAX_HEADER_BYTES` / `HELLO_MAX_PAYLOAD_BYTES`.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

PROTOCOL_VERSION = 1
MAGIC = b"BCFD"
PREFIX = struct.Struct(">4sIQ")  # magic, header length, payload length
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30
# Before a TCP server has accepted the hello, a frame may hold a small header and no payload: nothing
# is buffered for a client that has not shown the token. A larger frame is refused at its prefix.
HELLO_MAX_HEADER_BYTES = 64 << 10
HELLO_MAX_PAYLOAD_BYTES = 0
ALIGNMENT = 8  # arrays start on 8-byte payload offsets so decoded views are aligned

# Canonical little-endian numpy dtype strings allowed on the wire.
DTYPES = frozenset({"|b1", "|i1", "|u1", "<i2", "<u2", "<f2", "<i4", "<u4", "<f4", "<i8", "<u8", "<f8"})
MAX_NDIM = 32

# Message types, client -> server.
HELLO = "hello"
PING = "ping"
GENERATE = "generate"
CANCEL = "cancel"
FINISH = "finish"  # stop optimising now and deliver the asset as a normal end does
SHUTDOWN = "shutdown"
TEXTURE_MESH = "texture_mesh"  # texture the client's own mesh, keeping it exactly (a texture job)
BATCH = "batch"  # many variants (seeds x prompts) of one job, run on Ray
CLIENT_MESSAGES = frozenset({HELLO, PING, GENERATE, TEXTURE_MESH, CANCEL, FINISH, SHUTDOWN, BATCH})

# Message types, server -> client (plus HELLO).
PONG = "pong"
ACCEPTED = "accepted"
PROGRESS = "progress"
PREVIEW_MESH = "preview_mesh"
TEXTURE = "texture"
DONE = "done"
CANCELLED = "cancelled"
ERROR = "error"
BATCH_DONE = "batch_done"  # a batch ended: what finished, failed, was retried or cancelled
SERVER_MESSAGES = frozenset(
    {HELLO, PONG, ACCEPTED, PROGRESS, PREVIEW_MESH, TEXTURE, DONE, CANCELLED, ERROR, BATCH_DONE}
)

# Error codes carried by `error` frames.
BAD_SETTINGS = "bad_settings"
MISSING_WEIGHTS = "missing_weights"
OUT_OF_MEMORY = "out_of_memory"
NAN = "nan"
MALFORMED_FRAME = "malformed_frame"
BUSY = "busy"
PROTOCOL_VERSION_MISMATCH = "protocol_version"
INTERNAL = "internal"
UNKNOWN_TYPE = "unknown_type"
UNAUTHORIZED = "unauthorized"  # TCP only: the hello lacked the right token
MISSING_EXTRA = "missing_extra"  # an optional part (Ray, for a batch) is not installed or not reachable
ERROR_CODES = frozenset(
    {
        BAD_SETTINGS,
        MISSING_WEIGHTS,
        OUT_OF_MEMORY,
        NAN,
        MALFORMED_FRAME,
        BUSY,
        PROTOCOL_VERSION_MISMATCH,
        INTERNAL,
        UNKNOWN_TYPE,
        UNAUTHORIZED,
        MISSING_EXTRA,
    }
)

_FIRST_READ_BYTES = 16 << 20  # larger payloads grow as bytes arrive, so a lying length costs nothing


class ProtocolError(ValueError):
    """A frame that cannot be encoded or decoded; the message names what was wrong."""


@dataclass
class Message:
    """One decoded frame. `header` is the JSON header without the "arrays"/"blobs" descriptors."""

    type: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    blobs: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name -> (data, mime)
    # time.perf_counter() when a client's reader decoded it (never on the wire): latency figures.
    received_at: float | None = field(default=None, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


# ---------------------------------------------------------------------------------------- encoding


def _wire_array(name: str, value: np.ndarray) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise ProtocolError(f"array {name!r} must be a numpy array, got {type(value).__name__}")
    wire = value.astype(value.dtype.newbyteorder("<"), order="C", copy=False)
    if wire.dtype.str not in DTYPES:
        raise ProtocolError(f"array {name!r} has dtype {value.dtype}; allowed: {', '.join(sorted(DTYPES))}")
    if wire.ndim > MAX_NDIM:
        raise ProtocolError(f"array {name!r} has {wire.ndim} dimensions; at most {MAX_NDIM} allowed")
    return wire


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{kind} names must be non-empty strings, got {name!r}")


def encode_frame(
    header: dict[str, Any],
    arrays: dict[str, np.ndarray] | None = None,
    blobs: dict[str, tuple[bytes, str]] | None = None,
) -> bytes:
    """Encode one frame. `blobs` maps a name to (bytes, mime type)."""
    if not isinstance(header, dict):
        raise ProtocolError(f"the header must be a dict, got {type(header).__name__}")
    if not isinstance(header.get("type"), str) or not header["type"]:
        raise ProtocolError('the header needs a non-empty string "type"')
    reserved = {"arrays", "blobs"} & header.keys()
    if reserved:
        raise ProtocolError(f"header keys {sorted(reserved)} are reserved for payload descriptors")
    full = dict(header)
    parts: list[bytes | memoryview] = []
    offset = 0

    def place(data: memoryview) -> int:
        nonlocal offset
        padding = -offset % ALIGNMENT
        if padding:
            parts.append(bytes(padding))
            offset += padding
        start = offset
        parts.append(data)
        offset += data.nbytes
        return start

    if arrays:
        descriptors = []
        for name, value in arrays.items():
            _check_name("array", name)
            wire = _wire_array(name, value)
            start = place(memoryview(wire.reshape(-1).view(np.uint8)))
            descriptors.append(
                {
                    "name": name,
                    "dtype": wire.dtype.str,
                    "shape": list(wire.shape),
                    "offset": start,
                    "nbytes": wire.nbytes,
                }
            )
        full["arrays"] = descriptors
    if blobs:
        descriptors = []
        for name, (data, mime) in blobs.items():
            _check_name("blob", name)
            if not isinstance(mime, str):
                raise ProtocolError(f"blob {name!r}: the mime type must be a string, got {mime!r}")
            view = memoryview(data).cast("B")
            start = place(view)
            descriptors.append({"name": name, "offset": start, "nbytes": view.nbytes, "mime": mime})
        full["blobs"] = descriptors
    try:
        header_bytes = json.dumps(full, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"header of {header['type']!r} is not JSON-serialisable: {error}") from error
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header_bytes)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if offset > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload of {offset} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")
    return b"".join([PREFIX.pack(MAGIC, len(header_bytes), offset), header_bytes, *parts])


def write_all(stream: BinaryIO, data: bytes) -> None:
    """Write every byte of `data` (raw streams may accept fewer per call), then flush."""
    view = memoryview(data)
    while view.nbytes:
        written = stream.write(view)
        if written is None:
            raise BlockingIOError("the stream is non-blocking; frames need a blocking stream")
        view = view[written:]
    stream.flush()


# ---------------------------------------------------------------------------------------- decoding


def _reject_constant(name: str) -> float:
    raise ProtocolError(f"the header contains {name}, which is not valid JSON")


def _non_negative_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _byte_range(descriptor: dict, what: str, payload_length: int) -> tuple[int, int]:
    offset = _non_negative_int(descriptor.get("offset"), f"{what} offset")
    nbytes = _non_negative_int(descriptor.get("nbytes"), f"{what} nbytes")
    if offset + nbytes > payload_length:
        raise ProtocolError(
            f"{what} spans bytes {offset}..{offset + nbytes} beyond the {payload_length}-byte payload"
        )
    return offset, nbytes


def _descriptor_list(header: dict, key: str) -> list[dict]:
    descriptors = header.get(key, [])
    if not isinstance(descriptors, list) or not all(isinstance(d, dict) for d in descriptors):
        raise ProtocolError(f'header "{key}" must be a list of objects')
    names = [d.get("name") for d in descriptors]
    for name in names:
        if not isinstance(name, str) or not name:
            raise ProtocolError(f'each entry of header "{key}" needs a non-empty string "name", got {name!r}')
    if len(set(names)) != len(names):
        raise ProtocolError(f'header "{key}" repeats a name: {names}')
    return descriptors


def _decode_array(descriptor: dict, payload: bytearray) -> np.ndarray:
    what = f"array {descriptor['name']!r}"
    dtype = descriptor.get("dtype")
    if dtype not in DTYPES:
        raise ProtocolError(f"{what} has dtype {dtype!r}; allowed: {', '.join(sorted(DTYPES))}")
    shape = descriptor.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"{what} shape must be a list of at most {MAX_NDIM} sizes, got {shape!r}")
    for size in shape:
        _non_negative_int(size, f"{what} shape entry")
    offset, nbytes = _byte_range(descriptor, what, len(payload))
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    if count * dtype.itemsize != nbytes:
        raise ProtocolError(
            f"{what}: shape {shape} of {dtype.str} takes {count * dtype.itemsize} bytes, not nbytes={nbytes}"
        )
    if count == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(tuple(shape))


def decode_parts(header_bytes: bytes | bytearray, payload: bytearray) -> Message:
    """Build a `Message` from a frame's header bytes and payload, validating every descriptor."""
    try:
        header = json.loads(header_bytes.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as error:
        raise ProtocolError(f"the header is not valid UTF-8: {error}") from error
    except RecursionError as error:
        raise ProtocolError("the header JSON is nested too deeply") from error
    except json.JSONDecodeError as error:
        raise ProtocolError(f"the header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise ProtocolError(f"the header must be a JSON object, got {type(header).__name__}")
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError(f'the header has no string "type" (keys: {sorted(header)[:20]})')
    arrays = {d["name"]: _decode_array(d, payload) for d in _descriptor_list(header, "arrays")}
    blobs = {}
    for descriptor in _descriptor_list(header, "blobs"):
        what = f"blob {descriptor['name']!r}"
        offset, nbytes = _byte_range(descriptor, what, len(payload))
        mime = descriptor.get("mime")
        if not isinstance(mime, str):
            raise ProtocolError(f"{what} needs a string mime type, got {mime!r}")
        blobs[descriptor["name"]] = (bytes(payload[offset : offset + nbytes]), mime)
    header.pop("arrays", None)
    header.pop("blobs", None)
    return Message(kind, header, arrays, blobs)


class FrameReader:
    """Reads frames from a blocking binary stream (pipe, socket file, file).

    Pipes and sockets return short reads, so every read loops with `readinto` until the wanted
    length arrives. End of stream between frames is a clean close (`read` returns None); end of
    stream inside a frame is a `ProtocolError`. Smaller limits than the protocol's may be given.
    """

    def __init__(
        self,
        stream: BinaryIO,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ):
        self.stream = stream
        self.max_header_bytes = max_header_bytes
        self.max_payload_bytes = max_payload_bytes

    def _read_exact(self, length: int, what: str) -> tuple[bytearray, int]:
        """Up to `length` bytes; returns (buffer, bytes got), fewer only at end of stream."""
        buffer = bytearray(min(length, _FIRST_READ_BYTES))
        got = 0
        while got < length:
            if got == len(buffer):  # grow geometrically: memory follows the bytes that really came
                buffer.extend(bytes(min(length - got, len(buffer))))
            with memoryview(buffer) as view, view[got:] as rest:
                count = self.stream.readinto(rest)
            if count is None:
                raise BlockingIOError(f"no data while reading the {what}; frames need a blocking stream")
            if count == 0:
                break
            got += count
        return buffer, got

    def read(self) -> Message | None:
        """The next message, or None at a clean end of stream."""
        prefix, got = self._read_exact(PREFIX.size, "frame prefix")
        if got == 0:
            return None
        if got < PREFIX.size:
            raise ProtocolError(f"end of stream inside the frame prefix ({got} of {PREFIX.size} bytes)")
        magic, header_length, payload_length = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a blender-cfd frame")
        if header_length > self.max_header_bytes:
            raise ProtocolError(
                f"header of {header_length} bytes exceeds the {self.max_header_bytes}-byte limit"
            )
        if payload_length > self.max_payload_bytes:
            raise ProtocolError(
                f"payload of {payload_length} bytes exceeds the {self.max_payload_bytes}-byte limit"
            )
        header, got = self._read_exact(header_length, "header")
        if got < header_length:
            raise ProtocolError(f"end of stream inside the header ({got} of {header_length} bytes)")
        payload, got = self._read_exact(payload_length, "payload")
        if got < payload_length:
            raise ProtocolError(f"end of stream inside the payload ({got} of {payload_length} bytes)")
        return decode_parts(header, payload)

    def __iter__(self) -> Iterator[Message]:
        while (message := self.read()) is not None:
            yield message


def read_frame(stream: BinaryIO, **limits: int) -> Message | None:
    """The next message on `stream`, or None at a clean end of stream (see `FrameReader`)."""
    return FrameReader(stream, **limits).read()


def decode_frame(data: bytes | bytearray | memoryview) -> Message:
    """Decode exactly one complete frame held in memory."""
    stream = io.BytesIO(data)
    message = read_frame(stream)
    if message is None:
        raise ProtocolError("no frame: the data is empty")
    trailing = len(stream.getbuffer()) - stream.tell()
    if trailing:
        raise ProtocolError(f"{trailing} bytes follow the frame")
    return message


# -------------------------------------------------------------------------------- message builders


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: a diverged loss is sent as null (the `nan` error says why)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mesh_arrays(
    positions: np.ndarray, faces: np.ndarray, colors: np.ndarray | None, names: tuple[str, str, str]
) -> dict[str, np.ndarray]:
    positions = np.asarray(positions, dtype="<f4")
    faces = np.asarray(faces, dtype="<i4")
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ProtocolError(f"{names[0]} must be [N, 3], got shape {positions.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ProtocolError(f"{names[1]} must be [F, 3], got shape {faces.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(positions)):
        raise ProtocolError(f"{names[1]} index vertices outside 0..{len(positions) - 1}")
    arrays = {names[0]: positions, names[1]: faces}
    if colors is not None:
        colors = np.asarray(colors, dtype="|u1")
        if colors.shape != positions.shape:
            raise ProtocolError(f"{names[2]} must be [N, 3] uint8 like the positions, got {colors.shape}")
        arrays[names[2]] = colors
    return arrays


def client_hello(client: str, token: str | None = None) -> bytes:
    """First frame a client sends; `token` is required on TCP."""
    header = {"type": HELLO, "protocol": PROTOCOL_VERSION, "client": client}
    if token is not None:
        header["token"] = token
    return encode_frame(header)


def server_hello(
    server_version: str,
    python: str,
    torch: str | None,
    cuda: str | None,
    device: str,
    device_name: str,
    **extra: Any,
) -> bytes:
    """The server's answer to `hello`: versions and the device jobs will run on."""
    return encode_frame(
        {
            "type": HELLO,
            "protocol": PROTOCOL_VERSION,
            "server_version": server_version,
            "python": python,
            "torch": torch,
            "cuda": cuda,
            "device": device,
            "device_name": device_name,
            **extra,
        }
    )


def ping(id: int | str) -> bytes:
    return encode_frame({"type": PING, "id": id})


def pong(id: int | str) -> bytes:
    return encode_frame({"type": PONG, "id": id})


def generate(
    job_id: str,
    job: dict[str, Any],
    init_vertices: np.ndarray | None = None,
    init_faces: np.ndarray | None = None,
) -> bytes:
    """Start a job; `job` is a JobSpec dict. A starting mesh (init_shape "mesh") rides along."""
    arrays = None
    if (init_vertices is None) != (init_faces is None):
        raise ProtocolError("init_vertices and init_faces go together")
    if init_vertices is not None:
        arrays = _mesh_arrays(init_vertices, init_faces, None, ("init_vertices", "init_faces", ""))
    return encode_frame({"type": GENERATE, "job_id": job_id, "job": job}, arrays)


def texture_mesh(
    job_id: str,
    job: dict[str, Any],
    vertices: np.ndarray,
    faces: np.ndarray,
    uvs: np.ndarray | None = None,
) -> bytes:
    """Start a texture job on this mesh, which the asset keeps exactly: `job` is a JobSpec dict (its
    "kind" becomes "texture"), vertices <f4 [N,3] in the object's local space (Z up), faces <i4
    [F,3] or [F,4] (quads), optional per-corner UVs <f4 [F,3|4,2] (v up) to bake into. A server
    older than this message answers `unknown_type`. Shapes are checked by the server
    (`server.job.fixed_mesh.FixedMesh.from_arrays`), so a bad mesh comes back as `bad_settings`."""
    arrays = {
        "mesh_vertices": np.asarray(vertices, dtype="<f4"),
        "mesh_faces": np.asarray(faces, dtype="<i4"),
    }
    if uvs is not None:
        arrays["mesh_uvs"] = np.asarray(uvs, dtype="<f4")
    return encode_frame({"type": TEXTURE_MESH, "job_id": job_id, "job": job}, arrays)


def cancel(job_id: str) -> bytes:
    return encode_frame({"type": CANCEL, "job_id": job_id})


def finish(job_id: str) -> bytes:
    """Finish the job now: stop the optimisation after the current step, then bake and deliver the
    whole asset (its `done` carries `stopped_at_step`). A server older than this message answers
    with an `unknown_type` error naming "finish"; the job then runs on to its end."""
    return encode_frame({"type": FINISH, "job_id": job_id})


def batch(batch_id: str, job: dict[str, Any], seeds: list[int], prompts: list[str] | None = None) -> bytes:
    """Run every (prompt, seed) variant of `job` on the server's Ray instance or cluster: `prompts`
    (default: the job's own prompt) times `seeds`. The batch is one entry of the server's queue; its
    id travels as "job_id", so `cancel` and `finish` name it as they name a job (finish: no new
    variant starts, the running ones are delivered). The server answers `accepted`, then per finished
    variant a `done` (its own job id, with `batch_id`, `prompt`, `seed` and the GLB bytes) and a
    `progress` (step: variants ended, total: variants), and last `batch_done` (or `cancelled`). A
    server without Ray answers `error` "missing_extra"; one older than batches, `unknown_type`."""
    header: dict[str, Any] = {"type": BATCH, "job_id": batch_id, "job": job, "seeds": list(seeds)}
    if prompts is not None:
        header["prompts"] = list(prompts)
    return encode_frame(header)


def shutdown() -> bytes:
    return encode_frame({"type": SHUTDOWN})


def accepted(job_id: str, out_dir: str | None = None) -> bytes:
    header = {"type": ACCEPTED, "job_id": job_id}
    if out_dir is not None:
        header["out_dir"] = out_dir
    return encode_frame(header)


def progress(
    job_id: str,
    step: int,
    total: int,
    stage: str,
    t: float | None = None,
    loss: float | None = None,
    eta_s: float | None = None,
    elapsed_s: float | None = None,
    queue_position: int | None = None,
) -> bytes:
    """Per-step status; `t` is the diffusion timestep, `stage` a short name the UI shows.

    `queue_position`, only on a job that waits behind others on a shared server (stage "queued"),
    counts the jobs that run before it, the running one included.
    """
    header = {
        "type": PROGRESS,
        "job_id": job_id,
        "step": int(step),
        "total": int(total),
        "stage": stage,
        "t": _finite_or_none(t),
        "loss": _finite_or_none(loss),
        "eta_s": _finite_or_none(eta_s),
        "elapsed_s": _finite_or_none(elapsed_s),
    }
    if queue_position is not None:
        header["queue_position"] = int(queue_position)
    return encode_frame(header)


def preview_mesh(
    job_id: str, step: int, positions: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None
) -> bytes:
    """The current mesh in Blender's world frame (Z up): positions <f4 [N,3], faces <i4 [F,3],
    optional per-vertex colors |u1 [N,3]."""
    arrays = _mesh_arrays(positions, faces, colors, ("positions", "faces", "colors"))
    return encode_frame({"type": PREVIEW_MESH, "job_id": job_id, "step": int(step)}, arrays)


def texture(job_id: str, step: int, png: bytes, width: int, height: int, final: bool = False) -> bytes:
    """A baked texture as PNG bytes (blob "png")."""
    return encode_frame(
        {
            "type": TEXTURE,
            "job_id": job_id,
            "step": int(step),
            "width": int(width),
            "height": int(height),
            "final": bool(final),
        },
        blobs={"png": (png, "image/png")},
    )


def done(
    job_id: str,
    glb: str,
    preview_png: str | None,
    job_json: str,
    out_dir: str,
    seconds: float,
    steps_per_second: float,
    glb_bytes: bytes | None = None,
    **extra: Any,
) -> bytes:
    """The job finished; paths are absolute paths on the server's machine.

    `glb_bytes`, the asset itself as blob "glb", lets a client on another machine (TCP) keep it.
    `extra` carries the job's other fields, e.g. `stopped_at_step` (the step a `finish` stopped it at,
    null when it ran every step).
    """
    blobs = {"glb": (glb_bytes, "model/gltf-binary")} if glb_bytes is not None else None
    return encode_frame(
        {
            "type": DONE,
            "job_id": job_id,
            "glb": glb,
            "preview_png": preview_png,
            "job_json": job_json,
            "out_dir": out_dir,
            "seconds": _finite_or_none(seconds),
            "steps_per_second": _finite_or_none(steps_per_second),
            **extra,
        },
        blobs=blobs,
    )


def batch_done(
    batch_id: str, assets: int, failed: list[dict], retried: list[dict], cancelled: list[dict], seconds: float
) -> bytes:
    """A batch's last frame: how many variants were delivered (each came in its own `done`), and the
    ones that failed (prompt, seed, error), were sent again after their worker died (prompt, seed,
    error) or never ran because of `finish` (prompt, seed)."""
    return encode_frame(
        {
            "type": BATCH_DONE,
            "job_id": batch_id,
            "assets": int(assets),
            "failed": failed,
            "retried": retried,
            "cancelled": cancelled,
            "seconds": _finite_or_none(seconds),
        }
    )


def cancelled(job_id: str, step: int) -> bytes:
    return encode_frame({"type": CANCELLED, "job_id": job_id, "step": int(step)})


def error(job_id: str | None, code: str, message: str, fix: str = "") -> bytes:
    """A failure; `fix` tells the user what to change. `job_id` is null for connection-level errors."""
    if code not in ERROR_CODES:
        raise ProtocolError(f"unknown error code {code!r}; known: {', '.join(sorted(ERROR_CODES))}")
    return encode_frame({"type": ERROR, "job_id": job_id, "code": code, "message": message, "fix": fix})
