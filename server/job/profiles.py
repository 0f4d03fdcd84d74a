"""Pipeline profiles: which stages a job runs, and each stage's settings, per prior.

A profile is a sequence of stages (`StageSettings`): a coarse stage on the project's SDF volume, then
DMTet stages on its isosurface. "shapes" is the loop tuned on CPU demos against the project's shapes
prior (today's settings, unchanged); "sd", "mvdream" and "mvdream+sd" follow the Consistent Flow
Distillation reference (`runjie-yan/ConsistentFlowDistillation`, `scripts/run_all_stage.py --mesh` and
`configs/cfd/*.yaml`); every number names the config it came from in `SOURCES` and in the stage's
`source`. A job names a profile (`JobSpec.profile`, default: its prior's) and may change single
settings (`JobSpec.profile_overrides`, e.g. {"texture.guidance_scale": 30}); `resolve_profile`
applies them and the result goes into job.json.

Where a setting is None the job's own field decides (the shapes profile keeps every job field
meaningful as before). The reference's NeRF coarse stage is the project's SDF volume here (a NeRF at
512^2 is more than the CPU path carries); as in the reference it feeds DMTet through its isosurface.

stdlib only: Blender reads the prior defaults (guidance, negative prompt, step counts) from here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import JobSpecError
from .prior_kind import local_mvdream

SD_REFERENCE_MODEL = "stabilityai/stable-diffusion-2-1-base"
REPOSITORY = "runjie-yan/ConsistentFlowDistillation"
SOURCES = {
    "sd-stage1": "configs/cfd/sd-stage1.yaml",
    "mvdream-stage1": "configs/cfd/mvdream-shading-stage1.yaml",
    "geometry": "configs/cfd/sd-mesh-geometry-stage2.yaml",
    "texture": "configs/cfd/sd-mesh-texture-stage3.yaml",
    "shapes": "server/pipeline/setup.py (tuned on the CPU shapes demos, bench/README.md)",
    "project": "the project's own (the reference has no such stage)",
}
REPRESENTATIONS = ("volume", "dmtet")
RENDERS = ("lambertian", "normal", "albedo")
TIMESTEP_RULES = ("job", "knots", "dreamtime")
WEIGHTINGS = ("one", "lambda")

# The reference's negative prompts (`prompt_processor.negative_prompt`), used when a job gives none.
SD_NEGATIVE = (
    "lack details, ugly, oversmoothed, bad structure, out of focus, blurry, cartoon, oversaturated, foggy, "
    "hazy, bad anatomy, malformed, pixelated obscure, unnatural colors, dull, unclear, lowres, low quality, "
    "deformed, dehydrated"
)
SD_TEXTURE_NEGATIVE = "oversmoothed, strong reflection, " + SD_NEGATIVE.replace(", oversmoothed", "")
MVDREAM_NEGATIVE = (
    "ugly, bad anatomy, blurry, pixelated obscure, unnatural colors, poor lighting, dull, and unclear, "
    "cropped, lowres, low quality, artifacts, duplicate, morbid, mutilated, poorly drawn face, deformed, "
    "dehydrated, bad proportions"
)


@dataclass(frozen=True)
class StageSettings:
    """One stage of a profile. Fractions are of the job's steps (`until`, `freeze_geometry_at`) or of
    the stage's own steps (`render_size`, `timestep_knots`, `gamma`)."""

    name: str
    representation: str  # "volume": the SDF volume (coarse); "dmtet": the mesh
    until: float  # the stage ends at this fraction of the job's steps
    reference_steps: int  # the reference's step count for this stage (the job's `steps` are shared out)
    render: str  # what the prior sees: "lambertian" (lit colour), "normal" map, unlit "albedo"
    render_size: tuple[tuple[float, int], ...] | None  # (stage fraction, size) from then on; None: job's
    method: str | None  # "cfd", "fsd", "sds"; None: the job's
    prior: int  # 0: the job's prior, 1: its chain prior
    guidance_scale: float | None  # None: the job's, else the prior's own
    cfg_form: str | None  # None: the job's
    weighting: str  # w(t): "one" or "lambda" (sigma/alpha)
    timesteps: str  # "job": the job's knots over the whole job; "knots": the stage's; "dreamtime"
    timestep_knots: tuple[tuple[float, float], ...] | None
    gamma: tuple[tuple[float, float], ...] | None  # (stage fraction, gamma) knots; None: the job's
    negative_prompt: str  # used when the job gives none
    front_back_deg: float  # view-dependent prompts: front/back when within this of the front/back
    sdf_lr: float  # the DMTet's SDF; in a volume stage, the volume's grids
    deformation_lr: float
    encoding_lr: float  # the texture field's encoding; in a volume stage, the volume's albedo
    mlp_lr: float  # the texture field's MLP
    adam_eps: float
    freeze_geometry_at: float | None  # then only the colour moves (fraction of the job's steps)
    normal_weight: float  # mesh normal consistency
    laplacian_weight: float  # mesh Laplacian smoothness
    sign_weight: tuple[float, float]  # nvdiffrec's anti-floater term, annealed over the job's first half
    source: str  # the reference config (or the project's rule) these values come from

    @property
    def geometry_trained(self) -> bool:
        return self.sdf_lr > 0.0 or self.deformation_lr > 0.0


@dataclass(frozen=True)
class Profile:
    name: str
    stages: tuple[StageSettings, ...]
    grid_resolution: int | None  # Kuhn grid resolution; None: the job's
    chain_prior: str | None  # the prior `prior: 1` stages use when the job names none

    def stage(self, name: str) -> StageSettings:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, for job.json."""
        return {
            "name": self.name,
            "grid_resolution": self.grid_resolution,
            "chain_prior": self.chain_prior,
            "stages": [_jsonable(asdict(stage)) for stage in self.stages],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _sd_coarse(until: float) -> StageSettings:
    """`sd-stage1`: the reference's NeRF stage, here on the project's SDF volume."""
    return StageSettings(
        name="coarse",
        representation="volume",
        until=until,
        reference_steps=25_000,
        render="lambertian",
        render_size=((0.0, 128), (0.2, 512)),  # resolution_milestones [5000] of 25k
        method=None,
        prior=0,
        guidance_scale=70.0,
        cfg_form="cond",
        weighting="lambda",
        timesteps="knots",
        # linear_anneal_max [0, 0.3, 0.6, 0.8] at [0, 2.5k, 12.5k, 25k]: t = 1000 (0.98 - 0.96 p)
        timestep_knots=((0.0, 980.0), (0.1, 692.0), (0.5, 404.0), (1.0, 212.0)),
        gamma=((0.0, 0.01), (0.2, 0.01), (0.4, 1e-4), (1.0, 1e-4)),  # weight_decay [5k, 0.01, 1e-4, 10k]
        negative_prompt=SD_NEGATIVE,
        front_back_deg=30.0,
        sdf_lr=1e-2,
        deformation_lr=0.0,
        encoding_lr=1e-2,
        mlp_lr=1e-3,
        adam_eps=1e-15,
        freeze_geometry_at=None,
        normal_weight=0.0,
        laplacian_weight=0.0,
        sign_weight=(0.0, 0.0),
        source=SOURCES["sd-stage1"],
    )


# Shared by the reference's SD mesh stages (`sd-mesh-geometry-stage2`, `sd-mesh-texture-stage3`):
# 15k geometry steps (SDS on normal maps, fresh noise, DreamTime t, Adam lr 1e-2, eps 1e-8, normal
# consistency and Laplacian 1e4), then 20k texture steps (CFD, t 404 -> 260, gamma 1e-4, encoding 1e-2,
# MLP 1e-3, SDF and deformation still at 1e-4, eps 1e-15), both rendered at 1024 (encoded at 512).
def _sd_mesh_stages(start: float, total: int, prior: int) -> tuple[StageSettings, StageSettings]:
    geometry_end = start + 15_000 / total
    geometry = StageSettings(
        name="geometry",
        representation="dmtet",
        until=geometry_end,
        reference_steps=15_000,
        render="normal",
        render_size=((0.0, 1024),),
        method="sds",
        prior=prior,
        guidance_scale=50.0,
        cfg_form="cond",
        weighting="lambda",
        timesteps="dreamtime",
        timestep_knots=None,
        gamma=None,
        negative_prompt="",
        front_back_deg=30.0,
        sdf_lr=1e-2,
        deformation_lr=1e-2,
        encoding_lr=0.0,
        mlp_lr=0.0,
        adam_eps=1e-8,
        freeze_geometry_at=None,
        normal_weight=1e4,
        laplacian_weight=1e4,
        sign_weight=(0.0, 0.0),
        source=SOURCES["geometry"],
    )
    texture = replace(
        _sd_coarse(1.0),
        name="texture",
        representation="dmtet",
        reference_steps=20_000,
        render="albedo",
        render_size=((0.0, 1024),),
        prior=prior,
        guidance_scale=50.0,
        timestep_knots=((0.0, 404.0), (1.0, 260.0)),
        gamma=((0.0, 1e-4), (1.0, 1e-4)),
        negative_prompt=SD_TEXTURE_NEGATIVE,
        sdf_lr=1e-4,
        deformation_lr=1e-4,
        source=SOURCES["texture"],
    )
    return geometry, texture


def _shapes() -> Profile:
    """Today's tuned loop: the volume for 60 % of the steps, then DMTet, geometry frozen at 80 %."""
    common = {
        "reference_steps": 0,
        "method": None,
        "prior": 0,
        "guidance_scale": None,
        "cfg_form": None,
        "weighting": "one",
        "timesteps": "job",
        "timestep_knots": None,
        "gamma": None,
        "negative_prompt": "",
        "front_back_deg": 45.0,
        "deformation_lr": 5e-3,
        "encoding_lr": 1e-2,
        "mlp_lr": 1e-2,
        "adam_eps": 1e-15,
        "normal_weight": 1000.0,
        "laplacian_weight": 1000.0,
        "sign_weight": (0.2, 0.01),
        "source": SOURCES["shapes"],
    }
    return Profile(
        name="shapes",
        stages=(
            StageSettings(
                name="shape",
                representation="volume",
                until=0.6,
                render="lambertian",
                render_size=None,
                sdf_lr=1e-2,  # the volume's grids
                freeze_geometry_at=None,
                **common,
            ),
            StageSettings(
                name="refine",
                representation="dmtet",
                until=1.0,
                render="lambertian",
                render_size=None,
                sdf_lr=5e-3,
                freeze_geometry_at=0.8,
                **common,
            ),
        ),
        grid_resolution=None,
        chain_prior=None,
    )


def _sd() -> Profile:
    """`run_all_stage.py --sd --mesh`: SD coarse (25k), DMTet geometry (15k), texture (20k)."""
    total = 60_000
    coarse = _sd_coarse(25_000 / total)
    return Profile("sd", (coarse, *_sd_mesh_stages(coarse.until, total, 0)), 64, None)


def _mvdream_coarse(until: float) -> StageSettings:
    """`mvdream-shading-stage1`: as SD's coarse stage (the same volume learning rates and 30-degree
    view thresholds) but 10k steps at 64 -> 256, CFG 50 in the standard form, w = 1, t 980 -> 596 -> 404."""
    return replace(
        _sd_coarse(until),
        reference_steps=10_000,
        render_size=((0.0, 64), (0.5, 256)),  # resolution_milestones [5000] of 10k
        guidance_scale=50.0,
        cfg_form="uncond",
        weighting="one",
        # linear_anneal_max [0, 0.4, 0.6] at [0, 5k, 10k]
        timestep_knots=((0.0, 980.0), (0.5, 596.0), (1.0, 404.0)),
        gamma=((0.0, 1e-4), (1.0, 1e-4)),
        negative_prompt=MVDREAM_NEGATIVE,
        source=SOURCES["mvdream-stage1"],
    )


def _mvdream_plus_sd() -> Profile:
    """`run_all_stage.py --mesh` (the reference's default): MVDream coarse (10k), then SD's DMTet
    geometry (15k) and texture (20k)."""
    total = 45_000
    coarse = _mvdream_coarse(10_000 / total)
    return Profile("mvdream+sd", (coarse, *_sd_mesh_stages(coarse.until, total, 1)), 64, SD_REFERENCE_MODEL)


def _mvdream() -> Profile:
    """MVDream alone: the reference's MVDream stage, then (the project's own, as the reference hands
    its mesh stages to SD) a DMTet stage that keeps MVDream's settings and continues t from 404."""
    coarse = _mvdream_coarse(0.5)
    mesh = replace(
        coarse,
        name="texture",
        representation="dmtet",
        until=1.0,
        reference_steps=0,
        render_size=((0.0, 256),),
        timestep_knots=((0.0, 404.0), (1.0, 260.0)),
        sdf_lr=1e-4,
        deformation_lr=1e-4,
        source=SOURCES["project"],
    )
    return Profile("mvdream", (coarse, mesh), 64, None)


PROFILES: dict[str, Profile] = {p.name: p for p in (_shapes(), _sd(), _mvdream(), _mvdream_plus_sd())}


def default_profile_name(prior: str, chain_prior: str | None = None) -> str:
    """A prior's own profile: "shapes" for the shapes prior, "mvdream" for MVDream (with a chain prior:
    "mvdream+sd"), "sd" for any other model."""
    if prior == "shapes":
        return "shapes"
    if _looks_like_mvdream(prior):
        return "mvdream+sd" if chain_prior is not None else "mvdream"
    return "sd"


def _looks_like_mvdream(prior: str) -> bool:
    # `server.priors.mvdream.is_mvdream` without the hub cache: a hub id goes by its name.
    local = local_mvdream(prior)
    return "mvdream" in prior.lower() if local is None else local


def override_keys(profile: Profile) -> list[str]:
    """Every setting a job may override: "grid_resolution", and "<stage>.<field>"."""
    names = [f.name for f in fields(StageSettings) if f.name not in ("name", "representation", "source")]
    return ["grid_resolution"] + [f"{stage.name}.{name}" for stage in profile.stages for name in names]


def resolve_profile(name: str, overrides: dict[str, Any] | None = None) -> Profile:
    """The named profile with `overrides` ({"<stage>.<field>": value} or {"grid_resolution": n})
    applied and checked; raises `JobSpecError` naming the setting."""
    if name not in PROFILES:
        raise JobSpecError("profile", f"must be one of {', '.join(PROFILES)}; got {name!r}")
    profile = PROFILES[name]
    overrides = overrides or {}
    if not isinstance(overrides, dict):
        raise JobSpecError("profile_overrides", f"must be an object, got {type(overrides).__name__}")
    allowed = override_keys(profile)
    stages = {stage.name: stage for stage in profile.stages}
    grid = profile.grid_resolution
    for key, value in overrides.items():
        field_name = f"profile_overrides.{key}"
        if key not in allowed:
            stage_names = ", ".join(stages)
            settings = ", ".join(
                key.split(".", 1)[1] for key in allowed if key.startswith(f"{profile.stages[0].name}.")
            )
            raise JobSpecError(
                field_name,
                f"unknown setting of profile {name!r}; known: grid_resolution, or <stage>.<setting> with "
                f"stages {stage_names} and settings {settings}",
            )
        if key == "grid_resolution":
            grid = _check(field_name, "grid_resolution", value)
            continue
        stage_name, setting = key.split(".", 1)
        stages[stage_name] = replace(stages[stage_name], **{setting: _check(field_name, setting, value)})
    resolved = Profile(name, tuple(stages[s.name] for s in profile.stages), grid, profile.chain_prior)
    problem = _order_problem(resolved)
    if problem:
        raise JobSpecError("profile_overrides", problem)
    return resolved


def _order_problem(profile: Profile) -> str | None:
    ends = [stage.until for stage in profile.stages]
    if any(not a < b for a, b in itertools.pairwise([0.0, *ends])) or ends[-1] != 1.0:
        return f"stage ends must rise from above 0 to exactly 1, got {ends}"
    return None


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi:
        raise JobSpecError(name, f"must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _pairs(name: str, value: Any, lo: float, hi: float) -> tuple[tuple[float, float], ...]:
    ok = isinstance(value, list | tuple) and len(value) >= 1
    ok = ok and all(isinstance(p, list | tuple) and len(p) == 2 for p in value)
    if not ok:
        raise JobSpecError(name, f"must be a list of [stage fraction, value] pairs, got {value!r}"[:300])
    pairs = tuple((_number(name, f, 0.0, 1.0), _number(name, v, lo, hi)) for f, v in value)
    if pairs[0][0] != 0.0 or any(b[0] <= a[0] for a, b in itertools.pairwise(pairs)):
        raise JobSpecError(name, "fractions must start at 0 and increase")
    return pairs


def _check(name: str, setting: str, value: Any) -> Any:
    """One override, checked as the field it replaces."""
    choices = {
        "render": RENDERS,
        "method": (None, "cfd", "fsd", "sds"),
        "cfg_form": (None, "uncond", "cond"),
        "weighting": WEIGHTINGS,
        "timesteps": TIMESTEP_RULES,
    }
    if setting in choices:
        if value not in choices[setting]:
            raise JobSpecError(name, f"must be one of {', '.join(map(str, choices[setting]))}; got {value!r}")
        return value
    if setting in ("grid_resolution", "reference_steps", "prior"):
        hi = {"grid_resolution": 128, "reference_steps": 10**6, "prior": 1}[setting]
        lo = 8 if setting == "grid_resolution" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise JobSpecError(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
        return value
    if setting == "negative_prompt":
        if not isinstance(value, str) or len(value) > 500:
            raise JobSpecError(name, "must be a string of at most 500 characters")
        return value
    if setting == "render_size":
        if value is None:
            return None
        pairs = _pairs(name, value, 32, 1024)
        if any(int(size) % 32 for _, size in pairs):
            raise JobSpecError(name, "sizes must be multiples of 32 in [32, 1024]")
        return tuple((f, int(size)) for f, size in pairs)
    if setting == "sign_weight":
        ok = isinstance(value, list | tuple) and len(value) == 2
        if not ok:
            raise JobSpecError(name, f"must be a [start, end] pair, got {value!r}")
        return (_number(name, value[0], 0.0, 1e3), _number(name, value[1], 0.0, 1e3))
    if setting == "timestep_knots":
        return None if value is None else _pairs(name, value, 0.0, 999.0)
    if setting == "gamma":
        return None if value is None else _pairs(name, value, 0.0, 1.0)
    if setting in ("guidance_scale", "freeze_geometry_at") and value is None:
        return None
    bounds = {"until": (0.0, 1.0), "freeze_geometry_at": (0.0, 1.0), "guidance_scale": (0.0, 200.0)}
    lo, hi = bounds.get(setting, (0.0, 1e6))
    return _number(name, value, lo, hi)
