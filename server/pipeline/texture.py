"""A texture job: the artist's own mesh kept exactly, only a colour field optimised on it.

No DMTet and no clean-up: the mesh (`server.job.fixed_mesh.FixedMesh`) is scaled into the prior's view
volume for rendering only (centred, its largest half-extent `VIEW_HALF_EXTENT`, the size of the shapes
the priors see), the orbit's cameras look at it there, and CFD's noise is attached to that surface.
Each step renders the mesh with the colour field, takes the flow gradient of the chosen method
(`server.pipeline.step.flow_gradient`) and moves the colour field only. The texture is baked into the
mesh's own UVs (checked first: out-of-range or overlapping UVs are a `MeshInputError` unless the job
asks for a fresh unwrap) or a fresh xatlas unwrap of the mesh as it is, and the asset is written as a
generate job's is, with the input's positions and triangles untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from server.device import resolve_device
from server.distill.update import finite_loss
from server.geometry.dmtet import TriangleMesh
from server.geometry.texture_field import TextureField
from server.job.events import Events
from server.job.fixed_mesh import FixedMesh, MeshInputError
from server.job.profiles import Profile
from server.job.spec import JobSpec
from server.pipeline.asset import JobResult, write_asset
from server.pipeline.export import UVAtlas, atlas_from_uvs, fresh_atlas, png_bytes, uv_problem
from server.pipeline.run import StepLoop, report_step
from server.pipeline.setup import (
    CameraSource,
    PriorStage,
    StageRun,
    prior_stages,
    stage_render_sizes,
    stage_runs,
    texture_field,
)
from server.pipeline.step import UNTIMED, StepOutcome, StepTimer, flow_gradient
from server.priors import Prior
from server.render.mesh import render_mesh

VIEW_HALF_EXTENT = 0.5  # the mesh's largest half-extent where the cameras see it (the shapes' size)
MILESTONES = 3  # textures streamed during the run (the final one comes with the asset)


def mesh_atlas(mesh: FixedMesh, texture_size: int, uv_mode: str) -> UVAtlas:
    """Where the texture goes: the mesh's own UVs when it has them and the job keeps them, else a
    fresh unwrap. UVs that cannot take a texture raise `MeshInputError` naming the fix."""
    if mesh.uvs is None or uv_mode == "unwrap":
        return fresh_atlas(mesh.vertices, mesh.faces, texture_size)
    corners = mesh.uvs.reshape(-1, 2)
    problem = uv_problem(corners, np.arange(len(corners)).reshape(-1, 3), texture_size)
    if problem is not None:
        raise MeshInputError(
            "mesh_uvs",
            f"the mesh's UV map cannot take a baked texture: {problem}",
            'ask for a fresh unwrap (uv_mode "unwrap", `--unwrap`, or "Fresh UVs" in Blender), '
            "or fix the UV map (Blender: UV > Unwrap / Smart UV Project)",
        )
    return atlas_from_uvs(mesh.vertices, mesh.faces, mesh.uvs, texture_size)


def texture_profile(spec: JobSpec) -> Profile:
    """The job's profile cut to its last stage, the one that paints a settled mesh (the shapes
    profile's DMTet stage, Stable Diffusion's and MVDream's texture stages), over all the steps."""
    profile = spec.resolved_profile()
    return replace(profile, stages=(replace(profile.stages[-1], until=1.0),))


@dataclass
class TextureState:
    """What a texture job carries from step to step (the fields `flow_gradient` reads as a job's)."""

    spec: JobSpec
    stages: list[PriorStage]
    run: StageRun  # the profile's texture stage: its t, noise, gamma, render size and CFG settings
    device: torch.device
    vertices: torch.Tensor  # [N, 3] the mesh in the view volume
    faces: torch.Tensor  # [F, 3]
    centre: np.ndarray  # view volume = (original - centre) * scale
    scale: float
    texture: TextureField
    optimizer: torch.optim.Optimizer
    cameras: CameraSource
    generator: torch.Generator
    atlas: UVAtlas
    milestones: set[int]

    def color_fn(self, points: np.ndarray) -> np.ndarray:
        """The colour field at points of the original mesh's space (what the bake asks for)."""
        inside = (np.asarray(points, np.float64) - self.centre) * self.scale
        with torch.no_grad():
            return self.texture(torch.from_numpy(inside).float().to(self.device)).cpu().numpy()


def start_texture_job(spec: JobSpec, mesh: FixedMesh, prior: Prior | None = None) -> TextureState:
    """The atlas first (a bad UV map fails before any prior loads), then priors, colour field,
    optimiser, timesteps, noise and cameras, all seeded by the job."""
    atlas = mesh_atlas(mesh, spec.texture_size, spec.uv_mode)
    device = resolve_device(spec.device)
    torch.use_deterministic_algorithms(
        device.type == "cpu", warn_only=True
    )  # as `start_job`: same seed, same asset
    profile = texture_profile(spec)
    (run,) = stage_runs(spec, profile, device)
    stages = prior_stages(spec, profile, [spec.steps], device, prior)
    torch.manual_seed(spec.seed)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)
    low, high = mesh.vertices.min(axis=0).astype(np.float64), mesh.vertices.max(axis=0).astype(np.float64)
    centre = (low + high) / 2
    scale = VIEW_HALF_EXTENT / float((high - low).max() / 2)
    texture = texture_field(max(stage_render_sizes(run.settings, spec)), device)
    optimizer = torch.optim.Adam(
        [
            {"params": list(texture.encoding.parameters()), "lr": run.settings.encoding_lr},
            {"params": list(texture.mlp.parameters()), "lr": run.settings.mlp_lr},
        ],
        betas=(0.9, 0.99),
        eps=run.settings.adam_eps,
    )
    vertices = torch.from_numpy(((mesh.vertices - centre) * scale).astype(np.float32)).to(device)
    return TextureState(
        spec=spec,
        stages=stages,
        run=run,
        device=device,
        vertices=vertices,
        faces=torch.from_numpy(mesh.faces.astype(np.int64)).to(device),
        centre=centre,
        scale=scale,
        texture=texture,
        optimizer=optimizer,
        cameras=CameraSource(spec, np.random.default_rng(spec.seed)),
        generator=generator,
        atlas=atlas,
        milestones={spec.steps * k // (MILESTONES + 1) for k in range(1, MILESTONES + 1)} - {0, spec.steps},
    )


def texture_step(state: TextureState, step: int, timer: StepTimer = UNTIMED) -> StepOutcome:
    """Render the fixed mesh with the colour field, apply the flow gradient to the colour field only,
    re-inject noise; bake and return a texture after a milestone step."""
    spec, run = state.spec, state.run
    stage = next(stage for stage in state.stages if step < stage.until)
    with timer("render"):
        c2w, fovy, elevation, azimuth = state.cameras.sample(spec.batch_size, stage.views_per_group)
        view = render_mesh(
            state.vertices,
            state.faces,
            c2w.to(state.device),
            fovy.to(state.device),
            run.render_size(step, spec.render_size),
            color_fn=state.texture,
            shading=run.settings.render,
            generator=state.generator,
        )
    t = run.t(step, spec.steps, state.generator)
    latents, flow = flow_gradient(state, stage, run, view, t, elevation, azimuth, timer)
    loss = flow.loss / len(c2w)
    state.optimizer.zero_grad(set_to_none=True)
    timer.backward(loss, [(latents, "encode_backward")], "render_backward")
    with timer("optimiser"):
        state.optimizer.step()
    with timer("noise"):
        run.noise.reinject(run.gamma(step, spec.gamma))
    texture_png = None
    if step + 1 in state.milestones:
        finite_loss(loss, step)  # the bake reads the field on the host: not a diverged one
        with timer("texture_bake"):
            texture_png = png_bytes(state.atlas.bake(state.color_fn)[0])
    return StepOutcome(TriangleMesh(state.vertices, state.faces), loss.detach(), t, False, texture_png)


def run_texture_job(
    spec: JobSpec, mesh: FixedMesh, events: Events, should_cancel: Callable[[], bool]
) -> JobResult:
    """Optimise the colour field, then bake and export. Raises `Cancelled` within one step of
    `should_cancel()`; Finish now (`events.finish_requested()`) stops after the current step and
    delivers the asset as it is; previews carry the mesh (in its own space) with the colours at its
    vertices."""
    start = time.perf_counter()
    state = start_texture_job(spec, mesh)
    loop = StepLoop(spec, events, should_cancel)
    for step in loop:
        if report_step(events, spec, step, texture_step(state, step), start, "texture"):
            colours = (state.color_fn(mesh.vertices) * 255).round().astype(np.uint8)
            events.preview_mesh(step + 1, mesh.vertices, mesh.faces, colours)
    loop.check_cancelled()
    # The preview renders the mesh in the view volume with the field there; the bake reads the field
    # through `color_fn` at the atlas's own (original) vertices.
    return write_asset(
        spec,
        state.vertices.cpu(),
        state.faces.cpu(),
        state.color_fn,
        state.texture,
        events,
        start,
        state.atlas,
        stopped_at_step=loop.stopped_at,
    )
