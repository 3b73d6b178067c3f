"""The admin API and CLI: expiring overrides with their author, history filters and run
markers, errors that never pass for results."""

from __future__ import annotations

import getpass
import itertools
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Clock, Controller, Wire, run_cli, turn_until, wait_for

from lrpilot.client.protocol import Bye, Hello, LrMessage, encode
from lrpilot.controller.admin import Admin
from lrpilot.controller.errors import AdminError, BadEndpoint, UnknownJob
from lrpilot.controller.server import Server

Factory = Callable[..., Controller]
STEP = "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 2}\n"
AUTHOR = f"{getpass.getuser()}@{socket.gethostname()}"


def test_an_override_for_n_epochs_ends_and_the_schedule_takes_over(
    controller_factory: Factory,
) -> None:
    c = controller_factory(STEP)
    admin = Admin(c.admin)
    w = Wire(c.bind, "exp")
    try:
        w.hello(lr=0.8)
        lrs = [w.report(e, {"loss": 1.0}, lr=lr).lr for e, lr in ((0, 0.8), (1, 0.8))]
        assert lrs == [0.8, 0.4]  # the LRs for epochs 1 and 2
        reply = admin.set_lr("exp", 0.05, reason="spike", epochs=2)
        assert reply["apply_from"] == 2 and reply["override"]["epochs"] == 2
        assert reply["override"]["until_epoch"] is None  # known once it is trained at
        push = w.recv()
        assert isinstance(push, LrMessage) and push.lr == 0.05 and push.apply_from_epoch == 2
        assert push.notices[0][0] == "override" and "for 2 epochs" in push.notices[0][1]
        table = run_cli("status", "--admin", c.admin).stdout
        assert f"pinned by claimed:{AUTHOR} for 2 epochs trained at it, from epoch 2" in table
        # Epochs 2 and 3 train at the pin; from epoch 4 the step schedule's own LR
        # (0.8 * 0.5 ** (4 // 2) = 0.2), as if the pin had never been.
        assert w.report(2, {"loss": 1.0}, lr=0.05).lr == 0.05
        row = next(j for j in admin.status() if j["job"] == "exp")
        assert row["override"]["until_epoch"] == 4 and row["override"]["trained"] == 1
        assert "until epoch 4 (1/2 trained at it)" in run_cli("status", "--admin", c.admin).stdout
        trained = ((3, 0.05), (4, 0.2), (5, 0.2))
        assert [w.report(e, {"loss": 1.0}, lr=lr).lr for e, lr in trained] == [0.2, 0.2, 0.1]
        history = admin.history("exp")
        kinds = [(r["reason"], r["source"], r["detail"]) for r in history]
        assert ("override", f"claimed:{AUTHOR}", "spike; for 2 epochs") in kinds
        assert ("override", "expiry", "expired") in kinds
        assert next(j for j in admin.status() if j["job"] == "exp")["override"] is None
    finally:
        w.close()


@pytest.fixture
def server(clocked_server: Callable[..., tuple[Server, Clock]]) -> tuple[Server, Clock]:
    # A rank silent for the two hours below is still a worker.
    return clocked_server(STEP, worker_timeout=86400.0)


def _turn_until_answer(s: Server, w: Wire) -> object:
    (answer,) = turn_until(s, w)
    return answer


def test_an_override_for_a_duration_ends_at_its_time(server: tuple[Server, Clock]) -> None:
    s, clock = server
    w = Wire(s.endpoints()["bind"], "timed")
    try:
        w.sock.send(encode(Hello("timed", 0, 1, w.session, 0.8, 0).to_wire()))
        _turn_until_answer(s, w)
        w.report(0, {"loss": 1.0}, wait=False)
        assert _turn_until_answer(s, w).lr == 0.8  # type: ignore[attr-defined]
        batch = s.table.batch(clock(), clock.wall())
        batch.override("timed", 0.01, "night shift", "ops@host", seconds=7200)
        s.send(s.commit(batch))
        assert _turn_until_answer(s, w).lr == 0.01  # type: ignore[attr-defined]
        clock.t += 7199
        s.turn()
        assert s.table.jobs["timed"].lr == 0.01  # and nothing pushed: `back` is the next frame
        clock.t += 2  # the two hours are over: the schedule's LR is pushed for the next epoch
        s.turn()
        back = _turn_until_answer(s, w)
        assert isinstance(back, LrMessage) and back.lr == 0.8 and back.apply_from_epoch == 1
        assert back.reason == "override" and s.table.jobs["timed"].override is None
        w.report(1, {"loss": 1.0}, wait=False)  # one push only: this report's answer is next
        nxt = _turn_until_answer(s, w)
        assert isinstance(nxt, LrMessage) and nxt.seq == w.seq
        rows = s.store.history("timed")
        assert (rows[-1].reason, rows[-1].source, rows[-1].detail) == (
            "override",
            "expiry",
            "expired",
        )
    finally:
        w.close()


def say_bye(w: Wire, admin: str) -> None:
    """The rank says bye; returns once `status` shows the job finished (bounded)."""
    import time

    w.send_raw(encode(Bye(w.job, w.rank, w.session).to_wire()))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(j["job"] == w.job and j["finished"] for j in Admin(admin).status()):
            return
        w.sock.poll(20)
    raise AssertionError(f"the bye of {w.job} was never seen")


def test_history_marks_runs_and_filters(controller_factory: Factory) -> None:
    c = controller_factory(STEP)
    wires = [Wire(c.bind, "runs"), Wire(c.bind, "runs")]
    try:
        for w in wires:  # two runs: each process says hello at epoch 0 after reporting
            w.hello(lr=0.8)
            for e in range(3):
                w.report(e, {"loss": 1.0})
        # The second run is under way; once its only worker says bye, it is finished.
        marks = [r["run_state"] for r in Admin(c.admin).history("runs", all_runs=True)]
        assert marks[0] == "ended" and marks[-1] == "current"
        say_bye(wires[-1], c.admin)
    finally:
        for w in wires:
            w.close()
    admin = Admin(c.admin)
    every = admin.history("runs", all_runs=True)
    runs = sorted({r["run"] for r in every})
    assert len(runs) == 2
    current = admin.history("runs")
    assert {r["run"] for r in current} == {runs[-1]} and current[0]["reason"] == "initial"
    assert [r["run"] for r in admin.history("runs", run=runs[0])] == [runs[0]] * len(current)
    assert admin.history("runs", tail=1) == current[-1:]
    text = run_cli("history", "runs", "--all-runs", "--admin", c.admin).stdout
    assert [line for line in text.splitlines() if line.startswith("-- run")] == [
        f"-- run {runs[0]} (ended: a later run started) --",
        f"-- run {runs[1]} (finished: every worker said bye) --",
    ]
    assert json.loads(run_cli("history", "runs", "--json", "--admin", c.admin).stdout) == current


def test_admin_errors_never_pass_for_results(controller_factory: Factory) -> None:
    c = controller_factory(STEP)
    w = Wire(c.bind, "known")
    w.hello()
    w.close()
    with pytest.raises(UnknownJob):
        Admin(c.admin).set_lr("nope", 0.1)
    with pytest.raises(AdminError) as err:
        Admin(c.bind).status()  # the client port: refused, not an empty list
    assert err.value.code == "unknown_type"
    out = run_cli("status", "--admin", c.bind)
    assert out.returncode == 1 and "unknown" in out.stderr and "no jobs" not in out.stdout
    out = run_cli("reload", "--admin", c.bind)
    assert out.returncode == 1 and "rejected" not in out.stderr
    host_port = c.admin.removeprefix("tcp://")
    with pytest.raises(BadEndpoint, match="did you mean tcp://"):
        Admin(host_port)
    out = run_cli("status", "--admin", host_port)
    assert out.returncode == 1 and f"did you mean tcp://{host_port}" in out.stderr
    assert "Traceback" not in out.stderr
    out = run_cli("set-lr", "known", "0.1", "--for", "1h", "--epochs", "2", "--admin", c.admin)
    assert out.returncode == 2 and "not allowed with" in out.stderr


def test_a_closed_pipe_ends_the_output_quietly(tmp_path: Path) -> None:
    import subprocess
    import sys

    csv = tmp_path / "long.csv"
    csv.write_text("epoch,val_loss\n" + "".join(f"{e},{1.0 / (e + 1)}\n" for e in range(20000)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrpilot.controller.cli", "simulate", "--job", "x", "--json",
         "--metrics", str(csv)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10)  # `| head -c 10`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 0 and "Traceback" not in err and "BrokenPipe" not in err


def test_init_writes_a_starter_that_passes_check_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "lrpilot-policy.yaml"
    out = run_cli("init", cwd=tmp_path)
    assert out.returncode == 0 and target.is_file(), out.stderr
    assert run_cli("check", str(target)).stdout.strip() == f"{target}: ok"
    assert "#" in target.read_text()  # commented
    before = target.read_text()
    again = run_cli("init", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr and target.read_text() == before
    other = tmp_path / "warm.yaml"
    assert run_cli("init", str(other), "--example", "warmup-plateau").returncode == 0
    assert "warmup" in other.read_text()
    unknown = run_cli("init", str(tmp_path / "x.yaml"), "--example", "nope")
    assert unknown.returncode == 2 and "warmup-plateau" in unknown.stderr


def test_completion_scripts_complete_the_subcommands(tmp_path: Path) -> None:
    import shutil
    import subprocess

    bash = run_cli("completion", "bash")
    assert bash.returncode == 0 and "set-lr" in bash.stdout and "--watch" in bash.stdout
    zsh = run_cli("completion", "zsh")
    assert zsh.returncode == 0 and "#compdef lrpilot" in zsh.stdout
    if shutil.which("bash"):  # the script loads and completes `lrpilot st<TAB>`
        script = tmp_path / "lrpilot.bash"
        script.write_text(bash.stdout)
        probe = (
            f"source {script}; COMP_WORDS=(lrpilot st); COMP_CWORD=1; "
            "_shtab_lrpilot 2>/dev/null || true; printf '%s\\n' \"${COMPREPLY[@]}\""
        )
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
        assert "status" in done.stdout.split(), done.stdout + done.stderr


def test_status_watch_redraws_until_ctrl_c(controller_factory: Factory) -> None:
    import os
    import pty
    import signal
    import subprocess
    import sys
    import time

    c = controller_factory(STEP)
    w = Wire(c.bind, "watched")
    w.hello()
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lrpilot.controller.cli", "status", "--watch", "0.2",
         "--admin", c.admin],
        stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True,
    )  # fmt: skip
    os.close(secondary)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"\x1b[2J") < 3 and time.monotonic() < deadline:
            import select

            if select.select([primary], [], [], 1.0)[0]:
                seen += os.read(primary, 65536)
        assert seen.count(b"\x1b[2J") >= 3, seen  # redrawn in place, again and again
        assert b"watched" in seen and b"every 0.2 s" in seen
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(primary)
        w.close()


def test_status_prints_lrs_as_the_readme_shows(controller_factory: Factory) -> None:
    c = controller_factory("version: 1\ndefaults:\n  policy: {type: plateau, patience: 3}\n")
    w = Wire(c.bind, "fmt")
    w.hello(lr=3e-4)
    w.report(0, {"val_loss": 0.41213})
    table = run_cli("status", "--admin", c.admin).stdout
    assert "3e-04" in table and "0.4121" in table, table
    w.close()


def test_simulate_names_the_missing_column(tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("epoch,loss,accuracy\n0,1.0,0.5\n1,0.9,0.6\n")
    out = run_cli("simulate", "--job", "x", "--metrics", str(csv))  # the default monitors val_loss
    assert out.returncode == 2
    assert f"{csv}: no column 'val_loss'" in out.stderr and "accuracy, loss" in out.stderr


LABELS = """\
version: 1
defaults:
  policy: {type: plateau, monitor: loss, factor: 0.5, patience: 2, min_delta: 0.0, min_lr: 0.025}
jobs:
  - match: "steps-*"
    policy: {type: step, unit: step, factor: 0.5, step_size: 100}
"""


def _cells(table: str, job: str) -> list[str]:
    """The row of `job` in a status table, cut at the header's column starts."""
    header, *rows = table.splitlines()
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    (row,) = [r for r in rows if r.split(" ", 1)[0] == job]
    bounds = [*starts, None]
    return [row[a:b].strip() for a, b in itertools.pairwise(bounds)]


def test_status_marks_finished_jobs_labels_steps_and_stops_wait_at_min_lr(
    controller_factory: Factory,
) -> None:
    c = controller_factory(LABELS)
    done, steps, floor = Wire(c.bind, "done"), Wire(c.bind, "steps-a"), Wire(c.bind, "floor")
    try:
        done.hello(lr=0.1)
        done.report(0, {"loss": 1.0}, lr=0.1)
        say_bye(done, c.admin)
        steps.hello(lr=0.1)
        steps.report(0, {"loss": 1.0}, lr=0.1, step=41)
        floor.hello(lr=0.1)
        for e in range(10):  # no improvement: 0.1 -> 0.05 -> 0.025 (min_lr), then wait counts
            floor.report(e, {"loss": 1.0}, lr=0.1)
        table = run_cli("status", "--admin", c.admin).stdout
        header = table.splitlines()[0].split()
        assert header[:3] == ["JOB", "WORKERS", "EPOCH"] and header[-1] == "NOTE"
        assert _cells(table, "done")[-1] == "finished" and _cells(table, "done")[1] == "0"
        assert _cells(table, "steps-a")[2] == "step 41"  # a step job says it counts steps
        row = _cells(table, "floor")
        assert row[2] == "9" and row[-1] == "" and row[header.index("LR")] == "0.025"
        assert row[header.index("WAIT")] == "2/2 min_lr"  # Keras' wait is 5 there: not shown
        raw = {j["job"]: j for j in Admin(c.admin).status()}
        assert raw["floor"]["wait"] > raw["floor"]["patience"]  # the API keeps the count
        assert raw["done"]["finished"] and not raw["floor"]["finished"]
        assert raw["steps-a"]["unit"] == "step"
    finally:
        for w in (done, steps, floor):
            w.close()


def test_status_watch_into_a_file_writes_plain_tables(
    controller_factory: Factory, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    c = controller_factory(STEP)
    w = Wire(c.bind, "watched")
    w.hello()
    out = tmp_path / "watch.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lrpilot.controller.cli", "status", "--watch", "0.2",
             "--admin", c.admin],
            stdout=sink, stderr=subprocess.PIPE,
        )  # fmt: skip
    try:

        def two_tables() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return out.read_text().count("lrpilot status at") >= 2

        wait_for(two_tables, "two status tables in the file", timeout=30, interval=0.1)
        text = out.read_text()
        assert text.count("lrpilot status at") >= 2, text  # one table after another
        assert "\x1b" not in text and "watched" in text  # plain text, no escape codes
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        w.close()


RANGE_TEST = """\
version: 1
defaults:
  policy: {type: range_test, start_lr: 1.0e-3, steps_per_decade: 5}
"""


def test_a_range_test_is_one_short_line_in_history_and_whole_in_json(
    controller_factory: Factory,
) -> None:
    c = controller_factory(RANGE_TEST)
    w = Wire(c.bind, "sweep")
    try:
        lr = w.hello(lr=0.1, restore=True).lr
        for step in range(40):  # falls, then blows up past lr 1
            reply = w.report(0, {"loss": 1.0 / (1 + lr) if lr < 1 else 1e3 * lr}, lr=lr, step=step)
            lr = reply.lr
            if reply.action == "restore":
                break
        assert reply.action == "restore"
    finally:
        w.close()
    text = run_cli("history", "sweep", "--admin", c.admin).stdout
    lines = text.splitlines()
    assert max(len(line) for line in lines) < 200, max(lines, key=len)
    assert "(plan range_test from 0" in text  # the sweep's plan, named, not dumped
    last = lines[-1]
    assert "range test stopped: divergence" in last and "lrpilot range-test sweep" in last
    assert "points" in last and "suggested" in last
    rows = json.loads(run_cli("history", "sweep", "--json", "--admin", c.admin).stdout)
    detail = json.loads(rows[-1]["detail"])  # --json keeps the whole curve
    assert detail["stop_reason"] == "divergence" and len(detail["points"]) >= 10
