"""From panel settings to the server's job dict (`server/job/spec.py` JobSpec fields), without bpy.

A finished variant keeps the exact job it came from (JSON in the object's "cfd_job" property), so
Re-roll changes only the seed and Regenerate sends the same job again: same seed and settings give
the same asset. The operators read Blender properties into plain values and call these. The job
format and the precisions come from the server's own `job.spec`, which imports without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..server.job.profiles import PROFILES, default_profile_name
from ..server.job.spec import JOB_FORMAT, TEXTURE_DEFAULTS
from ..server.job.spec import PRECISIONS as JOB_PRECISIONS

MAX_SEED = 2**31 - 1  # Blender's IntProperty is a signed 32-bit int


@dataclass(frozen=True)
class QualityPreset:
    label: str
    description: str
    steps: int
    render_size: int  # pixels of each rendered view (a multiple of the priors' latent sizes)
    texture_size: int  # baked texture side
    # A profile's volume stages render (stage fraction, size) from then on and its mesh stages at
    # `render_size`, sent as profile overrides; None: the profile's own sizes (the shapes profile
    # renders at `render_size`, its volume at half of it).
    coarse_sizes: tuple[tuple[float, int], ...] | None = None
    # Seconds per step on (a CPU, a GPU): the estimate the panel shows before Generate.
    seconds_per_step: tuple[float, float] = (0.0, 0.0)


# The times are the shapes prior's on a 2-core CPU, measured with `python -m server generate` (2026-12-07);
# its GPU figures are estimates (its steps are render-bound, a few GFLOP of network).
QUALITY_PRESETS = {
    "DRAFT": QualityPreset(
        "Draft",
        "A quick look: 300 steps, 64 px views, 512 px texture; 1 min on 2 CPU cores",
        300,
        64,
        512,
        seconds_per_step=(0.2, 0.05),
    ),
    "STANDARD": QualityPreset(
        "Standard",
        "1000 steps, 128 px views, 1024 px texture; about 6.5 min on 2 CPU cores",
        1000,
        128,
        1024,
        seconds_per_step=(0.39, 0.06),
    ),
    "HIGH": QualityPreset(
        "High",
        "2500 steps, 256 px views, 2048 px texture; for a GPU (far longer on a CPU)",
        2500,
        256,
        2048,
        seconds_per_step=(1.5, 0.08),
    ),
}
# Stable Diffusion (the "sd" profile: coarse volume, DMTet geometry on normal maps, DMTet texture). High is
# the CFD reference itself (60k steps, volume 128 -> 512, mesh 1024 encoded at 512); the others keep its
# stage shares with fewer steps and smaller renders. Every step runs the UNet (batch 2, 64x64 latents) and
# the VAE encoder forward and backward at 512 px: 3.9 TFLOP a view (bench/README.md). Measured on one CPU
# thread (`python -m server.bench stages`, 2026-12-07): 110 s a coarse step (2 views), 55 s a mesh step at
# 512 px; the CPU figures below weight those by the stage shares. The GPU figures are the floor at about
# 25 TFLOP/s, estimates until `python -m server.bench gpu` has measured a card.
SD_PRESETS = {
    "DRAFT": QualityPreset(
        "Draft",
        "1200 steps, 256 px mesh views: a GPU run of a few minutes",
        1200,
        256,
        1024,
        ((0.0, 64), (0.2, 128)),
        (75.0, 0.2),
    ),
    "STANDARD": QualityPreset(
        "Standard",
        "6000 steps, 512 px mesh views, 1024 px texture: a GPU",
        6000,
        512,
        1024,
        ((0.0, 128), (0.2, 256)),
        (78.0, 0.25),
    ),
    "HIGH": QualityPreset(
        "High",
        "The CFD reference: 60 000 steps, 1024 px mesh views, 2048 px texture: a GPU, hours",
        60_000,
        1024,
        2048,
        None,
        (85.0, 0.3),
    ),
}
# MVDream alone or MVDream -> Stable Diffusion: the coarse stage renders 4 views of 64 -> 256 px (32x32
# latents), then the mesh stages as Stable Diffusion's. High is the reference (45k steps with SD).
MVDREAM_PRESETS = {
    "DRAFT": QualityPreset(
        "Draft",
        "1000 steps, 64 -> 128 px coarse views, 256 px mesh views: a GPU run of a few minutes",
        1000,
        256,
        1024,
        ((0.0, 64), (0.5, 128)),
        (60.0, 0.2),
    ),
    "STANDARD": QualityPreset(
        "Standard",
        "4500 steps, 64 -> 256 px coarse views, 512 px mesh views: a GPU",
        4500,
        512,
        1024,
        ((0.0, 64), (0.5, 256)),
        (70.0, 0.25),
    ),
    "HIGH": QualityPreset(
        "High",
        "The CFD reference: 45 000 steps (10k MVDream, 35k SD mesh), 1024 px mesh views: a GPU, hours",
        45_000,
        1024,
        2048,
        None,
        (80.0, 0.3),
    ),
}
PRESETS = {"shapes": QUALITY_PRESETS, "sd": SD_PRESETS}
PRESETS.update({"mvdream": MVDREAM_PRESETS, "mvdream+sd": MVDREAM_PRESETS})
PRECISIONS = {precision.upper(): precision for precision in JOB_PRECISIONS}  # the menu key: the job value
SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
PRIOR_ITEMS = [  # the preferences' menu: (key, label, tooltip)
    ("SHAPES", "Shapes (offline)", "The project's small shipped prior of coloured primitives: runs on a CPU"),
    ("SD21", "Stable Diffusion 2.1", f"{SD21_BASE}: downloaded once; a GPU is advised"),
    ("MVDREAM", "MVDream", "Multi-view Stable Diffusion: one face, consistent sides; downloaded once; GPU"),
    (
        "MVDREAM_SD21",
        "MVDream → Stable Diffusion",
        "MVDream forms the shape over the first half of the steps, then Stable Diffusion 2.1 adds detail",
    ),
    ("CUSTOM", "Custom", "Any Stable Diffusion or MVDream hub id, diffusers folder or checkpoint file"),
]
# The preferences' prior choices as the job's (prior, chain_prior); CUSTOM takes the typed source.
PRIORS = {
    "SHAPES": ("shapes", None),
    "SD21": (SD21_BASE, None),
    "MVDREAM": ("mvdream", None),
    "MVDREAM_SD21": ("mvdream", SD21_BASE),  # MVDream forms the shape, SD 2.1 adds detail
}
# What the shipped shapes prior knows, for the panel (a copy: Blender must not import server/shapes;
# tests/test_blender_extension.py checks it against server/shapes/primitives.py).
SHAPES_VOCABULARY = ("cube", "sphere", "cylinder", "cone", "torus")
COLOURS_VOCABULARY = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
INIT_SHAPES = {"SPHERE": "sphere", "MESH": "mesh"}
# Which panel value each job field comes back to on Regenerate.
PANEL_FIELDS = ("prompt", "negative_prompt", "seed")  # and guidance: its value when the job overrode it


def orbit_ranges(elevation_rad: tuple[float, float], radius: tuple[float, float], fov_rad: float) -> dict:
    """An orbit rig's ranges as the job's "orbit" object (degrees). Blender stores float32, so values
    are rounded to what a person typed (1e-4) and a stored job reads cleanly."""
    fov = round(math.degrees(fov_rad), 4)
    return {
        "elevation_deg": [round(math.degrees(elevation_rad[0]), 4), round(math.degrees(elevation_rad[1]), 4)],
        "azimuth_deg": [-180.0, 180.0],
        "radius": [round(float(radius[0]), 4), round(float(radius[1]), 4)],
        "fovy_deg": [fov, fov],
    }


def explicit_cameras(views: list[tuple[np.ndarray, float]]) -> list[dict]:
    """(camera-to-world relative to the asset's origin, fovy radians) pairs as the job's "cameras"."""
    return [
        {"c2w": np.asarray(c2w, np.float64).tolist(), "fovy_deg": math.degrees(fovy)} for c2w, fovy in views
    ]


def prior_sources(prior: str, custom_prior: str = "") -> tuple[str, str | None]:
    """The preferences' prior choice as the job's (prior, chain_prior); an empty custom one is shapes."""
    return PRIORS.get(prior, (custom_prior.strip() or "shapes", None))


def profile_name(prior: str, custom_prior: str = "") -> str:
    """The pipeline profile the server runs for the preferences' prior choice."""
    return default_profile_name(*prior_sources(prior, custom_prior))


def presets_for(profile: str) -> dict[str, QualityPreset]:
    """What Draft / Standard / High mean for a profile's prior."""
    return PRESETS[profile]


def guidance_default(profile: str) -> str:
    """The guidance the profile uses when the panel's is not overridden, per stage, e.g. "70 / 50 / 50"."""
    stages = PROFILES[profile].stages
    if all(stage.guidance_scale is None for stage in stages):
        return "the prior's own"
    return " / ".join(f"{stage.guidance_scale:g}" for stage in stages)


def negative_default(profile: str) -> str:
    """The negative prompt the profile's first stage uses when the panel's is empty ("" for none)."""
    return PROFILES[profile].stages[0].negative_prompt


def estimated_seconds(profile: str, quality: str, gpu: bool) -> float:
    """Estimated time of a job at a quality preset, on a GPU or a CPU (see the presets' figures)."""
    preset = presets_for(profile)[quality]
    return preset.steps * preset.seconds_per_step[1 if gpu else 0]


def format_duration(seconds: float) -> str:
    """ "about 40 s", "about 12 min", "about 3.5 h", "about 2 days"."""
    if seconds < 90:
        return f"about {max(round(seconds), 1)} s"
    if seconds < 5400:
        return f"about {round(seconds / 60)} min"
    if seconds < 2 * 86400:
        return f"about {seconds / 3600:.1f} h"
    return f"about {round(seconds / 86400)} days"


def build_job(
    *,
    prompt: str,
    negative_prompt: str,
    seed: int,
    quality: str,
    method: str,
    guidance_scale: float | None,
    init_shape: str,
    prior: str,
    device: str,
    custom_prior: str = "",
    precision: str,
    output_dir: str,
    orbit: dict | None = None,
    cameras: list[dict] | None = None,
) -> dict[str, Any]:
    """The job dict for `protocol.generate`: panel + preferences values, with the prior's quality preset
    expanded. `guidance_scale` None leaves guidance to the prior's profile (the panel's "Prior default")."""
    if (orbit is None) == (cameras is None):
        raise ValueError("give exactly one of orbit / cameras")
    source, chain = prior_sources(prior, custom_prior)
    profile = default_profile_name(source, chain)
    preset = presets_for(profile)[quality]
    job: dict[str, Any] = {
        "format": JOB_FORMAT,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": int(seed),
        "method": method.lower(),
        "prior": source,
        "steps": preset.steps,
        "render_size": preset.render_size,
        "texture_size": preset.texture_size,
        "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        "init_shape": INIT_SHAPES[init_shape],
        "device": device.lower(),
        "precision": PRECISIONS[precision],
        "output_dir": output_dir,
    }
    if chain is not None:
        job["chain_prior"] = chain
    if preset.coarse_sizes is not None:
        job["profile_overrides"] = {
            f"{stage.name}.render_size": [
                list(knot)
                for knot in (
                    preset.coarse_sizes if stage.representation == "volume" else [(0.0, preset.render_size)]
                )
            ]
            for stage in PROFILES[profile].stages
        }
    if orbit is not None:
        job["orbit"] = orbit
    else:
        job["cameras"] = cameras
    return job


# Texture selected: above this many triangles the panel offers a decimated copy (the fresh UV unwrap
# and the bake grow with the faces; xatlas takes about 10 s at 15k faces on a CPU).
TEXTURE_FACE_LIMIT = 100_000


# Steps of a texture job per quality preset: the colour alone settles far sooner than a shape (60
# steps gave the named colour in 24 of 24 shapes-prior runs); Standard is the server's default.
TEXTURE_STEPS = {"DRAFT": 60, "STANDARD": TEXTURE_DEFAULTS["steps"], "HIGH": 500}


def texture_job(job: dict, quality: str, fresh_uvs: bool) -> dict[str, Any]:
    """A panel job as a texture job for the selected mesh: the quality's texture steps and the
    server's texture timesteps, the mesh's UVs kept unless `fresh_uvs`."""
    return {
        **job,
        "kind": "texture",
        "uv_mode": "unwrap" if fresh_uvs else "keep",
        "steps": TEXTURE_STEPS[quality],
        "timestep_knots": [list(knot) for knot in TEXTURE_DEFAULTS["timestep_knots"]],
    }


def decimate_ratio(triangles: int) -> float:
    """The Decimate modifier's ratio that brings `triangles` just under `TEXTURE_FACE_LIMIT`."""
    return min(1.0, 0.95 * TEXTURE_FACE_LIMIT / max(triangles, 1))


def quality_of(job: dict) -> str | None:
    """The preset a job's steps / sizes came from, or None if they were set another way."""
    profile = default_profile_name(job.get("prior", "shapes"), job.get("chain_prior"))
    for key, preset in presets_for(profile).items():
        if (job.get("steps"), job.get("render_size"), job.get("texture_size")) == (
            preset.steps,
            preset.render_size,
            preset.texture_size,
        ):
            return key
    return None


def with_machine(job: dict, *, device: str, precision: str, output_dir: str) -> dict:
    """A stored job on this machine: where and how to run may change, what to make may not."""
    return {**job, "device": device.lower(), "precision": PRECISIONS[precision], "output_dir": output_dir}


def with_seed(job: dict, seed: int) -> dict:
    return {**job, "seed": int(seed)}


def new_seed(rng: np.random.Generator, avoid: int) -> int:
    """A fresh seed for Re-roll, never the one being re-rolled."""
    while True:
        seed = int(rng.integers(0, MAX_SEED))
        if seed != avoid:
            return seed


def encode_job(job: dict) -> str:
    return json.dumps(job, sort_keys=True)


def new_seeds(rng: np.random.Generator, count: int, avoid: int) -> list[int]:
    """`count` different fresh seeds for a batch of variants, none of them the one being re-rolled."""
    seeds: list[int] = []
    while len(seeds) < count:
        seed = new_seed(rng, avoid)
        if seed not in seeds:
            seeds.append(seed)
    return seeds


def prompt_lines(text: str) -> list[str]:
    """A prompt list: one prompt a line; blank lines and lines starting with # are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def decode_job(text: str) -> dict:
    job = json.loads(text)
    if not isinstance(job, dict) or job.get("format") != JOB_FORMAT:
        raise ValueError("not a blender-cfd job")
    return job


def variant_properties(job: dict, out_dir: str) -> dict[str, Any]:
    """Custom properties of a finished variant: readable fields for people, the exact job for Regenerate."""
    return {
        "cfd_prompt": job["prompt"],
        "cfd_seed": int(job["seed"]),
        "cfd_settings": {
            "negative_prompt": job["negative_prompt"],
            "quality": quality_of(job) or "CUSTOM",
            "method": job["method"].upper(),
            "guidance_scale": "prior default" if job.get("guidance_scale") is None else job["guidance_scale"],
            "prior": job["prior"],
            "steps": job["steps"],
            "render_size": job["render_size"],
            "texture_size": job["texture_size"],
            "init_shape": job["init_shape"],
            "cameras": "orbit" if "orbit" in job else f"{len(job['cameras'])} fixed",
        },
        "cfd_job": encode_job(job),
        "cfd_output": out_dir,
    }


def normalized_init_mesh(
    vertices: np.ndarray, faces: np.ndarray, extent: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """Centre a starting mesh and scale it into the object box [-extent, extent]^3 (the grid is [-1, 1]^3)."""
    vertices = np.asarray(vertices, np.float64)
    if len(vertices) == 0 or len(faces) == 0:
        raise ValueError("the starting mesh has no faces")
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    half = float((high - low).max()) / 2.0
    if half <= 0.0:
        raise ValueError("the starting mesh is flat in every direction")
    scaled = (vertices - (low + high) / 2.0) * (extent / half)
    return scaled.astype(np.float32), np.asarray(faces, np.int32)
