"""Run one text-to-3D job: optimise a DMTet mesh and its colour field against a diffusion prior.

This is the loop Blender watches and the command line runs headless (`python -m server generate`).
Each step renders a batch of views, encodes them into the prior's space, asks the noise provider
for eps_tilde (surface-attached for CFD, world-map for FSD, fresh for SDS), and applies the flow
gradient of `server.distill` through the renderer. A mesh exists at every step and is streamed as
a preview; at the end the mesh is cleaned, UV-unwrapped, baked and written as GLB + OBJ with a
preview PNG and job.json, atomically, into its own folder of the output directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from server import __version__
from server.cameras import OrbitRig
from server.distill import CFGForm, Method, Weighting, distillation_step
from server.dmtet import DMTet, TriangleMesh
from server.export import UVAtlas, bake_and_export, png_bytes, prepare_atlas
from server.job import Cancelled, JobSpec, JobSpecError, NonFiniteError
from server.mvdream_cameras import MultiViewRig
from server.noise import FreshNoise, NoiseProvider, NoiseQuery
from server.priors import Prior, PromptEmbeddings, load_prior
from server.regularizers import laplacian_smoothness, normal_consistency, sdf_sign_change
from server.render import render_mesh
from server.schedule import AnnealedTimesteps, NoiseSchedule, RandomTimesteps
from server.tetgrid import kuhn_grid
from server.texture_field import TextureField, default_encoding, triplane_resolutions


@dataclass(frozen=True)
class Optimisation:
    """The loop's internal settings (not job fields), tuned on CPU demos against the shapes prior.

    The flow loss is summed over latent pixels, so the regulariser weights are relative to a
    gradient of about one unit per latent pixel and view.
    """

    geometry_fraction: float = 0.75  # then the geometry freezes and only the colour keeps moving
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
TARGET_FACES = 10000  # decimate before UV unwrapping: xatlas takes ~10 s at 15k faces on a CPU
PREVIEW_VIEWS = ((15.0, -45.0), (15.0, 45.0), (15.0, 135.0), (60.0, -135.0))


class Events:
    """What a running job reports (`server.job.JobEvents` turns it into frames; the CLI into tqdm)."""

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


@dataclass
class JobResult:
    out_dir: Path
    glb: Path
    obj: Path
    preview_png: Path
    job_json: Path
    seconds: float
    steps_per_second: float

    def to_dict(self) -> dict:
        return {
            "glb": str(self.glb),
            "obj": str(self.obj),
            "preview_png": str(self.preview_png),
            "job_json": str(self.job_json),
            "out_dir": str(self.out_dir),
            "seconds": round(self.seconds, 2),
            "steps_per_second": round(self.steps_per_second, 3),
        }


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The prior's dtype: fp16 on CUDA when automatic; the geometry always stays fp32."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


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


def prior_stages(spec: JobSpec, device: torch.device) -> list[PriorStage]:
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
        view_dependent = getattr(prior, "view_dependent", False)
        embeddings = prior.encode_prompt(spec.prompt, spec.negative_prompt, view_dependent=view_dependent)
        guidance = prior.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
        stages.append(PriorStage(prior, embeddings, NoiseSchedule.of(prior), until, guidance))
    return stages


def noise_provider(method: Method, seed: int, device: torch.device) -> NoiseProvider:
    if method == Method.CFD:
        from server.consistent_noise import ConsistentNoise

        return ConsistentNoise(seed, device)
    if method == Method.FSD:
        from server.worldmap_noise import WorldMapNoise

        return WorldMapNoise(seed, device)
    return FreshNoise(seed, device)


class CameraSource:
    """Cameras per step: sampled from the orbit rig, or drawn from the explicit cameras sent by Blender.

    A multi-view prior (MVDream) needs groups of 4 views 90 degrees apart, as it was trained on:
    those come from its own rig (`server.mvdream_cameras.MultiViewRig`) whatever the job's cameras.
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


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "asset"


def render_preview(
    mesh_vertices: torch.Tensor, faces: torch.Tensor, color_fn, size: int = 256
) -> Image.Image:
    """A few fixed views of the asset, side by side: what a person looks at first."""
    from server.cameras import orbit_c2w

    c2w = torch.stack([torch.from_numpy(orbit_c2w(e, a, 2.4)).float() for e, a in PREVIEW_VIEWS])
    fovy = torch.full((len(PREVIEW_VIEWS),), math.radians(40.0))
    light = torch.nn.functional.normalize(c2w[:, :3, 3] + torch.tensor([0.0, 0.0, 1.5]), dim=-1)
    with torch.no_grad():
        out = render_mesh(mesh_vertices, faces, c2w, fovy, size, color_fn=color_fn, light_dir=light)
    row = torch.cat(list(out.rgb), dim=1).clamp(0, 1)
    return Image.fromarray((row.numpy() * 255).round().astype(np.uint8))


class StepTimer:
    """Where a step's time goes: books nothing here; `server.bench.step` times each stage through it."""

    def __call__(self, stage: str) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor, marks: list[tuple[torch.Tensor, str]], last: str) -> None:
        """`loss.backward()`; `marks` name the tensors where the backward pass changes stage."""
        loss.backward()


UNTIMED = StepTimer()


@dataclass
class JobState:
    """Everything a job's optimisation carries from step to step."""

    spec: JobSpec
    stages: list[PriorStage]
    device: torch.device
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


@dataclass
class StepOutcome:
    mesh: TriangleMesh
    loss: float
    t: float
    shaping: bool
    texture_png: bytes | None  # a milestone texture, baked after this step


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
    if prior is None:
        stages = prior_stages(spec, device)
    else:
        view_dependent = getattr(prior, "view_dependent", False)
        embeddings = prior.encode_prompt(spec.prompt, spec.negative_prompt, view_dependent=view_dependent)
        guidance = prior.guidance_scale if spec.guidance_scale is None else spec.guidance_scale
        stages = [PriorStage(prior, embeddings, NoiseSchedule.of(prior), spec.steps, guidance)]
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
    timesteps = (
        RandomTimesteps(20, 980)
        if method == Method.SDS
        else AnnealedTimesteps(tuple((float(f), float(t)) for f, t in spec.timestep_knots))
    )
    geometry_steps = int(opt.geometry_fraction * spec.steps)
    return JobState(
        spec=spec,
        stages=stages,
        device=device,
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


def run_job(
    spec: JobSpec,
    init_mesh: tuple[np.ndarray, np.ndarray] | None,
    events: Events,
    should_cancel: Callable[[], bool],
) -> JobResult:
    """Optimise, then bake and export. Raises `Cancelled` within one step of `should_cancel()`."""
    start = time.perf_counter()
    state = start_job(spec, init_mesh)
    for step in range(spec.steps):
        if should_cancel():
            raise Cancelled(step)
        outcome = optimisation_step(state, step)
        if outcome.texture_png is not None:
            events.texture(step + 1, outcome.texture_png, spec.texture_size, spec.texture_size)
        elapsed = time.perf_counter() - start
        eta = elapsed / (step + 1) * (spec.steps - step - 1)
        stage = "shape" if outcome.shaping else "texture"
        events.progress(step + 1, spec.steps, stage, outcome.t, outcome.loss, eta, elapsed)
        if events.preview_due() or step == spec.steps - 1:
            mesh = outcome.mesh
            with torch.no_grad():
                colors = (state.texture(mesh.vertices) * 255).round().to(torch.uint8)
            events.preview_mesh(
                step + 1,
                mesh.vertices.detach().cpu().numpy().astype(np.float32),
                mesh.faces.cpu().numpy().astype(np.int32),
                colors.cpu().numpy(),
            )

    if should_cancel():
        raise Cancelled(spec.steps)
    with torch.no_grad():
        mesh = state.geometry()
    return write_asset(
        spec, mesh.vertices.cpu(), mesh.faces.cpu(), state.color_fn, state.texture, events, start, state.atlas
    )


def texture_milestones(geometry_steps: int, steps: int, count: int = 3) -> set[int]:
    """Steps after which a baked texture is streamed: when the geometry freezes, then evenly through
    the colour-only phase (the final texture comes with the asset)."""
    if not 0 < geometry_steps < steps:
        return set()
    return {geometry_steps + (steps - geometry_steps) * k // count for k in range(count)} - {steps}


def write_asset(
    spec: JobSpec,
    vertices: torch.Tensor,
    faces: torch.Tensor,
    color_fn,
    texture,
    events: Events,
    start: float,
    atlas: UVAtlas | None = None,
) -> JobResult:
    """Everything is written into a staging folder that is renamed into place only when complete."""
    root = Path(spec.output_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    name = f"{slug(spec.prompt)}_seed{spec.seed}_{spec.method}_{datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    staging = root / f".{name}.partial"
    staging.mkdir()
    try:
        exported = bake_and_export(
            vertices.numpy(),
            faces.numpy(),
            color_fn,
            staging,
            texture_size=spec.texture_size,
            target_faces=TARGET_FACES,
            name=slug(spec.prompt),
            atlas=atlas,
        )
        texture_png = Path(exported["png"])
        with Image.open(texture_png) as image:
            events.texture(spec.steps, texture_png.read_bytes(), image.width, image.height, True)
        render_preview(vertices.float(), faces, texture).save(staging / "preview.png")
        seconds = time.perf_counter() - start
        record = {
            "job": spec.to_json_dict(),
            "seed": spec.seed,
            "seconds": round(seconds, 2),
            "server_version": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": sys.platform,
            "files": {k: Path(v).name for k, v in exported.items() if isinstance(v, (str, Path))},
        }
        (staging / "job.json").write_text(json.dumps(record, indent=2))
        final = root / name
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    glb = final / Path(exported["glb"]).name
    return JobResult(
        final,
        glb,
        final / Path(exported["obj"]).name,
        final / "preview.png",
        final / "job.json",
        seconds,
        spec.steps / seconds,
    )


# ----------------------------------------------------------------------------------------------------
# Command line: python -m server generate --prompt "a red cube" --seed 0 --out DIR [--variants N]


class ProgressBar(Events):
    def __init__(self, label: str, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)

    def progress(self, step, total, stage, t, loss, eta_s, elapsed_s) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(stage=stage, t=t, loss=f"{loss:.3g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="output folder")
    parser.add_argument("--variants", type=int, default=1, help="re-roll N seeds (seed, seed+1, ...)")
    parser.add_argument("--method", choices=[m.value for m in Method], default=None)
    parser.add_argument(
        "--prior",
        default=None,
        help='"shapes" (default), "mvdream", a folder, a checkpoint or a hub id',
    )
    parser.add_argument(
        "--chain-prior",
        default=None,
        help="a prior that takes over at --chain-at (SD after MVDream)",
    )
    parser.add_argument("--chain-at", type=float, default=None, help="fraction of the steps (default 0.5)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--render-size", type=int, default=None)
    parser.add_argument("--grid-resolution", type=int, default=None, help="DMTet cells per axis (default 32)")
    parser.add_argument("--texture-size", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the prior's own")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")


def spec_from_args(args: argparse.Namespace, seed: int) -> JobSpec:
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": seed,
        "output_dir": str(args.out),
    }
    keys = (
        "method",
        "prior",
        "chain_prior",
        "chain_at",
        "steps",
        "render_size",
        "grid_resolution",
        "texture_size",
        "guidance_scale",
        "device",
        "precision",
    )
    for key in keys:
        value = getattr(args, key)
        if value is not None:
            fields[key] = value
    return JobSpec.from_dict(fields)


def variant_grid(previews: list[Path], seeds: list[int], path: Path) -> None:
    """One row per variant (its preview views, labelled with its seed), so re-rolls can be compared."""
    images = [Image.open(p).convert("RGB") for p in previews]
    width = max(i.width for i in images)
    canvas = Image.new("RGB", (width, sum(i.height for i in images)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for image, seed in zip(images, seeds, strict=True):
        canvas.paste(image, (0, y))
        draw.text((4, y + 4), f"seed {seed}", fill=(0, 0, 0))
        y += image.height
    canvas.save(path)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [args.seed + i for i in range(max(1, args.variants))]
    try:
        specs = [spec_from_args(args, seed) for seed in seeds]
    except JobSpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = []
    for seed, spec in zip(seeds, specs, strict=True):
        bar = ProgressBar(f"seed {seed}", spec.steps)
        try:
            results.append(run_job(spec, None, bar, lambda: False))
        finally:
            bar.close()
        print(f"wrote {results[-1].glb}", file=sys.stderr)
    if len(results) == 1:
        print(json.dumps(results[0].to_dict()))
        return 0
    grid = Path(args.out) / f"variants_{slug(args.prompt)}_seed{seeds[0]}-{seeds[-1]}.png"
    variant_grid([r.preview_png for r in results], seeds, grid)
    print(
        json.dumps(
            {
                "variants": [r.to_dict() for r in results],
                "grid_png": str(grid),
                "seconds": round(sum(r.seconds for r in results), 2),
            }
        )
    )
    return 0
