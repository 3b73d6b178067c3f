"""Errors the controller side raises on purpose; all are `lrpilot.client.errors.LRPilotError`.

Policy files, the state directory, the policy loader, binding and the admin API
each have theirs here; the policy engine's are in `lrpilot.controller.policies.errors`.
"""

from __future__ import annotations

from lrpilot.client.errors import LRPilotError, ProtocolError

__all__ = [
    "AdminError",
    "BadEndpoint",
    "BindError",
    "DiskFull",
    "Forbidden",
    "Moved",
    "NoAnswer",
    "NotOwner",
    "PolicyError",
    "PolicyFileError",
    "SourceError",
    "StateDirError",
    "StateDirLocked",
    "StoreCorrupt",
    "StoreUnavailable",
    "UnknownJob",
]


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


class PolicyFileError(LRPilotError):
    """The policy file cannot be read: missing, a directory, a symlink loop, unreadable,
    too large, not UTF-8."""


class StateDirError(LRPilotError):
    """The state directory cannot be used; the message says why and what to do."""


class StateDirLocked(StateDirError):
    """Another controller holds the state directory."""


class StoreCorrupt(StateDirError):
    """The state database is damaged; it is not loaded."""


class StoreUnavailable(LRPilotError):
    """The state cannot be read or written now (a database down or out of reach); clients
    are answered `unavailable` and resend."""


class NotOwner(StoreUnavailable):
    """A commit touched a job whose shard this controller does not hold; nothing was written."""


class Moved(ProtocolError):
    """The job's shard is another controller's: the reply names its admin endpoint.

    Args:
        job: the job asked about.
        endpoint: the admin endpoint of the controller that holds its shard.
    """

    def __init__(self, job: str, endpoint: str) -> None:
        super().__init__("moved", f"job {job} is steered at the controller at {endpoint}")
        self.endpoint = endpoint


class DiskFull(StateDirError):
    """The state directory's file system is full (or the process' file size limit is hit)."""


class BindError(LRPilotError, OSError):
    """An endpoint or port the controller cannot bind; the message names it and the flag."""


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
