"""The representation-independent core: schedules, timestep annealing, CFG, the update, re-injection."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from scipy import stats

from server.distill.schedule import AnnealedTimesteps, NoiseSchedule, RandomTimesteps, lambda_steps
from server.distill.update import (
    CFGForm,
    Weighting,
    classifier_free_guidance,
    distillation_step,
    finite_loss,
    flow_pull,
)
from server.job.errors import NonFiniteError
from server.noise.base import FixedNoise, FreshNoise, NoiseQuery, mix_in_fresh


def sd_schedule() -> NoiseSchedule:
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return NoiseSchedule(scheduler.alphas_cumprod, float(scheduler.final_alpha_cumprod))


def test_lambda_matches_the_sd21_table_of_the_research_notes():
    schedule = sd_schedule()
    for t, expected in [(20, 0.14), (212, 0.60), (404, 1.18), (596, 2.25), (800, 5.11), (980, 13.0)]:
        assert schedule.lam(t) == pytest.approx(expected, rel=0.03)
    for t in (0, 500, 999):
        assert schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2 == pytest.approx(1.0)
    assert schedule.lam(-1) == pytest.approx(math.sqrt(1 - schedule.abar(0)) / math.sqrt(schedule.abar(0)))


def test_annealing_follows_the_cfd_knots_monotonically():
    anneal = AnnealedTimesteps(((0.0, 980.0), (0.5, 596.0), (1.0, 404.0)))
    ts = [anneal(step, 1001) for step in range(1001)]
    assert ts[0] == 980 and ts[500] == 596 and ts[-1] == 404
    assert all(b <= a for a, b in pairwise(ts))
    # piecewise linear: constant slope within each segment
    assert ts[250] == pytest.approx((980 + 596) / 2, abs=1)
    assert ts[750] == pytest.approx((596 + 404) / 2, abs=1)


@pytest.mark.parametrize(
    "knots",
    [
        ((0.0, 500.0), (1.0, 600.0)),
        ((0.0, 900.0), (0.5, 500.0)),
        ((0.0, 900.0), (0.6, 500.0), (0.4, 300.0), (1.0, 200.0)),
    ],
)
def test_bad_knots_are_refused(knots):
    with pytest.raises(ValueError, match="knot"):
        AnnealedTimesteps(knots)


def test_random_timesteps_are_uniform_and_reproducible():
    sampler = RandomTimesteps(20, 980)
    draw = [sampler(0, 1, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draw[0] == draw[1]
    g = torch.Generator().manual_seed(0)
    ts = np.array([sampler(i, 1000, g) for i in range(4000)])
    assert ts.min() >= 20 and ts.max() <= 980
    assert stats.kstest((ts - 20 + 0.5) / 961, "uniform").pvalue > 1e-3


def test_lambda_steps_sum_to_lambda_of_the_first_timestep():
    schedule = sd_schedule()
    ts = [981, 781, 581, 381, 181]
    steps = lambda_steps(schedule, ts)
    assert all(s > 0 for s in steps)
    assert sum(steps) == pytest.approx(schedule.lam(981) - schedule.lam(-1))


def test_the_two_cfg_forms_differ_by_one_unit_of_guidance():
    c, u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    standard = classifier_free_guidance(c, u, 7.5, CFGForm.UNCOND)
    threestudio = classifier_free_guidance(c, u, 7.5, CFGForm.COND)
    torch.testing.assert_close(threestudio, classifier_free_guidance(c, u, 8.5, CFGForm.UNCOND))
    torch.testing.assert_close(standard, u + 7.5 * (c - u))
    torch.testing.assert_close(classifier_free_guidance(c, u, 0.0, CFGForm.UNCOND), u)


class LinearPrior:
    """eps(x) = a x + b: enough to check the update's algebra exactly."""

    def __init__(self, a: float, b_cond: float, b_uncond: float):
        self.a, self.b_cond, self.b_uncond = a, b_cond, b_uncond

    def predict_eps(self, x_t, t, cond, uncond, c2w=None):
        return self.a * x_t + self.b_cond, self.a * x_t + self.b_uncond


def test_the_detached_target_loss_has_exactly_the_flow_gradient():
    schedule = sd_schedule()
    prior = LinearPrior(0.3, 0.2, -0.1)
    z = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = 500
    step = distillation_step(prior, z, eps, t, None, None, schedule, 5.0, CFGForm.UNCOND, Weighting.LAMBDA)
    step.loss.backward()
    x_t = schedule.alpha(t) * z.detach() + schedule.sigma(t) * eps
    eps_hat = (0.3 * x_t - 0.1) + 5.0 * 0.3
    expected = schedule.lam(t) * (eps_hat - eps)
    torch.testing.assert_close(z.grad, expected)
    torch.testing.assert_close(step.grad, expected)


class PointMassPrior:
    """The exact denoiser of data that is always 0: x0_hat = 0, so eps_hat = x_t / sigma_t."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def predict_eps(self, x_t, t, cond, uncond, c2w=None):
        eps = x_t / self.schedule.sigma(int(t[0]))
        return eps, eps


@pytest.mark.parametrize("weighting", [Weighting.ONE, Weighting.LAMBDA])
def test_the_opacity_term_weighs_as_the_flows_pull_on_a_render(weighting: Weighting):
    """The shape stage's opacity weight follows how hard the flow pulls a render towards the prior's
    estimate (grad = pull * (z - x0_hat)), capped at the pull where alpha_t = sigma_t: at w = 1 it is
    weak while t is high; at w = sigma / alpha the pull, and so the weight, is the same at every t."""
    schedule = sd_schedule()
    z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    pulls = {}
    for t in (980, 900, 700, 500, 300, 100):
        eps = torch.randn(1, 4, 8, 8, dtype=torch.float64)
        step = distillation_step(
            PointMassPrior(schedule), z, eps, t, None, None, schedule, 1.0, CFGForm.UNCOND, weighting
        )
        pull = float((step.grad / z).mean())  # x0_hat = 0: grad = pull * z
        torch.testing.assert_close(step.grad, pull * z)
        pulls[t] = pull
        assert flow_pull(schedule, t, weighting) == pytest.approx(min(pull, 1.0))
    if weighting == Weighting.ONE:
        assert pulls[980] < 0.1 < pulls[700] < 1.0 < pulls[300]
    else:
        assert all(p == pytest.approx(1.0) for p in pulls.values())


def test_nan_predictions_are_zeroed_and_counted_and_all_nan_is_an_error():
    schedule = sd_schedule()

    class NaNPrior:
        def __init__(self, fraction_nan):
            self.fraction_nan = fraction_nan

        def predict_eps(self, x_t, t, cond, uncond, c2w=None):
            eps = torch.zeros_like(x_t)
            flat = eps.view(-1)
            flat[: int(self.fraction_nan * flat.numel())] = float("nan")
            return eps, eps

    z = torch.zeros(1, 3, 4, 4, requires_grad=True)
    step = distillation_step(
        NaNPrior(0.25), z, torch.ones(1, 3, 4, 4), 300, None, None, schedule, 1.0, CFGForm.UNCOND
    )
    assert step.nonfinite == 12 and torch.isfinite(step.grad).all()
    assert finite_loss(step.loss, 7) == float(step.loss)
    # Nothing finite: the step does not stop to look (that would wait for the device); its loss is NaN
    # and raises where it is read.
    nothing = distillation_step(
        NaNPrior(1.0), z, torch.ones(1, 3, 4, 4), 300, None, None, schedule, 1.0, CFGForm.UNCOND
    )
    with pytest.raises(NonFiniteError, match="the loss became nan at step 7"):
        finite_loss(nothing.loss, 7)


def test_fixed_noise_is_fixed_per_view_and_fresh_noise_is_not():
    query = NoiseQuery(latent_hw=(8, 8), channels=4, view_ids=[0, 1, 0])
    fixed = FixedNoise(seed=1, device="cpu")
    first, second = fixed.sample(query), fixed.sample(query)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first[0], first[2])
    assert not torch.allclose(first[0], first[1])
    fresh = FreshNoise(seed=1, device="cpu")
    assert not torch.allclose(fresh.sample(query), fresh.sample(query))
    assert torch.equal(FixedNoise(seed=1, device="cpu").sample(query), first)


def test_sde_reinjection_keeps_the_noise_standard_normal_and_decorrelates_at_the_predicted_rate():
    gamma, steps = 0.05, 40
    noise = FixedNoise(seed=0, device="cpu")
    query = NoiseQuery(latent_hw=(64, 64), channels=4, view_ids=[0])
    start = noise.sample(query).flatten()
    for _ in range(steps):
        noise.reinject(gamma)
    end = noise.sample(query).flatten()
    # Marginal: still exactly N(0, 1) (KS test on 16k samples), not just the right variance.
    assert stats.kstest(end.numpy(), "norm").pvalue > 1e-3
    assert end.var().item() == pytest.approx(1.0, abs=0.05)
    # Memory: correlation with the start is (1 - gamma)^(n/2).
    expected = (1 - gamma) ** (steps / 2)
    assert torch.corrcoef(torch.stack([start, end]))[0, 1].item() == pytest.approx(expected, abs=0.03)
    # A non-variance-preserving mix (no square roots) would shrink the variance: the test can tell.
    shrunk = (1 - gamma) * start + gamma * torch.randn_like(start)
    assert stats.kstest(shrunk.numpy(), "norm").pvalue < 1e-3 or abs(shrunk.var().item() - 1) > 0.05
    with pytest.raises(ValueError, match="gamma"):
        mix_in_fresh(start, 1.5, start)
