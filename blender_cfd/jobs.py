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

from ..server.job.spec import JOB_FORMAT
from ..server.job.spec import PRECISIONS as JOB_PRECISIONS

MAX_SEED = 2**31 - 1  # Blender's IntProperty is a signed 32-bit int


@dataclass(frozen=True)
class QualityPreset:
    label: str
    description: str
    steps: int
    render_size: int  # pixels of each rendered view (a multiple of the priors' latent sizes)
    texture_size: int  # baked texture side


# The times are the shapes prior's on a 2-core CPU, measured with `python -m server generate` (2026-12-07).
QUALITY_PRESETS = {
    "DRAFT": QualityPreset(
        "Draft", "A quick look: 300 steps, 64 px views, 512 px texture; 1 min on 2 CPU cores", 300, 64, 512
    ),
    "STANDARD": QualityPreset(
        "Standard", "1000 steps, 128 px views, 1024 px texture; about 6.5 min on 2 CPU cores", 1000, 128, 1024
    ),
    "HIGH": QualityPreset(
        "High", "2500 steps, 256 px views, 2048 px texture; for a GPU (far longer on a CPU)", 2500, 256, 2048
    ),
}
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
PANEL_FIELDS = ("prompt", "negative_prompt", "seed", "guidance_scale")


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


def build_job(
    *,
    prompt: str,
    negative_prompt: str,
    seed: int,
    quality: str,
    method: str,
    guidance_scale: float,
    init_shape: str,
    prior: str,
    device: str,
    custom_prior: str = "",
    precision: str,
    output_dir: str,
    orbit: dict | None = None,
    cameras: list[dict] | None = None,
) -> dict[str, Any]:
    """The job dict for `protocol.generate`: panel + preferences values, with the quality preset expanded."""
    if (orbit is None) == (cameras is None):
        raise ValueError("give exactly one of orbit / cameras")
    preset = QUALITY_PRESETS[quality]
    source, chain = prior_sources(prior, custom_prior)
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
        "guidance_scale": float(guidance_scale),
        "init_shape": INIT_SHAPES[init_shape],
        "device": device.lower(),
        "precision": PRECISIONS[precision],
        "output_dir": output_dir,
    }
    if chain is not None:
        job["chain_prior"] = chain
    if orbit is not None:
        job["orbit"] = orbit
    else:
        job["cameras"] = cameras
    return job


def quality_of(job: dict) -> str | None:
    """The preset a job's steps / sizes came from, or None if they were set another way."""
    for key, preset in QUALITY_PRESETS.items():
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
            "guidance_scale": job["guidance_scale"],
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
