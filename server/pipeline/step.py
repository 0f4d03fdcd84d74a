"""One optimisation step of a job, and the timer hook `bench.step` uses to see where its time goes."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from server.distill.update import (
    CFGForm,
    DistillationStep,
    Weighting,
    distillation_step,
    finite_loss,
    flow_pull,
)
from server.geometry.dmtet import TriangleMesh
from server.geometry.regularizers import laplacian_smoothness, mesh_edges, normal_consistency, sdf_sign_change
from server.geometry.sdf_volume import VolumeRender
from server.job.errors import ShapeVanishedError
from server.noise.base import NoiseQuery
from server.pipeline.asset import TARGET_FACES
from server.pipeline.export import png_bytes, prepare_atlas
from server.pipeline.setup import JobState, PriorStage, StageRun, enter_mesh_stage
from server.render.mesh import MeshRender, render_mesh, sample_light_dirs
from server.render.shading import BACKGROUND


class StepTimer:
    """Where a step's time goes: books nothing here; `bench.step` times each stage through it."""

    def __call__(self, stage: str) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor, marks: list[tuple[torch.Tensor, str]], last: str) -> None:
        """`loss.backward()`; `marks` name the tensors where the backward pass changes stage."""
        loss.backward()


UNTIMED = StepTimer()


@dataclass
class StepOutcome:
    mesh: TriangleMesh
    loss: torch.Tensor  # 0-d, on the job's device: read (`finite_loss`) only where it is reported
    t: float
    shaping: bool
    texture_png: bytes | None  # a milestone texture, baked after this step


def optimisation_step(state: JobState, step: int, timer: StepTimer = UNTIMED) -> StepOutcome:
    """One step of the job: volume steps in a volume stage, then DMTet steps on its isosurface."""
    if step < state.volume_steps:
        return volume_step(state, step, timer)
    return mesh_step(state, step, timer)


def volume_step(state: JobState, step: int, timer: StepTimer = UNTIMED) -> StepOutcome:
    """The shape stage: render the SDF volume (one albedo, Lambert-shaded), and apply the same flow
    gradient with the noise attached to the volume's surface points.

    The DMTet's SDF follows the volume after every step, so the mesh a step reports is the surface it
    rendered (as a DMTet step's), and the texture field follows the albedo, so previews show the colour.
    """
    opt, spec, device, volume = state.opt, state.spec, state.device, state.volume
    run = state.run_at(step)
    stage = next(stage for stage in state.stages if step < stage.until)
    prior = stage.prior
    progress = step / max(state.volume_steps - 1, 1)
    beta = opt.volume_beta[0] * (opt.volume_beta[1] / opt.volume_beta[0]) ** progress
    with timer("marching_tets"), torch.no_grad():
        mesh = state.geometry()
    with timer("render"):
        # Several single views per step, or the job's groups for a multi-view prior (already 4 views).
        views = max(spec.batch_size, opt.volume_views) if stage.views_per_group == 1 else spec.batch_size
        c2w, fovy, elevation, azimuth = state.cameras.sample(views, stage.views_per_group)
        light = sample_light_dirs(c2w[:, :3, 3], state.generator)
        # The consistent noise needs whole latent pixels: the stage's size, else at least the latent
        # size and half the job's render size (the volume is the costlier render).
        half = max(spec.render_size // 2 // prior.latent_size, 1) * prior.latent_size
        size = run.render_size(step, half)
        view = volume.render(
            c2w.to(device),
            fovy.to(device),
            size,
            light.to(device),
            beta,
            opt.volume_samples,
            state.generator,
            eikonal_slack=opt.eikonal_slack,
        )
    t = run.t(step, spec.steps, state.generator)
    latents, flow = flow_gradient(state, stage, run, view, t, elevation, azimuth, timer)
    with timer("regularisers"):
        loss = flow.loss / len(c2w)
        loss = loss + opt.eikonal_weight * view.eikonal
        loss = loss + opt.volume_smoothness_weight * volume.smoothness()
        pull = flow_pull(stage.schedule, t, Weighting(run.settings.weighting))
        loss = loss + opt.opacity_weight * pull * view.opacity.mean()
    state.volume_optimizer.zero_grad(set_to_none=True)
    timer.backward(loss, [(latents, "regularisers"), (view.rgb, "encode_backward")], "render_backward")
    with timer("optimiser"):
        state.volume_optimizer.step()
    with timer("noise"):
        run.noise.reinject(run.gamma(step, spec.gamma))
    with torch.no_grad():
        state.geometry.sdf.copy_(volume.at(state.geometry.grid_vertices))
        state.texture.set_base_colour(volume.albedo_logit)
    if step == state.volume_steps - 1:
        finite_loss(loss, step)  # the hand-over reads the volume on the host: not from a diverged one
        with timer("hand_over"):
            hand_over(state)
    return StepOutcome(mesh, loss.detach(), t, True, None)


@torch.no_grad()
def hand_over(state: JobState) -> None:
    """The volume's isosurface becomes the DMTet's start, re-distanced from the extracted mesh (so the
    SDF is a true distance and inner pockets are gone), with fresh optimiser state."""
    geometry = state.geometry
    mesh = geometry()
    if len(mesh.faces) > 0:
        geometry.init_from_mesh(mesh.vertices, mesh.faces)
        geometry.remove_small_islands()
    for parameter in (geometry.sdf, geometry.deformation):
        state.optimizer.state.pop(parameter, None)


def mesh_step(state: JobState, step: int, timer: StepTimer = UNTIMED) -> StepOutcome:
    """One DMTet step: render a batch of views, encode them, draw eps_tilde from the method's noise, apply
    the flow gradient (plus the geometry's regularisers) through the renderer, re-inject noise.

    The backward pass runs the nodes created last first: regularisers, encoder (to the pixels),
    renderer (to the mesh vertices), marching tets (to the SDF and the deformation).
    """
    opt, spec, device, geometry = state.opt, state.spec, state.device, state.geometry
    run = state.run_at(step)
    settings = run.settings
    if step == run.start:
        enter_mesh_stage(state, run)
    shaping = step < state.geometry_steps
    if step == state.geometry_steps:
        for p in (geometry.sdf, geometry.deformation):
            p.requires_grad_(False)
    stage = next(stage for stage in state.stages if step < stage.until)

    with timer("marching_tets"):
        mesh = geometry()
    if len(mesh.faces) == 0:
        raise ShapeVanishedError(f"the shape vanished at step {step}: nothing is left to render")
    with timer("render"):
        # A multi-view prior's views of one group share one timestep and one surface-attached noise
        # query, which is what its cross-view attention expects.
        c2w, fovy, elevation, azimuth = state.cameras.sample(spec.batch_size, stage.views_per_group)
        # The stage's kind of render: lit colour, a normal map (geometry only, on black as the
        # reference's rasteriser draws it), or unlit albedo.
        normal_map = settings.render == "normal"
        view = render_mesh(
            mesh.vertices,
            mesh.faces,
            c2w.to(device),
            fovy.to(device),
            run.render_size(step, spec.render_size),
            color_fn=None if normal_map else state.texture,
            shading=settings.render,
            generator=state.generator,
            background=(0.0, 0.0, 0.0) if normal_map else BACKGROUND,
        )
    t = run.t(step, spec.steps, state.generator)
    latents, flow = flow_gradient(state, stage, run, view, t, elevation, azimuth, timer)
    with timer("regularisers"):
        loss = flow.loss / len(c2w)
        if shaping:
            anneal = max(0.0, 1.0 - step / (0.5 * spec.steps))
            sign_start, sign_end = settings.sign_weight
            sign_weight = sign_end + (sign_start - sign_end) * anneal
            # The unique edges once for both regularisers (their number is a wait for the device).
            if settings.normal_weight or settings.laplacian_weight:
                edges = mesh_edges(mesh.faces, len(mesh.vertices))
            if settings.normal_weight:
                loss = loss + settings.normal_weight * normal_consistency(mesh, edges)
            if settings.laplacian_weight:
                loss = loss + settings.laplacian_weight * laplacian_smoothness(mesh, edges)
            if sign_weight:
                loss = loss + sign_weight * sdf_sign_change(geometry.sdf, geometry.edges)
    state.optimizer.zero_grad(set_to_none=True)
    marks = [(latents, "regularisers"), (view.rgb, "encode_backward"), (mesh.vertices, "render_backward")]
    timer.backward(loss, marks, "marching_tets_backward")
    with timer("optimiser"):
        state.optimizer.step()
    with timer("noise"):
        run.noise.reinject(run.gamma(step, spec.gamma))
    cleanup = shaping and step % opt.island_cleanup_every == opt.island_cleanup_every - 1
    if cleanup or step + 1 in state.milestones:
        finite_loss(loss, step)  # the island cleanup and the bake read the mesh on the host
    if cleanup:
        with timer("island_cleanup"):
            geometry.remove_small_islands(optimizer=state.optimizer)
    texture_png = None
    if step + 1 in state.milestones:
        with timer("texture_bake"):
            texture_png = bake_milestone(state)
    return StepOutcome(mesh, loss.detach(), t, shaping, texture_png)


def flow_gradient(
    state: JobState,
    stage: PriorStage,
    run: StageRun,
    view: MeshRender | VolumeRender,
    t: int,
    elevation: torch.Tensor,
    azimuth: torch.Tensor,
    timer: StepTimer,
) -> tuple[torch.Tensor, DistillationStep]:
    """Encode the views, draw eps_tilde from the method's noise at the views' surface points, and
    compute the flow gradient on the latents with the stage's CFG form, weighting and view-dependent
    prompts: the part of a step every stage shares."""
    prior = stage.prior
    with timer("encode"):
        latents = prior.encode_images(view.rgb)
    with timer("noise"):
        eps_tilde = run.noise.sample(
            NoiseQuery(
                (prior.latent_size, prior.latent_size),
                prior.latent_channels,
                view.c2w,
                view.fovy,
                view.points.detach(),
                view.opacity.detach(),
            )
        )
    with timer("network"):
        flow = distillation_step(
            prior,
            latents,
            eps_tilde.to(latents.dtype),
            t,
            stage.embeddings.for_views(elevation, azimuth, front_back_deg=run.settings.front_back_deg),
            stage.embeddings.uncond,
            stage.schedule,
            stage.guidance_scale,
            CFGForm(run.settings.cfg_form or state.spec.cfg_form),
            Weighting(run.settings.weighting),
            c2w=view.c2w,
        )
    return latents, flow


def bake_milestone(state: JobState) -> bytes:
    """The colour field baked into the frozen geometry's UV atlas (unwrapped at the first milestone)."""
    if state.atlas is None:
        with torch.no_grad():
            final = state.geometry()
        state.atlas = prepare_atlas(
            final.vertices.cpu().numpy(), final.faces.cpu().numpy(), state.spec.texture_size, TARGET_FACES
        )
    baked, _ = state.atlas.bake(state.color_fn)
    return png_bytes(baked)
