"""The loss-spike guard: detection (pure), `check`, the reducer's rollback, `simulate`.

Detection is tested on generated sequences against an independent oracle: the closed form
of the bias-corrected EMA (Σ βⁱ·x / Σ βⁱ over the values kept), computed from scratch at
every unit, and a spike planted at a known unit.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import run_cli

from lrpilot.client.protocol import Hello, LrMessage, Report
from lrpilot.controller import transitions
from lrpilot.controller.guard import Guard, GuardState, observe
from lrpilot.controller.policyfile import load_text
from lrpilot.controller.transitions import Env

GUARDED = """\
version: 1
defaults:
  policy: {type: plateau, monitor: loss, unit: step, factor: 0.5, patience: 1000}
  guard: {spike: 3.0, window: 10, warmup: 20, snapshot_every: 25, lr_factor: 0.5,
          cooldown: 5, max_rollbacks: 2, on_exhausted: stop}
"""


def oracle_ema(kept: list[float], window: int) -> float:
    beta = 1.0 - 2.0 / (window + 1)
    n = len(kept)
    num = sum(beta ** (n - 1 - i) * x for i, x in enumerate(kept))
    den = sum(beta ** (n - 1 - i) for i in range(n))
    return num / den


def healthy_sequence(rng: random.Random, n: int) -> list[float]:
    """A noisy decaying loss: never 3× its recent level."""
    return [2.0 * math.exp(-t / 200) * (1 + 0.2 * rng.random()) + 0.1 for t in range(n)]


# -- detection -------------------------------------------------------------------------------


def test_a_spike_is_flagged_exactly_where_planted_on_generated_sequences() -> None:
    rng = random.Random(17)
    for _ in range(200):
        window = rng.randint(1, 40)
        warmup = rng.randint(0, 30)
        factor = rng.uniform(1.5, 10.0)
        guard = Guard(spike=factor, window=window, warmup=warmup, cooldown=0, max_rollbacks=9)
        values = healthy_sequence(rng, 120)
        at = rng.randint(warmup + 1, 110)
        kind = rng.choice(["jump", "nan", "inf"])
        values[at] = {"jump": values[at] * factor * 1.5 * 2.0, "nan": math.nan, "inf": math.inf}[
            kind
        ]
        state, flagged, kept = GuardState(), [], []
        for t, x in enumerate(values):
            before = state.ema
            state, spike = observe(guard, state, t, x, minimize=True)
            if kept:  # the EMA judged against is the closed form of what was kept
                assert before is not None and math.isclose(
                    before, oracle_ema(kept, window), rel_tol=1e-9
                )
            if spike is not None:
                flagged.append(t)
                assert spike.unit == t and (spike.ema == before)
            elif math.isfinite(x):
                kept.append(x)
        assert flagged == [at], (kind, window, warmup, factor)


def test_nan_counts_as_a_spike_after_warmup_but_not_during_it() -> None:
    guard = Guard(warmup=5, window=3, cooldown=0)
    state = GuardState()
    flagged = []
    for t, x in enumerate([1.0, math.nan, 1.0, 1.0, 1.0, 1.0, math.nan, 1.0]):
        state, spike = observe(guard, state, t, x, minimize=True)
        if spike:
            flagged.append(t)
    assert flagged == [6]


def test_a_max_monitor_spikes_downwards() -> None:
    guard = Guard(monitor="accuracy", spike=2.0, window=5, warmup=3, cooldown=0)
    state = GuardState()
    flagged = []
    for t, x in enumerate([0.8, 0.82, 0.81, 0.83, 2.5, 0.3, 0.84]):
        state, spike = observe(guard, state, t, x, minimize=False)
        if spike:
            flagged.append(t)
    assert flagged == [5]  # 2.5 is an improvement for a max monitor; 0.3 < EMA / 2


def test_cooldown_judges_nothing_then_judges_again_and_snapshot_unit_is_the_newest_healthy() -> (
    None
):
    guard = Guard(window=5, warmup=3, cooldown=4, snapshot_every=10, max_rollbacks=1)
    state = GuardState()
    spikes = []
    values = [1.0] * 30
    values[13] = 100.0
    values[14] = 100.0  # in the cooldown (the restore was not applied yet): not judged
    values[25] = math.nan  # after the cooldown: a spike again, rollbacks spent
    for t, x in enumerate(values):
        state, spike = observe(guard, state, t, x, minimize=True)
        if spike:
            spikes.append(spike)
    assert [(s.unit, s.snapshot_unit, s.rollback) for s in spikes] == [
        (13, 10, True),
        (25, 20, False),
    ]
    assert state.rollbacks == 1


def test_snapshot_unit_is_the_spike_unit_when_it_is_a_multiple() -> None:
    """The snapshot of unit s is taken before s's step: all its earlier units were healthy."""
    guard = Guard(window=5, warmup=3, snapshot_every=10)
    state = GuardState()
    for t in range(20):
        state, spike = observe(guard, state, t, 50.0 if t == 20 - 1 else 1.0, minimize=True)
    assert spike is not None and spike.snapshot_unit == 10
    state, spike = observe(guard, GuardState(), 0, 1.0, True)
    for t in range(1, 21):
        state, spike = observe(guard, state, t, 50.0 if t == 20 else 1.0, minimize=True)
    assert spike is not None and spike.snapshot_unit == 20


# -- check ---------------------------------------------------------------------------------------


def test_check_reports_guard_errors_with_file_and_line(write: Callable[[str, str], Path]) -> None:
    policy = write(
        "p.yaml",
        "version: 1\n"
        "defaults:\n"
        "  policy: {type: plateau, monitor: loss}\n"
        "  guard:\n"
        "    spike: 0.5\n"
        "    windw: 3\n"
        "jobs:\n"
        "  - match: 'a-*'\n"
        "    phases:\n"
        "      - {type: warmup, to_lr: 0.1, epochs: 3}\n"
        "      - type: constant\n"
        "        guard:\n"
        "          unit: step\n"
        "          on_exhausted: halt\n",
    )
    result = run_cli("check", str(policy))
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        f"{policy}:5: guard spike must be in (1, inf), got 0.5",
        f"{policy}:6: unknown key 'windw' in guard (did you mean 'window'?); allowed: cooldown, "
        "lr_factor, max_rollbacks, mode, monitor, on_exhausted, snapshot_every, spike, unit, "
        "warmup, window",
        f"{policy}:13: guard unit must be the policy's unit (epoch): the guard judges its "
        "reports, got 'step'",
        f"{policy}:14: guard on_exhausted must be one of continue, stop, got 'halt'",
    ]


def test_a_phase_guard_applies_in_its_phase_and_the_rule_guard_elsewhere() -> None:
    rules = load_text(
        "version: 1\n"
        "jobs:\n"
        "  - match: '*'\n"
        "    guard: {spike: 4.0}\n"
        "    phases:\n"
        "      - {type: warmup, to_lr: 0.1, epochs: 3}\n"
        "      - {type: constant, guard: {spike: 2.0}}\n",
        "p.yaml",
    )
    rule = rules.rule_for("j")
    assert rule.guard_at(0) is not None and rule.guard_at(0).spike == 4.0  # type: ignore[union-attr]
    assert rule.guard_at(1).spike == 2.0  # type: ignore[union-attr]


# -- the reducer -------------------------------------------------------------------------------


def _job(world: int = 1) -> tuple[transitions.JobState, list[bytes]]:
    rule = load_text(GUARDED, "p.yaml").rule_for("job")
    env = Env(now=0.0, wall=1.7e9, rules=lambda _name: rule)
    sessions = [os.urandom(16) for _ in range(world)]
    job = None
    for rank, s in enumerate(sessions):
        step = transitions.step(job, Hello("job", rank, world, s, 0.1, 0, restore=True), env)
        assert step is not None
        job = step.job
        (_, answer) = step.out[0]
        assert isinstance(answer, LrMessage) and answer.detail == {"snapshot_every": 25}
    assert job is not None
    return job, sessions


def test_a_spike_restores_every_rank_at_the_same_step_with_the_lr_times_lr_factor() -> None:
    job, sessions = _job(world=2)
    env = Env(now=1.0, wall=1.7e9)
    rollbacks = []
    for seq, t in enumerate(range(60), start=1):
        loss = 80.0 if t == 37 else 1.0 + 0.01 * (t % 3)
        for rank, s in enumerate(sessions):
            lr = job.lr
            step = transitions.step(job, Report("job", rank, s, seq, 0, {"loss": loss}, lr, t), env)
            assert step is not None and step.job is not None
            job = step.job
            if step.audit and step.audit[0].reason == "divergence":
                rollbacks.append((t, step))
    assert len(rollbacks) == 1
    t, step = rollbacks[0]
    assert t == 37
    messages = [m for _, m in step.out if isinstance(m, LrMessage)]
    assert {ident for ident, _ in step.out} == set(sessions)
    for m in messages:
        assert (m.action, m.reason, m.apply_from_step) == ("restore", "divergence", 38)
        assert m.detail == {"snapshot_every": 25, "snapshot_unit": 25}
        assert m.lr == pytest.approx(0.05)
        assert ("rolled_back" in dict(m.notices)) and "step 25" in dict(m.notices)["rolled_back"]
    row = step.audit[0]
    assert row.detail is not None and row.detail.startswith("unit=37 value=80 ema=1.0")
    assert row.detail.endswith("snapshot_unit=25")
    assert (row.old_lr, row.new_lr) == (pytest.approx(0.1), pytest.approx(0.05))
    assert job.rollbacks == 1 and job.lr == pytest.approx(0.05)


def test_a_replayed_spike_report_carries_the_restore_again_and_a_new_hello_does_not() -> None:
    job, (s,) = _job()
    env = Env(now=1.0, wall=1.7e9)
    for t in range(31):
        step = transitions.step(
            job, Report("job", 0, s, t + 1, 0, {"loss": 50.0 if t == 30 else 1.0}, job.lr, t), env
        )
        assert step is not None and step.job is not None
        job = step.job
    version = job.version
    # The same report again (its answer was lost with a controller killed after the commit).
    again = transitions.step(job, Report("job", 0, s, 31, 0, {"loss": 50.0}, 0.1, 30), env)
    assert again is not None
    ((_, reply),) = again.out
    assert isinstance(reply, LrMessage)
    assert (reply.version, reply.action, reply.detail) == (
        version,
        "restore",
        {"snapshot_every": 25, "snapshot_unit": 25},
    )
    # The same session's hello (after a restart): the restore again, same version.
    hello = transitions.step(job, Hello("job", 0, 1, s, 0.1, 0, start_step=31, restore=True), env)
    assert hello is not None
    assert [(m.version, m.action) for _, m in hello.out] == [(version, "restore")]  # type: ignore[union-attr]
    # A new process: no restore of weights it never had.
    fresh = transitions.step(
        job, Hello("job", 0, 1, os.urandom(16), 0.1, 0, start_step=31, restore=True), env
    )
    assert fresh is not None
    assert [m.action for _, m in fresh.out] == [None]  # type: ignore[union-attr]


def test_max_rollbacks_then_on_exhausted_stop() -> None:
    job, (s,) = _job()
    env = Env(now=1.0, wall=1.7e9)
    actions = []
    spikes = {30, 40, 50}
    for t in range(60):
        loss = 50.0 if t in spikes else 1.0
        step = transitions.step(job, Report("job", 0, s, t + 1, 0, {"loss": loss}, job.lr, t), env)
        assert step is not None and step.job is not None
        job = step.job
        ((_, reply),) = step.out
        assert isinstance(reply, LrMessage)
        if reply.version and step.audit and step.audit[0].reason == "divergence":
            actions.append((t, reply.action))
    assert actions == [(30, "restore"), (40, "restore"), (50, "stop")]
    assert job.rollbacks == 2


# -- simulate ------------------------------------------------------------------------------------


def test_simulate_marks_one_rollback_at_the_spike_row_and_none_elsewhere(
    write: Callable[[str, str], Path],
) -> None:
    policy = write("p.yaml", GUARDED)
    rng = random.Random(3)
    rows = ["epoch,step,loss"]
    for t in range(80):
        loss = 1.0 + 0.1 * rng.random()
        if t == 52:
            loss = 40.0
        if t == 70:
            loss = math.nan  # after the cooldown: a second spike, a second rollback
        rows.append(f"0,{t},{loss}")
    csv = write("h.csv", "\n".join(rows) + "\n")
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    marked = [(i, r["event"]) for i, r in enumerate(out) if r["event"] is not None]
    assert [(i, e["kind"]) for i, e in marked] == [(52, "divergence"), (70, "divergence")]
    assert marked[0][1]["new"] == pytest.approx(marked[0][1]["old"] * 0.5)
    table = run_cli("simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv))
    lines = [line for line in table.stdout.splitlines() if "rollback" in line]
    assert len(lines) == 2 and lines[0].split()[0] == "0"


def test_simulate_with_one_spike_marks_exactly_that_row(write: Callable[[str, str], Path]) -> None:
    policy = write("p.yaml", GUARDED)
    rows = ["epoch,step,loss"] + [f"0,{t},{'nan' if t == 44 else 1.0}" for t in range(90)]
    csv = write("h.csv", "\n".join(rows) + "\n")
    result = run_cli(
        "simulate", "--policy", str(policy), "--job", "j", "--metrics", str(csv), "--json"
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [i for i, r in enumerate(out) if r["event"] is not None] == [44]
    assert out[44]["value"] is None and out[44]["event"]["kind"] == "divergence"
