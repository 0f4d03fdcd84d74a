"""The identity the papers rest on: the clean-flow update with a fixed noise is DDIM, step for step.

Checked on an exact analytic denoiser (float64) and on a tiny diffusers UNet loaded from a folder
through the same loader real weights use. Each positive check is paired with the broken update
rules the identity must reject: resampled noise, a wrong step size, and the other CFG form.
"""

from __future__ import annotations

import pytest
import torch

from server.distill.clean_flow import clean_flow_2d, ddim_reference, ddim_timesteps_of
from server.distill.ddim_check import analytic_prior, compare
from server.distill.schedule import NoiseSchedule
from server.distill.update import CFGForm, distillation_step
from server.noise.base import FixedNoise, FreshNoise, NoiseQuery

STEPS, GUIDANCE = 20, 4.0


@pytest.fixture(scope="module")
def analytic():
    return analytic_prior()


@pytest.fixture(scope="module")
def tiny_unet(tiny_sd_dir):
    from server.priors import load_prior

    return load_prior(str(tiny_sd_dir), "cpu", torch.float32)


def setup(prior, prompt, batch, dtype):
    emb = prior.encode_prompt(prompt)
    shape = (batch, prior.latent_channels, prior.latent_size, prior.latent_size)
    timesteps = ddim_timesteps_of(prior, STEPS)
    schedule = NoiseSchedule.of(prior)
    query = NoiseQuery(latent_hw=shape[2:], channels=shape[1], view_ids=list(range(batch)))
    eps = FixedNoise(0, "cpu").sample(query).to(dtype)
    _, ddim_traj = ddim_reference(
        prior, emb.cond.expand(batch, -1, -1), emb.uncond, schedule.sigma(timesteps[0]) * eps, STEPS, GUIDANCE
    )
    return emb, shape, timesteps, schedule, eps, ddim_traj


def max_trajectory_gap(trajectory, reference) -> float:
    return max((a - b).abs().max().item() for a, b in zip(trajectory, reference, strict=True))


@pytest.mark.parametrize("which", ["analytic", "tiny_unet"])
def test_clean_flow_retraces_ddim_at_every_step(which, analytic, tiny_unet):
    if which == "analytic":
        prior, prompt = analytic
        result = compare(prior, prompt, 3, STEPS, GUIDANCE, seed=0, dtype=torch.float64)
        assert result.max_abs_diff < 1e-5
    else:
        result = compare(tiny_unet, "a red cube", 2, STEPS, GUIDANCE, seed=0, dtype=torch.float32)
        assert result.max_abs_diff < 1e-3
    assert result.steps == STEPS


@pytest.mark.parametrize("which", ["analytic", "tiny_unet"])
def test_resampling_the_noise_each_step_breaks_the_identity(which, analytic, tiny_unet):
    prior, prompt, dtype = (
        (*analytic, torch.float64) if which == "analytic" else (tiny_unet, "a red cube", torch.float32)
    )
    emb, shape, timesteps, _, _, ddim_traj = setup(prior, prompt, 2, dtype)
    flow = clean_flow_2d(
        prior,
        emb.cond.expand(2, -1, -1),
        emb.uncond,
        FreshNoise(0, "cpu"),
        timesteps,
        shape,
        GUIDANCE,
        CFGForm.UNCOND,
        dtype=dtype,
    )
    assert max_trajectory_gap(flow.trajectory, ddim_traj) > 0.1


@pytest.mark.parametrize("which", ["analytic", "tiny_unet"])
def test_the_other_cfg_form_breaks_the_identity(which, analytic, tiny_unet):
    prior, prompt, dtype = (
        (*analytic, torch.float64) if which == "analytic" else (tiny_unet, "a red cube", torch.float32)
    )
    result = compare(prior, prompt, 2, STEPS, GUIDANCE, seed=0, dtype=dtype, cfg_form=CFGForm.COND)
    assert result.max_abs_diff > 1e-2


@pytest.mark.parametrize("which", ["analytic", "tiny_unet"])
@pytest.mark.parametrize("wrong_step", ["lambda_t", "delta_t", "ten_percent_long"])
def test_a_wrong_step_size_breaks_the_identity(which, wrong_step, analytic, tiny_unet):
    prior, prompt, dtype = (
        (*analytic, torch.float64) if which == "analytic" else (tiny_unet, "a red cube", torch.float32)
    )
    emb, shape, timesteps, schedule, eps, ddim_traj = setup(prior, prompt, 2, dtype)
    x = torch.zeros(shape, dtype=dtype, requires_grad=True)
    trajectory = []
    for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
        trajectory.append(schedule.alpha(t) * x.detach() + schedule.sigma(t) * eps)
        size = {
            "lambda_t": schedule.lam(t),
            "delta_t": (t - max(t_prev, 0)) / 1000,
            "ten_percent_long": 1.1 * (schedule.lam(t) - schedule.lam(t_prev)),
        }[wrong_step]
        step = distillation_step(
            prior, x, eps, t, emb.cond.expand(2, -1, -1), emb.uncond, schedule, GUIDANCE, CFGForm.UNCOND
        )
        x.grad = None
        step.loss.backward()
        with torch.no_grad():
            x -= size * x.grad
    assert max_trajectory_gap(trajectory, ddim_traj) > 1e-2
