"""Polynomial decay (`type: polynomial`), as Keras' PolynomialDecay (BERT's schedule).

lr = (lr0 − end_lr) · (1 − t / decay_steps)^power + end_lr, flat after
decay_steps; with `cycle: true` decay_steps stretches to the next multiple of
itself past t (Keras' behaviour, not a restart). torch's PolynomialLR is end_lr 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrpilot.client.vocabulary import MAX_LR

from .fields import between, param, positive, positive_int
from .schedule import Schedule

__all__ = ["PolynomialDecay"]


@dataclass(frozen=True, kw_only=True)
class PolynomialDecay(Schedule):
    """Polynomial decay from lr0 to end_lr (Keras PolynomialDecay, torch PolynomialLR)."""

    type = "polynomial"
    equivalents = (
        "Keras `PolynomialDecay`",
        "torch `PolynomialLR(total_iters=decay_steps, power)` (end_lr 0)",
    )

    decay_steps: int = param(check=positive_int, doc="units to decay over")
    end_lr: float = param(1e-4, between(0, MAX_LR, lo_open=False, hi_open=False), "LR at the end")
    power: float = param(1.0, positive, "exponent of the decay (1: linear)")
    cycle: bool = param(False, doc="stretch decay_steps past its end (Keras cycle)")
