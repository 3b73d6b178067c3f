"""Multi-worker aggregation: the reports of one epoch from every rank become one value.

Pure and immutable. The controller waits for epoch t's report from every
rank (or `aggregate_timeout`), then decides once on the mean (or max) of
their metrics; one diverged rank (NaN) is a diverged job.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from lrpilot.client.protocol import Report

from .pmap import PMap

__all__ = ["Pending", "combine"]


@dataclass(frozen=True)
class Pending:
    """Reports of one epoch (or step) `t` waiting for the other ranks."""

    t: int
    first_seen: float
    reports: PMap[int, Report] = field(default_factory=PMap)

    def add(self, report: Report) -> Pending:
        """These reports and `report` (sharing the others: O(1) in the world size)."""
        return Pending(self.t, self.first_seen, self.reports.set(report.rank, report))

    def complete(self, world: int) -> bool:
        return len(self.reports) >= world


def combine(reports: Mapping[int, Report], how: str) -> dict[str, float]:
    """One value per metric from every rank's report: `mean` or `max` (NaN wins)."""
    if len(reports) == 1:
        return dict(next(iter(reports.values())).metrics)
    names = set().union(*(r.metrics for r in reports.values()))
    out: dict[str, float] = {}
    for name in names:
        values = [r.metrics[name] for r in reports.values() if name in r.metrics]
        if any(math.isnan(v) for v in values):
            out[name] = math.nan
        elif how == "max":
            out[name] = max(values)
        else:
            out[name] = math.fsum(values) / len(values)
    return out
