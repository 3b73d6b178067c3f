"""Errors the policy engine raises; the daemon maps them to wire codes (`transitions.decide`).

The engine knows no wire: these say what went wrong in the engine's words.
"""

from __future__ import annotations

from lrpilot.client.errors import ExpressionError, LRPilotError

__all__ = ["EngineError", "FormulaError", "ModeUnresolved"]


class EngineError(LRPilotError):
    """Base of the policy engine's errors."""


class FormulaError(EngineError, ExpressionError):
    """A formula that cannot be used; the message says what is wrong with it."""


class ModeUnresolved(EngineError):
    """`mode: auto` cannot tell whether the monitored metric should go down or up.

    Args:
        monitor: the metric's name.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        super().__init__(
            f"cannot tell whether `{monitor}` should be minimised or maximised; "
            "set mode: min or mode: max in the policy"
        )
