"""Diffusion schedule quantities and the timestep annealing t(tau) of the distillation loop.

Notation follows the papers: x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), and lambda_t = sigma_t / alpha_t (the CFD code calls it "lambdas"; it is
not a log-SNR). The clean-flow ODE advances the clean image by (eps_hat - eps_tilde) d(lambda).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from server.distill.knots import KNOTS_RULE, knots_problem


class NoiseSchedule:
    """alpha_t, sigma_t, lambda_t for integer timesteps, from a diffusers scheduler's `alphas_cumprod`.

    Held in float64 on the CPU: these are scalars per step, and the DDIM identity is checked to float
    tolerance, so they should not add rounding of their own.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float = 1.0):
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu", torch.float64)
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.num_train_timesteps = len(self.alphas_cumprod)

    @classmethod
    def of(cls, prior) -> NoiseSchedule:
        """The schedule of a prior, with its DDIM scheduler's value of abar after the last step."""
        return cls(prior.alphas_cumprod, float(prior.scheduler.final_alpha_cumprod))

    def abar(self, t: int) -> float:
        """abar_t; t < 0 means "after the last step" (diffusers' final_alpha_cumprod, 1 = clean)."""
        return self.final_alpha_cumprod if t < 0 else float(self.alphas_cumprod[t])

    def alpha(self, t: int) -> float:
        return self.abar(t) ** 0.5

    def sigma(self, t: int) -> float:
        return (1.0 - self.abar(t)) ** 0.5

    def lam(self, t: int) -> float:
        """lambda_t = sigma_t / alpha_t."""
        return self.sigma(t) / self.alpha(t)


@dataclass(frozen=True)
class AnnealedTimesteps:
    """Deterministic, monotone t(tau): piecewise-linear in the step fraction over knots.

    `knots` are (step_fraction, t) pairs with fractions increasing from 0 to 1 and t non-increasing,
    e.g. ((0, 980), (0.5, 596), (1, 404)) is the CFD MVDream stage's 980 -> 596 -> 404.
    Every view of a step shares the same t, as in the reference code.
    """

    knots: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        problem = knots_problem(self.knots)
        if problem is not None:
            raise ValueError(f"timestep knots {KNOTS_RULE}; {problem}")

    def __call__(self, step: int, total_steps: int, generator: torch.Generator | None = None) -> int:
        fraction = step / max(total_steps - 1, 1)
        fractions, ts = zip(*self.knots, strict=True)
        return round(float(np.interp(fraction, fractions, ts)))


@dataclass(frozen=True)
class RandomTimesteps:
    """SDS's t ~ U{t_min, ..., t_max}, drawn from the job's generator so runs are reproducible."""

    t_min: int = 20
    t_max: int = 980

    def __call__(self, step: int, total_steps: int, generator: torch.Generator | None = None) -> int:
        return int(torch.randint(self.t_min, self.t_max + 1, (1,), generator=generator).item())


def lambda_steps(schedule: NoiseSchedule, timesteps: Sequence[int]) -> list[float]:
    """Step sizes lambda_t - lambda_prev between consecutive timesteps (the last goes to lambda = 0)."""
    prevs = [*timesteps[1:], -1]
    return [schedule.lam(t) - schedule.lam(p) for t, p in zip(timesteps, prevs, strict=True)]
