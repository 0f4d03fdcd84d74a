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
        self._abar = self.alphas_cumprod.tolist()  # read per step as Python floats, not tensor items
        self.final_alpha_cumprod = float(final_alpha_cumprod)
        self.num_train_timesteps = len(self.alphas_cumprod)

    @classmethod
    def of(cls, prior) -> NoiseSchedule:
        """The schedule of a prior, with its DDIM scheduler's value of abar after the last step."""
        return cls(prior.alphas_cumprod, float(prior.scheduler.final_alpha_cumprod))

    def abar(self, t: int) -> float:
        """abar_t; t < 0 means "after the last step" (diffusers' final_alpha_cumprod, 1 = clean)."""
        return self.final_alpha_cumprod if t < 0 else self._abar[t]

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


@dataclass(frozen=True)
class DreamTimeTimesteps:
    """DreamTime's prior-weighted monotone t(tau) (Huang et al. 2023), which the CFD reference's mesh
    geometry stage uses (`dreamtime_anneal: [700, 400, 100, 200]`).

    A weight over t is flat between `low` and `high`, with Gaussian tails of width `high_std` above and
    `low_std` below; t(tau) is where the weight summed from the top reaches the fraction of steps done,
    so t lingers where the weight is large (400..700) and passes the tails quickly. Clamped to
    [t_min, t_max] as the reference's min/max step percentages (0.02, 0.98) do.
    """

    high: float = 700.0
    low: float = 400.0
    high_std: float = 100.0
    low_std: float = 200.0
    t_min: int = 20
    t_max: int = 980
    num_train_timesteps: int = 1000

    def weights(self) -> np.ndarray:
        """The normalised weight of t = 1 .. num_train_timesteps."""
        t = np.arange(1, self.num_train_timesteps + 1, dtype=np.float64)
        w = np.ones_like(t)
        above, below = t > self.high, t < self.low
        w[above] = np.exp(-((t[above] - self.high) ** 2) / (2 * self.high_std**2))
        w[below] = np.exp(-((t[below] - self.low) ** 2) / (2 * self.low_std**2))
        return w / w.sum()

    def __call__(self, step: int, total_steps: int, generator: torch.Generator | None = None) -> int:
        fraction = step / max(total_steps - 1, 1)
        from_top = np.cumsum(self.weights()[::-1])  # weight of t >= T - i
        index = int(np.searchsorted(from_top, fraction))
        t = self.num_train_timesteps - min(index, self.num_train_timesteps - 1)
        return int(min(max(t, self.t_min), self.t_max))


def lambda_steps(schedule: NoiseSchedule, timesteps: Sequence[int]) -> list[float]:
    """Step sizes lambda_t - lambda_prev between consecutive timesteps (the last goes to lambda = 0)."""
    prevs = [*timesteps[1:], -1]
    return [schedule.lam(t) - schedule.lam(p) for t, p in zip(timesteps, prevs, strict=True)]
