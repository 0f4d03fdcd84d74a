"""One distillation update for SDS, FSD and CFD: the gradient the prior puts on a rendered latent.

All three methods compute, for a render z = g(theta, c) encoded into the prior's space,

    x_t  = alpha_t * sg(z) + sigma_t * eps_tilde
    grad = w(t) * (eps_hat(x_t, t, y) - eps_tilde)                      (CFD Eq. / FSD Prop. 1)

and push it into theta through the detached-target loss 0.5 * ||z - sg(z - grad)||^2, whose
gradient with respect to z is exactly `grad`. They differ only in eps_tilde (fresh for SDS, fixed
per camera for FSD, surface-attached for CFD: see `server.noise.base`) and in how t is chosen (random
for SDS, annealed for FSD and CFD: see `server.distill.schedule`). With a fixed eps_tilde, w = 1 and a
gradient step of size lambda_t - lambda_prev, this is exactly a DDIM step on the clean variable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from server.distill.schedule import NoiseSchedule
from server.job.errors import NonFiniteError


class Method(StrEnum):
    SDS = "sds"
    FSD = "fsd"
    CFD = "cfd"


class CFGForm(StrEnum):
    """The two classifier-free-guidance forms in use; name the one you mean.

    UNCOND: eps_u + s (eps_c - eps_u), the standard form (diffusers pipelines, MVDream).
    COND:   eps_c + s (eps_c - eps_u), threestudio's Stable Diffusion guidance: effective scale s + 1.
    """

    UNCOND = "uncond"
    COND = "cond"


class Weighting(StrEnum):
    LAMBDA = "lambda"  # w(t) = sigma_t / alpha_t, the CFD reference's SD weighting
    ONE = "one"  # w(t) = 1, MVDream's, and the one that makes the 2-D flow exactly DDIM


def classifier_free_guidance(
    eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float, form: CFGForm
) -> torch.Tensor:
    if form == CFGForm.UNCOND:
        return eps_uncond + scale * (eps_cond - eps_uncond)
    if form == CFGForm.COND:
        return eps_cond + scale * (eps_cond - eps_uncond)
    raise ValueError(f"unknown CFG form {form!r}; use 'uncond' or 'cond'")


def weight(schedule: NoiseSchedule, t: int, weighting: Weighting) -> float:
    if weighting == Weighting.LAMBDA:
        return schedule.lam(t)
    if weighting == Weighting.ONE:
        return 1.0
    raise ValueError(f"unknown weighting {weighting!r}; use 'lambda' or 'one'")


def flow_pull(schedule: NoiseSchedule, t: int, weighting: Weighting) -> float:
    """How hard the flow pulls a render towards the prior's estimate at t, relative to its pull where
    alpha_t = sigma_t, at most 1: grad = w(t) (eps_hat - eps) = w(t) alpha_t / sigma_t (z - x0_hat).

    The shape stage's opacity term is weighed by it (`server.pipeline.step.volume_step`). At w = 1 the
    pull at t = 900 is a sixth of that at t = 500, and a constant opacity weight outweighed the prior
    wherever the object's colour is close to the background's: pink shapes on white were emptied or
    shredded in the first steps under CFD, whose annealed t spends them all high (SDS's random t does not).
    """
    return min(weight(schedule, t, weighting) * schedule.alpha(t) / schedule.sigma(t), 1.0)


@dataclass
class DistillationStep:
    loss: torch.Tensor  # scalar; d loss / d latents == grad
    grad: torch.Tensor  # [B, C, h, w], detached
    eps_hat: torch.Tensor  # guided prediction, detached
    x_t: torch.Tensor  # the noisy input the prior saw
    nonfinite: torch.Tensor  # 0-d: how many gradient entries were NaN/inf and zeroed


def distillation_step(
    prior,
    latents: torch.Tensor,
    noise: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    schedule: NoiseSchedule,
    guidance_scale: float,
    cfg_form: CFGForm,
    weighting: Weighting = Weighting.ONE,
    step_weight: float = 1.0,
    c2w: torch.Tensor | None = None,
) -> DistillationStep:
    """The flow gradient on `latents` [B, C, h, w] with noise eps_tilde = `noise` at timestep t.

    `step_weight` multiplies w(t): the 2-D clean flow passes the DDIM step size through the
    optimiser's learning rate instead, so it is 1 there. The returned loss is summed over views;
    a 3-D caller averages it over its cameras. `c2w` are the views' cameras, for a prior that is
    conditioned on them (MVDream).
    """
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    x_t = alpha * latents.detach() + sigma * noise
    timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
    eps_cond, eps_uncond = prior.predict_eps(x_t, timesteps, cond, uncond, c2w=c2w)
    eps_hat = classifier_free_guidance(eps_cond, eps_uncond, guidance_scale, cfg_form).to(latents.dtype)

    grad = step_weight * weight(schedule, t, weighting) * (eps_hat - noise)
    finite = torch.isfinite(grad)
    nonfinite = (~finite).sum()
    grad = torch.where(finite, grad, torch.zeros_like(grad))

    target = (latents - grad).detach()
    loss = 0.5 * ((latents - target) ** 2).sum()
    # No prediction finite at all: a NaN loss, which its reader raises as `NonFiniteError` (read here,
    # it would make every step wait for the device).
    loss = torch.where(nonfinite < grad.numel(), loss, math.nan)
    return DistillationStep(loss, grad, eps_hat.detach(), x_t, nonfinite)


def finite_loss(loss: torch.Tensor, step: int) -> float:
    """A step's loss as a float, read where it is reported, so that the step itself never waits for the
    device; `NonFiniteError` when it diverged (or the prior predicted nothing finite)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteError(f"the loss became {value} at step {step}")
    return value
