"""The controller daemon over real sockets: decisions, admin, lifecycle, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import re
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from conftest import Controller, Wire, run_cli

from lrpilot.client.protocol import ErrorMessage, LrMessage

PLATEAU = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2, min_delta: 0.0}
jobs:
  - match: "step-*"
    policy: {type: step, factor: 0.1, step_size: 3}
  - match: "warm-*"
    phases:
      - {type: warmup, from_lr: 0.01, to_lr: 0.1, epochs: 2}
      - {type: plateau, patience: 1, factor: 0.5, min_delta: 0.0}
  - match: "ddp-*"
    aggregate_timeout: 1s
    policy: {type: plateau, factor: 0.5, patience: 1, min_delta: 0.0}
"""

Factory = Callable[..., Controller]


def test_hello_and_reports_drive_plateau_decisions(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-a")
    try:
        first = w.hello(lr=0.1)
        assert isinstance(first, LrMessage) and first.reason == "initial"
        assert first.apply_from_epoch == 0 and first.lr == pytest.approx(0.1)
        replies = [w.report(e, {"val_loss": v}) for e, v in enumerate([1.0, 1.0, 1.0, 0.5])]
        assert [r.seq for r in replies] == [1, 2, 3, 4]
        assert [r.apply_from_epoch for r in replies] == [1, 2, 3, 4]
        assert replies[2].reason == "plateau" and replies[2].lr == pytest.approx(0.05)
        assert replies[2].version == first.version + 1
        # A duplicate seq is answered with the current LR and changes nothing.
        dup = w.report(2, {"val_loss": 1.0}, seq=3)
        assert dup.lr == pytest.approx(0.05) and dup.version == replies[2].version
    finally:
        w.close()


def test_several_jobs_with_different_policies(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    peers = {name: Wire(c.bind, name) for name in ("plain-1", "step-1", "warm-1")}
    try:
        lrs: dict[str, list[float]] = {name: [p.hello(lr=0.1).lr] for name, p in peers.items()}
        for epoch in range(6):
            for name, p in peers.items():
                lrs[name].append(p.report(epoch, {"val_loss": 1.0}).lr)
        assert lrs["step-1"] == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001])
        assert lrs["warm-1"][:3] == pytest.approx([0.01, 0.055, 0.1])
        assert lrs["warm-1"][4] == pytest.approx(0.05)  # plateau phase: patience 1
        assert lrs["plain-1"][3] == pytest.approx(0.05)  # keras patience 2: wait 2 at epoch 2
        status = run_cli("status", "--json", "--admin", c.admin)
        import json

        rows = {r["job"]: r for r in json.loads(status.stdout)}
        assert set(rows) == set(peers)
        assert rows["warm-1"]["phase"] == "2/2 plateau" and rows["step-1"]["policy"] == "step"
        assert set(rows["plain-1"]) == {
            "job",
            "workers",
            "epoch",
            "lr",
            "monitor",
            "value",
            "best",
            "wait",
            "patience",
            "policy",
            "phase",
            "last_report_age_s",
        }
    finally:
        for p in peers.values():
            p.close()


def test_multi_worker_decides_once_on_the_mean_and_answers_every_rank(
    controller_factory: Factory,
) -> None:
    c = controller_factory(PLATEAU)
    r0, r1 = Wire(c.bind, "ddp-a", 0, 2), Wire(c.bind, "ddp-a", 1, 2)
    try:
        r0.hello(), r1.hello()
        for epoch, (a, b) in enumerate([(1.0, 1.0), (0.5, 2.0), (1.0, 1.0)]):
            r0.report(epoch, {"val_loss": a}, wait=False)
            r1.report(epoch, {"val_loss": b}, wait=False)
            x, y = r0.recv(), r1.recv()
            assert (x.lr, x.version, x.apply_from_epoch) == (y.lr, y.version, y.apply_from_epoch)
        # mean 1.25 at epoch 1 is no improvement (patience 1): reduced at epoch 1.
        assert x.lr == pytest.approx(0.05 * 0.5)
        # rank 1 goes silent: after aggregate_timeout (1 s) rank 0 still gets its decision
        # (the exact moment is tested with an injected clock in test_transitions.py).
        r0.report(3, {"val_loss": 5.0}, wait=False)
        late = r0.recv(timeout=10)
        assert late.apply_from_epoch == 4
        assert c.metric("lrpilot_late_decisions_total", training_job="ddp-a") >= 1
    finally:
        r0.close(), r1.close()


def test_resume_from_an_older_checkpoint_restores_that_epochs_state(
    controller_factory: Factory,
) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-r")
    try:
        w.hello()
        lrs = [w.report(e, {"val_loss": 1.0}).lr for e in range(6)]  # reductions at 2 and 4
        assert lrs[1] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.025)
        w.close()
        w = Wire(c.bind, "job-r")
        back = w.hello(start_epoch=2)  # the trainer restarted from its epoch-2 checkpoint
        assert back.reason == "resume" and back.lr == pytest.approx(0.1)
        assert back.apply_from_epoch == 2
        again = [w.report(e, {"val_loss": 1.0}).lr for e in range(2, 6)]
        assert again == pytest.approx(lrs[2:6])  # continues as if never interrupted
    finally:
        w.close()


def test_kill_9_keeps_every_decision_and_the_plateau_count(
    controller_factory: Factory, tmp_path: Path
) -> None:
    policy = (
        "version: 1\ndefaults:\n"
        "  policy: {type: plateau, factor: 0.5, patience: 3, min_delta: 0.0}\n"
    )
    c = controller_factory(policy)
    w = Wire(c.bind, "job-k")
    run = w.hello(lr=0.1).run
    lrs = [w.report(e, {"val_loss": 1.0}).lr for e in range(7)]  # reductions at epochs 3 and 6
    assert lrs[3] == pytest.approx(0.05) and lrs[6] == pytest.approx(0.025)
    w.close()
    c.kill()
    c2 = controller_factory(policy, state_dir=c.state_dir)
    w = Wire(c2.bind, "job-k")
    try:
        back = w.hello(lr=0.1, start_epoch=7)
        assert back.lr == pytest.approx(0.025) and back.run == run
        after = [w.report(e, {"val_loss": 1.0}).lr for e in range(7, 11)]
        # exactly `patience` (3) further bad epochs: reduced by the report of epoch 9
        assert after == pytest.approx([0.025, 0.025, 0.0125, 0.0125])
    finally:
        w.close()


def test_kill_9_at_random_points_loses_no_decision(
    controller_factory: Factory, tmp_path: Path
) -> None:
    policy = (
        "version: 1\ndefaults:\n"
        "  policy: {type: plateau, factor: 0.9, patience: 0, min_delta: 0.0}\n"
    )
    rng = random.Random(11)
    state_dir = tmp_path / "state"
    epoch, received, survived = 0, None, 0
    deadline = time.monotonic() + 120
    for _round in range(8):
        if time.monotonic() > deadline:
            break
        c = controller_factory(policy, state_dir=state_dir)
        w = Wire(c.bind, "job-x")
        hello = w.hello(lr=0.1, start_epoch=epoch)
        if received is not None:
            # The decision this client last received survived the SIGKILL.
            assert hello.lr == pytest.approx(received.lr, rel=1e-7)
            assert hello.version >= received.version
        # A stream of reports, killed at a random moment, some replies possibly in flight.
        n = rng.randint(3, 40)
        for _ in range(n):
            w.report(epoch, {"val_loss": 1.0}, wait=False)
            try:
                received = w.recv(timeout=5)
            except TimeoutError:
                break
            epoch += 1
        w.report(epoch, {"val_loss": 1.0}, wait=False)  # in flight when the kill lands
        # Kept on purpose: the kill lands at a random moment of the real process's handling
        # (before, during or after the commit); no clock of a separate process can be stepped.
        time.sleep(rng.uniform(0, 0.01))
        c.kill()
        survived += 1
        try:
            late = w.recv(timeout=0.2)
            if isinstance(late, LrMessage):
                received, epoch = late, epoch + 1
        except TimeoutError:
            pass
        w.close()
    assert survived >= 5


BAD_FRAMES: list[bytes] = [
    b"",
    b"\x00",
    b"garbage" * 10,
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"t": 5}),
    msgpack.packb({"t": "nope"}),
    msgpack.packb({"t": "report"}),
    msgpack.packb({"t": "hello", "v": 2}),
    msgpack.packb({"t": "hello", "v": 1, "job": "x" * 1000}),
    b"\x91" * 5000,  # deeply nested arrays
    msgpack.packb({"t": "report", "job": "a", "metrics": {str(i): 1.0 for i in range(300)}}),
    b"\xc1",  # never-used msgpack byte
    msgpack.packb({"t": "x" * 5000}),
    b"\xdd\xff\xff\xff\xff",  # array32 with 4 billion items announced
]


def _random_message(rng: random.Random, session: bytes) -> bytes:
    base = {
        "t": rng.choice(["hello", "report", "bye", "lr", "status", ""]),
        "v": rng.choice([1, 1, 2, "1", None]),
        "job": rng.choice(["ok-job", "", "bad name", "ü", 5, None, "a" * 200]),
        "rank": rng.choice([0, -1, (1 << 64) - 1, "0", 3.5, None]),
        "world": rng.choice([1, 0, -5, 1 << 20]),
        "session": rng.choice([session, b"short", "str", None]),
        "lr": rng.choice([0.1, -1.0, 0.0, math.nan, math.inf, 11.0, "x", True]),
        "seq": rng.choice([1, -1, (1 << 64) - 1, None, 2.5]),
        "epoch": rng.choice([0, -1, 1 << 41, 1.5, None, "3"]),
        "start_epoch": rng.choice([0, -3, 1 << 50]),
        "step": rng.choice([None, -1, 5]),
        "metrics": rng.choice(
            [
                {"val_loss": math.nan},
                {"val loss": 1.0},
                [],
                {"a": "b"},
                {"val_loss": math.inf},
                {"": 1.0},
                None,
            ]
        ),
    }
    keys = rng.sample(sorted(base), rng.randint(0, len(base)))
    return msgpack.packb({k: base[k] for k in keys}, use_bin_type=True)


def test_thousands_of_malformed_messages_change_nothing(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    good = Wire(c.bind, "good-job")
    bad = Wire(c.bind, "evil")
    rng = random.Random(3)
    try:
        good.hello(lr=0.1)
        expected = [good.report(e, {"val_loss": 1.0}).lr for e in range(2)]
        n = 0
        answered = 0
        for i in range(3000):
            frame = (
                BAD_FRAMES[i % len(BAD_FRAMES)] if i % 3 == 0 else _random_message(rng, bad.session)
            )
            bad.send_raw(frame)
            n += 1
            if i % 50 == 49:  # keep the pipe drained
                while bad.sock.poll(0):
                    bad.sock.recv()
                    answered += 1
        while bad.sock.poll(500):
            bad.sock.recv()
            answered += 1
        assert answered >= n * 0.9  # answered with an error, not dropped
        # An oversize frame: the socket drops that peer; the controller stays up.
        big = Wire(c.bind, "big")
        big.send_raw(b"\x00" * (2 << 20))
        big.close()
        # The good job is untouched and keeps getting the right decisions.
        lrs = expected + [good.report(e, {"val_loss": 1.0}).lr for e in range(2, 5)]
        assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
        assert c.proc is not None and c.proc.poll() is None
        total = sum(
            c.metric("lrpilot_invalid_messages_total", reason=r)
            for r in (
                "too_large",
                "decode",
                "schema",
                "unknown_type",
                "out_of_range",
                "bad_version",
                "max_jobs",
                "mode_unresolved",
            )
        )
        assert total >= n * 0.5
        assert c.metric("lrpilot_invalid_messages_total", reason="decode") > 0
        assert c.metric("lrpilot_invalid_messages_total", reason="schema") > 0
        status = run_cli("status", "--json", "--admin", c.admin)
        import json

        jobs = {r["job"] for r in json.loads(status.stdout)}
        assert "good-job" in jobs and "evil" not in jobs
    finally:
        good.close(), bad.close()


def test_report_before_hello_is_unknown_session(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-u")
    try:
        reply = w.report(0, {"val_loss": 1.0})
        assert (
            isinstance(reply, ErrorMessage) and reply.code == "unknown_session" and reply.seq == 1
        )
    finally:
        w.close()


def test_mode_auto_unresolved_is_an_error_and_keeps_the_lr(controller_factory: Factory) -> None:
    c = controller_factory("version: 1\ndefaults:\n  policy: {type: plateau, monitor: val_f1}\n")
    w = Wire(c.bind, "job-m")
    try:
        w.hello()
        assert w.report(0, {"val_f1": 0.5}).code == "mode_unresolved"
        w2 = Wire(c.bind, "job-m2")
        w2.hello(directions={"val_f1": "max"})
        assert isinstance(w2.report(0, {"val_f1": 0.5}), LrMessage)
        w2.close()
    finally:
        w.close()


def test_set_lr_pushes_to_workers_and_is_audited(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-o")
    try:
        w.hello()
        w.report(0, {"val_loss": 1.0})
        out = run_cli("set-lr", "job-o", "0.02", "--reason", "spike at epoch 0", "--admin", c.admin)
        assert out.returncode == 0, out.stderr
        push = w.recv()
        assert push.reason == "override" and push.lr == pytest.approx(0.02)
        assert push.seq is None and push.apply_from_epoch == 1
        # The plateau continues from it, keeping best and wait (wait was 0 after the first value).
        lrs = [w.report(e, {"val_loss": 1.0}).lr for e in (1, 2)]
        assert lrs == pytest.approx([0.02, 0.01])
        history = run_cli("history", "job-o", "--json", "--admin", c.admin)
        import json

        rows = json.loads(history.stdout)
        assert [r["reason"] for r in rows] == ["initial", "override", "plateau"]
        import getpass
        import socket

        # Who ran set-lr, as the caller says: a loopback TCP admin socket cannot vouch for it.
        author = f"claimed:{getpass.getuser()}@{socket.gethostname()}"
        assert rows[1]["source"] == author and rows[1]["detail"] == "spike at epoch 0"
        lines = (c.state_dir / "audit.jsonl").read_text().splitlines()
        assert len(lines) == 3 and '"override"' in lines[1]
        assert run_cli("set-lr", "nope", "0.1", "--admin", c.admin).returncode == 1
        assert run_cli("set-lr", "job-o", "20", "--admin", c.admin).returncode == 2
        assert run_cli("forget", "job-o", "--admin", c.admin).returncode == 0
        assert run_cli("history", "nope", "--admin", c.admin).returncode == 1
    finally:
        w.close()


def test_admin_without_a_controller_fails_fast(tmp_path: Path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    t0 = time.monotonic()
    out = run_cli("status", "--admin", f"tcp://127.0.0.1:{port}")
    assert out.returncode == 1 and "no controller answered" in out.stderr
    assert time.monotonic() - t0 < 6  # 2 s wait + interpreter start


def test_sigterm_exits_0_within_2_seconds_and_lock_is_exclusive(
    controller_factory: Factory,
) -> None:
    c = controller_factory(PLATEAU)
    second = run_cli(
        "serve",
        "--bind",
        "tcp://127.0.0.1:0",
        "--admin-bind",
        "tcp://127.0.0.1:0",
        "--metrics-port",
        "0",
        "--state-dir",
        str(c.state_dir),
    )
    assert second.returncode == 1 and "locked" in second.stderr
    assert c.proc is not None
    t0 = time.monotonic()
    c.proc.terminate()
    assert c.proc.wait(5) == 0
    assert time.monotonic() - t0 < 2.0


def test_bad_flags_and_bad_policy_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\ndefaults:\n  policy: {type: plateau, factor: 7}\n")
    out = run_cli("serve", "--policy", str(bad), "--state-dir", str(tmp_path / "s"))
    assert out.returncode == 2 and "p.yaml:3: factor" in out.stderr
    assert run_cli("serve", "--metrics-port", "x").returncode == 2


def test_corrupt_store_is_refused(controller_factory: Factory, tmp_path: Path) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-c")
    w.hello()
    w.close()
    assert c.stop() == 0
    db = c.state_dir / "state.db"
    with open(db, "r+b") as fh:  # scribble over the middle of the file
        fh.seek(100)
        fh.write(os.urandom(4000))
    out = run_cli(
        "serve",
        "--bind",
        "tcp://127.0.0.1:0",
        "--admin-bind",
        "tcp://127.0.0.1:0",
        "--metrics-port",
        "0",
        "--state-dir",
        str(c.state_dir),
    )
    assert out.returncode == 1
    assert "damaged" in out.stderr and "move it aside" in out.stderr


def test_bind_failure_exits_1(controller_factory: Factory, tmp_path: Path) -> None:
    c = controller_factory(PLATEAU)
    out = run_cli(
        "serve",
        "--bind",
        c.bind,
        "--admin-bind",
        "tcp://127.0.0.1:0",
        "--metrics-port",
        "0",
        "--state-dir",
        str(tmp_path / "other"),
    )
    assert out.returncode == 1 and f"cannot bind {c.bind} (--bind)" in out.stderr
    busy = c.metrics.split("//")[1].split("/")[0]  # host:port of the running one's metrics
    out = run_cli(
        "serve",
        "--bind",
        "tcp://127.0.0.1:0",
        "--admin-bind",
        "tcp://127.0.0.1:0",
        "--metrics-host",
        busy.split(":")[0],
        "--metrics-port",
        busy.split(":")[1],
        "--state-dir",
        str(tmp_path / "third"),
        "--log-format",
        "json",
    )
    assert out.returncode == 1
    line = json.loads(out.stderr.strip().splitlines()[-1])  # startup errors are JSON too
    assert f"cannot serve metrics on {busy} (--metrics-port)" in line["message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


def test_store_is_sqlite_wal(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-w")
    w.hello()
    w.close()
    assert not (c.state_dir / "state.db-shm").exists()  # no mmap that could SIGBUS
    c.stop()  # the controller holds the database exclusively while it runs
    mode = sqlite3.connect(c.state_dir / "state.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_subprocess_module_entry(tmp_path: Path) -> None:
    out = subprocess.run(
        ["lrpilot", "--version"],
        capture_output=True,
        text=True,
        check=False,
        env={
            **os.environ,
            "PATH": str(Path(os.sys.executable).parent) + ":" + os.environ.get("PATH", ""),
        },
    )
    assert out.returncode == 0 and out.stdout.startswith("lrpilot ")


def test_unresolved_mode_is_counted(controller_factory: Factory) -> None:
    c = controller_factory("version: 1\ndefaults:\n  policy: {type: plateau, monitor: val_f1}\n")
    w = Wire(c.bind, "job-mc")
    try:
        w.hello()
        assert w.report(0, {"val_f1": 0.5}).code == "mode_unresolved"
        assert c.metric("lrpilot_invalid_messages_total", reason="mode_unresolved") == 1
    finally:
        w.close()


def test_a_full_disk_loses_no_decision_and_never_stops_the_controller(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(PLATEAU)
    c = Controller(tmp_path / "state", policy, max_file_bytes=150_000).start()
    w = Wire(c.bind, "job-disk")
    try:
        w.hello()
        received: list[LrMessage] = []
        failed_at = None
        for e in range(2000):
            answer = w.report(e, {"val_loss": 1.0 + e}, seq=e + 1)
            if isinstance(answer, ErrorMessage):
                assert answer.code == "unavailable" and answer.seq == e + 1
                failed_at = e
                break
            received.append(answer)
        assert failed_at is not None, "the file size limit must be reached"
        assert c.proc is not None and c.proc.poll() is None  # still serving
        assert c.metric("lrpilot_store_errors_total") >= 1
        status = run_cli("status", "--json", "--admin", c.admin)
        import json

        row = json.loads(status.stdout)[0]
        assert row["epoch"] == failed_at - 1  # the refused decision changed nothing
        assert row["lr"] == pytest.approx(received[-1].lr)
        # A resend of the refused report is processed, not deduplicated away: still refused.
        again = w.report(failed_at, {"val_loss": 1.0}, seq=failed_at + 1)
        assert isinstance(again, ErrorMessage) and again.code == "unavailable"
    finally:
        w.close()
        c.kill()
    # Restarted without the limit, the last decision the client received is there.
    c2 = Controller(tmp_path / "state", policy).start()
    w = Wire(c2.bind, "job-disk")
    try:
        back = w.hello(start_epoch=failed_at)
        assert back.lr == pytest.approx(received[-1].lr)
    finally:
        w.close()
        c2.kill()


def test_a_forgotten_job_starts_a_run_its_clients_accept(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-f")
    try:
        first = w.hello()
        for e in range(4):
            w.report(e, {"val_loss": 1.0})
        assert run_cli("forget", "job-f", "--admin", c.admin).returncode == 0
        w2 = Wire(c.bind, "job-f")
        again = w2.hello(start_epoch=0)
        assert again.run != first.run  # a client holding the old run applies the new one
        w2.close()
    finally:
        w.close()


def test_many_sessions_of_one_rank_keep_the_state_small(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    for _ in range(300):
        w = Wire(c.bind, "job-s")
        w.hello(start_epoch=5)
        w.close()
    c.stop()  # the controller holds the database exclusively while it runs
    size = (
        sqlite3.connect(c.state_dir / "state.db")
        .execute("SELECT length(data) FROM jobs WHERE job = 'job-s'")
        .fetchone()[0]
    )
    assert size < 4000, size


def test_cosine_down_to_zero_keeps_the_job_controlled(controller_factory: Factory) -> None:
    c = controller_factory("version: 1\ndefaults:\n  policy: {type: cosine, decay_steps: 3}\n")
    w = Wire(c.bind, "job-z")
    try:
        w.hello(lr=0.1)
        lrs = []
        for e in range(6):
            reply = w.report(e, {"val_loss": 1.0}, lr=lrs[-1] if lrs else 0.1)
            assert isinstance(reply, LrMessage), reply
            lrs.append(reply.lr)
        # Cosine with alpha 0 ends at 0 (Keras, torch); the job stays at the floor, 1e-12.
        assert lrs[2:] == [1e-12, 1e-12, 1e-12, 1e-12]
        assert c.metric("lrpilot_epoch", training_job="job-z") == 5
    finally:
        w.close()


def test_shadow_mode_records_decisions_but_sends_the_old_lr(controller_factory: Factory) -> None:
    c = controller_factory(
        "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 1, apply: false}\n"
    )
    w = Wire(c.bind, "job-shadow")
    try:
        w.hello(lr=0.1)
        lrs = [w.report(e, {"val_loss": 1.0}).lr for e in range(3)]
        assert lrs == [pytest.approx(0.1)] * 3
        import json

        row = json.loads(run_cli("status", "--json", "--admin", c.admin).stdout)[0]
        assert row["lr"] == pytest.approx(0.1)
        rows = json.loads(run_cli("history", "job-shadow", "--json", "--admin", c.admin).stdout)
        shadow = [r for r in rows if r["source"] == "shadow"]
        assert len(shadow) == 3 and shadow[-1]["detail"] == "shadow lr 0.0125"
    finally:
        w.close()


def test_unit_step_policies_decide_per_step(controller_factory: Factory) -> None:
    c = controller_factory(
        "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 100, unit: step}\n"
    )
    w = Wire(c.bind, "job-steps")
    try:
        first = w.hello(lr=0.1)
        assert first.apply_from_step == 0 and first.apply_from_epoch is None
        replies = [w.report(0, {"loss": 1.0}, step=s) for s in (49, 99, 149, 199)]
        assert [r.apply_from_step for r in replies] == [50, 100, 150, 200]
        assert [r.lr for r in replies] == pytest.approx([0.1, 0.05, 0.05, 0.025])
        no_step = w.report(0, {"loss": 1.0})
        assert isinstance(no_step, ErrorMessage) and no_step.code == "schema"
    finally:
        w.close()


def test_notices_tell_the_trainer_what_is_wrong(controller_factory: Factory) -> None:
    policy = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, patience: 1}
jobs:
  - match: "shadow-*"
    policy: {type: step, factor: 0.5, step_size: 1, apply: false}
"""
    c = controller_factory(policy)
    missing, shadow = Wire(c.bind, "no-val"), Wire(c.bind, "shadow-1")
    try:
        missing.hello()
        reply = missing.report(0, {"loss": 1.0})  # fit without validation data
        assert isinstance(reply, LrMessage)
        assert [code for code, _ in reply.notices] == ["monitor_missing"]
        assert "val_loss" in reply.notices[0][1] and "loss" in reply.notices[0][1]
        shadow.hello()
        reply = shadow.report(0, {"loss": 1.0})
        assert isinstance(reply, LrMessage) and reply.lr == pytest.approx(0.1)
        assert [code for code, _ in reply.notices] == ["shadow"]
        assert "0.05" in reply.notices[0][1]
    finally:
        missing.close(), shadow.close()
