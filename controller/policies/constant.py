"""A fixed LR (`type: constant`): lr = `lr`, default lr0."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import an_lr, param
from .schedule import Schedule

__all__ = ["Constant"]


@dataclass(frozen=True, kw_only=True)
class Constant(Schedule):
    """Hold one LR; useful as a phase, or to pin a job while you look at it."""

    type = "constant"
    equivalents = ("the optimizer's own LR, with no scheduler",)

    lr: float | None = param(None, an_lr, "the LR (default lr0)")
