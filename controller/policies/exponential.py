"""Exponential decay (`type: exponential`), in either of its two usual forms.

`{decay_rate, decay_steps, staircase}` is Keras' ExponentialDecay:
lr0 · decay_rate^(t / decay_steps) (floor of the exponent with staircase);
`{k}` is the textbook lr0 · e^(−k·t). Give one form, not both.
"""

from __future__ import annotations

from dataclasses import dataclass

from .fields import at_least, param, positive, positive_int
from .schedule import Schedule

__all__ = ["ExponentialDecay"]


@dataclass(frozen=True, kw_only=True)
class ExponentialDecay(Schedule):
    """Exponential decay per epoch (or step)."""

    type = "exponential"
    equivalents = (
        "Keras `ExponentialDecay(lr0, decay_steps, decay_rate, staircase)`",
        "torch `ExponentialLR(gamma=decay_rate)` (decay_steps 1)",
    )

    decay_rate: float | None = param(None, positive, "Keras form: multiplier per decay_steps")
    decay_steps: int | None = param(None, positive_int, "Keras form: period of decay_rate")
    staircase: bool = param(False, doc="Keras form: decay in whole periods")
    k: float | None = param(None, at_least(0), "textbook form: lr0 * exp(-k * t)")

    def problems(self) -> list[tuple[str | None, str]]:
        keras_form = self.decay_rate is not None or self.decay_steps is not None
        if self.k is not None and keras_form:
            return [("k", "give either k or decay_rate/decay_steps, not both")]
        if self.k is None and not (self.decay_rate is not None and self.decay_steps is not None):
            return [(None, "exponential needs k, or decay_rate and decay_steps")]
        if self.k is not None and self.staircase:
            return [("staircase", "staircase applies to the decay_rate/decay_steps form")]
        return []
