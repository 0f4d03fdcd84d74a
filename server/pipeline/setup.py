"""A job's set-up: its priors (cached between jobs), geometry, colour field, optimiser, timesteps,
noise and cameras, all seeded by the job, gathered in the `JobState` each step carries on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from server.device import resolve_device, resolve_dtype
from server.distill.schedule import AnnealedTimesteps, NoiseSchedule, RandomTimesteps
from server.distill.update import Method, Weighting
from server.geometry.dmtet import DMTet
from server.geometry.sdf_volume import SDFVolume
from server.geometry.tetgrid import kuhn_grid
from server.geometry.texture_field import TextureField, default_encoding, triplane_resolutions
from server.job.errors import JobSpecError
from server.job.spec import JobSpec
from server.noise.base import FreshNoise, NoiseProvider
from server.pipeline.export import UVAtlas
from server.priors import Prior, PromptEmbeddings, load_prior
from server.render.cameras import OrbitRig
from server.render.mvdream_cameras import MultiViewRig


@dataclass(frozen=True)
class Optimisation:
    """The loop's internal settings (not job fields), tuned on CPU demos against the shapes prior.

    The flow loss is summed over latent pixels, so the regulariser weights are relative to a
    gradient of about one unit per latent pixel and view.
    """

    # Shape stage (`server.geometry.sdf_volume`): the first steps form the shape in a volume that can
    # change topology, rendered at half the job's render size with one albedo, from the job's orbit
    # (its low views are the only ones that see, and so trim, the underside), with opacity sparsity
    # so that what no view supports (a torus's hole seen from above) empties.
    volume_fraction: float = 0.6
    volume_lr: float = 1e-2
    volume_levels: tuple[int, ...] = (8, 16)
    volume_samples: int = 48
    volume_views: int = 2  # per step, at least (the job's batch_size when larger): views must agree
    volume_beta: tuple[float, float] = (0.05, 0.02)  # the density's width, annealed geometrically
    eikonal_weight: float = 100.0
    volume_smoothness_weight: float = 100.0
    opacity_weight: float = 200.0
    # Then DMTet refines the volume's isosurface with a texture field, until the geometry freezes.
    geometry_fraction: float = 0.8  # then the geometry freezes and only the colour keeps moving
    sdf_lr: float = 5e-3
    deformation_lr: float = 5e-3
    texture_lr: float = 1e-2
    weighting: Weighting = Weighting.ONE
    normal_weight: float = 1000.0
    laplacian_weight: float = 1000.0
    sign_weight_start: float = 0.2  # nvdiffrec's anti-floater term, annealed to sign_weight_end
    sign_weight_end: float = 0.01
    island_cleanup_every: int = 25


OPTIMISATION = Optimisation()


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
    """One prior's share of a job's steps, up to step `until`: a chained job (MVDream forming the
    geometry, then Stable Diffusion adding detail) has two."""

    prior: Prior
    embeddings: PromptEmbeddings
    schedule: NoiseSchedule
    until: int
    guidance_scale: float  # the job's, else the prior's own

    @property
    def views_per_group(self) -> int:
        """Views a multi-view prior (MVDream) denoises together; 1 for a single-view prior."""
        return getattr(self.prior, "views_per_group", 1)


def prior_stage(spec: JobSpec, prior: Prior, until: int) -> PriorStage:
    """`prior` with the job's prompt encoded, its schedule and its guidance, in charge until `until`."""
    view_dependent = getattr(prior, "view_dependent", False)
    embeddings = prior.encode_prompt(spec.prompt, spec.negative_prompt, view_dependent=view_dependent)
    guidance = prior.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
    return PriorStage(prior, embeddings, NoiseSchedule.of(prior), until, guidance)


def prior_stages(spec: JobSpec, device: torch.device) -> list[PriorStage]:
    """The job's prior, or its two chained priors, each checked against the render size."""
    names = [spec.prior] if spec.chain_prior is None else [spec.prior, spec.chain_prior]
    priors = cached_priors(names, device, resolve_dtype(spec.precision, device))
    ends = [spec.steps] if len(priors) == 1 else [round(spec.chain_at * spec.steps), spec.steps]
    stages = []
    for prior, until in zip(priors, ends, strict=True):
        if spec.render_size % prior.latent_size:
            raise JobSpecError(
                "render_size",
                f"{spec.render_size} must be a multiple of the latent size {prior.latent_size} of prior "
                f"{prior.name!r}",
            )
        stages.append(prior_stage(spec, prior, until))
    return stages


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
    stages: list[PriorStage]
    device: torch.device
    volume: SDFVolume  # the shape stage's geometry, handed to `geometry` at step `volume_steps`
    volume_optimizer: torch.optim.Optimizer
    volume_steps: int
    geometry: DMTet
    texture: TextureField
    optimizer: torch.optim.Optimizer
    timesteps: AnnealedTimesteps | RandomTimesteps
    noise: NoiseProvider
    cameras: CameraSource
    generator: torch.Generator
    geometry_steps: int  # then the geometry freezes and only the colour keeps moving
    milestones: set[int]  # steps after which a texture is baked and streamed
    atlas: UVAtlas | None = None  # the frozen geometry, unwrapped once, for milestones and the asset

    def color_fn(self, points: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.texture(torch.from_numpy(points).float().to(self.device)).cpu().numpy()


def start_job(
    spec: JobSpec, init_mesh: tuple[np.ndarray, np.ndarray] | None, prior: Prior | None = None
) -> JobState:
    """A job's set-up: priors, geometry, colour field, optimiser, timesteps, noise and cameras, all
    seeded by the job. `prior` replaces the priors the spec names (a benchmark's in-memory model)."""
    opt = OPTIMISATION
    device = resolve_device(spec.device)
    # Same seed, same asset: with two CPU threads, accumulating kernels of the backward passes summed
    # in a varying order, and 40 steps amplified those last-bit differences into a different SDF
    # (max difference 0.06). The deterministic CPU kernels cost about 5 %. On CUDA the switch would
    # also pin cuDNN/cuBLAS algorithms at a larger cost, so GPU runs stay as fast as they can be.
    # Set for every job: the flag is process-wide, and a server may run a CPU job then a CUDA one.
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)
    stages = prior_stages(spec, device) if prior is None else [prior_stage(spec, prior, spec.steps)]
    method = Method(spec.method)
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)

    geometry = DMTet(kuhn_grid(spec.grid_resolution, radius=1.0), device=device)
    if init_mesh is not None:
        geometry.init_from_mesh(*init_mesh, fill=0.8)
    elif spec.init_shape == "ellipsoid":
        geometry.init_ellipsoid((0.45, 0.45, 0.6))
    else:
        geometry.init_sphere(0.5)
    volume = SDFVolume(geometry.sdf, geometry.grid.radius, opt.volume_levels)
    volume_optimizer = torch.optim.Adam(
        [
            {"params": list(volume.grids), "lr": opt.volume_lr},
            {"params": [volume.albedo_logit], "lr": opt.texture_lr},
        ],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    encoding = default_encoding(device)
    planes = {"resolutions": triplane_resolutions(spec.render_size)} if encoding == "triplane" else None
    texture = TextureField(encoding=encoding, encoding_options=planes, device=device)
    optimizer = torch.optim.Adam(
        [
            {"params": [geometry.sdf], "lr": opt.sdf_lr},
            {"params": [geometry.deformation], "lr": opt.deformation_lr},
            {"params": list(texture.parameters()), "lr": opt.texture_lr},
        ],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    timesteps = job_timesteps(spec)
    geometry_steps = int(opt.geometry_fraction * spec.steps)
    return JobState(
        spec=spec,
        stages=stages,
        device=device,
        volume=volume,
        volume_optimizer=volume_optimizer,
        volume_steps=int(opt.volume_fraction * spec.steps),
        geometry=geometry,
        texture=texture,
        optimizer=optimizer,
        timesteps=timesteps,
        noise=noise_provider(method, spec.seed, device),
        cameras=CameraSource(spec, rng),
        generator=generator,
        geometry_steps=geometry_steps,
        milestones=texture_milestones(geometry_steps, spec.steps),
    )


def texture_milestones(geometry_steps: int, steps: int, count: int = 3) -> set[int]:
    """Steps after which a baked texture is streamed: when the geometry freezes, then evenly through
    the colour-only phase (the final texture comes with the asset)."""
    if not 0 < geometry_steps < steps:
        return set()
    return {geometry_steps + (steps - geometry_steps) * k // count for k in range(count)} - {steps}
