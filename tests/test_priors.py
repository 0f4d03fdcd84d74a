"""The priors: loading (offline, from folders and the hub cache), missing weights, the interface's
contracts (gradients through encoding, one batched CFG call, float32 outputs, prompt caching), view
suffixes, the exact empirical denoiser, and the `sample` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from PIL import Image

import server.priors as priors
from server.__main__ import main as server_main
from server.priors import (
    VIEW_SUFFIXES,
    DiffusersPrior,
    EmpiricalPrior,
    MissingWeightsError,
    PromptEmbeddings,
    load_prior,
    view_suffix_index,
)
from server.priors.base import BACK, FRONT, OVERHEAD, SIDE
from server.priors.sample import image_grid, sample_images
from server.testing.tiny import LATENT_SIZE, PIXEL_SIZE, sd_scheduler


@pytest.fixture(scope="module")
def sd(tiny_sd_dir: Path) -> DiffusersPrior:
    return load_prior(str(tiny_sd_dir), "cpu", torch.float32)


@pytest.fixture(scope="module")
def pixel(tiny_pixel_dir: Path) -> DiffusersPrior:
    return load_prior(str(tiny_pixel_dir), "cpu", torch.float32)


# --- loading ---------------------------------------------------------------------------------------


def test_tiny_pipeline_loads_offline_from_a_folder(tiny_sd_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = load_prior(str(tiny_sd_dir), "cpu", torch.float32)
    assert (prior.latent_channels, prior.latent_size, prior.pixel_size) == (4, LATENT_SIZE, 8 * LATENT_SIZE)
    assert (
        prior.view_dependent
        and not load_prior(str(tiny_sd_dir), "cpu", torch.float32, view_dependent=False).view_dependent
    )
    assert isinstance(prior.scheduler, DDIMScheduler) and prior.num_train_timesteps == 1000
    assert prior.alphas_cumprod.dtype == torch.float64 and prior.alphas_cumprod.device.type == "cpu"
    torch.testing.assert_close(prior.alphas_cumprod, sd_scheduler().alphas_cumprod.double())
    from safetensors.torch import load_file

    on_disk = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    for key, value in prior.unet.state_dict().items():
        torch.testing.assert_close(value, on_disk[key], rtol=0, atol=0)


def test_a_hub_id_loads_from_the_cache_when_offline(tiny_sd_dir, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache exactly as real Stable Diffusion weights do."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    shutil.copytree(tiny_sd_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prior = load_prior("tiny-org/tiny-sd", "cpu", torch.float32)
    assert prior.folder == (repo / "snapshots" / commit).resolve()
    assert prior.name == "tiny-org/tiny-sd" and prior.vae is not None


def test_the_tiny_folder_is_a_real_diffusers_pipeline(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True, safety_checker=None)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and pipe.tokenizer.model_max_length == 77


def test_a_missing_hub_model_names_the_model_and_the_fix(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as info:
        load_prior("nobody-here/no-such-model", "cpu", torch.float32)
    assert info.value.model == "nobody-here/no-such-model"
    assert "hf download nobody-here/no-such-model" in str(info.value) and "local folder" in str(info.value)
    assert "HF_HUB_OFFLINE" in str(info.value)


def test_an_empty_or_partial_folder_names_what_is_missing(tmp_path, tiny_sd_dir):
    with pytest.raises(MissingWeightsError) as info:
        load_prior(str(tmp_path), "cpu", torch.float32)
    assert str(tmp_path) in str(info.value) and "unet" in str(info.value) and "hf download" in str(info.value)

    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd_dir, partial)
    (partial / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="unet weights"):
        load_prior(str(partial), "cpu", torch.float32)
    with pytest.raises(MissingWeightsError, match="no such folder"):
        load_prior(str(tmp_path / "not" / "there"), "cpu", torch.float32)


def test_missing_shapes_weights_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(priors, "SHAPES_WEIGHTS", tmp_path / "weights")
    with pytest.raises(MissingWeightsError) as info:
        load_prior("shapes", "cpu", torch.float32)
    assert info.value.model == "shapes" and "python -m server.shapes.train" in info.value.fix


# --- encoding --------------------------------------------------------------------------------------


def test_encode_images_keeps_the_gradient_through_the_vae(tiny_sd_dir):
    sd64 = load_prior(str(tiny_sd_dir), "cpu", torch.float64)  # float64 so a finite difference is exact
    rgb = torch.rand(
        2, 32, 32, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True
    )
    weights = torch.randn(
        2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )

    def loss(image):
        return (sd64.encode_images(image, generator=torch.Generator().manual_seed(7)) * weights).sum()

    value = loss(rgb)
    value.backward()
    assert rgb.grad is not None and torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
    # The gradient is the true derivative: compare with a central difference along a random direction.
    direction = torch.randn(rgb.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        numeric = (loss(rgb + h * direction) - loss(rgb - h * direction)) / (2 * h)
    assert float((rgb.grad * direction).sum()) == pytest.approx(float(numeric), rel=1e-4)


def test_the_posterior_sample_follows_the_generator(sd):
    rgb = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    a = sd.encode_images(rgb, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, sd.encode_images(rgb, torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, sd.encode_images(rgb, torch.Generator().manual_seed(4)))
    assert a.shape == (1, 4, LATENT_SIZE, LATENT_SIZE) and a.dtype == torch.float32


def test_pixel_priors_encode_by_rescaling_and_decode_back(pixel):
    rgb = torch.rand(2, PIXEL_SIZE, PIXEL_SIZE, 3, requires_grad=True)
    x = pixel.encode_images(rgb)
    torch.testing.assert_close(x, rgb.detach().permute(0, 3, 1, 2) * 2 - 1)
    x.sum().backward()
    torch.testing.assert_close(rgb.grad, torch.full_like(rgb, 2.0))
    torch.testing.assert_close(pixel.decode_latents(x.detach()), rgb.detach())
    big = torch.rand(1, 4 * PIXEL_SIZE, 4 * PIXEL_SIZE, 3)  # a larger render is low-passed, not aliased
    assert pixel.encode_images(big).shape == (1, 3, PIXEL_SIZE, PIXEL_SIZE)
    flat = torch.full((1, 4 * PIXEL_SIZE, 4 * PIXEL_SIZE, 3), 0.25)
    torch.testing.assert_close(pixel.encode_images(flat), torch.full((1, 3, PIXEL_SIZE, PIXEL_SIZE), -0.5))


# --- noise prediction ------------------------------------------------------------------------------


def test_predict_eps_is_one_batched_call_with_float32_outputs(sd):
    emb = sd.encode_prompt("a red cube", view_dependent=True)
    cond = emb.for_views(torch.tensor([0.0, 10.0]), torch.tensor([0.0, 180.0]))
    x_t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 700])
    calls = []
    handle = sd.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        eps_cond, eps_uncond = sd.predict_eps(x_t, t, cond, emb.uncond)
    finally:
        handle.remove()
    assert calls == [4]
    assert eps_cond.shape == eps_uncond.shape == x_t.shape
    assert eps_cond.dtype == eps_uncond.dtype == torch.float32 and not eps_cond.requires_grad
    assert (eps_cond - eps_uncond).abs().max() > 1e-4
    with torch.no_grad():
        direct = sd.unet(x_t, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(eps_cond, direct, rtol=1e-4, atol=1e-5)
    # A scalar t and a batch-1 cond broadcast over the batch.
    same_t = sd.predict_eps(x_t, 500, emb.cond[:1], emb.uncond)[0]
    torch.testing.assert_close(
        same_t, sd.predict_eps(x_t, torch.tensor([500, 500]), emb.cond[[0, 0]], emb.uncond)[0]
    )


def test_v_prediction_models_are_converted_to_epsilon(tiny_sd_dir, tmp_path):
    folder = shutil.copytree(tiny_sd_dir, tmp_path / "v")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    prior = load_prior(str(folder), "cpu", torch.float32)
    emb = prior.encode_prompt("a blue sphere")
    x_t = torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    eps, _ = prior.predict_eps(x_t, 300, emb.cond, emb.uncond)
    with torch.no_grad():
        v = prior.unet(x_t, torch.tensor([300]), encoder_hidden_states=emb.cond).sample
    abar = float(prior.alphas_cumprod[300])
    torch.testing.assert_close(eps, abar**0.5 * v + (1 - abar) ** 0.5 * x_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("option", ["attention_slicing", "cpu_offload", "vae_slicing", "channels_last"])
def test_memory_savers_do_not_change_the_prediction(sd, tiny_sd_dir, option):
    saver = DiffusersPrior(tiny_sd_dir, "cpu", torch.float32, **{option: True})
    emb = sd.encode_prompt("a green torus")
    torch.testing.assert_close(saver.encode_prompt("a green torus").cond, emb.cond)
    x_t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(0))
    for a, b in zip(
        saver.predict_eps(x_t, 400, emb.cond, emb.uncond),
        sd.predict_eps(x_t, 400, emb.cond, emb.uncond),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    rgb = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        saver.encode_images(rgb, torch.Generator().manual_seed(5)),
        sd.encode_images(rgb, torch.Generator().manual_seed(5)),
        rtol=1e-4,
        atol=1e-5,
    )


# --- prompts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elevation", "azimuth", "expected"),
    [
        (0, 0, FRONT),
        (0, 44.9, FRONT),
        (0, -44.9, FRONT),
        (0, 45, SIDE),
        (0, -45, SIDE),
        (0, 90, SIDE),
        (0, -90, SIDE),
        (0, 135, SIDE),
        (0, 135.1, BACK),
        (0, 180, BACK),
        (0, -180, BACK),
        (0, -135.1, BACK),
        (0, 360, FRONT),
        (0, 405, SIDE),
        (60, 0, FRONT),
        (60.1, 0, OVERHEAD),
        (89, 180, OVERHEAD),
        (-30, 180, BACK),
    ],
)
def test_view_suffix_thresholds(elevation, azimuth, expected):
    assert view_suffix_index(elevation, azimuth) == expected


def test_the_front_can_face_blenders_front_view():
    assert view_suffix_index(0, -90, front_azimuth_deg=-90) == FRONT
    assert view_suffix_index(0, 90, front_azimuth_deg=-90) == BACK
    assert view_suffix_index(0, 0, front_azimuth_deg=-90) == SIDE


def test_the_reference_sd_stages_narrow_front_and_back_to_30_degrees():
    """threestudio's front_threshold / back_threshold 30 in the CFD configs: 40 degrees off the front
    (or back) is already a side view there, a front (back) view at DreamFusion's 45."""
    assert [view_suffix_index(0, a) for a in (40, 140)] == [FRONT, BACK]
    assert [view_suffix_index(0, a, front_back_deg=30) for a in (29, 40, 140, 151)] == [
        FRONT,
        SIDE,
        SIDE,
        BACK,
    ]
    emb = PromptEmbeddings(torch.arange(4.0).view(4, 1, 1), torch.zeros(1, 1, 1), list(VIEW_SUFFIXES))
    rows = emb.for_views(torch.zeros(2), torch.tensor([40.0, 151.0]), front_back_deg=30)
    assert rows.flatten().tolist() == [SIDE, BACK]


def test_for_views_picks_the_suffix_row_of_each_camera():
    cond = torch.arange(4.0).view(4, 1, 1)
    emb = PromptEmbeddings(cond, torch.zeros(1, 1, 1), list(VIEW_SUFFIXES))
    rows = emb.for_views(torch.tensor([0.0, 0.0, 0.0, 70.0]), torch.tensor([0.0, 90.0, 180.0, 0.0]))
    assert rows.flatten().tolist() == [FRONT, SIDE, BACK, OVERHEAD]
    single = PromptEmbeddings(cond[:1], torch.zeros(1, 1, 1), [""])
    assert single.for_views(torch.zeros(3), torch.tensor([0.0, 90.0, 180.0])).shape == (3, 1, 1)


def test_prompt_embeddings_are_computed_once_and_match_the_suffixed_texts(tiny_sd_dir):
    prior = DiffusersPrior(tiny_sd_dir, "cpu", torch.float32)
    calls = []
    prior.text_encoder.register_forward_hook(lambda module, args, out: calls.append(1))
    emb = prior.encode_prompt("a red cube", view_dependent=True)
    assert prior.encode_prompt("a red cube", view_dependent=True) is emb and len(calls) == 1
    assert emb.cond.shape[0] == 4 and emb.uncond.shape[0] == 1 and emb.suffixes == list(VIEW_SUFFIXES)
    expected = prior.embed_texts(["a red cube, side view", ""])
    torch.testing.assert_close(emb.cond[SIDE], expected[0])
    torch.testing.assert_close(emb.uncond[0], expected[1])
    assert not torch.allclose(emb.cond[FRONT], emb.cond[SIDE])
    prior.release_text_encoder()
    assert prior.encode_prompt("a red cube", view_dependent=True) is emb
    with pytest.raises(RuntimeError, match="released"):
        prior.encode_prompt("a blue cone")


# --- the empirical prior ---------------------------------------------------------------------------

CAPTIONS = ["a red cube"] * 3 + ["a blue sphere"] * 3


def empirical(dtype=torch.float64, scheduler=None) -> EmpiricalPrior:
    images = torch.rand(6, 8, 8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    config = (scheduler or sd_scheduler()).config
    return EmpiricalPrior(images, CAPTIONS, config, "cpu", dtype)


def brute_force_eps(prior: EmpiricalPrior, x_t: np.ndarray, t: int, members: list[int]) -> np.ndarray:
    """The optimal denoiser written out image by image in float64 numpy."""
    abar = float(prior.alphas_cumprod[t])
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    images = prior.images.double().numpy()
    logits = np.array([-np.sum((x_t - alpha * images[i]) ** 2) / (2 * sigma**2) for i in members])
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    x0 = sum(w * images[i] for w, i in zip(weights, members, strict=True))
    return (x_t - alpha * x0) / sigma


def test_the_empirical_denoiser_matches_a_brute_force_computation():
    prior = empirical()
    emb = prior.encode_prompt("a red cube")
    rng = np.random.default_rng(0)
    for t in (50, 400, 900):
        x_t = rng.standard_normal((2, 3, 8, 8))
        eps_cond, eps_uncond = prior.predict_eps(torch.from_numpy(x_t), t, emb.cond, emb.uncond)
        for b in range(2):
            np.testing.assert_allclose(
                eps_cond[b].numpy(), brute_force_eps(prior, x_t[b], t, [0, 1, 2]), rtol=1e-9, atol=1e-10
            )
            np.testing.assert_allclose(
                eps_uncond[b].numpy(),
                brute_force_eps(prior, x_t[b], t, list(range(6))),
                rtol=1e-9,
                atol=1e-10,
            )
    assert eps_cond.dtype == torch.float64
    x_t = rng.standard_normal((2, 3, 8, 8))
    single = empirical(torch.float32).predict_eps(
        torch.from_numpy(x_t).float(), 400, emb.cond.float(), emb.uncond.float()
    )
    assert single[0].dtype == torch.float32
    for a, b in zip(single, prior.predict_eps(torch.from_numpy(x_t), 400, emb.cond, emb.uncond), strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def test_at_small_noise_the_empirical_denoiser_returns_the_training_image():
    prior = empirical()
    emb = prior.encode_prompt("a red cube")
    t = 0
    abar = float(prior.alphas_cumprod[t])
    noise = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for i in (1, 4):
        x_t = abar**0.5 * prior.images[i : i + 1] + (1 - abar) ** 0.5 * noise
        _, eps_uncond = prior.predict_eps(x_t, t, emb.cond, emb.uncond)
        x0 = (x_t - (1 - abar) ** 0.5 * eps_uncond.double()) / abar**0.5
        torch.testing.assert_close(x0, prior.images[i : i + 1], rtol=0, atol=1e-5)
    # Restricted to "a red cube", a noisy blue sphere is explained by the nearest red cube instead.
    x_t = abar**0.5 * prior.images[4:5] + (1 - abar) ** 0.5 * noise
    x0_cond = prior.predict_x0(x_t, torch.tensor([t]), emb.cond[:, 0, :])
    nearest = min(range(3), key=lambda j: float(((prior.images[j] - prior.images[4]) ** 2).sum()))
    torch.testing.assert_close(x0_cond, prior.images[nearest : nearest + 1], rtol=0, atol=1e-5)


def test_at_large_noise_the_empirical_denoiser_returns_the_mean():
    ddpm = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)  # abar_999 = 4e-5
    prior = empirical(scheduler=ddpm)
    emb = prior.encode_prompt("a blue sphere")
    x_t = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([999])
    spread = (prior.images - prior.images.mean(0)).abs().max()
    assert spread > 0.5
    torch.testing.assert_close(
        prior.predict_x0(x_t, t, emb.uncond[:, 0, :]), prior.images.mean(0, keepdim=True), rtol=0, atol=0.02
    )
    torch.testing.assert_close(
        prior.predict_x0(x_t, t, emb.cond[:, 0, :]), prior.images[3:].mean(0, keepdim=True), rtol=0, atol=0.02
    )


def test_empirical_prompts_select_by_caption_and_reject_unknown_ones():
    prior = empirical()
    assert prior.encode_prompt("A  Red Cube.").cond.flatten().tolist() == [1, 1, 1, 0, 0, 0]
    assert (
        prior.encode_prompt("a red cube", view_dependent=True).cond[:, 0].tolist() == [[1, 1, 1, 0, 0, 0]] * 4
    )
    assert prior.encode_prompt("a red cube").uncond.flatten().tolist() == [1] * 6
    with pytest.raises(ValueError, match="a green cone"):
        prior.encode_prompt("a green cone")


# --- sampling --------------------------------------------------------------------------------------


def test_ddim_sampling_from_the_empirical_prior_reproduces_images_of_the_prompt():
    prior = empirical(torch.float32)
    samples = sample_images(prior, "a blue sphere", seed=0, num_steps=25, guidance_scale=1.0, n=4)
    assert samples.shape == (4, 8, 8, 3)
    targets = prior.decode_latents(prior.images).float()
    distances = ((samples[:, None] - targets[None]) ** 2).mean(dim=(2, 3, 4)).sqrt()  # [sample, image]
    assert distances.argmin(dim=1).min() >= 3  # every sample is a blue sphere
    assert distances.min(dim=1).values.max() < 0.02


def test_the_sample_command_writes_a_grid(tiny_sd_dir, tiny_pixel_dir, tmp_path):
    out = tmp_path / "grid.png"
    code = server_main(
        [
            "sample",
            "--prompt",
            "a red cube",
            "--seed",
            "3",
            "--out",
            str(out),
            "--prior",
            str(tiny_sd_dir),
            "--steps",
            "2",
            "--n",
            "3",
        ]
    )
    assert code == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 64, 2 * 64, 3)
    assert (grid[64:, 64:] == 255).all() and grid[:64, :64].std() > 0  # 3 samples in a 2x2 grid
    assert (
        server_main(
            [
                "sample",
                "--prompt",
                "a cube",
                "--out",
                str(tmp_path / "p.png"),
                "--prior",
                str(tiny_pixel_dir),
                "--steps",
                "2",
                "--n",
                "1",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "p.png").size == (PIXEL_SIZE, PIXEL_SIZE)
    assert server_main(["sample", "--prompt", "x", "--out", str(out), "--prior", str(tmp_path / "none")]) == 1


def test_image_grid_places_images_row_by_row():
    images = torch.stack([torch.full((2, 3, 3), v) for v in (0.0, 0.5, 1.0)])
    grid = np.asarray(image_grid(images, columns=2))
    assert grid.shape == (4, 6, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 3, 0] == 128 and grid[2, 0, 0] == 255 and grid[2, 3, 0] == 255


# --- the benchmark's Stable Diffusion configs --------------------------------------------------------


def test_the_benchmark_builds_sd21_sized_models():
    """The written-out configs give SD 2.1-base's parameter counts (865.9M UNet, 83.7M VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from bench.prior import sd21_unet_config, sd_vae_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd21_unet_config())
        vae = AutoencoderKL(**sd_vae_config())
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in vae.encoder.parameters()) == pytest.approx(34.2e6, rel=0.01)


def test_the_shapes_trainers_export_loads_as_the_shapes_prior(tmp_path, monkeypatch):
    """What `python -m server.shapes.train` writes (fp16 pixel UNet with text-pooled embedding, CLIP
    text encoder, tokenizer, DDIM scheduler; no VAE) is what `load_prior("shapes")` serves."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from server.shapes import train
    from server.shapes.primitives import all_captions
    from server.shapes.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(all_captions(), tmp_path / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, text_encoder = (
            UNet2DConditionModel(**train.unet_config()),
            CLIPTextModel(train.text_config(tokenizer)),
        )
    train.export_weights(unet, text_encoder, tmp_path / "tokenizer", tmp_path / "weights", {"steps": 0})
    monkeypatch.setattr(priors, "SHAPES_WEIGHTS", tmp_path / "weights")

    prior = load_prior("shapes", "cpu", torch.float32)
    assert prior.name == "shapes" and prior.vae is None and prior.unet.dtype == torch.float32
    assert not prior.view_dependent
    assert (prior.latent_channels, prior.latent_size, prior.pixel_size) == (3, 32, 32)
    assert (
        prior.scheduler.config.beta_schedule == "squaredcos_cap_v2"
        and prior.scheduler.final_alpha_cumprod == 1
    )
    emb = prior.encode_prompt("a red cube")
    assert emb.cond.shape == (1, tokenizer.model_max_length, train.TEXT_DIM)
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eps_cond, eps_uncond = prior.predict_eps(x_t, 500, emb.cond, emb.uncond)
    with torch.no_grad():
        direct = unet.half().float()(
            x_t,
            torch.tensor([500, 500]),
            encoder_hidden_states=emb.cond.expand(2, -1, -1),
            class_labels=torch.zeros(2, 3),  # no camera given: the "no camera" the trainer drops to
        )
    torch.testing.assert_close(eps_cond, direct.sample, rtol=1e-4, atol=1e-4)
    assert (eps_cond - eps_uncond).abs().max() > 1e-4


def test_the_shapes_prior_sees_the_direction_each_view_is_seen_from(tmp_path, monkeypatch):
    """A camera-conditioned shapes UNet gets each view's unit direction from its c2w, in both CFG
    halves; a fresh camera projection (zero last layer) leaves a camera-free model's output unchanged."""
    from transformers import CLIPTextModel

    from server.render.cameras import orbit_c2w
    from server.shapes import train
    from server.shapes.primitives import all_captions
    from server.shapes.tokenizer import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(all_captions(), tmp_path / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, text_encoder = train.new_unet(), CLIPTextModel(train.text_config(tokenizer))
    views = [(10.0, 30.0, 2.2), (40.0, -120.0, 2.6)]
    c2w = torch.from_numpy(np.stack([orbit_c2w(*v) for v in views]))
    x_t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def predictions(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
        train.export_weights(unet, text_encoder, tmp_path / "tokenizer", tmp_path / folder, {"steps": 0})
        monkeypatch.setattr(priors, "SHAPES_WEIGHTS", tmp_path / folder)
        prior = load_prior("shapes", "cpu", torch.float32)
        assert prior.camera_conditioned
        emb = prior.encode_prompt("a red cube")
        with_camera = prior.predict_eps(x_t, 500, emb.cond, emb.uncond, c2w=c2w)
        return torch.cat(with_camera), torch.cat(prior.predict_eps(x_t, 500, emb.cond, emb.uncond))

    seen, unseen = predictions("fresh")
    torch.testing.assert_close(seen, unseen, rtol=0, atol=0)

    with torch.no_grad():
        unet.class_embedding.linear_2.weight.normal_(0.0, 0.5)
    seen, unseen = predictions("trained")
    assert (seen - unseen).abs().max() > 1e-2
    e, a = np.radians([v[0] for v in views]), np.radians([v[1] for v in views])
    directions = torch.tensor(np.stack([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)], 1)).float()
    emb = load_prior("shapes", "cpu", torch.float32).encode_prompt("a red cube")
    with torch.no_grad():
        direct = unet.half().float()(
            torch.cat([x_t, x_t]),
            torch.tensor([500] * 4),
            encoder_hidden_states=torch.cat([emb.cond.expand(2, -1, -1), emb.uncond.expand(2, -1, -1)]),
            class_labels=directions.repeat(2, 1),
        )
    torch.testing.assert_close(seen, direct.sample, rtol=1e-4, atol=1e-4)


def test_a_mirrored_training_image_is_the_view_from_the_mirrored_camera():
    """The trainer flips images and negates the view direction's y: that is exactly right only if the
    flipped render of every primitive equals its render from azimuth -a (with the light mirrored too)."""
    import math

    from server.render.cameras import Camera, orbit_c2w
    from server.shapes import train
    from server.shapes.dataset import render_primitive
    from server.shapes.primitives import COLOURS, SHAPES

    elevation, azimuth, radius = 25.0, 33.0, 2.4
    light = np.array([0.3, 0.8, 0.52]) / np.linalg.norm([0.3, 0.8, 0.52])
    mirror = np.array([1.0, -1.0, 1.0])
    for shape in SHAPES:
        seen = render_primitive(
            shape, COLOURS["red"], Camera(orbit_c2w(elevation, azimuth, radius), math.radians(40)), 32, light
        )
        mirrored = render_primitive(
            shape,
            COLOURS["red"],
            Camera(orbit_c2w(elevation, -azimuth, radius), math.radians(40)),
            32,
            light * mirror,
        )
        np.testing.assert_allclose(seen[:, ::-1], mirrored, atol=2e-3, err_msg=shape)
        # and the cube really is seen differently from the two cameras, so the check has teeth
        if shape == "cube":
            assert np.abs(seen - mirrored).max() > 0.1
    directions = train.dataset_view_directions(np.array([[elevation, azimuth, radius, 40.0]] * 2))
    flipped = train.dataset_view_directions(np.array([[elevation, -azimuth, radius, 40.0]]))
    torch.testing.assert_close(directions[0] * train.MIRROR, flipped[0])
