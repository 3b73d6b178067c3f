"""Errors the controller side raises on purpose; all are `lrpilot.client.errors.LRPilotError`.

(Policy-file and protocol errors live in `lrpilot.client.errors`, which both sides import.)
"""

from __future__ import annotations

from lrpilot.client.errors import LRPilotError

__all__ = ["AdminError", "BadEndpoint", "Forbidden", "NoAnswer", "UnknownJob"]


class NoAnswer(LRPilotError):
    """No controller answered on the admin endpoint in time."""


class BadEndpoint(LRPilotError, ValueError):
    """An admin endpoint that ZeroMQ cannot use (no scheme, say)."""


class AdminError(LRPilotError):
    """The controller refused an admin request; `code` says why (`out_of_range`, ...).

    Args:
        code: the error code of the controller's reply.
        message: the controller's explanation.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class UnknownJob(AdminError):
    """The controller knows no job of that name."""


class Forbidden(AdminError):
    """The admin key may not do this (CURVE with a job-limited or removed key)."""
