"""The two kinds of error the physics raises (see `cost_models.specs`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .specs import Estimate


class SpecError(ValueError):
    """A user-supplied spec or layout is malformed; the message says what to change."""


class InfeasibleLayout(Exception):  # noqa: N818 - the domain name used across meshplan
    """A valid layout that cannot run, e.g. it does not fit in GPU memory.

    `estimate` (if set) holds the `Estimate` whose memory breakdown shows by how much.
    """

    def __init__(self, message: str, estimate: Estimate | None = None):
        super().__init__(message)
        self.estimate = estimate
