"""Prometheus metrics from a real scrape match the controller's decisions; series stay bounded."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from conftest import Controller, Wire, run_cli
from prometheus_client.parser import text_string_to_metric_families

Factory = Callable[..., Controller]
POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2, min_delta: 0.0, min_lr: 0.01}
"""


def series(c: Controller, name: str) -> list[dict[str, str]]:
    out = []
    for family in text_string_to_metric_families(c.scrape()):
        for sample in family.samples:
            if sample.name == name:
                out.append(sample.labels)
    return out


def test_metrics_match_a_scripted_run(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    w = Wire(c.bind, "job-m")
    try:
        w.hello(lr=0.1)
        values = [1.0, 0.8, 0.9, 0.95, 0.85, 0.81, 0.79]
        replies = [w.report(e, {"val_loss": v}) for e, v in enumerate(values)]
        m = lambda name, **kw: c.metric(name, training_job="job-m", **kw)  # noqa: E731
        assert m("lrpilot_learning_rate") == pytest.approx(replies[-1].lr)
        assert m("lrpilot_monitor_value") == pytest.approx(0.79)
        assert m("lrpilot_monitor_best") == pytest.approx(0.79)
        assert m("lrpilot_plateau_wait") == 0 and m("lrpilot_plateau_patience") == 2
        assert m("lrpilot_min_lr") == pytest.approx(0.01)
        assert m("lrpilot_epoch") == 6 and m("lrpilot_workers") == 1
        assert m("lrpilot_reports_total") == len(values)
        reductions = sum(1 for r in replies if r.reason == "plateau")
        assert reductions == 2
        assert m("lrpilot_lr_changes_total", reason="plateau") == reductions
        assert m("lrpilot_lr_changes_total", reason="override") == 0  # present from the start
        assert m("lrpilot_policy_info", policy="plateau", phase="") == 1
        assert m("lrpilot_last_report_timestamp_seconds") == pytest.approx(time.time(), abs=30)
        assert c.metric("lrpilot_jobs") == 1
        assert c.metric("lrpilot_decision_seconds_count") >= len(values)
        assert c.metric("lrpilot_build_info") == 1
        for reason in (
            "too_large",
            "decode",
            "schema",
            "unknown_type",
            "out_of_range",
            "bad_version",
            "unknown_session",
            "max_jobs",
            "mode_unresolved",
        ):
            assert {"reason": reason} in series(c, "lrpilot_invalid_messages_total")
        assert c.metric("lrpilot_policy_last_reload_success") == 1
        assert c.metric("lrpilot_policy_last_reload_timestamp_seconds") > 0
    finally:
        w.close()


def test_job_ttl_removes_every_series_of_a_silent_job(controller_factory: Factory) -> None:
    c = controller_factory(POLICY, "--job-ttl", "1s", "--worker-timeout", "1s")
    w = Wire(c.bind, "job-ttl")
    run = w.hello().run
    w.report(0, {"val_loss": 1.0})
    w.close()
    assert any(s.get("training_job") == "job-ttl" for s in series(c, "lrpilot_learning_rate"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "job-ttl" in c.scrape():
        time.sleep(0.2)
    assert "job-ttl" not in c.scrape()
    assert c.metric("lrpilot_jobs") == 0
    status = run_cli("status", "--json", "--admin", c.admin)
    assert status.stdout.strip() == "[]"
    # Its state is kept on disk: a resume picks it up again.
    w = Wire(c.bind, "job-ttl")
    assert w.hello(start_epoch=1).run == run
    w.close()


def test_a_thousand_short_jobs_leave_a_bounded_number_of_series(
    controller_factory: Factory,
) -> None:
    c = controller_factory(POLICY, "--job-ttl", "1s", "--max-jobs", "200")
    refused = 0
    for i in range(1000):
        w = Wire(c.bind, f"short-{i}")
        reply = w.hello()
        if getattr(reply, "code", None) == "max_jobs":
            refused += 1
        else:
            w.report(0, {"val_loss": 1.0})
            w.sock.send(
                __import__("msgpack").packb(
                    {"t": "bye", "job": w.job, "rank": 0, "session": w.session}, use_bin_type=True
                )
            )
        w.close()
        if i % 250 == 249:
            time.sleep(1.3)  # let the TTL sweep drop finished jobs
    lines = [ln for ln in c.scrape().splitlines() if ln.startswith("lrpilot_learning_rate{")]
    assert len(lines) <= 200
    assert c.metric("lrpilot_jobs") <= 200
    assert c.metric("lrpilot_invalid_messages_total", reason="max_jobs") == refused
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and c.metric("lrpilot_jobs") > 0:
        time.sleep(0.2)
    assert c.metric("lrpilot_jobs") == 0
    assert "short-" not in c.scrape()


def test_workers_gauge_follows_worker_timeout(controller_factory: Factory) -> None:
    c = controller_factory(POLICY, "--worker-timeout", "1s")
    w = Wire(c.bind, "job-wk")
    try:
        w.hello()
        w.report(0, {"val_loss": 1.0})
        assert c.metric("lrpilot_workers", training_job="job-wk") == 1
        deadline = time.monotonic() + 10
        while c.metric("lrpilot_workers", training_job="job-wk") != 0:
            assert time.monotonic() < deadline, "a silent rank must stop counting as a worker"
            time.sleep(0.2)
    finally:
        w.close()
