"""Run one text-to-3D job: optimise a DMTet mesh and its colour field against a diffusion prior.

This is the loop Blender watches (through `server.serve`) and the command line runs headless
(`python -m server generate`). Each step renders a batch of views, encodes them into the prior's
space, asks the noise provider for eps_tilde (surface-attached for CFD, world-map for FSD, fresh for
SDS), and applies the flow gradient of `server.distill.update` through the renderer. A mesh exists
at every step and is streamed as a preview; at the end the mesh is cleaned, UV-unwrapped, baked and
written as GLB + OBJ with a preview PNG and job.json, atomically, into its own folder of the output
directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from server.distill.update import finite_loss
from server.job.errors import Cancelled, ShapeVanishedError
from server.job.events import Events
from server.job.spec import JobSpec
from server.pipeline.asset import JobResult, write_asset
from server.pipeline.setup import start_job
from server.pipeline.step import StepOutcome, optimisation_step


def report_step(
    events: Events, spec: JobSpec, step: int, outcome: StepOutcome, start: float, stage: str
) -> bool:
    """Stream a step's milestone texture and its progress in `stage`; True when a preview mesh is due.
    Raises `NonFiniteError` when the step's loss diverged."""
    loss = finite_loss(outcome.loss, step)
    if outcome.texture_png is not None:
        events.texture(step + 1, outcome.texture_png, spec.texture_size, spec.texture_size)
    elapsed = time.perf_counter() - start
    eta = elapsed / (step + 1) * (spec.steps - step - 1)
    events.progress(step + 1, spec.steps, stage, outcome.t, loss, eta, elapsed)
    return events.preview_due() or step == spec.steps - 1


class StepLoop:
    """A job's steps as every job loop runs them: Cancel raises `Cancelled` within one step, Finish now
    (`events.finish_requested()`) ends the loop after the current step, and `stopped_at` names it."""

    def __init__(self, spec: JobSpec, events: Events, should_cancel: Callable[[], bool]):
        self.spec, self.events, self.should_cancel = spec, events, should_cancel
        self.stopped_at: int | None = None

    def __iter__(self) -> Iterator[int]:
        for step in range(self.spec.steps):
            if self.should_cancel():
                raise Cancelled(step)
            if self.events.finish_requested():
                self.stopped_at = step
                return
            yield step

    def check_cancelled(self) -> None:
        """A Cancel that came with the last step: nothing is written."""
        if self.should_cancel():
            raise Cancelled(self.spec.steps if self.stopped_at is None else self.stopped_at)


def run_job(
    spec: JobSpec,
    init_mesh: tuple[np.ndarray, np.ndarray] | None,
    events: Events,
    should_cancel: Callable[[], bool],
    init_fill: float | None = 0.8,
) -> JobResult:
    """Optimise, then bake and export. Raises `Cancelled` within one step of `should_cancel()`; when
    `events.finish_requested()` turns true it stops optimising after the current step and delivers the
    whole asset all the same, its job.json naming the step it stopped at. `init_fill`: as `start_job`."""
    start = time.perf_counter()
    state = start_job(spec, init_mesh, init_fill=init_fill)
    loop = StepLoop(spec, events, should_cancel)
    for step in loop:
        outcome = optimisation_step(state, step)
        # The shapes profile says whether the geometry still moves; the others name their stage.
        if state.profile.name == "shapes":
            stage = "shape" if outcome.shaping else "texture"
        else:
            stage = state.run_at(step).settings.name
        if report_step(events, spec, step, outcome, start, stage):
            mesh = outcome.mesh
            with torch.no_grad():
                colors = (state.texture(mesh.vertices) * 255).round().to(torch.uint8)
            events.preview_mesh(
                step + 1,
                mesh.vertices.detach().cpu().numpy().astype(np.float32),
                mesh.faces.cpu().numpy().astype(np.int32),
                colors.cpu().numpy(),
            )
    loop.check_cancelled()
    with torch.no_grad():
        mesh = state.geometry()
    if len(mesh.faces) == 0:
        raise ShapeVanishedError(f"the shape vanished by step {loop.stopped_at}: there is nothing to finish")
    return write_asset(
        spec,
        mesh.vertices.cpu(),
        mesh.faces.cpu(),
        state.color_fn,
        state.texture,
        events,
        start,
        state.atlas,
        stopped_at_step=loop.stopped_at,
    )
