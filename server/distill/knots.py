"""What makes timestep knots valid, in one place: the job's settings and the annealed schedule both ask.

stdlib only (Blender imports it through `server.job.spec`).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

KNOTS_RULE = (
    "must be [[step_fraction, t], ...] from fraction 0 to 1, fractions increasing, "
    "t in [1, 999] not increasing"
)


def knots_problem(knots: Sequence[tuple[float, float]]) -> str | None:
    """What is wrong with (step_fraction, t) knots, or None when they describe a valid t(tau)."""
    fractions = [f for f, _ in knots]
    timesteps = [t for _, t in knots]
    if (
        len(knots) < 2
        or fractions[0] != 0.0
        or fractions[-1] != 1.0
        or any(b <= a for a, b in pairwise(fractions))
    ):
        return f"fractions are {fractions}"
    if any(not 1.0 <= t <= 999.0 for t in timesteps) or any(b > a for a, b in pairwise(timesteps)):
        return f"timesteps are {timesteps}"
    return None
