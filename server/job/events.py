"""What a running job reports: the `Events` protocol, and `JobEvents`, which sends it as frames.

The serve loop hands a job `JobEvents`; the command line a progress bar (`server.pipeline.cli`);
benchmarks their own recorders. All implement `Events`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..wire import protocol


class Events:
    """What a running job reports; every method may be left out (a recorder keeps what it needs)."""

    def progress(
        self,
        step: int,
        total: int,
        stage: str,
        t: float | None = None,
        loss: float | None = None,
        eta_s: float | None = None,
        elapsed_s: float | None = None,
    ) -> None: ...

    def preview_due(self) -> bool:
        return False

    def preview_mesh(
        self, step: int, positions: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None
    ) -> None: ...

    def texture(self, step: int, png: bytes, width: int, height: int, final: bool = False) -> None: ...

    def finish_requested(self) -> bool:
        """Whether the person asked to finish now: the job stops optimising and delivers its asset."""
        return False


class JobEvents(Events):
    """How a running job talks to the client: the protocol's job messages with the job id filled in.

    `run_job(spec, init_mesh, emit, should_cancel)` receives one of these as `emit`. Calling it
    directly sends a ready frame (bytes) or a header dict (+ arrays, blobs) stamped with the job id.
    Previews cost time to build, so jobs ask `preview_due()` first; it enforces `preview_max_fps`.
    `finish_requested()` turns true when the client sent `finish` for this job.
    """

    def __init__(
        self,
        job_id: str,
        send: Callable[[bytes], object],
        preview_max_fps: float,
        clock: Callable[[], float] = time.monotonic,
        should_finish: Callable[[], bool] = lambda: False,
    ):
        self.job_id = job_id
        self._should_finish = should_finish
        self._send = send
        self._min_interval = 1.0 / preview_max_fps
        self._clock = clock
        self._last_preview = -math.inf

    def __call__(
        self,
        frame_or_header: bytes | dict[str, Any],
        arrays: dict[str, np.ndarray] | None = None,
        blobs: dict[str, tuple[bytes, str]] | None = None,
    ) -> None:
        if isinstance(frame_or_header, bytes | bytearray):
            self._send(bytes(frame_or_header))
        else:
            self._send(protocol.encode_frame({"job_id": self.job_id, **frame_or_header}, arrays, blobs))

    def progress(
        self,
        step: int,
        total: int,
        stage: str,
        t: float | None = None,
        loss: float | None = None,
        eta_s: float | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        self._send(protocol.progress(self.job_id, step, total, stage, t, loss, eta_s, elapsed_s))

    def preview_due(self) -> bool:
        return self._clock() - self._last_preview >= self._min_interval

    def preview_mesh(
        self, step: int, positions: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None
    ) -> None:
        self._last_preview = self._clock()
        self._send(protocol.preview_mesh(self.job_id, step, positions, faces, colors))

    def texture(self, step: int, png: bytes, width: int, height: int, final: bool = False) -> None:
        if not final:
            self._last_preview = self._clock()
        self._send(protocol.texture(self.job_id, step, png, width, height, final))

    def finish_requested(self) -> bool:
        return self._should_finish()
