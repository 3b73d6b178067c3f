"""What a client sees go wrong, and the root of every lrpilot error.

`LRPilotError` is the base of every error lrpilot raises on purpose, on both
sides: the controller's (`lrpilot.controller.errors`) and the policy engine's
(`lrpilot.controller.policies.errors`) derive from it, so `except LRPilotError`
catches "an lrpilot error". This module imports nothing, so the engine can
use the base class without the wire protocol.
"""

from __future__ import annotations

__all__ = ["ControllerUnavailable", "ExpressionError", "LRPilotError", "ProtocolError"]


class LRPilotError(Exception):
    """Base class of every error lrpilot raises on purpose."""


class ProtocolError(LRPilotError):
    """A message that breaks the wire protocol; `code` is the error code sent back.

    Args:
        code: one of the protocol's error codes (`decode`, `schema`, `out_of_range`, ...).
        message: what is wrong, quoting the bad value.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class ControllerUnavailable(LRPilotError):
    """`strict=True`: the controller did not answer the client's hello within `timeout`."""


class ExpressionError(LRPilotError, ValueError):
    """A formula (`lrpilot.client.expression`) that cannot be used; the message says what
    is wrong with it. The policy engine's `FormulaError` is one."""
