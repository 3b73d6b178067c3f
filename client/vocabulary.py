"""The words controller and client share: reasons, codes, actions, the name pattern, LR bounds.

Dependency-free (the standard library only), so the policy engine, the daemon
and the client all import it and each rule is written once. The engine
imports nothing else from the client: the wire format (`protocol.py`) is the
daemon's and the client's business.

Example:

    >>> from lrpilot.client.vocabulary import lr_problem
    >>> lr_problem(0.1) is None
    True
    >>> lr_problem(1e-300)
    'must be a finite number in [1e-12, 10]'
"""

from __future__ import annotations

import math
import re
import struct

__all__ = [
    "ACTIONS",
    "ERROR_CODES",
    "LR_MESSAGE",
    "LR_RANGE",
    "MAX_LR",
    "MIN_LR",
    "NAME_RE",
    "NOTICE_CODES",
    "REASONS",
    "RETRYABLE_CODES",
    "as_lr",
    "clamp_lr",
    "float32",
    "lr_ok",
    "lr_problem",
]

#: The smallest and largest LR lrpilot accepts or sends (wire, admin, policy file, CLI).
MIN_LR = 1e-12
MAX_LR = 10.0
#: Shown in messages: "[1e-12, 10]".
LR_RANGE = f"[{MIN_LR:g}, {MAX_LR:g}]"
#: What is wrong with an LR that `lr_ok` refuses; the caller quotes the value.
LR_MESSAGE = f"must be a finite number in {LR_RANGE}"

#: Job and metric names, matched in full (`fullmatch`: no trailing newline slips through).
NAME_RE = re.compile(r"[A-Za-z0-9._:/@-]{1,128}")

#: Error codes in `error` replies, and reasons of `lrpilot_invalid_messages_total`.
ERROR_CODES = (
    "too_large",
    "decode",
    "schema",
    "unknown_type",
    "out_of_range",
    "bad_version",
    "unknown_session",
    "max_jobs",
    "mode_unresolved",
    "moved",
    "unavailable",
    "forbidden",
)

#: Error codes a client may retry: the message was not processed and should be sent again.
RETRYABLE_CODES = ("unavailable",)

#: Why an LR is what it is: in `lr` messages, the audit log and metrics.
REASONS = (
    "initial",
    "unchanged",
    "plateau",
    "schedule",
    "phase",
    "override",
    "range_test",
    "reload",
    "divergence",
    "resume",
)

#: What the trainer should do at the boundary besides using the LR.
ACTIONS = ("snapshot", "restore", "stop")

#: What the controller tells the trainer about its job (in `lr.notices`); clients log each
#: code once per run.
NOTICE_CODES = (
    "monitor_missing",
    "mode_unresolved",
    "shadow",
    "clamped",
    "restore_unsupported",
    "rolled_back",
    "override",
)

_F32 = struct.Struct("<f")
_MIN_LR_F32 = _F32.unpack(_F32.pack(MIN_LR))[0]


def float32(x: float) -> float:
    """Round `x` to the nearest float32, as TensorFlow stores an optimizer's LR and compares."""
    try:
        return float(_F32.unpack(_F32.pack(x))[0])
    except OverflowError:
        return math.copysign(math.inf, x)


def lr_ok(value: float) -> bool:
    """Whether `value` is an LR lrpilot accepts: finite, at most 10 and at least 1e-12, also
    once rounded to float32 (what Keras and a float32 optimizer keep of it).

    Example:
        >>> lr_ok(1e-12), lr_ok(float32(1e-12)), lr_ok(0.0), lr_ok(10.000001)
        (True, True, False, False)
    """
    # float32(1e-12) is 9.9999998e-13: a value the policy rounded is compared in float32.
    return math.isfinite(value) and value <= MAX_LR and float32(value) >= _MIN_LR_F32


def lr_problem(value: object) -> str | None:
    """None for an acceptable LR (see `lr_ok`), else what is wrong; the caller quotes the
    value (`f"lr {problem}, got {value!r}"`)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not lr_ok(float(value)):
        return LR_MESSAGE
    return None


def as_lr(value: object) -> float | None:
    """`value` as a float if it is an acceptable LR (see `lr_ok`), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not lr_ok(float(value)):
        return None
    return float(value)


def clamp_lr(value: float) -> float:
    """The acceptable LR nearest to `value` (MIN_LR for NaN, 0 and below)."""
    if value > MAX_LR:
        return MAX_LR
    if not value >= MIN_LR:  # also NaN
        return MIN_LR
    return value
