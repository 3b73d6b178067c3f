"""Typed errors of lrpilot, one place for all of them.

They live in the client package because the controller imports the client
(the wire protocol lives here) and never the other way round.
"""

from __future__ import annotations

__all__ = ["ControllerUnavailable", "LRPilotError", "PolicyError", "ProtocolError", "SourceError"]


class LRPilotError(Exception):
    """Base class of every error lrpilot raises on purpose."""


class SourceError(LRPilotError):
    """An error located in an input file: `file:line: message`.

    Args:
        message: what is wrong, quoting the bad value.
        file: the file name as the user gave it, or None.
        line: 1-based line number, or None.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        super().__init__(self.located())

    def located(self) -> str:
        if self.file is None:
            return self.message
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class PolicyError(SourceError):
    """One or more errors in a policy file; `errors` holds every one found.

    Args:
        errors: the individual located errors, in file order.
    """

    def __init__(self, errors: list[SourceError]) -> None:
        self.errors = errors
        first = errors[0] if errors else SourceError("invalid policy")
        super().__init__(first.message, first.file, first.line)

    def __str__(self) -> str:
        return "\n".join(e.located() for e in self.errors)


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
