"""The range test over the wire: snapshot at hello, restore with the suggestion, the next
phase from it, the curve in the audit log, `lrpilot range-test`, status and metrics; a client
that cannot restore is refused with a notice. Raw protocol peers against a real controller."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import pytest
from conftest import Controller, Wire, run_cli

from lrpilot.client import Client
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


def test_a_trainer_restarted_mid_sweep_without_restore_abandons_the_sweep(
    controller_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's run: a trainer dies mid-sweep and comes back (from its checkpoint at step
    6, or from scratch) with a client that cannot put weights back. The sweep is abandoned
    (audited), the trainer is told in its own log, and it never trains at a sweep LR."""
    c = controller_factory(POLICY)
    restores: list[str] = []

    def restoring(job: str) -> Client:
        return Client(
            c.bind, job=job, initial_lr=0.01, timeout=2.0, rank=0, world=1,
            snapshot_fn=lambda: None, restore_fn=lambda: restores.append(job),
        )  # fmt: skip

    caplog.set_level(logging.WARNING, logger="lrpilot.client")
    for job, start in (("from-checkpoint", 6), ("from-scratch", 0)):
        first = restoring(job)
        try:
            for step in range(6):
                first.report(0, {"loss": loss_at(first.lr)}, step=step)
            assert first.lr == pytest.approx(1e-4 * 10 ** (6 / 10))  # mid-sweep
            caplog.clear()
            with Client(c.bind, job=job, initial_lr=0.01, start_step=start, timeout=2.0,
                        rank=0, world=1) as again:  # fmt: skip
                assert [code for code, _ in again.notices] == ["restore_unsupported"]
                assert "restore_unsupported" in caplog.text  # logged in the trainer
                assert again.lr == pytest.approx(0.01, rel=1e-7)  # never a sweep LR
                if start:  # it joined: it trains on in the plateau phase from the old LR
                    assert again.report(0, {"loss": 1.0}, step=start) == again.lr
            # From scratch the new process did not join, so the first is still rank 0's
            # worker: were it alive, it would put its weights back. From the checkpoint the
            # new process took rank 0 over (the old one is gone): nothing to push.
            first.poll(step=6)
            assert first.lr == pytest.approx(0.01 if not start else 1e-4 * 10**0.6, rel=1e-7)
        finally:
            first.close()
        history = json.loads(run_cli("history", job, "--json", "--admin", c.admin).stdout)
        last = history[-1]
        assert (last["reason"], last["source"]) == ("range_test", "hello")
        assert json.loads(last["detail"])["stop_reason"] == "abandoned"
        out = run_cli("range-test", job, "--json", "--admin", c.admin)
        report = json.loads(out.stdout)
        assert report["stop_reason"] == "abandoned" and report["suggested_lr"] is None
        assert len(report["points"]) == 6
    assert restores == ["from-scratch"]
    assert c.log().count("cannot put its weights back") == 2  # the controller's log, too
