"""A job's set-up: its priors (cached between jobs), geometry, colour field, optimiser, timesteps,
noise and cameras, all seeded by the job, gathered in the `JobState` each step carries on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from server.device import resolve_device, resolve_dtype
from server.distill.schedule import AnnealedTimesteps, DreamTimeTimesteps, NoiseSchedule, RandomTimesteps
from server.distill.update import Method
from server.geometry.dmtet import DMTet
from server.geometry.sdf_volume import SDFVolume
from server.geometry.tetgrid import kuhn_grid
from server.geometry.texture_field import (
    Encoding,
    TextureField,
    default_encoding,
    hash_grid_resolution,
    triplane_resolutions,
)
from server.job.errors import JobSpecError
from server.job.profiles import Profile, StageSettings
from server.job.spec import JobSpec
from server.noise.base import FreshNoise, NoiseProvider
from server.pipeline.export import UVAtlas
from server.priors import Prior, PromptEmbeddings, load_prior
from server.render.cameras import OrbitRig
from server.render.mvdream_cameras import MultiViewRig


@dataclass(frozen=True)
class Optimisation:
    """The loop's internal settings that no profile changes, tuned on CPU demos against the shapes prior;
    what differs per stage (learning rates, regulariser weights, stage ends) is in the job's profile
    (`server.job.profiles`).

    The flow loss is summed over latent pixels, so the regulariser weights are relative to a
    gradient of about one unit per latent pixel and view.
    """

    # Volume stage (`server.geometry.sdf_volume`): the first steps form the shape in a volume that can
    # change topology, rendered at half the job's render size with one albedo, from the job's orbit
    # (its low views are the only ones that see, and so trim, the underside), with opacity sparsity
    # so that what no view supports (a torus's hole seen from above) empties.
    # The 32^3 level keeps a cone's apex and a base's rim, which a 16^3 cell rounds (two tuning cones
    # handed over at IoU 0.62 / 0.63 without it, 0.76 / 0.76 with it: bench/README.md).
    volume_levels: tuple[int, ...] = (8, 16, 32)
    volume_samples: int = 48
    volume_views: int = 2  # per step, at least (the job's batch_size when larger): views must agree
    volume_beta: tuple[float, float] = (0.05, 0.02)  # the density's width, annealed geometrically
    eikonal_weight: float = 100.0
    # |grad sdf| is free within 1 +- this: a trilinear grid's gradient across a sharp edge is about 0.7,
    # and the exact term rounds cubes and cylinder rims off (`server.geometry.sdf_volume.eikonal_excess`).
    eikonal_slack: float = 0.35
    volume_smoothness_weight: float = 100.0
    opacity_weight: float = 100.0  # times the flow's pull at t (`server.distill.update.flow_pull`)
    island_cleanup_every: int = 25


_PRIORS: dict[tuple[str, str, str], Prior] = {}


def cached_priors(names: list[str], device: torch.device, dtype: torch.dtype) -> list[Prior]:
    """Loading a prior takes seconds (minutes for SD): keep this job's priors for the next job."""
    keys = [(name, str(device), str(dtype)) for name in names]
    for key in list(_PRIORS):
        if key not in keys:
            del _PRIORS[key]
    for key in keys:
        if key not in _PRIORS:
            _PRIORS[key] = load_prior(key[0], device, dtype)
    return [_PRIORS[key] for key in keys]


@dataclass
class PriorStage:
    """The prior in charge of a job's steps up to step `until`, with the prompt encoded for it: one per
    profile stage (Stable Diffusion's texture stage has its own negative prompt and guidance), or the
    two halves of a chained job that names no chain stage (MVDream forming the geometry, then Stable
    Diffusion adding detail)."""

    prior: Prior
    embeddings: PromptEmbeddings
    schedule: NoiseSchedule
    until: int
    guidance_scale: float  # the job's, else the stage's, else the prior's own

    @property
    def views_per_group(self) -> int:
        """Views a multi-view prior (MVDream) denoises together; 1 for a single-view prior."""
        return getattr(self.prior, "views_per_group", 1)


def prior_stage(spec: JobSpec, prior: Prior, until: int, settings: StageSettings | None = None) -> PriorStage:
    """`prior` with the job's prompt encoded, its schedule and its guidance, in charge until `until`.
    The job's negative prompt and guidance win over the stage's."""
    view_dependent = getattr(prior, "view_dependent", False)
    negative = spec.negative_prompt or (settings.negative_prompt if settings else "")
    embeddings = prior.encode_prompt(spec.prompt, negative, view_dependent=view_dependent)
    guidance = next(
        g
        for g in (spec.guidance_scale, settings and settings.guidance_scale, prior.guidance_scale)
        if g is not None
    )
    return PriorStage(prior, embeddings, NoiseSchedule.of(prior), until, guidance)


def prior_names(spec: JobSpec, profile: Profile) -> list[str]:
    """The job's prior, and the chain prior when the job or a stage of its profile asks for one."""
    chain = spec.chain_prior
    if chain is None and any(stage.prior == 1 for stage in profile.stages):
        chain = profile.chain_prior
    return [spec.prior] if chain is None else [spec.prior, chain]


def prior_stages(
    spec: JobSpec, profile: Profile, ends: list[int], device: torch.device, prior: Prior | None = None
) -> list[PriorStage]:
    """One `PriorStage` per profile stage (ending at `ends`), each checked against its render sizes;
    `prior` replaces the priors the job names (a benchmark's in-memory model)."""
    names = prior_names(spec, profile)
    priors = (
        cached_priors(names, device, resolve_dtype(spec.precision, device))
        if prior is None
        else [prior] * len(names)
    )
    for stage in profile.stages:
        for size in stage_render_sizes(stage, spec):
            check_render_size(size, priors[min(stage.prior, len(priors) - 1)])
    if len(priors) == 2 and all(stage.prior == 0 for stage in profile.stages):
        # A chain the profile has no stage for: the chain prior takes over at `chain_at`.
        until = [round(spec.chain_at * spec.steps), spec.steps]
        return [prior_stage(spec, p, u, profile.stages[0]) for p, u in zip(priors, until, strict=True)]
    pairs = zip(profile.stages, ends, strict=True)
    return [prior_stage(spec, priors[stage.prior], end, stage) for stage, end in pairs]


def check_render_size(size: int, prior: Prior) -> None:
    if size % prior.latent_size:
        raise JobSpecError(
            "render_size",
            f"{size} must be a multiple of the latent size {prior.latent_size} of prior {prior.name!r}",
        )


def stage_render_sizes(stage: StageSettings, spec: JobSpec) -> list[int]:
    """Every size a stage renders at: its own, else the job's (a mesh stage) or half of it (a volume)."""
    if stage.render_size is not None:
        return [size for _, size in stage.render_size]
    return [spec.render_size] if stage.representation == "dmtet" else []


@dataclass
class StageRun:
    """One profile stage as the loop runs it: its settings, its steps [start, end), its t and its noise."""

    settings: StageSettings
    start: int
    end: int
    timesteps: AnnealedTimesteps | RandomTimesteps | DreamTimeTimesteps
    noise: NoiseProvider

    def fraction(self, step: int) -> float:
        """How far into the stage `step` is, 0 at its first step and 1 at its last."""
        return (step - self.start) / max(self.end - self.start - 1, 1)

    def t(self, step: int, total_steps: int, generator: torch.Generator) -> int:
        """The stage's timestep: over the whole job for the job's own knots, else over the stage."""
        if self.settings.timesteps == "job":
            return self.timesteps(step, total_steps, generator)
        return self.timesteps(step - self.start, self.end - self.start, generator)

    def gamma(self, step: int, job_gamma: float) -> float:
        """The noise re-injection gamma at `step`: the stage's schedule, else the job's."""
        if self.settings.gamma is None:
            return job_gamma
        fractions, gammas = zip(*self.settings.gamma, strict=True)
        return float(np.interp(self.fraction(step), fractions, gammas))

    def render_size(self, step: int, job_size: int) -> int:
        """The stage's render size at `step` (its sizes hold from their fraction on), else `job_size`."""
        if self.settings.render_size is None:
            return job_size
        return [size for fraction, size in self.settings.render_size if fraction <= self.fraction(step)][-1]

    @property
    def method(self) -> Method:
        return Method(self.settings.method or "cfd")


def stage_runs(spec: JobSpec, profile: Profile, device: torch.device) -> list[StageRun]:
    """The profile's stages laid over the job's steps. A stage's noise is the previous stage's when
    their methods agree (the shapes profile's one field), else a fresh one as the reference re-creates
    it per stage."""
    ends = [int(stage.until * spec.steps) for stage in profile.stages[:-1]] + [spec.steps]
    job_knots = job_timesteps(spec)
    runs: list[StageRun] = []
    for index, (stage, start, end) in enumerate(zip(profile.stages, [0, *ends], ends, strict=False)):
        stage = replace(stage, method=stage.method or spec.method)
        method = Method(stage.method)
        if stage.timesteps == "job":
            timesteps = job_knots
        elif stage.timesteps == "dreamtime":
            timesteps = DreamTimeTimesteps()
        elif method == Method.SDS:
            timesteps = RandomTimesteps(20, 980)
        else:
            timesteps = AnnealedTimesteps(stage.timestep_knots)
        if runs and runs[-1].settings.method == stage.method:
            noise = runs[-1].noise
        else:
            noise = noise_provider(method, spec.seed + index, device)
        runs.append(StageRun(stage, start, end, timesteps, noise))
    return runs


def job_timesteps(spec: JobSpec) -> AnnealedTimesteps | RandomTimesteps:
    """t per step: uniformly random for SDS (as DreamFusion), annealed along the job's knots otherwise."""
    if Method(spec.method) == Method.SDS:
        return RandomTimesteps(20, 980)
    return AnnealedTimesteps(tuple((float(f), float(t)) for f, t in spec.timestep_knots))


def noise_provider(method: Method, seed: int, device: torch.device) -> NoiseProvider:
    """eps_tilde's source: surface-attached for CFD, world-map for FSD, fresh for SDS."""
    if method == Method.CFD:
        from server.noise.consistent import ConsistentNoise

        return ConsistentNoise(seed, device)
    if method == Method.FSD:
        from server.noise.worldmap import WorldMapNoise

        return WorldMapNoise(seed, device)
    return FreshNoise(seed, device)


class CameraSource:
    """Cameras per step: sampled from the orbit rig, or drawn from the explicit cameras sent by Blender.

    A multi-view prior (MVDream) needs groups of 4 views 90 degrees apart, as it was trained on:
    those come from its own rig (`server.render.mvdream_cameras.MultiViewRig`) whatever the job's cameras.
    """

    def __init__(self, spec: JobSpec, rng: np.random.Generator):
        self.rng = rng
        self.rig = OrbitRig(**asdict(spec.orbit)) if spec.cameras is None else None
        self.cameras = spec.cameras
        self.multiview = MultiViewRig()

    def sample(
        self, n: int, views_per_group: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c2w [N,4,4], fovy [N] radians, elevation_deg [N], azimuth_deg [N]) as float32 CPU tensors;
        N = n views, or n groups of `views_per_group` consecutive views."""
        if views_per_group > 1:
            cams = self.multiview.sample(self.rng, n)
            c2w, fovy = np.stack([c.c2w for c in cams]), np.array([c.fovy for c in cams])
        elif self.rig is not None:
            cams = self.rig.sample(self.rng, n)
            c2w, fovy = np.stack([c.c2w for c in cams]), np.array([c.fovy for c in cams])
        else:
            picks = self.rng.integers(0, len(self.cameras), n)
            c2w = np.stack([self.cameras[i].matrix for i in picks])
            fovy = np.radians([self.cameras[i].fovy_deg for i in picks])
        position = c2w[:, :3, 3]
        elevation = np.degrees(np.arcsin(position[:, 2] / np.linalg.norm(position, axis=1)))
        azimuth = np.degrees(np.arctan2(position[:, 1], position[:, 0]))
        return (
            torch.from_numpy(c2w).float(),
            torch.from_numpy(fovy).float(),
            torch.from_numpy(elevation),
            torch.from_numpy(azimuth),
        )


@dataclass
class JobState:
    """Everything a job's optimisation carries from step to step."""

    spec: JobSpec
    profile: Profile  # the job's stages, its overrides applied
    opt: Optimisation
    runs: list[StageRun]  # the profile's stages over the job's steps
    stages: list[PriorStage]
    device: torch.device
    volume: SDFVolume  # the volume stage's geometry, handed to `geometry` at step `volume_steps`
    volume_optimizer: torch.optim.Optimizer
    volume_steps: int
    geometry: DMTet
    texture: TextureField
    optimizer: torch.optim.Optimizer  # groups: SDF, deformation, texture encoding, texture MLP
    cameras: CameraSource
    generator: torch.Generator
    geometry_steps: int  # then the geometry freezes and only the colour keeps moving
    milestones: set[int]  # steps after which a texture is baked and streamed
    atlas: UVAtlas | None = None  # the frozen geometry, unwrapped once, for milestones and the asset

    def run_at(self, step: int) -> StageRun:
        """The profile stage `step` belongs to."""
        return next(run for run in self.runs if step < run.end)

    def color_fn(self, points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.texture(torch.from_numpy(points).float().to(self.device)).cpu().numpy()


def texture_field(render_size: int, device: torch.device, encoding: Encoding | None = None) -> TextureField:
    """The colour field for renders of `render_size`: its finest level no finer than they are
    (`triplane_resolutions`, `hash_grid_resolution`), so every fine texel is trained by whole pixels.
    `encoding`: the device's default (hash grid on CUDA, triplanes elsewhere) unless named."""
    encoding = encoding or default_encoding(device)
    if encoding == "triplane":
        options = {"resolutions": triplane_resolutions(render_size)}
    else:
        options = {"finest_resolution": hash_grid_resolution(render_size)}
    return TextureField(encoding=encoding, encoding_options=options, device=device)


def start_job(
    spec: JobSpec,
    init_mesh: tuple[np.ndarray, np.ndarray] | None,
    prior: Prior | None = None,
    init_fill: float | None = 0.8,
) -> JobState:
    """A job's set-up: priors, geometry, colour field, optimiser, timesteps, noise and cameras, all
    seeded by the job. `prior` replaces the priors the spec names (a benchmark's in-memory model).
    `init_fill`: the share of the box an artist's start mesh is scaled to span; None keeps its size
    (the quality benchmark's start from the true primitive)."""
    opt = Optimisation()
    profile = spec.resolved_profile()
    device = resolve_device(spec.device)
    # Same seed, same asset: with two CPU threads, accumulating kernels of the backward passes summed
    # in a varying order, and 40 steps amplified those last-bit differences into a different SDF
    # (max difference 0.06). The deterministic CPU kernels cost about 5 %. On CUDA the switch would
    # also pin cuDNN/cuBLAS algorithms at a larger cost, so GPU runs stay as fast as they can be.
    # Set for every job: the flag is process-wide, and a server may run a CPU job then a CUDA one.
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    runs = stage_runs(spec, profile, device)
    stages = prior_stages(spec, profile, [run.end for run in runs], device, prior)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)

    geometry = DMTet(kuhn_grid(profile.grid_resolution or spec.grid_resolution, radius=1.0), device=device)
    if init_mesh is not None:
        geometry.init_from_mesh(*init_mesh, fill=init_fill)
    elif spec.init_shape == "ellipsoid":
        geometry.init_ellipsoid((0.45, 0.45, 0.6))
    else:
        geometry.init_sphere(0.5)
    volume = SDFVolume(geometry.sdf, geometry.grid.radius, opt.volume_levels)
    first = profile.stages[0]
    volume_optimizer = torch.optim.Adam(
        [
            {"params": list(volume.grids), "lr": first.sdf_lr},
            {"params": [volume.albedo_logit], "lr": first.encoding_lr},
        ],
        betas=(0.9, 0.99),
        eps=first.adam_eps,
    )
    meshes = [run for run in runs if run.settings.representation == "dmtet"]
    mesh_size = max(size for run in meshes for size in stage_render_sizes(run.settings, spec))
    texture = texture_field(mesh_size, device)
    mesh = meshes[0].settings
    optimizer = torch.optim.Adam(
        [
            {"params": [geometry.sdf], "lr": mesh.sdf_lr},
            {"params": [geometry.deformation], "lr": mesh.deformation_lr},
            {"params": list(texture.encoding.parameters()), "lr": mesh.encoding_lr},
            {"params": list(texture.mlp.parameters()), "lr": mesh.mlp_lr},
        ],
        betas=(0.9, 0.99),
        eps=mesh.adam_eps,
    )
    volume_steps = runs[0].end if first.representation == "volume" else 0
    frozen = [run for run in meshes if run.settings.freeze_geometry_at is not None]
    geometry_steps = int(frozen[0].settings.freeze_geometry_at * spec.steps) if frozen else spec.steps
    return JobState(
        spec=spec,
        profile=profile,
        opt=opt,
        runs=runs,
        stages=stages,
        device=device,
        volume=volume,
        volume_optimizer=volume_optimizer,
        volume_steps=volume_steps,
        geometry=geometry,
        texture=texture,
        optimizer=optimizer,
        cameras=CameraSource(spec, rng),
        generator=generator,
        geometry_steps=geometry_steps,
        milestones=texture_milestones(geometry_steps, spec.steps),
    )


def enter_mesh_stage(state: JobState, run: StageRun) -> None:
    """A DMTet stage's learning rates and Adam epsilon on the mesh optimiser's groups, and geometry
    that trains only where the stage gives it a learning rate."""
    settings = run.settings
    lrs = (settings.sdf_lr, settings.deformation_lr, settings.encoding_lr, settings.mlp_lr)
    for group, lr in zip(state.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
        group["eps"] = settings.adam_eps
    geometry = state.geometry
    for parameter, lr in ((geometry.sdf, settings.sdf_lr), (geometry.deformation, settings.deformation_lr)):
        parameter.requires_grad_(lr > 0.0 and run.start < state.geometry_steps)


def texture_milestones(geometry_steps: int, steps: int, count: int = 3) -> set[int]:
    """Steps after which a baked texture is streamed: when the geometry freezes, then evenly through
    the colour-only phase (the final texture comes with the asset)."""
    if not 0 < geometry_steps < steps:
        return set()
    return {geometry_steps + (steps - geometry_steps) * k // count for k in range(count)} - {steps}
