"""The range test over the wire: snapshot at hello, restore with the suggestion, the next
phase from it, the curve in the audit log, `lrpilot range-test`, status and metrics; a client
that cannot restore is refused with a notice. Raw protocol peers against a real controller."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
from conftest import Controller, Wire, run_cli

from lrpilot.client.protocol import ErrorMessage, LrMessage

Factory = Callable[..., Controller]
POLICY = """\
version: 1
defaults:
  phases:
    - {type: range_test, start_lr: 1.0e-4, end_lr: 10, steps_per_decade: 10, suggest: minimum}
    - {type: plateau, lr: suggested, monitor: loss, factor: 0.5, patience: 3, unit: step}
"""


def loss_at(lr: float) -> float:
    """A curve that falls until lr ~ 0.03 and blows up past 0.2 (a known stability limit)."""
    x = math.log10(lr)
    return 1.0 + (x + 1.5) ** 2 if lr < 0.2 else 1e6 * lr


def test_a_range_test_sweeps_restores_and_hands_its_suggestion_on(
    controller_factory: Factory, tmp_path: object
) -> None:
    c = controller_factory(POLICY)
    w = Wire(c.bind, "find-lr")
    try:
        hello = w.hello(lr=0.01, restore=True)
        assert isinstance(hello, LrMessage) and hello.action == "snapshot"
        assert hello.lr == 1e-4 and hello.apply_from_step == 0
        lr, step, restore = hello.lr, 0, None
        while step < 200:
            reply = w.report(0, {"loss": loss_at(lr)}, lr=lr, step=step)
            assert isinstance(reply, LrMessage), reply
            step += 1
            if reply.action == "restore":
                restore = reply
                break
            assert reply.apply_from_step == step
            lr = reply.lr
        assert restore is not None and restore.reason == "range_test"
        assert lr > 2e-4 and lr > 0.2  # the sweep went past the limit before stopping
        suggested = restore.lr
        assert 1e-3 < suggested < 0.2  # below the limit, within two decades of it

        out = run_cli("range-test", "find-lr", "--json", "--admin", c.admin)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["done"] and report["stop_reason"] == "divergence"
        # The restore carries the next phase's LR: the suggestion as a Keras-compat plateau
        # holds it (float32).
        assert report["suggested_lr"] == pytest.approx(suggested, rel=1e-7)
        assert report["suggest"] == "minimum"
        assert set(report["suggestions"]) == {"valley", "steep", "minimum"}
        assert len(report["points"]) >= 10 and all(len(p) == 3 for p in report["points"])
        text = run_cli("range-test", "find-lr", "--admin", c.admin).stdout
        assert "minimum" in text and "<- suggest" in text

        # The plateau phase starts from the suggestion and goes on deciding.
        reply = w.report(0, {"loss": 1.0}, lr=suggested, step=step)
        assert isinstance(reply, LrMessage) and reply.lr == suggested
        status = json.loads(run_cli("status", "--json", "--admin", c.admin).stdout)[0]
        assert status["phase"] == "2/2 plateau"
        metric = c.metric("lrpilot_range_test_suggested_lr", training_job="find-lr")
        assert metric == pytest.approx(suggested, rel=1e-7)
        history = json.loads(run_cli("history", "find-lr", "--json", "--admin", c.admin).stdout)
        final = [r for r in history if r["reason"] == "range_test"][-1]
        audited = json.loads(final["detail"])  # the curve, in the audit log
        assert audited["suggested_lr"] == report["suggested_lr"] and audited["points"]
    finally:
        w.close()


def test_a_client_that_cannot_restore_is_refused_with_a_notice(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    w = Wire(c.bind, "no-restore")
    try:
        reply = w.hello(lr=0.01)  # no `restore: true`
        assert isinstance(reply, LrMessage) and reply.lr == 0.01 and reply.action is None
        assert [code for code, _ in reply.notices] == ["restore_unsupported"]
        assert "model=model" in reply.notices[0][1]
        answer = w.report(0, {"loss": 1.0}, lr=0.01, step=0)
        assert isinstance(answer, ErrorMessage) and answer.code == "unknown_session"
        out = run_cli("status", "--json", "--admin", c.admin)
        assert "no-restore" not in out.stdout  # it never joined
    finally:
        w.close()
