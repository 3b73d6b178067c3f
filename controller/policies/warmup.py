"""Linear warmup (`type: warmup`): lr = from_lr + (to_lr − from_lr) · t / epochs.

from_lr defaults to lr0. Inside `phases` the warmup lasts `epochs` and leaves
`to_lr` to the next phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import an_lr, param, positive_int
from .schedule import Schedule

__all__ = ["Warmup"]


@dataclass(frozen=True, kw_only=True)
class Warmup(Schedule):
    """Ramp the LR linearly from from_lr to to_lr over `epochs`, then hold to_lr."""

    type = "warmup"
    equivalents = (
        (
            "torch `LinearLR(start_factor=from_lr / to_lr, total_iters=epochs)` "
            "with the optimizer at to_lr"
        ),
        "the warmup of Keras `CosineDecay(warmup_target, warmup_steps)`",
    )

    to_lr: float = param(check=an_lr, doc="LR reached after `epochs`")
    epochs: int = param(check=positive_int, doc="length of the ramp (steps with unit: step)")
    from_lr: float | None = param(None, an_lr, "start LR (default lr0)")
