"""The clean flow in 2-D: optimise images (pixels or latents) directly with the distillation update.

This is the papers' central identity made executable. Starting from x = 0 with a fixed noise
eps_tilde, a plain gradient step of size lambda_t - lambda_prev on the loss of `server.distill.update`
moves the clean variable x exactly as DDIM (eta = 0) moves x_t = alpha_t x + sigma_t eps_tilde,
from x_T = sigma_T eps_tilde. `ddim_reference` runs DDIM through diffusers' own scheduler so that
the two paths share nothing but the prior.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler

from server.distill.schedule import NoiseSchedule
from server.distill.update import CFGForm, Weighting, classifier_free_guidance, distillation_step, finite_loss
from server.noise.base import NoiseProvider, NoiseQuery


@dataclass
class CleanFlowResult:
    images: torch.Tensor  # final clean variable [B, C, h, w]
    trajectory: list[torch.Tensor] = field(
        default_factory=list
    )  # x_t = alpha_t x + sigma_t eps before each step
    clean: list[torch.Tensor] = field(default_factory=list)  # the clean variable before each step


def clean_flow_2d(
    prior,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: NoiseProvider,
    timesteps: Sequence[int],
    shape: tuple[int, int, int, int],
    guidance_scale: float,
    cfg_form: CFGForm,
    optimizer: str = "sgd",
    lr: float = 2.5e-3,
    weighting: Weighting = Weighting.ONE,
    gamma: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> CleanFlowResult:
    """Run the clean flow over `timesteps` (descending) for B images of `shape` = (B, C, h, w).

    optimizer "sgd": a plain gradient step of size lambda_t - lambda_prev with w = 1 -- DDIM exactly
    when gamma = 0. optimizer "adam": Adam at `lr` with weight w(t), as the 3-D loop steps.
    """
    schedule = NoiseSchedule.of(prior)
    x = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD([x], lr=1.0)
    elif optimizer == "adam":
        opt = torch.optim.Adam([x], lr=lr, betas=(0.0, 0.99))
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; use 'sgd' or 'adam'")
    query = NoiseQuery(latent_hw=shape[2:], channels=shape[1], view_ids=list(range(shape[0])))
    result = CleanFlowResult(images=x)
    prevs = [*timesteps[1:], -1]
    for i, (t, t_prev) in enumerate(zip(timesteps, prevs, strict=True)):
        eps_tilde = noise.sample(query).to(dtype)
        result.clean.append(x.detach().clone())
        result.trajectory.append(schedule.alpha(t) * x.detach() + schedule.sigma(t) * eps_tilde)
        if optimizer == "sgd":
            opt.param_groups[0]["lr"] = schedule.lam(t) - schedule.lam(t_prev)
        step = distillation_step(
            prior,
            x,
            eps_tilde,
            t,
            cond,
            uncond,
            schedule,
            guidance_scale,
            cfg_form,
            Weighting.ONE if optimizer == "sgd" else weighting,
        )
        finite_loss(step.loss, i)
        opt.zero_grad(set_to_none=True)
        step.loss.backward()
        opt.step()
        noise.reinject(gamma)
        if callback is not None:
            callback(i, x.detach())
    result.images = x.detach()
    return result


@torch.no_grad()
def ddim_reference(
    prior,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    x_T: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    cfg_form: CFGForm = CFGForm.UNCOND,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain DDIM (eta = 0) with diffusers' DDIMScheduler; returns x_0 and x_t before each step."""
    scheduler = DDIMScheduler.from_config(prior.scheduler.config)
    scheduler.set_timesteps(num_steps)
    x, trajectory = x_T, []
    for t in scheduler.timesteps:
        trajectory.append(x.clone())
        ts = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        eps_cond, eps_uncond = prior.predict_eps(x, ts, cond, uncond)
        eps_hat = classifier_free_guidance(eps_cond, eps_uncond, guidance_scale, cfg_form).to(x.dtype)
        x = scheduler.step(eps_hat, t, x, eta=0.0).prev_sample
    return x, trajectory


def ddim_timesteps_of(prior, num_steps: int) -> list[int]:
    """The timesteps diffusers' DDIM visits for this prior's scheduler config."""
    scheduler = DDIMScheduler.from_config(prior.scheduler.config)
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]
