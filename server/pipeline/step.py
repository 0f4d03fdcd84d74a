"""One optimisation step of a job, and the timer hook `bench.step` uses to see where its time goes."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from server.distill.update import CFGForm, distillation_step
from server.geometry.dmtet import TriangleMesh
from server.geometry.regularizers import laplacian_smoothness, normal_consistency, sdf_sign_change
from server.job.errors import NonFiniteError
from server.noise.base import NoiseQuery
from server.pipeline.asset import TARGET_FACES
from server.pipeline.export import png_bytes, prepare_atlas
from server.pipeline.setup import OPTIMISATION, JobState
from server.render.mesh import render_mesh


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
    loss: float
    t: float
    shaping: bool
    texture_png: bytes | None  # a milestone texture, baked after this step


def optimisation_step(state: JobState, step: int, timer: StepTimer = UNTIMED) -> StepOutcome:
    """One step: render a batch of views, encode them, draw eps_tilde from the method's noise, apply
    the flow gradient (plus the geometry's regularisers) through the renderer, re-inject noise.

    The backward pass runs the nodes created last first: regularisers, encoder (to the pixels),
    renderer (to the mesh vertices), marching tets (to the SDF and the deformation).
    """
    opt, spec, device, geometry = OPTIMISATION, state.spec, state.device, state.geometry
    shaping = step < state.geometry_steps
    if step == state.geometry_steps:
        for p in (geometry.sdf, geometry.deformation):
            p.requires_grad_(False)
    stage = next(stage for stage in state.stages if step < stage.until)
    prior = stage.prior

    with timer("marching_tets"):
        mesh = geometry()
    with timer("render"):
        # A multi-view prior's views of one group share one timestep and one surface-attached noise
        # query, which is what its cross-view attention expects.
        c2w, fovy, elevation, azimuth = state.cameras.sample(spec.batch_size, stage.views_per_group)
        view = render_mesh(
            mesh.vertices,
            mesh.faces,
            c2w.to(device),
            fovy.to(device),
            spec.render_size,
            color_fn=state.texture,
            generator=state.generator,
        )
    with timer("encode"):
        latents = prior.encode_images(view.rgb)
    with timer("noise"):
        eps_tilde = state.noise.sample(
            NoiseQuery(
                (prior.latent_size, prior.latent_size),
                prior.latent_channels,
                view.c2w,
                view.fovy,
                view.points.detach(),
                view.opacity.detach(),
            )
        )
    t = state.timesteps(step, spec.steps, state.generator)
    with timer("network"):
        flow = distillation_step(
            prior,
            latents,
            eps_tilde.to(latents.dtype),
            t,
            stage.embeddings.for_views(elevation, azimuth),
            stage.embeddings.uncond,
            stage.schedule,
            stage.guidance_scale,
            CFGForm(spec.cfg_form),
            opt.weighting,
            c2w=view.c2w,
        )
    with timer("regularisers"):
        loss = flow.loss / len(c2w)
        if shaping:
            anneal = max(0.0, 1.0 - step / (0.5 * spec.steps))
            sign_weight = opt.sign_weight_end + (opt.sign_weight_start - opt.sign_weight_end) * anneal
            loss = loss + opt.normal_weight * normal_consistency(mesh)
            loss = loss + opt.laplacian_weight * laplacian_smoothness(mesh)
            loss = loss + sign_weight * sdf_sign_change(geometry.sdf, geometry.edges)
    if not torch.isfinite(loss):
        raise NonFiniteError(f"the loss became {loss.item()} at step {step}")
    state.optimizer.zero_grad(set_to_none=True)
    marks = [(latents, "regularisers"), (view.rgb, "encode_backward"), (mesh.vertices, "render_backward")]
    timer.backward(loss, marks, "marching_tets_backward")
    with timer("optimiser"):
        state.optimizer.step()
    with timer("noise"):
        state.noise.reinject(spec.gamma)
    if shaping and step % opt.island_cleanup_every == opt.island_cleanup_every - 1:
        with timer("island_cleanup"):
            geometry.remove_small_islands(optimizer=state.optimizer)
    texture_png = None
    if step + 1 in state.milestones:
        with timer("texture_bake"):
            texture_png = bake_milestone(state)
    return StepOutcome(mesh, loss.item(), t, shaping, texture_png)


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
