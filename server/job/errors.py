"""The exceptions a job raises, in one place: the serve loop maps each to a protocol error code.

stdlib only, so the settings (`spec`), the core (`server.distill`, `server.priors`) and the serve
loop share them without importing one another.
"""

from __future__ import annotations


class JobSpecError(ValueError):
    """A job setting is invalid; `field` names it (dotted for nested ones, e.g. "orbit.radius")."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class Cancelled(Exception):
    """Raised by a job when `should_cancel()` turns true; `step` is the last step completed."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"cancelled after step {step}")


class MissingWeightsError(RuntimeError):
    """A prior's weights are not on this machine; `model` names them, `fix` says how to get them.

    The server maps it to the protocol's `missing_weights` error, so the message must be actionable.
    """

    def __init__(self, model: str, fix: str):
        self.model, self.fix = model, fix
        super().__init__(f"weights for {model!r} are not available: {fix}")


class NonFiniteError(RuntimeError):
    """The optimisation produced NaN/inf; the server reports it as the protocol's `nan` error."""


class ShapeVanishedError(NonFiniteError):
    """The surface shrank to nothing, so no view sees it and no gradient can bring it back: as final as a
    NaN, and reported the same way (the protocol's `nan` error, whose fix names another seed)."""


class MissingExtraError(RuntimeError):
    """An optional part the job needs (Ray, for a batch) is not installed or not reachable; `fix` says
    what to do. The server maps it to the protocol's `missing_extra` error."""

    def __init__(self, message: str, fix: str):
        self.fix = fix
        super().__init__(message)
