"""JobSpec: every field's bad values are refused with an error naming that field; good specs
round-trip through to_dict / job.json; JobEvents stamps job ids and throttles previews."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from server.job.errors import JobSpecError
from server.job.events import JobEvents
from server.job.spec import JobSpec, OrbitSpec
from server.render.cameras import look_at, orbit_c2w
from server.wire import protocol

EYE4 = np.eye(4).tolist()
SCALED = (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
MIRRORED = (np.diag([-1.0, 1.0, 1.0, 1.0])).tolist()
BAD_LAST_ROW = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
SHEARED = [[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]

# (setting overrides, the field the error must name)
BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 501}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"negative_prompt": "x" * 501}, "negative_prompt"),
    ({"negative_prompt": None}, "negative_prompt"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"),
    ({"method": "vsd"}, "method"),
    ({"prior": ""}, "prior"),
    ({"chain_prior": ""}, "chain_prior"),
    ({"chain_prior": 7}, "chain_prior"),
    ({"chain_at": 1.5}, "chain_at"),
    ({"chain_at": -0.1}, "chain_at"),
    ({"prior": 3}, "prior"),
    ({"prior": "a\nb"}, "prior"),
    ({"orbit": "wide"}, "orbit"),
    ({"orbit": {"elevation_deg": [-100, 10]}}, "orbit.elevation_deg"),
    ({"orbit": {"elevation_deg": [50, 10]}}, "orbit.elevation_deg"),
    ({"orbit": {"azimuth_deg": [-400, 0]}}, "orbit.azimuth_deg"),
    ({"orbit": {"azimuth_deg": [-300, 300]}}, "orbit.azimuth_deg"),
    ({"orbit": {"radius": [1.0, 2.0]}}, "orbit.radius"),
    ({"orbit": {"radius": [2.0, "far"]}}, "orbit.radius"),
    ({"orbit": {"radius": [2.0]}}, "orbit.radius"),
    ({"orbit": {"fovy_deg": [10, 170]}}, "orbit.fovy_deg"),
    ({"orbit": {"fovy_deg": [0.5, 40]}}, "orbit.fovy_deg"),
    ({"orbit": {"zoom": 2}}, "orbit.zoom"),
    ({"cameras": []}, "cameras"),
    ({"cameras": "front"}, "cameras"),
    ({"cameras": [{"c2w": EYE4, "fovy_deg": 40}], "orbit": {}}, "cameras"),
    ({"cameras": [{"c2w": EYE4}]}, "cameras[0]"),
    ({"cameras": [{"c2w": EYE4, "fovy_deg": 40}, {"c2w": EYE4[:3], "fovy_deg": 40}]}, "cameras[1].c2w"),
    ({"cameras": [{"c2w": SCALED, "fovy_deg": 40}]}, "cameras[0].c2w"),
    ({"cameras": [{"c2w": MIRRORED, "fovy_deg": 40}]}, "cameras[0].c2w"),
    ({"cameras": [{"c2w": SHEARED, "fovy_deg": 40}]}, "cameras[0].c2w"),
    ({"cameras": [{"c2w": BAD_LAST_ROW, "fovy_deg": 40}]}, "cameras[0].c2w"),
    ({"cameras": [{"c2w": [[math.nan] * 4] * 4, "fovy_deg": 40}]}, "cameras[0].c2w"),
    ({"cameras": [{"c2w": EYE4, "fovy_deg": 170}]}, "cameras[0].fovy_deg"),
    ({"steps": 0}, "steps"),
    ({"steps": 100_001}, "steps"),
    ({"render_size": 48}, "render_size"),
    ({"render_size": 0}, "render_size"),
    ({"render_size": 1056}, "render_size"),
    ({"guidance_scale": -0.1}, "guidance_scale"),
    ({"guidance_scale": 200.5}, "guidance_scale"),
    ({"guidance_scale": math.nan}, "guidance_scale"),
    ({"cfg_form": "both"}, "cfg_form"),
    ({"gamma": 1.01}, "gamma"),
    ({"gamma": -1e-9}, "gamma"),
    ({"timestep_knots": [[0, 980]]}, "timestep_knots"),
    ({"timestep_knots": [[0.1, 980], [1, 20]]}, "timestep_knots"),
    ({"timestep_knots": [[0, 980], [0.9, 20]]}, "timestep_knots"),
    ({"timestep_knots": [[0, 980], [0.5, 500], [0.5, 400], [1, 20]]}, "timestep_knots"),
    ({"timestep_knots": [[0, 980], [0.5, 990], [1, 20]]}, "timestep_knots"),
    ({"timestep_knots": [[0, 1000], [1, 20]]}, "timestep_knots"),
    ({"timestep_knots": [[0, 980], [1, 0]]}, "timestep_knots"),
    ({"timestep_knots": [[0, 980, 1], [1, 20]]}, "timestep_knots"),
    ({"texture_size": 100}, "texture_size"),
    ({"texture_size": 384}, "texture_size"),
    ({"texture_size": 8192}, "texture_size"),
    ({"init_shape": "cube"}, "init_shape"),
    ({"grid_resolution": 7}, "grid_resolution"),
    ({"grid_resolution": 129}, "grid_resolution"),
    ({"device": "gpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"precision": "fp8"}, "precision"),
    ({"output_dir": ""}, "output_dir"),
    ({"output_dir": 5}, "output_dir"),
    ({"preview_max_fps": 0.05}, "preview_max_fps"),
    ({"preview_max_fps": 31}, "preview_max_fps"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 9}, "batch_size"),
    ({"profile": "nerf"}, "profile"),
    ({"profile": 3}, "profile"),
    ({"profile_overrides": [1]}, "profile_overrides"),
    ({"profile_overrides": {"texture.gamma": 0.1}}, "profile_overrides.texture.gamma"),
    ({"profile_overrides": {"nerf.render": "rgb"}}, "profile_overrides.nerf.render"),
    ({"kind": "retexture"}, "kind"),
    ({"uv_mode": "auto"}, "uv_mode"),
    ({"resolution": 64}, "resolution"),
    ({"format": "other/2"}, "format"),
]


@pytest.mark.parametrize(("overrides", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_values_are_refused_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(JobSpecError) as caught:
        JobSpec.from_dict({"prompt": "a chair", **overrides})
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_every_field_has_bad_value_cases() -> None:
    covered = {f.split(".")[0].split("[")[0] for _, f in BAD}
    assert {f.name for f in dataclasses.fields(JobSpec)} <= covered


def test_errors_name_the_allowed_range_or_choices() -> None:
    messages = {}
    for overrides in ({"steps": 0}, {"method": "x"}, {"texture_size": 100}, {"bogus": 1}):
        with pytest.raises(JobSpecError) as caught:
            JobSpec.from_dict({"prompt": "p", **overrides})
        messages[next(iter(overrides))] = str(caught.value)
    assert "[1, 100000]" in messages["steps"]
    assert "cfd, fsd, sds" in messages["method"]
    assert "power of two in [128, 4096]" in messages["texture_size"]
    assert "known settings: prompt, negative_prompt, seed" in messages["bogus"]


def test_missing_prompt_and_non_object_job() -> None:
    with pytest.raises(JobSpecError, match="prompt: is required"):
        JobSpec.from_dict({"seed": 1})
    with pytest.raises(JobSpecError, match="job: must be an object"):
        JobSpec.from_dict(["prompt"])


def test_defaults_are_valid_and_in_one_place() -> None:
    assert JobSpec.from_dict({"prompt": "a chair"}) == JobSpec(prompt="a chair")
    assert JobSpec(prompt="a chair").orbit == OrbitSpec()


def test_explicit_cameras_from_blender_matrices_are_accepted() -> None:
    rotated = look_at(np.array([0.3, -2.5, 1.2]), up=np.array([0.0, 0.0, 1.0]))
    cameras = [
        {"c2w": orbit_c2w(20, 30, 2.5).tolist(), "fovy_deg": 40},
        {"c2w": rotated.astype(np.float32).tolist(), "fovy_deg": 39.6},  # float32 round-off is fine
        {"c2w": orbit_c2w(90, 0, 3.0).tolist(), "fovy_deg": 60},  # straight down
    ]
    spec = JobSpec.from_dict({"prompt": "p", "cameras": cameras})
    assert spec.orbit is None and len(spec.cameras) == 3
    np.testing.assert_allclose(spec.cameras[0].matrix, orbit_c2w(20, 30, 2.5))


def test_a_full_spec_round_trips_through_job_json() -> None:
    settings = {
        "prompt": "a ceramic mug",
        "negative_prompt": "blurry",
        "seed": 2**32 - 1,
        "method": "fsd",
        "prior": "stabilityai/stable-diffusion-2-1-base",
        "orbit": {
            "elevation_deg": [0, 30],
            "azimuth_deg": [-90, 90],
            "radius": [2.0, 3.0],
            "fovy_deg": [30, 45],
        },
        "steps": 1500,
        "render_size": 512,
        "guidance_scale": 50,
        "cfg_form": "cond",
        "gamma": 0.0,
        "timestep_knots": [[0, 980], [0.5, 596], [0.7, 596], [1, 404]],
        "texture_size": 2048,
        "init_shape": "ellipsoid",
        "grid_resolution": 128,
        "device": "cuda:1",
        "precision": "fp16",
        "output_dir": "/tmp/mug",
        "preview_max_fps": 0.5,
        "batch_size": 4,
    }
    spec = JobSpec.from_dict(settings)
    assert spec.guidance_scale == 50.0 and spec.orbit.radius == (2.0, 3.0)
    assert JobSpec.from_dict(spec.to_dict()) == spec
    saved = json.loads(json.dumps(spec.to_json_dict()))
    assert saved["format"] == "blender-cfd-job/1"
    assert JobSpec.from_dict(saved) == spec
    with_cameras = JobSpec.from_dict({"prompt": "p", "cameras": [{"c2w": EYE4, "fovy_deg": 40}]})
    assert JobSpec.from_dict(json.loads(json.dumps(with_cameras.to_json_dict()))) == with_cameras


def test_job_events_stamp_the_job_id_and_throttle_previews() -> None:
    sent: list[bytes] = []
    now = [100.0]
    events = JobEvents("j7", sent.append, preview_max_fps=2.0, clock=lambda: now[0])
    positions = np.zeros((3, 3), np.float32)
    faces = np.array([[0, 1, 2]], np.int32)
    assert events.preview_due()
    events.preview_mesh(1, positions, faces)
    now[0] += 0.4
    assert not events.preview_due()
    now[0] += 0.1
    assert events.preview_due()
    events.texture(2, b"png", 1, 1, final=True)  # a final texture does not use up the preview budget
    assert events.preview_due()
    events.progress(3, 10, "geometry", t=500.0, loss=0.1)
    events({"type": "progress", "step": 4, "total": 10, "stage": "custom"})
    events(protocol.cancelled("j7", 4))
    decoded = [protocol.decode_frame(frame) for frame in sent]
    assert [m.type for m in decoded] == ["preview_mesh", "texture", "progress", "progress", "cancelled"]
    assert all(m.header["job_id"] == "j7" for m in decoded)
    assert decoded[3].header["stage"] == "custom"


def test_a_texture_job_has_its_own_defaults_and_round_trips() -> None:
    from server.job.spec import TEXTURE_DEFAULTS

    spec = JobSpec.from_dict({"prompt": "a red cube", "kind": "texture"})
    assert spec.steps == TEXTURE_DEFAULTS["steps"] < JobSpec(prompt="x").steps
    assert spec.timestep_knots == TEXTURE_DEFAULTS["timestep_knots"] and spec.uv_mode == "keep"
    assert JobSpec.from_dict(spec.to_json_dict()) == spec
    chosen = JobSpec.from_dict({"prompt": "a red cube", "kind": "texture", "steps": 7, "uv_mode": "unwrap"})
    assert (chosen.steps, chosen.uv_mode) == (7, "unwrap")
