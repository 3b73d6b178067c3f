"""Where to pick the LR on a range test's curve: fastai's `valley`, `steep` and `minimum`.

Each function takes the LRs of a sweep (increasing) and the smoothed losses measured at them
(finite, same length) and returns one LR. They follow the definitions fastai publishes with
`Learner.lr_find` (fastai/callback/schedule.py, `SuggestionMethod`):

- `valley`: the longest valley of decreasing loss — the length L of the longest strictly
  decreasing subsequence, ending at index `end` (the first index that reaches that length);
  the valley is taken as [end − L, end] and the LR at `start + ⌊(end−start)/3⌋ +
  ⌊(end−start)/6⌋` of it is suggested.
- `steep`: where the loss falls fastest against log LR: the LR at the left end of the
  segment with the most negative Δloss / Δlog(LR).
- `minimum`: the LR at the lowest loss, divided by 10.

`suggest` prepares the curve as `lr_find` does before calling them: it leaves out the first
tenth of the planned sweep and the last 5 points (the blow-up that stopped it), then cuts
the rest at its first non-finite loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

__all__ = ["METHODS", "minimum", "steep", "suggest", "valley"]


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The LR part-way down the longest valley of decreasing loss (fastai's default)."""
    n = len(losses)
    if n == 0:
        raise ValueError("valley needs at least one point")
    longest = [1] * n  # longest[i]: length of the longest decreasing subsequence ending at i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end = i
                start = end - longest[end]
    sections = (end - start) / 3
    # fastai's index can be -1 for a two-point valley at the very start; it means the first point.
    index = max(0, start + int(sections) + int(sections / 2))
    return float(lrs[index])


def steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The LR where the loss falls fastest against log LR."""
    if len(losses) < 2:
        raise ValueError("steep needs at least two points")
    slopes = [
        (losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
        for i in range(len(losses) - 1)
    ]
    return float(lrs[min(range(len(slopes)), key=slopes.__getitem__)])


def minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """A tenth of the LR at the lowest loss."""
    if len(losses) == 0:
        raise ValueError("minimum needs at least one point")
    return float(lrs[min(range(len(losses)), key=losses.__getitem__)]) / 10


#: The suggestion methods by the name `suggest:` takes.
METHODS: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "valley": valley,
    "steep": steep,
    "minimum": minimum,
}

SKIP_END = 5  # lr_find drops the last 5 points: the ones that ran into divergence


def suggest(
    lrs: Sequence[float], losses: Sequence[float], skip_start: int, skip_end: int = SKIP_END
) -> dict[str, float | None]:
    """All three suggestions on a recorded curve, prepared as fastai's `lr_find` does.

    `lr_find` takes `lrs[num_it // 10 : -5]` (the first tenth of the planned sweep and the
    last 5 points left out), then cuts that at its first NaN. A curve with fewer than two
    points left that way keeps all its points up to the first non-finite loss.

    Args:
        lrs: the LR of each point.
        losses: the smoothed loss of each point (may end in non-finite values).
        skip_start: points left out at the start (lr_find: a tenth of the planned sweep).
        skip_end: points left out at the end.

    Example:
        >>> s = suggest([1e-3, 1e-2, 1e-1], [1.0, 0.5, 0.8], skip_start=0)
        >>> s["minimum"]
        0.001
    """
    xs, ys = _finite_prefix(
        lrs[skip_start : len(lrs) - skip_end], losses[skip_start : len(losses) - skip_end]
    )
    if len(ys) < 2:
        xs, ys = _finite_prefix(lrs, losses)
    out: dict[str, float | None] = {}
    for name, method in METHODS.items():
        try:
            out[name] = method(xs, ys)
        except ValueError:  # too few points for this method
            out[name] = None
    return out


def _finite_prefix(
    lrs: Sequence[float], losses: Sequence[float]
) -> tuple[list[float], list[float]]:
    n = 0
    while n < len(losses) and math.isfinite(losses[n]):
        n += 1
    return list(lrs[:n]), list(losses[:n])
