"""`status` during and after a range test, against a real controller.

During the sweep `suggested_lr` (the admin API's status rows; the table's NOTE column) is
null until the curve has enough finite points (`SUGGEST_AFTER`), then what the curve so
far suggests; at and after the restore it is the LR the test chose. VALUE is the curve's
smoothed loss, never the diverged loss that stopped the sweep. `status --json` keeps
DESIGN.md's twelve fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from conftest import Controller, Wire, run_cli

from lrpilot.controller.admin import Admin
from lrpilot.controller.jobstate import SUGGEST_AFTER

Factory = Callable[..., Controller]

POLICY = """\
version: 1
defaults:
  policy: {type: range_test, start_lr: 1.0e-6, end_lr: 10, steps_per_decade: 20}
"""


def loss_at(lr: float) -> float:
    """A loss that falls with the LR up to about 1e-3, then blows up (inf past 3)."""
    if lr > 3:
        return math.inf
    return 1.0 / (1 + 1000 * lr) if lr < 0.5 else 50 * lr


def status(c: Controller, job: str) -> dict[str, Any]:
    return next(r for r in Admin(c.admin).status() if r["job"] == job)


def test_status_shows_the_suggestion_during_and_after_the_sweep(
    controller_factory: Factory,
) -> None:
    c = controller_factory(POLICY)
    peer = Wire(c.bind, "rt-status")
    try:
        answer = peer.hello(lr=0.01, restore=True)
        assert answer.action == "snapshot"
        lr, seen = answer.lr, {}
        for t in range(400):
            answer = peer.report(0, {"loss": loss_at(lr)}, lr=lr, step=t)
            if t + 1 in (SUGGEST_AFTER - 5, 60):
                seen[t + 1] = status(c, "rt-status")
            if answer.action == "restore":
                break
            lr = answer.lr
        assert answer.action == "restore", "the sweep never ended"
        diverged = loss_at(lr)
        after = status(c, "rt-status")
        table = run_cli("status", "--admin", c.admin).stdout
        row = json.loads(run_cli("status", "--json", "--admin", c.admin).stdout)[0]
    finally:
        peer.close()
    assert seen[SUGGEST_AFTER - 5]["suggested_lr"] is None  # too few points to tell
    during = seen[60]["suggested_lr"]
    assert during is not None and 1e-6 < during < 1.0
    assert after["suggested_lr"] == answer.lr  # the LR the restore sent
    assert after["value"] is not None and math.isfinite(after["value"])
    assert after["value"] != diverged and after["value"] < 1.0  # the curve's, not the blow-up
    assert f"suggested {answer.lr:.3g}" in table, table
    assert row["value"] == after["value"] and "suggested_lr" not in row  # DESIGN's fields
