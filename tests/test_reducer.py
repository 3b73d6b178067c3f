"""One reducer: `transitions.step` decides for the daemon and for `simulate` alike.

The property test runs generated metric histories through a live `Server` (real ZeroMQ
sockets, a real SQLite store, its loop turned by the test with an injected clock) and
through `simulate.run`, and requires the same LR, shadow LR, notices and actions.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from conftest import Clock, Wire, turn_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrpilot.client.protocol import Hello, LrMessage, Report, encode
from lrpilot.controller import simulate, transitions
from lrpilot.controller.policyfile import load_text
from lrpilot.controller.server import ServeConfig, Server, build_server
from lrpilot.controller.transitions import Env

POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.0}
jobs:
  - match: "shadow-plateau-*"
    policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 0, apply: false}
  - match: "shadow-step-*"
    policy: {type: step, factor: 0.5, step_size: 2, apply: false}
  - match: "chain-*"
    phases:
      - {type: warmup, from_lr: 1.0e-4, to_lr: 1.0e-2, epochs: 3}
      - {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, apply: false}
  - match: "cooldown-*"
    policy: {type: plateau, monitor: val_loss, factor: 0.2, patience: 2, cooldown: 1, min_lr: 1e-4}
"""

KINDS = ("plain", "shadow-plateau", "shadow-step", "chain", "cooldown")


def test_shadow_mode_runs_the_policy_on_its_own_lr_and_sends_the_old_one() -> None:
    """The defect of issue 20: a shadow plateau's LR alternated 0.1 / 0.05 in the daemon
    while simulate showed 0.1 -> 0.05 -> 0.025."""
    rules = load_text(POLICY, "p.yaml")
    rule = rules.rule_for("shadow-plateau-1")
    env = Env(now=0.0, wall=1.7e9, rules=rules.rule_for)
    s = os.urandom(16)
    first = transitions.step(None, Hello("shadow-plateau-1", 0, 1, s, 0.1, 0), env)
    assert first is not None and first.job is not None
    job, sent, shadow = first.job, [], []
    for e in range(4):
        step = transitions.step(job, Report(job.name, 0, s, e + 1, e, {"val_loss": 1.0}, 0.1), env)
        assert step is not None and step.job is not None
        job = step.job
        sent.append(step.out[0][1].lr)  # type: ignore[union-attr]
        shadow.append(job.shadow_lr)
    assert sent == pytest.approx([0.1] * 4)
    assert shadow == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    history = simulate.History("h.csv", (0, 1, 2, 3), (None,) * 4, ({"val_loss": 1.0},) * 4, None)
    rows = simulate.run(rule, history, 0.1).rows
    assert [r.lr for r in rows] == sent and [r.shadow_lr for r in rows] == shadow


def test_a_misspelt_field_is_an_error_not_a_new_attribute() -> None:
    rules = load_text(POLICY, "p.yaml")
    env = Env(now=0.0, wall=1.7e9, rules=rules.rule_for)
    first = transitions.step(None, Hello("j", 0, 1, os.urandom(16), 0.1, 0), env)
    assert first is not None and first.job is not None
    with pytest.raises(TypeError):
        first.job.with_(last_epok=3)


def test_policies_name_what_they_monitor() -> None:
    rules = load_text(POLICY, "p.yaml")
    assert rules.rule_for("x").policy.monitors() == ("val_loss",)
    assert rules.rule_for("shadow-step-1").policy.monitors() == ()
    chain = rules.rule_for("chain-1").policy
    assert chain.monitors() == ("val_loss",)
    assert chain.current(chain.start(0.01, 0)).type == "warmup"
    assert chain.current(chain.start(0.01, 5)).type == "plateau"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Clock]]:
    """One in-process controller for every generated run (each run is a new job)."""
    clock = Clock()
    config = ServeConfig(
        bind="tcp://127.0.0.1:0",
        admin_bind="tcp://127.0.0.1:0",
        metrics_port=None,
        state_dir=str(tmp_path_factory.mktemp("state")),
    )
    server = build_server(config, load_text(POLICY, "p.yaml"), clock=clock, wall=clock.wall)
    try:
        yield server, clock
    finally:
        server.close()


_names = itertools.count()
values = st.one_of(
    st.floats(0.0, 2.0, allow_nan=False), st.just(1.0), st.just(float("nan")), st.none()
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    lr0=st.sampled_from([0.1, 0.01, 3e-4]),
    history=st.lists(values, min_size=1, max_size=14),
)
def test_simulate_equals_the_live_daemon_on_generated_runs(
    live: tuple[Server, Clock],
    kind: str,
    lr0: float,
    history: list[float | None],
) -> None:
    server, clock = live
    name = f"{kind}-{next(_names)}"
    rows: list[dict[str, float]] = [{} if x is None else {"val_loss": x} for x in history]
    epochs = tuple(range(len(rows)))
    replay = simulate.run(
        server.table.rule_for(name),
        simulate.History("h.csv", epochs, (None,) * len(rows), tuple(rows), None),
        lr0,
    )
    w = Wire(server.endpoints()["bind"], name)
    try:
        w.sock.send(encode(Hello(name, 0, 1, w.session, lr0, 0).to_wire()))
        (start,) = turn_until(server, w)
        assert isinstance(start, LrMessage) and start.lr == replay.start_lr
        for e, metrics in enumerate(rows):
            clock.t += 1.0
            w.report(e, metrics, wait=False)
            (reply,) = turn_until(server, w)
            assert isinstance(reply, LrMessage), reply
            row = replay.rows[e]
            job = server.table.jobs[name]
            assert (reply.lr, reply.action, reply.notices) == (row.lr, row.action, row.notices)
            assert job.shadow_lr == row.shadow_lr
    finally:
        w.close()
