"""The daemon core without a subprocess: pure transitions, the group commit, deadlines.

Time is an injected clock: nothing here sleeps or reads the wall clock to decide.
Turn-level tests drive a real `Server` (real sockets on random ports, a real
SQLite store) one `turn()` at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Clock, Wire, turn_until
from prometheus_client.parser import text_string_to_metric_families

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import ErrorMessage, Hello, LrMessage, Report
from lrpilot.controller import transitions
from lrpilot.controller.jobstate import JobState
from lrpilot.controller.policies import Plateau, fingerprint, float32
from lrpilot.controller.policyfile import load_text
from lrpilot.controller.server import Server
from lrpilot.controller.store import Store, Writes, decode_row
from lrpilot.controller.transitions import Env

PLATEAU = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.0}
  aggregate_timeout: 5
"""


def session() -> bytes:
    return os.urandom(16)


# -- pure transitions ---------------------------------------------------------------------


def test_a_transition_returns_a_new_state_and_changes_nothing_it_was_given() -> None:
    rule = load_text(PLATEAU, "p.yaml").rule_for("job")
    env = Env(now=10.0, wall=1.7e9)
    s = session()
    first = transitions.hello(None, Hello("job", 0, 1, s, 0.1, 0), rule, env, lambda *a: None)
    job = first.job
    assert [m.lr for _, m in first.out] == [float32(0.1)] and first.audit[0].reason == "initial"
    before = dataclasses.asdict(job)
    step = transitions.report(job, Report("job", 0, s, 1, 0, {"val_loss": 1.0}, 0.1), env)
    assert dataclasses.asdict(job) == before  # the input is untouched
    assert step.job.last_epoch == 0 and step.snapshot == 0 and step.reports == 1
    assert step.job.sessions.seqs[s.hex()] == 1
    step2 = transitions.report(step.job, Report("job", 0, s, 2, 1, {"val_loss": 2.0}, 0.1), env)
    ((ident, reply),) = step2.out
    assert ident == s and isinstance(reply, LrMessage)
    assert (reply.lr, reply.reason, reply.apply_from_epoch, reply.seq) == (
        float32(0.05),
        "plateau",
        2,
        2,
    )
    assert step2.job.version == step.job.version + 1 and step2.audit[0].reason == "plateau"


def test_transitions_decide_exactly_as_the_engine_on_generated_sequences() -> None:
    import random

    rng = random.Random(7)
    rule = load_text(PLATEAU, "p.yaml").rule_for("job")
    policy = rule.policy
    for _ in range(50):
        env = Env(now=0.0, wall=1.7e9)
        s = session()
        job = transitions.hello(None, Hello("job", 0, 1, s, 0.1, 0), rule, env, lambda *a: None).job
        state = policy.start(0.1, 0)
        for e in range(30):
            x = rng.choice([rng.uniform(0, 2), float("nan"), 1.0])
            step = transitions.report(job, Report("job", 0, s, e + 1, e, {"val_loss": x}, 0.1), env)
            job = step.job
            state, decision = policy.step(state, e, {"val_loss": x}, {})
            assert job.lr == decision.lr == step.out[0][1].lr  # type: ignore[union-attr]


def test_duplicates_and_unknown_sessions_change_nothing() -> None:
    rule = load_text(PLATEAU, "p.yaml").rule_for("job")
    env = Env(now=0.0, wall=1.7e9)
    s = session()
    job = transitions.hello(None, Hello("job", 0, 1, s, 0.1, 0), rule, env, lambda *a: None).job
    job = transitions.report(job, Report("job", 0, s, 1, 0, {"val_loss": 1.0}, 0.1), env).job
    dup = transitions.report(job, Report("job", 0, s, 1, 0, {"val_loss": 9.0}, 0.1), env)
    assert dup.job.state == job.state and dup.snapshot is None and dup.reports == 0
    assert dup.out[0][1].reason == "unchanged"  # type: ignore[union-attr]
    with pytest.raises(ProtocolError) as err:
        transitions.report(job, Report("job", 0, session(), 1, 1, {"val_loss": 1.0}, 0.1), env)
    assert err.value.code == "unknown_session"


def test_a_policy_that_gains_a_defaulted_parameter_keeps_its_fingerprint() -> None:
    @dataclass(frozen=True, kw_only=True)
    class PlateauV2(Plateau):  # a later lrpilot adds a parameter with a default
        warm_start: bool = False

    assert fingerprint(PlateauV2(patience=3)) == fingerprint(Plateau(patience=3))
    assert fingerprint(PlateauV2(patience=3, warm_start=True)) != fingerprint(Plateau(patience=3))
    assert fingerprint(Plateau(patience=4)) != fingerprint(Plateau(patience=3))


def test_stored_state_round_trips_and_0_1_rows_keep_their_plateau_memory() -> None:
    rule = load_text(PLATEAU, "p.yaml").rule_for("job").for_framework("keras")
    state = rule.policy.start(0.1, 0).replace(best=0.5, wait=1)
    job = JobState("job", rule, state, fingerprint(rule.policy), run=7, version=3, last_epoch=4)
    job = job.with_(framework="keras")
    back = JobState.from_stored("job", rule, job.stored(), now=0.0)
    assert (back.state, back.run, back.version, back.last_epoch) == (state, 7, 3, 4)
    # 0.1 wrote no framework and keyed state on the repr of its (Keras) policy.
    legacy = {**job.stored(), "policy": None, "framework": None}
    legacy["policy_key"] = f"{rule.match}|{rule.policy!r}"
    assert JobState.from_stored("job", rule, legacy, now=0.0).state == state
    other = {**job.stored(), "policy": "something else"}
    assert JobState.from_stored("job", rule, other, now=0.0).state.best is None  # type: ignore[attr-defined]


# -- the turn: group commit, deadlines, metrics --------------------------------------------


@pytest.fixture
def server(clocked_server: Callable[..., tuple[Server, Clock]]) -> tuple[Server, Clock]:
    return clocked_server(PLATEAU, job_ttl=3600.0, worker_timeout=600.0)


@pytest.fixture
def inproc(clocked_server: Callable[..., tuple[Server, Clock]]) -> tuple[Server, Clock]:
    """A server whose clients are in this process (inproc://): a sent message is queued at
    once, so a test knows what one turn will see and what a turn did not send."""
    return clocked_server(PLATEAU, bind=f"inproc://lrpilot-test-{os.getpid()}-{id(object())}")


def _peer(s: Server, job: str, rank: int = 0, world: int = 1) -> Wire:
    return Wire(s.endpoints()["bind"], job, rank, world, ctx=s.ctx)


class CountingStore(Store):
    """The real SQLite store, counting the transactions it commits."""

    def __init__(self, state_dir: str) -> None:
        super().__init__(state_dir)
        self.commits = 0

    def commit(self, w: Writes) -> None:
        super().commit(w)
        self.commits += 1


def test_one_commit_per_turn_answers_every_message(
    clocked_server: Callable[..., tuple[Server, Clock]],
) -> None:
    s, _clock = clocked_server(
        PLATEAU,
        state_store=CountingStore,
        bind=f"inproc://lrpilot-test-{os.getpid()}-{id(object())}",
    )
    assert isinstance(s.store, CountingStore)
    peers = [_peer(s, f"job-{i}") for i in range(8)]
    try:
        for p in peers:
            p.sock.send(_hello(p))
        turn_until(s, *peers)
        before = s.store.commits
        for p in peers:
            p.report(0, {"val_loss": 1.0}, wait=False)
        s.turn()  # all eight are queued (inproc): one turn decides them, with one commit
        assert sum(c.reports for c in s.table.counters.values()) == 8
        assert s.store.commits - before == 1
        answers = [p.recv(timeout=1) for p in peers]
        assert all(isinstance(a, LrMessage) and a.seq == 1 for a in answers)
    finally:
        for p in peers:
            p.close()


def test_a_failed_commit_answers_unavailable_and_puts_every_job_back(
    server: tuple[Server, Clock],
) -> None:
    s, _clock = server
    a, b = Wire(s.endpoints()["bind"], "job-a"), Wire(s.endpoints()["bind"], "job-b")
    try:
        for p in (a, b):
            p.sock.send(_hello(p))
        turn_until(s, a, b)
        for p in (a, b):
            p.report(0, {"val_loss": 1.0}, wait=False)
        before = {name: job for name, job in s.table.jobs.items()}
        with disk_full(Path(s.config.state_dir) / "state.db-wal"):
            answers = turn_until(s, a, b)
        assert all(isinstance(x, ErrorMessage) and x.code == "unavailable" for x in answers)
        assert [x.seq for x in answers] == [1, 1]  # type: ignore[attr-defined]
        assert s.table.jobs == before  # nothing changed
        assert _sample(s, "lrpilot_store_errors_total") >= 1
        for p in (a, b):  # the clients resend the same reports; now they are decided
            p.report(0, {"val_loss": 1.0}, seq=1, wait=False)
        answers = turn_until(s, a, b)
        assert all(isinstance(x, LrMessage) and x.seq == 1 for x in answers)
        assert all(s.table.jobs[n].last_epoch == 0 for n in ("job-a", "job-b"))
    finally:
        a.close(), b.close()


def test_an_aggregation_deadline_fires_at_its_time_and_not_before(
    inproc: tuple[Server, Clock],
) -> None:
    s, clock = inproc
    r0, r1 = _peer(s, "ddp", 0, 2), _peer(s, "ddp", 1, 2)
    try:
        for p in (r0, r1):
            p.sock.send(_hello(p))
        turn_until(s, r0, r1)
        r0.report(0, {"val_loss": 1.0}, wait=False)
        s.turn()
        # The turn took the report (the positive signal) and, inproc, any reply would be
        # queued at r0 already: none is, it waits for rank 1.
        assert s.table.counters["ddp"].reports == 1 and not r0.sock.poll(0)
        clock.t += 4.99
        s.turn()
        assert not r0.sock.poll(0) and s.table.jobs["ddp"].last_epoch is None
        clock.t += 0.02  # aggregate_timeout (5 s) has passed
        s.turn()
        late = r0.recv(timeout=1)
        assert isinstance(late, LrMessage) and late.apply_from_epoch == 1 and late.seq == 1
        assert _sample(s, "lrpilot_late_decisions_total", training_job="ddp") == 1
        assert len(s.table.deadlines) == 1  # the TTL check of the job, nothing else left
    finally:
        r0.close(), r1.close()


def test_a_silent_job_leaves_memory_after_the_ttl_and_resumes_from_disk(
    server: tuple[Server, Clock],
) -> None:
    s, clock = server
    w = Wire(s.endpoints()["bind"], "idle")
    try:
        w.sock.send(_hello(w))
        turn_until(s, w)
        w.report(0, {"val_loss": 1.0}, wait=False)
        turn_until(s, w)
        w.sock.send(_bye(w))
        for _ in range(20):
            s.sock.poll(10)
            s.turn()
        clock.t += 3599
        s.turn()
        assert "idle" in s.table.jobs
        clock.t += 2
        s.turn()
        assert "idle" not in s.table.jobs
        assert "idle" not in _series(s, "lrpilot_learning_rate")
        w2 = Wire(s.endpoints()["bind"], "idle")
        w2.sock.send(_hello(w2, start_epoch=1))
        (back,) = turn_until(s, w2)
        assert isinstance(back, LrMessage) and s.table.jobs["idle"].last_epoch == 0
        w2.close()
    finally:
        w.close()


def test_each_job_row_is_encoded_once_per_commit(server: tuple[Server, Clock]) -> None:
    s, clock = server
    rule = s.table.rule_for("job")
    batch = s.table.batch(clock(), clock.wall())
    sess = session()
    batch.hello(Hello("job", 0, 1, sess, 0.1, 0))
    for e in range(3):
        batch.report(Report("job", 0, sess, e + 1, e, {"val_loss": 1.0 + e}, 0.1))
    w = batch.writes()
    assert list(w.jobs) == ["job"] and [x[2] for x in w.snapshots] == [0, 1, 2]
    assert w.jobs["job"] is w.snapshots[-1][3]  # the last snapshot's bytes are the row
    assert decode_row(w.jobs["job"])["last_epoch"] == 2
    assert rule.match == "*"


def test_scrape_renders_per_job_series_from_the_table(server: tuple[Server, Clock]) -> None:
    s, clock = server
    w = Wire(s.endpoints()["bind"], "m")
    try:
        w.sock.send(_hello(w))
        turn_until(s, w)
        for e, x in enumerate([1.0, 2.0, 3.0]):
            w.report(e, {"val_loss": x}, wait=False)
            turn_until(s, w)
        assert _sample(s, "lrpilot_learning_rate", training_job="m") == float32(0.025)
        assert _sample(s, "lrpilot_reports_total", training_job="m") == 3
        assert _sample(s, "lrpilot_lr_changes_total", training_job="m", reason="plateau") == 2
        assert _sample(s, "lrpilot_lr_changes_total", training_job="m", reason="resume") == 0
        assert _sample(s, "lrpilot_workers", training_job="m") == 1
        clock.t += 601  # past --worker-timeout without a message: no longer a worker
        assert _sample(s, "lrpilot_workers", training_job="m") == 0
        assert _sample(s, "lrpilot_jobs") == 1
    finally:
        w.close()


@contextlib.contextmanager
def disk_full(wal: Path) -> Iterator[None]:
    """No file of this process may grow past the WAL's size: the next commit fails as on a
    full disk (SQLite: "database or disk is full"). Restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (wal.stat().st_size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


# -- helpers ----------------------------------------------------------------------------------


def _hello(p: Wire, start_epoch: int = 0) -> bytes:
    from lrpilot.client.protocol import encode

    return encode(Hello(p.job, p.rank, p.world, p.session, 0.1, start_epoch).to_wire())


def _bye(p: Wire) -> bytes:
    from lrpilot.client.protocol import Bye, encode

    return encode(Bye(p.job, p.rank, p.session).to_wire())


def _families(s: Server) -> list[object]:
    return list(text_string_to_metric_families(s.metrics.render().decode()))


def _sample(s: Server, name: str, **labels: str) -> float:
    for family in _families(s):
        for sample in family.samples:  # type: ignore[attr-defined]
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


def _series(s: Server, name: str) -> set[str]:
    return {
        sample.labels.get("training_job", "")
        for family in _families(s)
        for sample in family.samples  # type: ignore[attr-defined]
        if sample.name == name
    }


def test_rows_written_by_0_1_as_json_still_decode() -> None:
    from lrpilot.controller.store import decode_row

    legacy = '{"run":3,"state":{"lr":0.05,"best":{"$f":"nan"},"wait":2},"seqs":{}}'
    row = decode_row(legacy)
    assert row["run"] == 3 and row["state"]["wait"] == 2
    assert row["state"]["best"] != row["state"]["best"]  # NaN, as 0.1 stored it


# -- the sealed commit: quarantine, deadlines, reload, history ---------------------------------


def test_an_unusable_row_is_quarantined_in_the_turns_commit_or_not_at_all(
    server: tuple[Server, Clock],
) -> None:
    s, _clock = server
    s.store.commit(Writes(jobs={"broken": b"\xc1 not msgpack"}))
    w = Wire(s.endpoints()["bind"], "broken")
    try:
        with disk_full(Path(s.config.state_dir) / "state.db-wal"):
            w.sock.send(_hello(w))
            (refused,) = turn_until(s, w)
        assert isinstance(refused, ErrorMessage) and refused.code == "unavailable"
        assert s.store.quarantined == 0  # the commit failed: the row has not moved
        w.sock.send(_hello(w))
        (answer,) = turn_until(s, w)  # the same turn moves the old row aside and starts anew
        assert isinstance(answer, LrMessage) and answer.reason == "initial"
        assert s.store.quarantined == 1
    finally:
        w.close()
    db = s.store.db  # the controller's own connection (the store holds an exclusive lock)
    assert db.execute("SELECT job, data FROM quarantine").fetchall() == [
        ("broken", b"\xc1 not msgpack")
    ]
    assert decode_row(db.execute("SELECT data FROM jobs WHERE job='broken'").fetchone()[0])


def test_deadlines_leave_the_heap_only_with_a_committed_turn(server: tuple[Server, Clock]) -> None:
    s, clock = server
    r0, r1 = Wire(s.endpoints()["bind"], "ddp2", 0, 2), Wire(s.endpoints()["bind"], "ddp2", 1, 2)
    try:
        for p in (r0, r1):
            p.sock.send(_hello(p))
        turn_until(s, r0, r1)
        r0.report(0, {"val_loss": 1.0}, wait=False)
        for _ in range(200):  # until the controller counted the report (a positive signal)
            s.sock.poll(10)
            s.turn()
            if s.table.counters["ddp2"].reports == 1:
                break
        held = sorted(s.table.deadlines._heap)
        clock.t += 6  # past aggregate_timeout
        assert [d[1] for d in s.table.deadlines.due(clock.t)] == ["aggregate"]
        with disk_full(Path(s.config.state_dir) / "state.db-wal"):
            s.turn()
        assert sorted(s.table.deadlines._heap) == held  # still there, never popped
        assert s.table.jobs["ddp2"].last_epoch is None
        s.turn()
        late = r0.recv(timeout=5)
        assert isinstance(late, LrMessage) and late.apply_from_epoch == 1
        assert s.table.jobs["ddp2"].last_epoch == 0
        assert [d[1] for d in s.table.deadlines.due(clock.t)] == []
    finally:
        r0.close(), r1.close()


def test_a_reload_rebinds_each_job_at_its_next_decision_not_all_at_once(
    server: tuple[Server, Clock],
) -> None:
    s, _clock = server
    peers = [Wire(s.endpoints()["bind"], f"rb-{i}") for i in range(3)]
    try:
        for p in peers:
            p.sock.send(_hello(p))
        turn_until(s, *peers)
        new = load_text(PLATEAU.replace("patience: 1", "patience: 1, min_lr: 0.2"), "p.yaml")
        s.table.swap_policies(new)  # what a reload does: O(1), no job touched yet
        assert all(j.rule.policy.min_lr == 0.0 for j in s.table.jobs.values())  # type: ignore[attr-defined]
        peers[0].report(0, {"val_loss": 1.0}, wait=False)
        batch = s.table.batch(s.clock(), s.wall())
        s._feed(*_received(s), batch, [], [])  # one message, its job rebound at its decision
        assert [st.job.name for st in batch.steps if st.job] == ["rb-0", "rb-0"]
        s.store.commit(batch.writes())
        s.table.deadlines.pop_due(s.clock())
        s.send(s.table.publish(batch))
        (reply,) = [peers[0].recv()]
        assert reply.lr == pytest.approx(0.2) and reply.reason == "reload"
        s.turn()  # the others within a few loop turns, pushed to their workers
        pushed = [p.recv() for p in peers[1:]]
        assert all(m.reason == "reload" and m.lr == pytest.approx(0.2) for m in pushed)
        assert not s.table.rebinding
    finally:
        for p in peers:
            p.close()


def _received(s: Server) -> tuple[list[bytes]]:
    for _ in range(200):
        if s.sock.poll(10):
            return (s.sock.recv_multipart(),)
    raise AssertionError("no message reached the controller")


def test_history_is_filtered_by_the_store(server: tuple[Server, Clock]) -> None:
    from lrpilot.controller.store import AuditRow

    s, _clock = server
    rows = [
        AuditRow(f"2026-01-0{d}T00:00:00.000Z", "h", 0.1, 0.1 / d, "plateau", d, d, "policy", run)
        for d, run in ((1, 1), (2, 1), (3, 2), (4, 2), (5, 2))
    ]
    s.store.commit(Writes(audit=rows))
    assert [r.version for r in s.store.history("h", run=2)] == [3, 4, 5]
    assert [r.version for r in s.store.history("h", run=2, limit=2)] == [4, 5]
    assert [r.version for r in s.store.history("h", since="2026-01-02")] == [2, 3, 4, 5]
    assert s.store.last_run("h") == 2 and s.store.last_run("nobody") is None
