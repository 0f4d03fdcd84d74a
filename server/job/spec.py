"""The settings of one generation job (`JobSpec`), validated field by field.

Blender sends a job as a JSON object; `JobSpec.from_dict` checks every field and raises
`JobSpecError(field, message)` naming the field and what is allowed, so the panel can point at the
setting to change. stdlib + numpy only: the extension may validate settings before sending them.
Defaults are the CPU demo's and live in the dataclass fields below, in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from ..distill.knots import KNOTS_RULE, knots_problem
from .errors import JobSpecError
from .profiles import Profile, default_profile_name, resolve_profile

JOB_FORMAT = "blender-cfd-job/1"  # tag in job.json, so a saved job can be fed back to from_dict
METHODS = ("cfd", "fsd", "sds")
CFG_FORMS = ("uncond", "cond")
INIT_SHAPES = ("sphere", "ellipsoid", "mesh")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
KINDS = ("generate", "texture")  # a new shape, or a colour field on the artist's own mesh
UV_MODES = ("keep", "unwrap")  # a texture job bakes into the mesh's own UVs, or a fresh xatlas unwrap
MAX_PROMPT_CHARS = 500
MAX_EXPLICIT_CAMERAS = 256
RIGID_TOLERANCE = 1e-4
# A texture job's own defaults: the colour forms from scratch on a surface that is already there, so
# fewer steps than a generate job's and t falling from high (colour is decided at high noise) to low.
TEXTURE_DEFAULTS: dict[str, Any] = {"steps": 200, "timestep_knots": ((0.0, 700.0), (1.0, 200.0))}
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,2})?")


@dataclass(frozen=True)
class OrbitSpec:
    """Camera ranges the optimiser samples from; same fields as `server.render.cameras.OrbitRig`."""

    elevation_deg: tuple[float, float] = (-10.0, 45.0)
    azimuth_deg: tuple[float, float] = (-180.0, 180.0)
    radius: tuple[float, float] = (2.2, 2.6)
    fovy_deg: tuple[float, float] = (38.0, 42.0)


@dataclass(frozen=True)
class CameraSpec:
    """One fixed camera: camera-to-world 4x4 in Blender's convention, vertical fov in degrees."""

    c2w: tuple[tuple[float, float, float, float], ...]
    fovy_deg: float

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.c2w, dtype=np.float64)


@dataclass(frozen=True)
class JobSpec:
    """Every setting of a generation job. Exactly one of `orbit` / `cameras` is set."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    method: str = "cfd"
    prior: str = "shapes"
    orbit: OrbitSpec | None = field(default_factory=OrbitSpec)
    cameras: tuple[CameraSpec, ...] | None = None
    steps: int = 600
    render_size: int = 64
    guidance_scale: float | None = None  # None: the prior's own (`Prior.guidance_scale`)
    cfg_form: str = "uncond"
    gamma: float = 1e-4
    # t falls through the shape stage (the first 60 %, `server.job.profiles`' shapes profile) to 300,
    # where a render's silhouette is settled, then slowly while DMTet refines and the colour settles.
    timestep_knots: tuple[tuple[float, float], ...] = ((0.0, 980.0), (0.6, 300.0), (1.0, 200.0))
    texture_size: int = 512
    init_shape: str = "sphere"
    grid_resolution: int = 32
    device: str = "auto"
    precision: str = "auto"
    output_dir: str | None = None
    preview_max_fps: float = 2.0
    batch_size: int = 1
    chain_prior: str | None = None  # e.g. MVDream forms the geometry, then Stable Diffusion adds detail
    chain_at: float = 0.5  # fraction of the steps after which `chain_prior` takes over
    profile: str | None = None  # the pipeline profile (`server.job.profiles`); None: the prior's own
    profile_overrides: dict[str, Any] | None = None  # single profile settings, {"texture.guidance_scale": 30}
    kind: str = "generate"
    uv_mode: str = "keep"  # texture jobs: "keep" the mesh's UVs (a fresh unwrap when it has none)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        """Validate a job dict (as sent by Blender or saved in job.json) and build the spec."""
        if not isinstance(d, dict):
            raise JobSpecError("job", f"must be an object, got {type(d).__name__}")
        d = dict(d)
        job_format = d.pop("format", JOB_FORMAT)
        if job_format != JOB_FORMAT:
            raise JobSpecError("format", f"must be {JOB_FORMAT!r}, got {job_format!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise JobSpecError(unknown[0], f"unknown setting; known settings: {', '.join(known)}")
        if "prompt" not in d:
            raise JobSpecError("prompt", "is required")
        if d.get("orbit") is not None and d.get("cameras") is not None:
            raise JobSpecError("cameras", "give either an orbit camera rig or explicit cameras, not both")
        defaults = cls(prompt="default")
        kind_defaults = TEXTURE_DEFAULTS if d.get("kind") == "texture" else {}
        values = {name: d.get(name, kind_defaults.get(name, getattr(defaults, name))) for name in known}
        cameras = values["cameras"]
        return cls(
            prompt=_text("prompt", values["prompt"], allow_empty=False),
            negative_prompt=_text("negative_prompt", values["negative_prompt"], allow_empty=True),
            seed=_integer("seed", values["seed"], 0, 2**32 - 1),
            method=_choice("method", values["method"], METHODS),
            prior=_prior(values["prior"]),
            orbit=None if cameras is not None else _orbit(values["orbit"] or OrbitSpec()),
            cameras=None if cameras is None else _cameras(cameras),
            steps=_integer("steps", values["steps"], 1, 100_000),
            render_size=_render_size(values["render_size"]),
            guidance_scale=None
            if values["guidance_scale"] is None
            else _number("guidance_scale", values["guidance_scale"], 0.0, 200.0),
            cfg_form=_choice("cfg_form", values["cfg_form"], CFG_FORMS),
            gamma=_number("gamma", values["gamma"], 0.0, 1.0),
            timestep_knots=_knots(values["timestep_knots"]),
            texture_size=_texture_size(values["texture_size"]),
            init_shape=_choice("init_shape", values["init_shape"], INIT_SHAPES),
            grid_resolution=_integer("grid_resolution", values["grid_resolution"], 8, 128),
            device=_device(values["device"]),
            precision=_choice("precision", values["precision"], PRECISIONS),
            output_dir=_output_dir(values["output_dir"]),
            preview_max_fps=_number("preview_max_fps", values["preview_max_fps"], 0.1, 30.0),
            batch_size=_integer("batch_size", values["batch_size"], 1, 8),
            chain_prior=None
            if values["chain_prior"] is None
            else _prior(values["chain_prior"], "chain_prior"),
            chain_at=_number("chain_at", values["chain_at"], 0.0, 1.0),
            profile=_profile(values["profile"]),
            profile_overrides=_profile_overrides(values["profile_overrides"]),
            kind=_choice("kind", values["kind"], KINDS),
            uv_mode=_choice("uv_mode", values["uv_mode"], UV_MODES),
        )._with_checked_profile()

    @property
    def profile_name(self) -> str:
        """The profile this job runs: the one it names, else its prior's own."""
        return self.profile or default_profile_name(self.prior, self.chain_prior)

    def resolved_profile(self) -> Profile:
        """The job's stages with its overrides applied (what job.json records)."""
        return resolve_profile(self.profile_name, self.profile_overrides)

    def _with_checked_profile(self) -> JobSpec:
        self.resolved_profile()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; `JobSpec.from_dict(spec.to_dict()) == spec`."""
        d = asdict(self)
        d["orbit"] = None if self.orbit is None else {k: list(v) for k, v in asdict(self.orbit).items()}
        d["cameras"] = (
            None
            if self.cameras is None
            else [{"c2w": [list(row) for row in cam.c2w], "fovy_deg": cam.fovy_deg} for cam in self.cameras]
        )
        d["timestep_knots"] = [list(knot) for knot in self.timestep_knots]
        return d

    def to_json_dict(self) -> dict[str, Any]:
        """What goes into job.json: the settings tagged with their format (still `from_dict`-able)."""
        return {"format": JOB_FORMAT, **self.to_dict()}


# ------------------------------------------------------------------------------------- validators


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if not _is_number(value) or not lo <= value <= hi:
        raise JobSpecError(name, f"must be a number in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise JobSpecError(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise JobSpecError(name, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _text(name: str, value: Any, allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise JobSpecError(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise JobSpecError(name, "must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise JobSpecError(name, f"must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    return value


def _prior(value: Any, name: str = "prior") -> str:
    allowed = (
        '"shapes" (default), "mvdream", a Stable Diffusion or MVDream hub id like "owner/name", '
        "or a local model folder or checkpoint"
    )
    if not isinstance(value, str) or not value.strip() or len(value) > 1000:
        raise JobSpecError(name, f"must be {allowed}; got {value!r}")
    if any(ord(ch) < 32 for ch in value):
        raise JobSpecError(name, "must not contain control characters")
    return value


def _range(name: str, value: Any, lo: float, hi: float, hi_inclusive: bool = True) -> tuple[float, float]:
    bounds = f"[{lo:g}, {hi:g}{']' if hi_inclusive else ')'}"
    shape_ok = isinstance(value, list | tuple) and len(value) == 2 and all(_is_number(v) for v in value)
    if not shape_ok:
        raise JobSpecError(name, f"must be a [low, high] pair of numbers within {bounds}, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if low > high:
        raise JobSpecError(name, f"low {low:g} is above high {high:g}")
    if low < lo or high > hi or (not hi_inclusive and high >= hi):
        raise JobSpecError(name, f"must lie within {bounds}, got [{low:g}, {high:g}]")
    return low, high


def _orbit(value: Any) -> OrbitSpec:
    if isinstance(value, OrbitSpec):
        value = asdict(value)
    if not isinstance(value, dict):
        raise JobSpecError("orbit", f"must be an object, got {type(value).__name__}")
    known = [f.name for f in fields(OrbitSpec)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise JobSpecError(f"orbit.{unknown[0]}", f"unknown setting; known: {', '.join(known)}")
    merged = {**asdict(OrbitSpec()), **value}
    radius = _range("orbit.radius", merged["radius"], 1.0, 100.0)
    if radius[0] <= 1.0:
        raise JobSpecError("orbit.radius", f"must stay above 1 (outside the object's box), got {radius[0]:g}")
    azimuth = _range("orbit.azimuth_deg", merged["azimuth_deg"], -360.0, 360.0)
    if azimuth[1] - azimuth[0] > 360.0:
        raise JobSpecError("orbit.azimuth_deg", f"spans {azimuth[1] - azimuth[0]:g} degrees; at most 360")
    return OrbitSpec(
        elevation_deg=_range("orbit.elevation_deg", merged["elevation_deg"], -90.0, 90.0),
        azimuth_deg=azimuth,
        radius=radius,
        fovy_deg=_range("orbit.fovy_deg", merged["fovy_deg"], 1.0, 170.0, hi_inclusive=False),
    )


def _camera(index: int, value: Any) -> CameraSpec:
    name = f"cameras[{index}]"
    if isinstance(value, CameraSpec):
        value = {"c2w": value.c2w, "fovy_deg": value.fovy_deg}
    if not isinstance(value, dict) or set(value) != {"c2w", "fovy_deg"}:
        raise JobSpecError(name, f'must be an object with exactly "c2w" and "fovy_deg", got {value!r}'[:300])
    c2w = value["c2w"]
    rows_ok = (
        isinstance(c2w, list | tuple)
        and len(c2w) == 4
        and all(
            isinstance(row, list | tuple) and len(row) == 4 and all(_is_number(v) for v in row) for row in c2w
        )
    )
    if not rows_ok:
        raise JobSpecError(f"{name}.c2w", "must be a 4x4 nested list of finite numbers")
    matrix = np.array(c2w, dtype=np.float64)
    rotation = matrix[:3, :3]
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], atol=RIGID_TOLERANCE):
        raise JobSpecError(f"{name}.c2w", f"last row must be 0 0 0 1, got {matrix[3].tolist()}")
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=RIGID_TOLERANCE) or np.linalg.det(rotation) < 0:
        raise JobSpecError(
            f"{name}.c2w", "rotation part must be orthonormal with determinant +1 (no scale, shear or mirror)"
        )
    fovy = value["fovy_deg"]
    if not _is_number(fovy) or not 1.0 <= fovy < 170.0:
        raise JobSpecError(f"{name}.fovy_deg", f"must be a number in [1, 170), got {fovy!r}")
    return CameraSpec(tuple(tuple(float(v) for v in row) for row in c2w), float(fovy))


def _cameras(value: Any) -> tuple[CameraSpec, ...]:
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_EXPLICIT_CAMERAS:
        raise JobSpecError("cameras", f"must be a list of 1 to {MAX_EXPLICIT_CAMERAS} cameras")
    return tuple(_camera(i, cam) for i, cam in enumerate(value))


def _render_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 32 <= value <= 1024 or value % 32:
        raise JobSpecError("render_size", f"must be a multiple of 32 in [32, 1024], got {value!r}")
    return value


def _texture_size(value: Any) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 128 <= value <= 4096
        or value & (value - 1)
    ):
        raise JobSpecError("texture_size", f"must be a power of two in [128, 4096], got {value!r}")
    return value


def _knots(value: Any) -> tuple[tuple[float, float], ...]:
    pairs_ok = (
        isinstance(value, list | tuple)
        and len(value) >= 2
        and all(isinstance(k, list | tuple) and len(k) == 2 and all(_is_number(v) for v in k) for k in value)
    )
    if not pairs_ok:
        raise JobSpecError("timestep_knots", f"{KNOTS_RULE}; got {value!r}"[:400])
    knots = tuple((float(f), float(t)) for f, t in value)
    problem = knots_problem(knots)
    if problem is not None:
        raise JobSpecError("timestep_knots", f"{KNOTS_RULE}; {problem}")
    return knots


def _profile(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise JobSpecError("profile", f"must be a profile name or null, got {value!r}")
    return value


def _profile_overrides(value: Any) -> dict[str, Any] | None:
    if value is None or value == {}:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise JobSpecError("profile_overrides", f"must be an object of settings, got {value!r}"[:300])
    return dict(value)


def _device(value: Any) -> str:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        raise JobSpecError("device", f'must be "auto", "cpu", "cuda", "cuda:N" or "mps"; got {value!r}')
    return value


def _output_dir(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise JobSpecError("output_dir", f"must be a folder path string or null, got {value!r}")
    return value
