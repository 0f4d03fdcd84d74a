"""MVDream: the camera convention (against its definition and against Blender), the groups of 4 views,
loading both released weight layouts offline, the cross-view attention, the prior's contract, and
CFD jobs with MVDream (and MVDream chained into Stable Diffusion) through the generator and a server.

The models are tiny random ones built here (server.testing.tiny.build_tiny_mvdream): they check the
plumbing and every invariant, never image quality, which needs the real weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from scipy import stats

from bench.prior import sd21_unet_config
from server.job.errors import MissingWeightsError
from server.job.events import Events
from server.job.spec import JobSpec
from server.priors.mvdream import (
    DEFAULT_SOURCE,
    ORIGINAL_FILE,
    ORIGINAL_REPO,
    MultiViewSelfAttention,
    MVDreamPrior,
    diffusers_unet_config,
    infer_ldm_config,
    is_mvdream,
    load_multiview_unet,
    read_unet_state,
)
from server.render.cameras import look_at
from server.render.mvdream_cameras import MultiViewRig, camera_embedding, mvdream_orbit_c2w
from server.testing.tiny import (
    LATENT_SIZE,
    build_tiny_mvdream,
    ldm_unet_state,
    tiny_multiview_config,
    tiny_multiview_unet,
)

REPO = Path(__file__).resolve().parent.parent
# MVDream's sd-v2.1-base-4view UNet configuration (MultiViewUNetModel keys), as the model was released.
MVDREAM_SD21 = {
    "_class_name": "MultiViewUNetModel",
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "transformer_depth": 1,
    "context_dim": 1024,
    "camera_dim": 16,
    "use_checkpoint": False,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(diffusers-layout folder, original-layout checkpoint) of one tiny random MVDream."""
    return build_tiny_mvdream(tmp_path_factory.mktemp("tiny_mvdream"))


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE, an empty hub cache, and no network at all: any connection attempt fails."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return cache


@pytest.fixture(scope="module")
def mv(tiny) -> MVDreamPrior:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return MVDreamPrior(tiny[0], "cpu", torch.float32)


def group_cameras(groups: int, elevation: float = 15.0, radius: float = 2.0) -> torch.Tensor:
    """MVDream's default views (azimuths 0/90/180/270 at one elevation), `groups` times: [4G, 4, 4]."""
    views = [
        mvdream_orbit_c2w(elevation, a + 17.0 * g, radius) for g in range(groups) for a in (0, 90, 180, 270)
    ]
    return torch.from_numpy(np.stack(views)).float()


def latents(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))


# --- cameras -----------------------------------------------------------------------------------------


def mvdream_definition(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """MVDream's camera input as its `get_camera` defines it, written out independently of the module:
    OpenGL look-at in a Y-up world, the Y/Z swap to Z-up, unit translation, flattened row-major."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    position = np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    swap = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return (swap @ c2w).reshape(16)


def test_the_camera_input_follows_mvdreams_definition():
    rng = np.random.default_rng(0)
    angles = [(15.0, a) for a in (0.0, 90.0, 180.0, 270.0)] + [
        (float(e), float(a))
        for e, a in zip(rng.uniform(-60, 80, 20), rng.uniform(-360, 360, 20), strict=True)
    ]
    for elevation, azimuth in angles:
        radius = float(rng.uniform(0.5, 8.0))  # distance is not conditioned: any radius, same input
        ours = camera_embedding(torch.from_numpy(mvdream_orbit_c2w(elevation, azimuth, radius))[None])
        np.testing.assert_allclose(ours[0].numpy(), mvdream_definition(elevation, azimuth), atol=1e-12)
    # Azimuth 0 is the object's front: a camera on -Y looking at +Y, Blender's Front view.
    front = camera_embedding(torch.from_numpy(mvdream_orbit_c2w(0.0, 0.0, 3.0))[None])[0]
    np.testing.assert_allclose(front.numpy(), [1, 0, 0, 0, 0, 0, -1, -1, 0, 1, 0, 0, 0, 0, 0, 1], atol=1e-12)


BLENDER_CAMERAS = """
import json, math, sys
import bpy
scene = bpy.context.scene
target = bpy.data.objects.new("target", None)
scene.collection.objects.link(target)
out = []
for e, a, r in json.loads(sys.argv[1]):
    e, a = math.radians(e), math.radians(a)
    location = (r * math.cos(e) * math.sin(a), -r * math.cos(e) * math.cos(a), r * math.sin(e))
    by_euler = bpy.data.objects.new("euler", bpy.data.cameras.new("euler"))
    by_euler.location, by_euler.rotation_euler = location, (math.pi / 2 - e, 0.0, a)
    tracking = bpy.data.objects.new("track", bpy.data.cameras.new("track"))
    tracking.location = location
    constraint = tracking.constraints.new("TRACK_TO")
    constraint.target, constraint.track_axis, constraint.up_axis = target, "TRACK_NEGATIVE_Z", "UP_Y"
    for obj in (by_euler, tracking):
        scene.collection.objects.link(obj)
    bpy.context.view_layer.update()
    out.append([[list(row) for row in obj.matrix_world] for obj in (by_euler, tracking)])
print("MATRICES", json.dumps(out))
"""


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("bpy") is None, reason="bpy (Blender as a module) is not installed"
)
def test_the_camera_input_matches_blenders_camera_matrices(tmp_path: Path):
    """A Blender camera placed at MVDream's (elevation, azimuth) -- rotated by hand (X by 90 - e, Z by
    a) or aimed with a Track To constraint -- has exactly the matrix MVDream is conditioned on."""
    angles = [(0.0, 0.0, 1.0), (15.0, 90.0, 2.0), (30.0, 200.0, 3.5), (-20.0, -45.0, 1.5), (70.0, 300.0, 2.5)]
    script = tmp_path / "cameras.py"
    script.write_text(BLENDER_CAMERAS)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(angles)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    line = next(x for x in result.stdout.splitlines() if x.startswith("MATRICES "))
    for (elevation, azimuth, radius), matrices in zip(angles, json.loads(line[9:]), strict=True):
        ours = mvdream_orbit_c2w(elevation, azimuth, radius)
        for blender in matrices:
            np.testing.assert_allclose(np.array(blender), ours, atol=1e-5)
            np.testing.assert_allclose(
                camera_embedding(torch.tensor([blender], dtype=torch.float64))[0].numpy(),
                mvdream_definition(elevation, azimuth),
                atol=1e-5,
            )


def test_groups_are_4_views_90_degrees_apart_sampled_as_the_reference():
    rig = MultiViewRig()
    groups = 3000
    angles = rig.sample_angles(np.random.default_rng(1), groups).reshape(groups, 4, 4)
    elevation, azimuth, radius, fovy = (angles[..., i] for i in range(4))
    for shared in (elevation, radius, fovy):
        assert np.all(shared == shared[:, :1])
    steps = (np.diff(azimuth, axis=1) + 360.0) % 360.0
    np.testing.assert_allclose(steps, 90.0, atol=1e-9)
    assert np.all((azimuth >= -180.0) & (azimuth < 180.0))
    relative = radius[:, 0] * np.tan(np.radians(fovy[:, 0]) / 2.0)
    assert radius.min() > math.sqrt(3.0) * 0.8  # outside the object's box whatever the draw
    # Each per-group quantity follows the reference's distribution (Kolmogorov-Smirnov, fixed seed).
    assert stats.kstest(azimuth[:, 0], stats.uniform(-180, 360).cdf).pvalue > 1e-3
    assert stats.kstest(fovy[:, 0], stats.uniform(15, 45).cdf).pvalue > 1e-3
    assert stats.kstest(relative, stats.uniform(0.8, 0.2).cdf).pvalue > 1e-3
    lo, hi = 0.0, math.radians(30.0)

    def elevation_cdf(x):  # half uniform in degrees, half uniform on the sphere's band
        e = np.radians(x)
        return 0.5 * (e - lo) / (hi - lo) + 0.5 * (np.sin(e) - np.sin(lo)) / (np.sin(hi) - np.sin(lo))

    assert stats.kstest(elevation[:, 0], elevation_cdf).pvalue > 1e-3
    cameras = rig.sample(np.random.default_rng(2), 2)
    assert len(cameras) == 8
    for camera in cameras:  # every view looks at the object's centre
        np.testing.assert_allclose(camera.c2w, look_at(camera.position), atol=1e-12)


# --- loading -----------------------------------------------------------------------------------------


def test_both_weight_layouts_load_offline_into_the_same_unet(tiny, offline):
    folder, checkpoint = tiny
    reference = tiny_multiview_unet(0).state_dict()
    diffusers_layout = MVDreamPrior(folder, "cpu", torch.float32)
    original = MVDreamPrior(checkpoint, "cpu", torch.float32, sd_source=folder)
    in_a_folder = MVDreamPrior(checkpoint.parent, "cpu", torch.float32, sd_source=folder)
    for prior in (diffusers_layout, original, in_a_folder):
        state = prior.unet.state_dict()
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
        assert prior.prediction_type == "epsilon" and not prior.view_dependent and prior.views_per_group == 4
        assert isinstance(prior.text_encoder, torch.nn.Module) and prior.vae is not None
    assert (diffusers_layout.latent_size, diffusers_layout.pixel_size) == (LATENT_SIZE, 8 * LATENT_SIZE)
    # A bare checkpoint carries no sizes: MVDream's 256 px renders and 32x32 latents are assumed.
    assert (original.latent_size, original.pixel_size) == (32, 256)
    rgb = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    assert original.encode_images(rgb).shape == (4, 4, 32, 32)
    assert all(is_mvdream(str(p)) for p in (folder, checkpoint, checkpoint.parent))


def test_hub_ids_load_from_the_cache_offline(tiny, offline):
    """The diffusers-layout repository and the original checkpoint repository, both from the cache."""
    folder, checkpoint = tiny
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, fill in (("tiny-org/tiny-mv", folder), (ORIGINAL_REPO, None)):
        snapshot = offline / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        if fill is None:
            snapshot.mkdir(parents=True)
            shutil.copy(checkpoint, snapshot / ORIGINAL_FILE)
        else:
            shutil.copytree(fill, snapshot)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text(commit)
    assert is_mvdream("tiny-org/tiny-mv") and is_mvdream(ORIGINAL_REPO) and is_mvdream("mvdream")
    assert not is_mvdream("stabilityai/stable-diffusion-2-1-base") and not is_mvdream("shapes")
    from_hub = MVDreamPrior("tiny-org/tiny-mv", "cpu", torch.float32)
    original = MVDreamPrior(ORIGINAL_REPO, "cpu", torch.float32, sd_source="tiny-org/tiny-mv")
    assert from_hub.folder == offline / "models--tiny-org--tiny-mv" / "snapshots" / commit
    assert original.weights == offline / "models--MVDream--MVDream" / "snapshots" / commit / ORIGINAL_FILE
    torch.testing.assert_close(from_hub.unet.state_dict(), original.unet.state_dict(), rtol=0, atol=0)


def test_missing_weights_name_the_model_and_how_to_get_them(tiny, offline, tmp_path):
    folder, checkpoint = tiny
    with pytest.raises(MissingWeightsError) as info:
        MVDreamPrior("mvdream", "cpu", torch.float32)
    assert info.value.model == DEFAULT_SOURCE and "HF_HUB_OFFLINE" in str(info.value)
    assert f"hf download {DEFAULT_SOURCE}" in info.value.fix and ORIGINAL_FILE in info.value.fix
    missing = tmp_path / "nowhere" / ORIGINAL_FILE
    assert is_mvdream(str(missing))  # so load_prior gives MVDream's error, not Stable Diffusion's
    with pytest.raises(MissingWeightsError, match="no such file or folder"):
        MVDreamPrior(missing, "cpu", torch.float32)
    with pytest.raises(MissingWeightsError, match="holds neither"):
        MVDreamPrior(tmp_path, "cpu", torch.float32)
    with pytest.raises(
        MissingWeightsError
    ) as info:  # the checkpoint alone lacks SD 2.1's text encoder and VAE
        MVDreamPrior(checkpoint, "cpu", torch.float32)
    assert info.value.model == "stabilityai/stable-diffusion-2-1-base" and "hf download" in info.value.fix
    plain_sd = tmp_path / "sd"
    shutil.copytree(folder, plain_sd)
    (plain_sd / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    assert not is_mvdream(str(plain_sd))
    with pytest.raises(MissingWeightsError, match="not MVDream"):
        MVDreamPrior(plain_sd, "cpu", torch.float32)
    not_mvdream = tmp_path / "other.safetensors"
    shutil.copy(plain_sd / "vae" / "diffusion_pytorch_model.safetensors", not_mvdream)
    with pytest.raises(MissingWeightsError, match="not an MVDream UNet checkpoint"):
        read_unet_state(not_mvdream)


def test_the_released_configuration_is_stable_diffusion_2_1_plus_the_camera_mlp():
    """On the meta device (no memory): MVDream's UNet has every SD 2.1-base parameter, same name and
    shape, plus exactly the camera MLP 16 -> 1280 -> 1280; its LDM state has SD's 686 keys + 4, and
    the configuration read back from those shapes is the released one."""
    with torch.device("meta"):
        mvdream = UNet2DConditionModel(**diffusers_unet_config(MVDREAM_SD21))
        sd21 = UNet2DConditionModel(**sd21_unet_config())
    ours = {k: tuple(v.shape) for k, v in mvdream.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in sd21.state_dict().items()}
    assert {k: ours[k] for k in theirs} == theirs
    assert {k: v for k, v in ours.items() if k not in theirs} == {
        "class_embedding.linear_1.weight": (1280, 16),
        "class_embedding.linear_1.bias": (1280,),
        "class_embedding.linear_2.weight": (1280, 1280),
        "class_embedding.linear_2.bias": (1280,),
    }
    assert sum(p.numel() for p in sd21.parameters()) == 865_910_724
    state = ldm_unet_state(mvdream)
    assert len(state) == 686 + 4 and state["camera_embed.0.weight"].shape == (1280, 16)
    inferred = infer_ldm_config(state)
    for key in (
        "model_channels",
        "num_res_blocks",
        "channel_mult",
        "context_dim",
        "camera_dim",
        "transformer_depth",
    ):
        assert inferred[key] == MVDREAM_SD21[key], key
    assert sorted(inferred["attention_resolutions"]) == sorted(MVDREAM_SD21["attention_resolutions"])
    assert inferred["use_linear_in_transformer"] and inferred["image_size"] == 32
    load_multiview_unet(state, MVDREAM_SD21)  # strict: every tensor placed, every parameter filled


def test_the_configuration_translation_honours_heads_and_attention_levels():
    config = diffusers_unet_config({**MVDREAM_SD21, "num_head_channels": 32, "attention_resolutions": [2, 4]})
    assert config["attention_head_dim"] == (10, 20, 40, 40)
    assert config["down_block_types"] == (
        "DownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    assert config["up_block_types"] == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    legacy = diffusers_unet_config({**MVDREAM_SD21, "num_head_channels": -1, "num_heads": 8})
    assert legacy["attention_head_dim"] == (8, 8, 8, 8)
    tiny_state = ldm_unet_state(tiny_multiview_unet(0))
    with pytest.raises(ValueError, match="does not match"):
        load_multiview_unet(tiny_state, {**tiny_multiview_config(), "num_res_blocks": 2})


# --- cross-view attention ----------------------------------------------------------------------------


def test_the_processor_is_plain_attention_over_the_concatenated_views_of_each_group():
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=2, dim_head=32)
    x = torch.randn(8, 5, 64)  # 2 groups x 4 views, 5 tokens each
    out = MultiViewSelfAttention(4)(attn, x)
    for g in range(2):
        folded = x[4 * g : 4 * g + 4].reshape(1, 20, 64)
        expected = AttnProcessor()(attn, folded).reshape(4, 5, 64)  # the classic (non-SDPA) attention
        torch.testing.assert_close(out[4 * g : 4 * g + 4], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="whole groups"):
        MultiViewSelfAttention(4)(attn, x[:6])


def test_views_attend_across_their_group_and_never_across_objects(mv):
    emb = mv.encode_prompt("a red cube")
    c2w = group_cameras(2)
    x = latents(8)
    base, _ = mv.predict_eps(x, 500, emb.cond, emb.uncond, c2w=c2w)
    nudged = x.clone()
    nudged[2] += 0.5 * torch.randn(4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(9))
    moved, _ = mv.predict_eps(nudged, 500, emb.cond, emb.uncond, c2w=c2w)
    change = (moved - base).abs().flatten(1).amax(dim=1)
    assert change[[0, 1, 3]].min() > 1e-3, change  # the other views of object 0 see view 2
    assert change[4:].max() < 1e-5, change  # object 1 never does
    alone, _ = mv.predict_eps(x[4:], 500, emb.cond, emb.uncond, c2w=c2w[4:])
    torch.testing.assert_close(alone, base[4:], atol=1e-5, rtol=1e-5)

    # The same weights with per-view attention: views are independent, so the fold is what couples them.
    mv.unet.set_attn_processor(AttnProcessor2_0())
    context = emb.cond.expand(8, -1, -1)
    camera = camera_embedding(c2w)
    plain = mv.unet(x, torch.full((8,), 500), encoder_hidden_states=context, class_labels=camera).sample
    plain_moved = mv.unet(
        nudged, torch.full((8,), 500), encoder_hidden_states=context, class_labels=camera
    ).sample
    assert (plain_moved - plain)[[0, 1, 3]].abs().max() < 1e-5
    assert (plain - base).abs().max() > 1e-2  # cross-view attention changes the prediction


def test_the_multiview_processor_is_reinstalled_whatever_swapped_it(mv):
    emb = mv.encode_prompt("a red cube")
    c2w, x = group_cameras(1), latents(4, seed=3)
    before, _ = mv.predict_eps(x, 400, emb.cond, emb.uncond, c2w=c2w)
    mv.unet.set_attn_processor(AttnProcessor2_0())
    mv.unet.set_attention_slice("max")
    after, _ = mv.predict_eps(x, 400, emb.cond, emb.uncond, c2w=c2w)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)  # attn2 is now sliced: round-off only
    processors = mv.unet.attn_processors
    self_attention = [k for k in processors if ".attn1." in k]
    assert len(self_attention) == 7  # 2 down + 1 mid + 4 up transformer blocks in the tiny UNet
    assert all(processors[k] is mv.multiview_attention for k in self_attention)
    assert not any(isinstance(processors[k], MultiViewSelfAttention) for k in processors if ".attn2." in k)


# --- the prior's contract ----------------------------------------------------------------------------


def test_predict_eps_is_one_call_on_the_cfg_batch_with_each_views_camera(mv):
    emb = mv.encode_prompt("a red cube", "blurry")
    c2w, x = group_cameras(2), latents(8, seed=1)
    calls = []
    hook = mv.unet.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    try:
        eps_cond, eps_uncond = mv.predict_eps(
            x, torch.tensor([700] * 4 + [300] * 4), emb.cond, emb.uncond, c2w=c2w
        )
    finally:
        hook.remove()
    ((args, kwargs),) = calls
    assert args[0].shape[0] == 16 and args[1].tolist() == ([700] * 4 + [300] * 4) * 2
    torch.testing.assert_close(kwargs["class_labels"], camera_embedding(c2w).repeat(2, 1))
    assert eps_cond.dtype == eps_uncond.dtype == torch.float32 and eps_cond.shape == x.shape
    assert (eps_cond - eps_uncond).abs().max() > 1e-4  # the prompt reaches the network

    turned, _ = mv.predict_eps(x, 500, emb.cond, emb.uncond, c2w=c2w.roll(1, dims=0))
    same, _ = mv.predict_eps(x, 500, emb.cond, emb.uncond, c2w=c2w)
    far = c2w.clone()
    far[:, :3, 3] *= 3.0
    farther, _ = mv.predict_eps(x, 500, emb.cond, emb.uncond, c2w=far)
    assert (turned - same).abs().max() > 1e-3  # the camera reaches the network...
    torch.testing.assert_close(farther, same, atol=1e-5, rtol=1e-5)  # ...but not its distance

    with pytest.raises(ValueError, match="camera"):
        mv.predict_eps(x, 500, emb.cond, emb.uncond)
    with pytest.raises(ValueError, match="whole groups"):
        mv.predict_eps(x[:6], 500, emb.cond, emb.uncond, c2w=c2w[:6])
    with pytest.raises(ValueError, match="share one timestep"):
        mv.predict_eps(x, torch.arange(8) * 100, emb.cond, emb.uncond, c2w=c2w)


def test_the_four_views_of_a_group_get_one_surface_attached_noise():
    """CFD's provider is stateless per view: a view's noise is the same alone or inside its group of 4,
    so one query per step gives every view of every group the noise of the one surface."""
    from server.geometry.dmtet import DMTet
    from server.geometry.tetgrid import kuhn_grid
    from server.noise.base import NoiseQuery
    from server.noise.consistent import ConsistentNoise
    from server.render.mesh import render_mesh

    geometry = DMTet(kuhn_grid(12, radius=1.0), device="cpu")
    geometry.init_sphere(0.5)
    mesh = geometry()
    cams = MultiViewRig().sample(np.random.default_rng(0), 1)
    c2w = torch.from_numpy(np.stack([c.c2w for c in cams])).float()
    fovy = torch.tensor([c.fovy for c in cams]).float()
    with torch.no_grad():
        view = render_mesh(mesh.vertices, mesh.faces, c2w, fovy, 64)

    def query(i: slice) -> NoiseQuery:
        return NoiseQuery((8, 8), 4, view.c2w[i], view.fovy[i], view.points[i], view.opacity[i])

    provider = ConsistentNoise(0, "cpu")
    together = provider.sample(query(slice(0, 4)))
    for i in range(4):
        torch.testing.assert_close(provider.sample(query(slice(i, i + 1)))[0], together[i], rtol=0, atol=0)
    assert view.opacity.flatten(1).amax(dim=1).min() == 1.0  # every view sees the object


# --- jobs --------------------------------------------------------------------------------------------

# The shapes profile: the job's own render size and chain point (the mvdream profiles render 64-1024 px,
# tests/test_profiles.py runs them).
QUICK = {
    "steps": 4,
    "grid_resolution": 12,
    "texture_size": 128,
    "render_size": 32,
    "preview_max_fps": 30,
    "profile": "shapes",
}


class Recorder(Events):
    def progress(self, *args, **kwargs): ...

    def preview_due(self):
        return False

    def preview_mesh(self, *args, **kwargs): ...

    def texture(self, *args, **kwargs): ...


def test_a_cfd_job_gives_mvdream_groups_of_4_views_then_chains_into_sd(
    tiny, tiny_sd_dir, tmp_path, monkeypatch
):
    """MVDream steps: whole groups of 4 views with their cameras and one timestep, their noise from
    one query of the CFD provider; after chain_at, Stable Diffusion steps with single views."""
    from server.noise.consistent import ConsistentNoise
    from server.pipeline.run import run_job
    from server.priors import DiffusersPrior

    calls, queries = [], []
    for cls in (MVDreamPrior, DiffusersPrior):
        original = cls.predict_eps

        def recording(self, x_t, t, cond, uncond, c2w=None, _original=original):
            calls.append((type(self).__name__, x_t.shape[0], None if c2w is None else c2w.clone(), t.clone()))
            return _original(self, x_t, t, cond, uncond, c2w=c2w)

        monkeypatch.setattr(cls, "predict_eps", recording)
    sample = ConsistentNoise.sample
    monkeypatch.setattr(
        ConsistentNoise, "sample", lambda self, q: queries.append(q.c2w.clone()) or sample(self, q)
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = {**QUICK, "prior": str(tiny[0]), "chain_prior": str(tiny_sd_dir), "chain_at": 0.5}
    spec = JobSpec.from_dict(
        {"prompt": "a red cube", "output_dir": str(tmp_path), "method": "cfd", **settings}
    )
    result = run_job(spec, None, Recorder(), lambda: False)

    assert [(name, batch) for name, batch, _, _ in calls] == [("MVDreamPrior", 4)] * 2 + [
        ("DiffusersPrior", 1)
    ] * 2
    for (name, _, c2w, t), queried in zip(calls, queries, strict=True):
        assert len(set(t.tolist())) == 1
        torch.testing.assert_close(c2w, queried)  # the cameras the noise was drawn for reach the prior
        if name == "MVDreamPrior":
            azimuth = torch.rad2deg(torch.atan2(c2w[:, 1, 3], c2w[:, 0, 3]))
            steps = (azimuth.diff() + 360.0) % 360.0
            torch.testing.assert_close(steps, torch.full((3,), 90.0), atol=1e-3, rtol=0)
    assert result.glb.exists()


def test_mvdream_jobs_run_through_a_server_and_missing_weights_say_how_to_get_them(tiny, tmp_path):
    from server.wire.client import ServerProcess

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "empty_cache"),
    }
    server = ServerProcess(sys.executable, ["--output-root", str(tmp_path)], cwd=REPO, env=env)
    try:
        server.hello(timeout=120)
        for job_id, prior in (("tiny", str(tiny[0])), ("missing", "mvdream")):
            server.generate(job_id, {"prompt": "a red cube", "seed": 1, "prior": prior, **QUICK})
            deadline, messages = time.monotonic() + 120, []
            while not messages or messages[-1].type not in {"done", "error", "cancelled"}:
                message = server.get(max(0.1, deadline - time.monotonic()))
                assert message is not None, "no final message"
                messages.append(message)
            if job_id == "tiny":
                assert messages[-1].type == "done", messages[-1].header
                assert (
                    "preview_mesh" in {m.type for m in messages} and Path(messages[-1].header["glb"]).exists()
                )
            else:
                error = messages[-1].header
                assert error["code"] == "missing_weights" and f"hf download {DEFAULT_SOURCE}" in error["fix"]
    finally:
        server.close()
