"""Pipeline profiles: each resolves to the CFD reference's numbers, jobs override single settings,
and the shapes profile keeps today's tuned loop."""

from __future__ import annotations

import pytest

from server.job.errors import JobSpecError
from server.job.profiles import (
    MVDREAM_NEGATIVE,
    PROFILES,
    SD_NEGATIVE,
    SD_TEXTURE_NEGATIVE,
    default_profile_name,
    resolve_profile,
)
from server.job.spec import JobSpec

# The reference, read from runjie-yan/ConsistentFlowDistillation at HEAD. t knots: the configs give
# t_scheduler.linear_anneal_max p at linear_anneal_steps; t = 1000 (0.98 - 0.96 p) (threestudio's
# TimestepScheduler), steps as fractions of trainer.max_steps. gamma: noise_generator.weight_decay.
SD1 = "configs/cfd/sd-stage1.yaml"
MV1 = "configs/cfd/mvdream-shading-stage1.yaml"
GEO = "configs/cfd/sd-mesh-geometry-stage2.yaml"
TEX = "configs/cfd/sd-mesh-texture-stage3.yaml"
REFERENCE = {
    # (profile, stage): {setting: value}, and the config file they come from
    ("sd", "coarse"): (
        SD1,
        {
            "reference_steps": 25_000,  # trainer.max_steps
            "guidance_scale": 70.0,  # guidance.guidance_scale
            "cfg_form": "cond",  # unified guidance without perp-neg: eps_c + s(eps_c - eps_u)
            "weighting": "lambda",  # w = sigma/alpha, hard-coded in the guidance
            "method": None,  # the job's (CFD): triplane-noise-generator, sqrt_beta 1
            # linear_anneal_max [0, 0.3, 0.6, 0.8] at [0, 2500, 12500, 25000]
            "timestep_knots": ((0.0, 980.0), (0.1, 692.0), (0.5, 404.0), (1.0, 212.0)),
            # weight_decay [5000, 0.01, 0.0001, 10000]
            "gamma": ((0.0, 0.01), (0.2, 0.01), (0.4, 1e-4), (1.0, 1e-4)),
            "render_size": ((0.0, 128), (0.2, 512)),  # width [128, 512], resolution_milestones [5000]
            "negative_prompt": SD_NEGATIVE,
            "front_back_deg": 30.0,  # front_threshold, back_threshold
            "encoding_lr": 1e-2,  # geometry.encoding
            "mlp_lr": 1e-3,  # geometry.feature_network
            "adam_eps": 1e-15,
        },
    ),
    ("sd", "geometry"): (
        GEO,
        {
            "reference_steps": 15_000,
            "representation": "dmtet",  # tetrahedra-sdf-grid
            "render": "normal",  # stage: geometry (SDS on the normal map)
            "render_size": ((0.0, 1024),),
            "method": "sds",  # no noise generator: fresh noise
            "timesteps": "dreamtime",  # dreamtime_anneal [700, 400, 100, 200]
            "guidance_scale": 50.0,
            "cfg_form": "cond",
            "weighting": "lambda",
            "negative_prompt": "",  # none configured
            "sdf_lr": 1e-2,  # optimizer.args.lr
            "deformation_lr": 1e-2,
            "adam_eps": 1e-8,
            "normal_weight": 1e4,  # lambda_normal_consistency
            "laplacian_weight": 1e4,  # lambda_laplacian_smoothness
        },
    ),
    ("sd", "texture"): (
        TEX,
        {
            "reference_steps": 20_000,
            "render": "albedo",  # no-material: sigmoid RGB, unlit
            "render_size": ((0.0, 1024),),
            "method": None,  # CFD
            "timestep_knots": ((0.0, 404.0), (1.0, 260.0)),  # linear_anneal_max [0.6, 0.75]
            "gamma": ((0.0, 1e-4), (1.0, 1e-4)),
            "guidance_scale": 50.0,
            "cfg_form": "cond",
            "weighting": "lambda",
            "negative_prompt": SD_TEXTURE_NEGATIVE,
            "front_back_deg": 30.0,
            "encoding_lr": 1e-2,
            "mlp_lr": 1e-3,
            "sdf_lr": 1e-4,  # geometry.sdf: not frozen
            "deformation_lr": 1e-4,
            "adam_eps": 1e-15,
            "normal_weight": 0.0,
            "laplacian_weight": 0.0,
            "freeze_geometry_at": None,
        },
    ),
    ("mvdream+sd", "coarse"): (
        MV1,
        {
            "reference_steps": 10_000,
            "prior": 0,
            "guidance_scale": 50.0,
            "cfg_form": "uncond",  # eps_u + s (eps_c - eps_u)
            "weighting": "one",  # no w(t) in the MVDream guidance
            "timestep_knots": ((0.0, 980.0), (0.5, 596.0), (1.0, 404.0)),  # [0, 0.4, 0.6] at [0, 5k, 10k]
            "gamma": ((0.0, 1e-4), (1.0, 1e-4)),
            "render_size": ((0.0, 64), (0.5, 256)),  # width [64, 256], resolution_milestones [5000]
            "negative_prompt": MVDREAM_NEGATIVE,
            "encoding_lr": 1e-2,
            "mlp_lr": 1e-3,
        },
    ),
    ("mvdream+sd", "geometry"): (GEO, {"prior": 1, "method": "sds", "guidance_scale": 50.0}),
    ("mvdream+sd", "texture"): (TEX, {"prior": 1, "guidance_scale": 50.0, "sdf_lr": 1e-4}),
}


@pytest.mark.parametrize(("profile", "stage"), list(REFERENCE))
def test_each_profile_stage_has_the_reference_configs_numbers(profile: str, stage: str):
    source, expected = REFERENCE[(profile, stage)]
    settings = PROFILES[profile].stage(stage)
    assert settings.source == source
    assert {name: getattr(settings, name) for name in expected} == expected


def test_stage_shares_follow_the_reference_step_counts_and_the_grid_its_tet_budget():
    sd = PROFILES["sd"]
    # 25k + 15k + 20k steps (sd-stage1, geometry, texture): the job's steps are shared the same way.
    assert [s.until for s in sd.stages] == pytest.approx([25 / 60, 40 / 60, 1.0])
    mv = PROFILES["mvdream+sd"]
    assert [s.until for s in mv.stages] == pytest.approx([10 / 45, 25 / 45, 1.0])
    # isosurface_resolution 128 tets: a Kuhn grid of 64 cells per side.
    assert sd.grid_resolution == mv.grid_resolution == PROFILES["mvdream"].grid_resolution == 64
    assert mv.chain_prior == "stabilityai/stable-diffusion-2-1-base"


def test_the_shapes_profile_is_todays_tuned_loop():
    shape, refine = PROFILES["shapes"].stages
    assert (shape.representation, shape.until, shape.sdf_lr, shape.encoding_lr) == ("volume", 0.6, 1e-2, 1e-2)
    assert (refine.representation, refine.freeze_geometry_at) == ("dmtet", 0.8)
    assert (refine.sdf_lr, refine.deformation_lr, refine.encoding_lr, refine.mlp_lr) == (
        5e-3,
        5e-3,
        1e-2,
        1e-2,
    )
    assert (refine.normal_weight, refine.laplacian_weight, refine.sign_weight) == (
        1000.0,
        1000.0,
        (0.2, 0.01),
    )
    # Every other setting is the job's own, as before profiles existed.
    for stage in (shape, refine):
        assert stage.guidance_scale is stage.method is stage.cfg_form is stage.render_size is None
        assert (stage.timesteps, stage.weighting, stage.front_back_deg) == ("job", "one", 45.0)
    assert PROFILES["shapes"].grid_resolution is None


def test_a_job_runs_its_priors_profile_unless_it_names_one():
    assert default_profile_name("shapes") == "shapes"
    assert default_profile_name("stabilityai/stable-diffusion-2-1-base") == "sd"
    assert default_profile_name("/models/my-sd") == "sd"
    assert default_profile_name("mvdream") == "mvdream"
    assert default_profile_name("mvdream", "stabilityai/stable-diffusion-2-1-base") == "mvdream+sd"
    spec = JobSpec.from_dict({"prompt": "a cat", "prior": "mvdream", "profile": "mvdream+sd"})
    assert spec.profile_name == "mvdream+sd"
    assert JobSpec.from_dict({"prompt": "a cat", "prior": "some/sd"}).resolved_profile().name == "sd"


def test_a_job_overrides_single_settings_and_the_spec_round_trips():
    overrides = {"texture.guidance_scale": 30, "grid_resolution": 48, "geometry.render_size": [[0, 512]]}
    spec = JobSpec.from_dict({"prompt": "a cat", "prior": "x/sd", "profile_overrides": overrides})
    profile = spec.resolved_profile()
    assert profile.stage("texture").guidance_scale == 30.0 and profile.grid_resolution == 48
    assert profile.stage("geometry").render_size == ((0.0, 512),)
    # Nothing else moved.
    assert profile.stage("coarse") == PROFILES["sd"].stage("coarse")
    assert profile.stage("texture").timestep_knots == PROFILES["sd"].stage("texture").timestep_knots
    assert JobSpec.from_dict(spec.to_dict()) == spec
    record = profile.to_dict()
    assert record["stages"][2]["guidance_scale"] == 30.0 and record["stages"][0]["source"] == SD1


@pytest.mark.parametrize(
    ("job", "field", "words"),
    [
        ({"profile": "nerf"}, "profile", "shapes, sd, mvdream, mvdream+sd"),
        ({"profile_overrides": {"texture.guidance": 3}}, "profile_overrides.texture.guidance", "known:"),
        (
            {"profile_overrides": {"texture.guidance_scale": 900}},
            "profile_overrides.texture.guidance_scale",
            "200",
        ),
        ({"profile_overrides": {"coarse.until": 0.9}}, "profile_overrides", "stage ends must rise"),
        (
            {"profile_overrides": {"texture.render_size": [[0, 100]]}},
            "profile_overrides.texture.render_size",
            "32",
        ),
        ({"profile_overrides": {"geometry.method": "vsd"}}, "profile_overrides.geometry.method", "sds"),
        ({"profile_overrides": [1]}, "profile_overrides", "object"),
    ],
)
def test_a_bad_profile_or_override_is_refused_naming_it(job: dict, field: str, words: str):
    with pytest.raises(JobSpecError) as refused:
        JobSpec.from_dict({"prompt": "a cat", "prior": "x/sd", **job})
    assert refused.value.field == field and words in str(refused.value)


def test_resolving_leaves_the_shipped_profiles_alone():
    before = PROFILES["sd"]
    resolve_profile("sd", {"coarse.guidance_scale": 10})
    assert PROFILES["sd"] is before and before.stage("coarse").guidance_scale == 70.0


# --------------------------------------------------------------------------- the stages as they run

SMALL_SD = {
    "steps": 6,
    "grid_resolution": 16,
    "texture_size": 128,
    "profile_overrides": {
        "grid_resolution": 16,
        "coarse.render_size": [[0, 32], [0.5, 64]],
        "geometry.render_size": [[0, 64]],
        "texture.render_size": [[0, 64]],
    },
}


class Recorder:
    """Spies on what the prior is shown (it still encodes): the renders of each step."""

    def __init__(self, prior):
        self.images: list = []
        self._encode = prior.encode_images
        prior.encode_images = self

    def __call__(self, rgb):
        self.images.append(rgb.detach().clone())
        return self._encode(rgb)


def test_the_sd_profile_runs_each_stage_at_its_settings_and_hands_over(tiny_sd_dir):
    import torch

    from server.noise.base import FreshNoise
    from server.noise.consistent import ConsistentNoise
    from server.pipeline.setup import start_job
    from server.pipeline.step import optimisation_step

    spec = JobSpec.from_dict({"prompt": "a red cube", "prior": str(tiny_sd_dir), **SMALL_SD})
    state = start_job(spec, None)
    assert spec.profile_name == "sd" and [(r.start, r.end) for r in state.runs] == [(0, 2), (2, 4), (4, 6)]
    assert [s.guidance_scale for s in state.stages] == [70.0, 50.0, 50.0]
    noises = [run.noise for run in state.runs]
    assert isinstance(noises[0], ConsistentNoise) and isinstance(noises[1], FreshNoise)
    assert isinstance(noises[2], ConsistentNoise) and noises[2] is not noises[0]
    # Each stage's own negative prompt is the uncond branch: the geometry stage's is empty.
    assert not torch.equal(state.stages[1].embeddings.uncond, state.stages[2].embeddings.uncond)
    recorder = Recorder(state.stages[0].prior)

    def snapshot():
        return (
            state.geometry.sdf.detach().clone(),
            [p.detach().clone() for p in state.texture.parameters()],
        )

    ts, sizes, snapshots = [], [], [snapshot()]
    for step in range(spec.steps):
        ts.append(optimisation_step(state, step).t)
        sizes.append(recorder.images[-1].shape[1])
        snapshots.append(snapshot())
        if step == 1:  # the volume's isosurface became the DMTet's start
            mesh = state.geometry()
            assert len(mesh.faces) > 0 and not torch.equal(snapshots[0][0], state.geometry.sdf)
    # coarse 980 -> 212 (sd-stage1 knots), geometry DreamTime from the top, texture 404 -> 260
    assert ts[:2] == [980, 212] and ts[2] == 980 and ts[3] < 400 and ts[4:] == [404, 260]
    assert sizes == [32, 64, 64, 64, 64, 64]
    # The geometry stage shows the prior normal maps: (n + 1) / 2 on the object, so its colours are
    # the surface's, not the texture's; the texture does not move there and the SDF does.
    normal_map = recorder.images[2][0]
    assert normal_map.amax() > 0.8 and normal_map[0, 0].abs().max() == 0.0  # on black, as the reference
    for before, after in zip(snapshots[3][1], snapshots[4][1], strict=True):
        assert torch.equal(before, after)
    assert not torch.equal(snapshots[3][0], snapshots[4][0])
    # The texture stage moves the colour field, and the geometry only at lr 1e-4.
    assert any(not torch.equal(b, a) for b, a in zip(snapshots[5][1], snapshots[6][1], strict=True))
    moved = (snapshots[6][0] - snapshots[4][0]).abs().max().item()
    assert 0.0 < moved < 5e-4
    groups = state.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-4, 1e-4, 1e-2, 1e-3] and {g["eps"] for g in groups} == {1e-15}


def test_job_json_records_the_resolved_stages(tmp_path, tiny_sd_dir):
    import json

    from server.pipeline.run import run_job

    labels = []

    class Quiet:
        def progress(self, step, total, stage, *args):
            labels.append(stage)

        def __getattr__(self, name):
            return lambda *args, **kwargs: False

    overrides = {**SMALL_SD["profile_overrides"], "texture.guidance_scale": 20}
    job = {"prompt": "a red cube", "prior": str(tiny_sd_dir), **SMALL_SD, "profile_overrides": overrides}
    result = run_job(JobSpec.from_dict({**job, "output_dir": str(tmp_path)}), None, Quiet(), lambda: False)
    record = json.loads(result.job_json.read_text())
    stages = record["pipeline"]["stages"]
    assert record["pipeline"]["name"] == "sd" and [s["name"] for s in stages] == [
        "coarse",
        "geometry",
        "texture",
    ]
    assert stages[2]["guidance_scale"] == 20.0 and stages[1]["method"] == "sds" and stages[0]["source"] == SD1
    assert JobSpec.from_dict(record["job"]).profile_overrides == overrides
    assert labels == ["coarse", "coarse", "geometry", "geometry", "texture", "texture"]  # what Blender shows


@pytest.mark.parametrize("render_size", [256, 512])
def test_the_hash_grid_is_sized_to_the_renders_so_its_finest_level_sees_whole_pixels(render_size: int):
    """The CUDA colour field's code path, on whatever device runs the tests: one render's gradient
    reaches each finest-level entry from about a pixel or more, where the fixed 2048 level spread it
    over many entries that each saw a fraction of a pixel (and Adam turned those into full steps)."""
    import math

    import torch
    import trimesh

    from server.geometry.texture_field import TextureField
    from server.pipeline.setup import texture_field
    from server.render.cameras import orbit_c2w
    from server.render.mesh import render_mesh

    device = torch.device("cpu")
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float32)
    faces = torch.tensor(sphere.faces, dtype=torch.long)
    c2w = torch.from_numpy(orbit_c2w(20.0, 30.0, 2.4)).float()[None]

    def pixels_per_finest_entry(field: TextureField) -> float:
        """How many pixels train each finest-level entry they reach, on average (8 corners a pixel)."""
        view = render_mesh(
            vertices, faces, c2w, torch.tensor([math.radians(40.0)]), render_size, color_fn=field
        )
        view.rgb.sum().backward()
        touched = (field.encoding.table.grad[-1].abs().sum(-1) > 0).sum().item()
        return 8 * view.mask.sum().item() / touched

    sized = texture_field(render_size, device, "hash")
    assert abs(sized.encoding.resolutions[-1].item() - render_size) <= 1  # the levels grow geometrically
    fixed = TextureField(encoding="hash", encoding_options={"finest_resolution": 2048}, device=device)
    sized_pixels, fixed_pixels = pixels_per_finest_entry(sized), pixels_per_finest_entry(fixed)
    # Measured: 3.5 and 3.9 pixels an entry at 256 and 512 px, against 1.1 and 1.6 for the 2048 level.
    assert sized_pixels >= 3.0 and sized_pixels > 2.0 * fixed_pixels


def test_the_command_line_names_a_profile_and_overrides_settings():
    import argparse

    from server.pipeline.cli import add_arguments, spec_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [
        "--prompt",
        "a cat",
        "--prior",
        "mvdream",
        "--profile",
        "mvdream+sd",
        "--override",
        "texture.gamma=[[0,0]]",
    ]
    args = parser.parse_args([*argv, "--override", "coarse.negative_prompt=blurry"])
    profile = spec_from_args(args, seed=1).resolved_profile()
    assert profile.name == "mvdream+sd" and profile.stage("texture").gamma == ((0.0, 0.0),)
    assert profile.stage("coarse").negative_prompt == "blurry"  # not JSON: taken as text
    with pytest.raises(JobSpecError) as refused:
        spec_from_args(parser.parse_args([*argv, "--override", "grid_resolution"]), seed=1)
    assert "SETTING=VALUE" in str(refused.value)


def test_mvdream_forms_the_shape_then_sds_stages_take_over(tmp_path, tiny_sd_dir, monkeypatch):
    """The reference's default pipeline: MVDream's coarse stage on groups of 4 views (standard CFG,
    w = 1), then Stable Diffusion's geometry and texture stages on single views (threestudio's CFG,
    w = sigma/alpha). A local MVDream folder is recognised by its files, whatever it is called."""
    from server.pipeline.setup import start_job
    from server.pipeline.step import optimisation_step
    from server.priors import MVDreamPrior
    from server.testing.tiny import build_tiny_mvdream

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = build_tiny_mvdream(tmp_path / "multiview")
    overrides = {
        "grid_resolution": 12,
        "coarse.render_size": [[0, 32]],
        "geometry.render_size": [[0, 64]],
        "texture.render_size": [[0, 64]],
        "coarse.until": 0.5,
        "geometry.until": 0.7,
    }
    job = {"prompt": "a red cube", "prior": str(folder), "chain_prior": str(tiny_sd_dir), "steps": 6}
    spec = JobSpec.from_dict({**job, "texture_size": 128, "profile_overrides": overrides})
    assert spec.profile_name == "mvdream+sd"
    state = start_job(spec, None)
    assert [(r.start, r.end) for r in state.runs] == [(0, 3), (3, 4), (4, 6)]
    assert [type(s.prior) is MVDreamPrior for s in state.stages] == [True, False, False]
    assert [s.guidance_scale for s in state.stages] == [50.0, 50.0, 50.0]
    batches = []
    for prior in {id(s.prior): s.prior for s in state.stages}.values():  # SD's two stages share one
        Recorder(prior).images = batches
    for step in range(spec.steps):
        optimisation_step(state, step)
    assert [len(images) for images in batches] == [4, 4, 4, 1, 1, 1]
    assert [tuple(images.shape[1:3]) for images in batches] == [(32, 32)] * 3 + [(64, 64)] * 3
