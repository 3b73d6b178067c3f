"""Cosine decay (`type: cosine`), as Keras' CosineDecay without warmup.

lr = lr0 · ((1 − alpha) · ½(1 + cos(π · min(t, decay_steps) / decay_steps)) + alpha)
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import between, param, positive_int
from .schedule import Schedule

__all__ = ["CosineDecay"]


@dataclass(frozen=True, kw_only=True)
class CosineDecay(Schedule):
    """Half a cosine from lr0 down to alpha · lr0 over decay_steps, then flat."""

    type = "cosine"
    equivalents = (
        "Keras `CosineDecay(lr0, decay_steps, alpha)`",
        "torch `CosineAnnealingLR(T_max=decay_steps, eta_min=alpha * lr0)` up to T_max",
    )

    decay_steps: int = param(check=positive_int, doc="epochs (or steps) to decay over")
    alpha: float = param(0.0, between(0, 1, lo_open=False, hi_open=False), "final LR / lr0")
