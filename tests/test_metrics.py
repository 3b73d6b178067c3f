"""Prometheus metrics from a real scrape match the controller's decisions; series stay bounded."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from conftest import Clock, Controller, Wire, turn_until
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lrpilot.client.protocol import Bye, Hello, Report, encode
from lrpilot.controller.server import Server

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


@pytest.fixture
def clocked(
    clocked_server: Callable[..., tuple[Server, Clock]],
) -> Callable[..., tuple[Server, Clock]]:
    return lambda **config: clocked_server(POLICY, **config)


def _scrape(s: Server) -> str:
    return s.metrics.render().decode()


def _metric(s: Server, name: str, **labels: str) -> float:
    """One sample's value from the controller's exposition; a missing series fails."""
    for family in text_string_to_metric_families(_scrape(s)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no series {name}{labels} in the scrape")


def _say(s: Server, w: Wire, *frames: bytes) -> list[object]:
    for frame in frames:
        w.sock.send(frame)
    return [turn_until(s, w)[0] for _ in frames]


def _turn_while(s: Server, waiting: Callable[[], bool], tries: int = 200) -> None:
    """Turn the loop until the controller shows what the test waits for (bounded)."""
    for _ in range(tries):
        if not waiting():
            return
        s.sock.poll(10)
        s.turn()
    raise AssertionError("the controller never got there")


def _hello(w: Wire, start_epoch: int = 0) -> bytes:
    return encode(Hello(w.job, w.rank, w.world, w.session, 0.1, start_epoch).to_wire())


def _report(w: Wire, epoch: int) -> bytes:
    w.seq += 1
    return encode(Report(w.job, w.rank, w.session, w.seq, epoch, {"val_loss": 1.0}, 0.1).to_wire())


def _bye(w: Wire) -> bytes:
    return encode(Bye(w.job, w.rank, w.session).to_wire())


def test_the_registered_collector_and_the_scrape_show_the_same_samples(
    clocked: Callable[..., tuple[Server, Clock]],
) -> None:
    s, _clock = clocked()
    peers = [Wire(s.endpoints()["bind"], f"job-{i}") for i in range(3)]
    try:
        for p in peers:
            _say(s, p, _hello(p), *(_report(p, e) for e in range(4)))
        peers[0].sock.send(_bye(peers[0]))
        _turn_while(s, lambda: not s.table.jobs["job-0"].sessions.finished())
        via_collector = generate_latest(s.metrics.registry).decode()
        for text in (_scrape(s), _scrape(s)):  # the second scrape reuses the cached lines
            assert _samples(text) == _samples(via_collector)
        assert _metric(s, "lrpilot_job_finished", training_job="job-0") == 1
        assert _metric(s, "lrpilot_lr_changes_total", training_job="job-1", reason="plateau") == 1
    finally:
        for p in peers:
            p.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], str]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): repr(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.startswith("lrpilot_decision_seconds")  # observed by turns
    }


def test_job_ttl_removes_every_series_of_a_silent_job(
    clocked: Callable[..., tuple[Server, Clock]],
) -> None:
    s, clock = clocked(job_ttl=60.0, worker_timeout=60.0)
    w = Wire(s.endpoints()["bind"], "job-ttl")
    try:
        (hello,) = _say(s, w, _hello(w))
        run = hello.run  # type: ignore[attr-defined]
        _say(s, w, _report(w, 0))
        assert _metric(s, "lrpilot_learning_rate", training_job="job-ttl") == pytest.approx(0.1)
        clock.t += 59
        s.turn()
        assert "job-ttl" in _scrape(s)  # not yet
        clock.t += 62  # past the TTL and the worker timeout
        s.turn()
        s.turn()
        assert "job-ttl" not in _scrape(s)
        assert _metric(s, "lrpilot_jobs") == 0
        # Its state is kept on disk: a resume picks it up again.
        (again,) = _say(s, w, _hello(w, start_epoch=1))
        assert again.run == run  # type: ignore[attr-defined]
    finally:
        w.close()


def test_a_thousand_short_jobs_leave_a_bounded_number_of_series(
    clocked: Callable[..., tuple[Server, Clock]],
) -> None:
    s, clock = clocked(job_ttl=1.0, max_jobs=200)
    refused = 0
    w = Wire(s.endpoints()["bind"], "short")
    try:
        for i in range(1000):
            w.job = f"short-{i}"
            (reply,) = _say(s, w, _hello(w))
            if getattr(reply, "code", None) == "max_jobs":
                refused += 1
            else:
                _say(s, w, _report(w, 0))
                w.sock.send(_bye(w))
                _turn_while(s, lambda j=w.job: not s.table.jobs[j].sessions.finished())  # type: ignore[misc]
            if i % 250 == 249:
                clock.t += 1.3  # the TTL sweep drops finished jobs
                s.turn()
        lines = [ln for ln in _scrape(s).splitlines() if ln.startswith("lrpilot_learning_rate{")]
        assert len(lines) <= 200 and _metric(s, "lrpilot_jobs") <= 200
        assert _metric(s, "lrpilot_invalid_messages_total", reason="max_jobs") == refused > 0
        clock.t += 2
        s.turn()
        s.turn()
        assert _metric(s, "lrpilot_jobs") == 0 and "short-" not in _scrape(s)
    finally:
        w.close()


def test_workers_gauge_follows_worker_timeout(clocked: Callable[..., tuple[Server, Clock]]) -> None:
    s, clock = clocked(worker_timeout=1.0)
    w = Wire(s.endpoints()["bind"], "job-wk")
    try:
        _say(s, w, _hello(w), _report(w, 0))
        assert _metric(s, "lrpilot_workers", training_job="job-wk") == 1
        clock.t += 1.01  # a silent rank stops counting as a worker
        assert _metric(s, "lrpilot_workers", training_job="job-wk") == 0
    finally:
        w.close()
