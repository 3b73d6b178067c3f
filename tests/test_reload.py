"""Hot reload: the controller sees every way a policy file gets changed, within a second.

In-place write, rename-into-place, a Kubernetes ConfigMap `..data` symlink
swap, SIGHUP and `lrpilot reload`; an invalid edit keeps the old policy and
says so in the metrics; a burst of edits ends in the final state.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Controller, Wire, run_cli, wait_for

from lrpilot.client.protocol import LrMessage
from lrpilot.controller.policyfile import load_text
from lrpilot.controller.reload import parse


def plateau(min_lr: float = 0.0, factor: float = 0.5, patience: int = 5) -> str:
    return (
        "version: 1\ndefaults:\n  policy: {type: plateau, min_delta: 0.0, "
        f"factor: {factor}, patience: {patience}, min_lr: {min_lr}}}\n"
    )


def wait_push(w: Wire, timeout: float = 3.0) -> tuple[LrMessage, float]:
    t0 = time.monotonic()
    msg = w.recv(timeout=timeout)
    assert isinstance(msg, LrMessage), msg
    return msg, time.monotonic() - t0


def _wait_metric(
    c: Controller, name: str, value: float, timeout: float = 10.0, **labels: str
) -> None:
    wait_for(lambda: c.metric(name, **labels) == value, f"{name}{labels} == {value}", timeout)


def in_place(path: Path, text: str) -> None:
    with open(path, "r+") as fh:  # same inode, as `sed -i`-less editors and `>` redirects do
        fh.seek(0)
        fh.write(text)
        fh.truncate()


def rename_into_place(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def configmap_swap(mount: Path, text: str, n: int) -> None:
    """What the kubelet does: a new timestamped dir, then `..data` re-pointed atomically."""
    stamp = mount / f"..2026_11_23_00_00_{n:02d}.000000001"
    stamp.mkdir()
    (stamp / "policy.yaml").write_text(text)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(stamp.name)
    os.replace(tmp, mount / "..data")


@pytest.fixture
def running(tmp_path: Path):  # type: ignore[no-untyped-def]
    started: list[tuple[Controller, Wire]] = []

    def make(path: Path, text: str) -> tuple[Controller, Wire]:
        path.write_text(text)
        c = Controller(tmp_path / "state", path).start()
        w = Wire(c.bind, "job-r")
        w.hello(lr=0.1)
        w.report(0, {"val_loss": 1.0})
        w.report(1, {"val_loss": 1.0})  # on a plateau: best 1.0, wait 1
        started.append((c, w))
        return c, w

    yield make
    for c, w in started:
        w.close()
        c.kill()


@pytest.mark.parametrize("edit", ["in_place", "rename"])
def test_an_edit_that_invalidates_the_lr_is_pushed_within_a_second(
    running,
    tmp_path: Path,
    edit: str,  # type: ignore[no-untyped-def]
) -> None:
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau())
    t0 = time.monotonic()
    (in_place if edit == "in_place" else rename_into_place)(path, plateau(min_lr=0.2))
    msg, _ = wait_push(w)
    latency = time.monotonic() - t0
    print(f"\n{edit}: edit -> client sees the new LR in {latency * 1000:.0f} ms")
    assert latency < 1.5
    assert msg.reason == "reload" and msg.lr == pytest.approx(0.2) and msg.seq is None
    assert msg.apply_from_epoch == 2
    # Same monitor/mode/compat: plateau memory is kept (wait 1 -> 2 -> 3 ... patience 5).
    rows = [w.report(e, {"val_loss": 1.0}) for e in range(2, 6)]
    assert [r.lr for r in rows] == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert c.metric("lrpilot_policy_reloads_total", result="success") == 1
    assert c.metric("lrpilot_lr_changes_total", training_job="job-r", reason="reload") == 1
    hist = run_cli("history", "job-r", "--json", "--admin", c.admin)
    assert '"reload"' in hist.stdout


def test_kubernetes_configmap_symlink_swap(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mount = tmp_path / "etc-lrpilot"
    mount.mkdir()
    configmap_swap(mount, plateau(), 0)
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    _, w = running(mount / "policy.yaml", (mount / "policy.yaml").read_text())
    t0 = time.monotonic()
    configmap_swap(mount, plateau(min_lr=0.3), 1)
    msg, _ = wait_push(w)
    print(f"\nconfigmap swap -> client sees the new LR in {(time.monotonic() - t0) * 1000:.0f} ms")
    assert msg.reason == "reload" and msg.lr == pytest.approx(0.3)


def _keep_touching(path: Path, text: str, written: threading.Event, stop: threading.Event) -> None:
    # Rewrite the file every 50 ms so the watcher never sees it settle: only the
    # explicit trigger under test can reload it.
    while not stop.is_set():
        in_place(path, text)
        written.set()
        stop.wait(0.05)


@pytest.mark.parametrize("trigger", ["sighup", "admin"])
def test_sighup_and_lrpilot_reload(running, tmp_path: Path, trigger: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau())
    written, stop = threading.Event(), threading.Event()
    toucher = threading.Thread(
        target=_keep_touching, args=(path, plateau(min_lr=0.2), written, stop)
    )
    toucher.start()
    try:
        assert written.wait(5), "the edit was never written"  # the trigger reloads the edit
        if trigger == "sighup":
            assert c.proc is not None
            c.proc.send_signal(signal.SIGHUP)
        else:
            out = run_cli("reload", "--admin", c.admin)
            assert out.returncode == 0 and out.stdout.strip() == "reloaded", out
        msg, _ = wait_push(w)
        assert msg.reason == "reload" and msg.lr == pytest.approx(0.2)
    finally:
        stop.set()
        toucher.join(5)
    # The watcher may apply the edit first; the signal or request is then logged as heard.
    expected = "(signal)" if trigger == "sighup" else "(admin)"
    wait_for(lambda: expected in c.log(), f"{expected} in the log", timeout=5)


def test_an_invalid_edit_changes_nothing_and_says_so(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau(patience=2))
    in_place(path, "version: 1\ndefaults:\n  policy: {type: plateau, factor: 1.5}\n")
    _wait_metric(c, "lrpilot_policy_last_reload_success", 0, timeout=5)
    assert c.metric("lrpilot_policy_reloads_total", result="error") == 1
    assert "policy.yaml:3: factor must be in (0, 1), got 1.5" in c.log()
    # The old policy (patience 2, factor 0.5) decides on: epoch 2 is the second bad epoch.
    assert w.report(2, {"val_loss": 1.0}).lr == pytest.approx(0.05)
    out = run_cli("reload", "--admin", c.admin)
    assert out.returncode == 2 and "factor must be in (0, 1)" in out.stdout
    # A file no check foresaw (a list where a name goes) is rejected too, never a crash.
    in_place(path, "version: 1\ndefaults:\n  policy: {type: [plateau]}\n")
    wait_for(
        lambda: c.metric("lrpilot_policy_reloads_total", result="error") >= 2,
        "a second rejected reload",
        timeout=5,
    )
    assert c.proc is not None and c.proc.poll() is None
    # Reverting to the file in force is a successful reload: the alert clears, and the log
    # says why (it said the file was rejected; it says the file is valid again).
    in_place(path, plateau(patience=2))
    _wait_metric(c, "lrpilot_policy_last_reload_success", 1, timeout=5)
    log = c.log()
    rejected = log.rindex("policy reload rejected, old policy kept")
    valid_again = log.index(f"policy file {path} is valid again (watch)")
    assert rejected < valid_again, log[-2000:]
    # Fixing the file recovers.
    in_place(path, plateau(patience=2, min_lr=0.06))
    msg, _ = wait_push(w)
    assert msg.lr == pytest.approx(0.06)
    assert c.metric("lrpilot_policy_last_reload_success") == 1


def test_a_hundred_edits_in_a_second_end_in_the_final_state(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau())
    t0 = time.monotonic()
    for i in range(100):
        writer = in_place if i % 2 else rename_into_place
        writer(path, plateau(min_lr=round(0.11 + i * 0.001, 6)))
        # Kept on purpose: the burst must span several polls (0.2 s apart) of the watcher in
        # the controller process, whose clock no test can step; edits 9 ms apart do that.
        time.sleep(max(0.0, t0 + (i + 1) * 0.009 - time.monotonic()))
    assert time.monotonic() - t0 < 1.2
    final = 0.11 + 99 * 0.001
    deadline = time.monotonic() + 5
    last = None
    while time.monotonic() < deadline:
        try:
            last = w.recv(timeout=1.0)
        except TimeoutError:
            break
    assert isinstance(last, LrMessage) and last.lr == pytest.approx(final)
    reloads = c.metric("lrpilot_policy_reloads_total", result="success")
    assert 1 <= reloads <= 10, reloads  # debounced, not 100
    assert c.proc is not None and c.proc.poll() is None
    assert w.report(2, {"val_loss": 1.0}).lr == pytest.approx(final)


def test_a_changed_policy_type_starts_from_the_current_lr(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau())
    in_place(path, "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 2}\n")
    assert run_cli("reload", "--admin", c.admin).returncode == 0  # answered once in force
    lrs = [w.report(e, {"val_loss": 1.0}).lr for e in range(2, 6)]
    # From 0.1 at epoch 2 the step schedule keeps its shape: halves at epochs 4 and 6.
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.025])


def test_resume_after_a_policy_change_restarts_from_that_epochs_lr(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau(patience=1))  # epochs 0, 1 reported: reduced to 0.05 at 1
    w.report(2, {"val_loss": 1.0})  # reduced again to 0.025
    in_place(path, "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 2}\n")
    assert run_cli("reload", "--admin", c.admin).returncode == 0  # answered once in force
    w2 = Wire(c.bind, "job-r")
    try:
        back = w2.hello(start_epoch=2)  # a checkpoint from before the policy change
        assert back.reason == "resume" and back.lr == pytest.approx(0.05)
        nxt = w2.report(2, {"val_loss": 1.0})
        assert nxt.lr > 0 and c.proc is not None and c.proc.poll() is None
    finally:
        w2.close()


@pytest.mark.parametrize("breakage", ["deleted", "directory", "symlink-loop"])
def test_a_file_that_cannot_be_read_is_a_reload_error(
    running, tmp_path: Path, breakage: str
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau(patience=2))
    path.unlink()
    if breakage == "directory":
        path.mkdir()
    elif breakage == "symlink-loop":
        path.symlink_to(path.name)  # policy.yaml -> policy.yaml
    _wait_metric(c, "lrpilot_policy_last_reload_success", 0)
    assert c.metric("lrpilot_policy_reloads_total", result="error") >= 1
    why = {"deleted": "missing", "directory": "a directory", "symlink-loop": "symlink loop"}
    assert why[breakage] in c.log()
    out = run_cli("reload", "--admin", c.admin)
    assert out.returncode == 2 and why[breakage] in out.stdout
    # The policy in force goes on deciding (patience 2, factor 0.5).
    assert w.report(2, {"val_loss": 1.0}).lr == pytest.approx(0.05)
    # Putting the file back as it was is a successful reload again.
    if path.is_dir():
        path.rmdir()
    elif path.is_symlink():
        path.unlink()
    path.write_text(plateau(patience=2))
    _wait_metric(c, "lrpilot_policy_last_reload_success", 1)


def test_a_20_mb_policy_file_is_rejected_unread_and_never_stalls_clients(
    running, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "policy.yaml"
    c, _w = running(path, plateau(patience=100))
    peers = [Wire(c.bind, f"busy-{i}") for i in range(8)]
    try:
        for p in peers:
            p.hello()
        huge = plateau(patience=100) + "# padding\n" * (2 << 20)  # about 21 MB, valid YAML
        rename_into_place(path, huge)
        slowest, epoch = 0.0, 0
        deadline = time.monotonic() + 10
        while c.metric("lrpilot_policy_reloads_total", result="error") < 1:
            assert time.monotonic() < deadline, "the huge file was never rejected"
            for p in peers:
                t0 = time.monotonic()
                p.report(epoch, {"val_loss": 1.0})
                slowest = max(slowest, time.monotonic() - t0)
            epoch += 1
        for p in peers:  # and after the rejection
            t0 = time.monotonic()
            p.report(epoch, {"val_loss": 1.0})
            slowest = max(slowest, time.monotonic() - t0)
        assert epoch >= 1 and slowest < 0.05, f"slowest report {slowest * 1000:.1f} ms"
        assert "over 10485760 bytes" in c.log() or "(10 MiB); not read" in c.log()
        assert c.metric("lrpilot_policy_last_reload_success") == 0
    finally:
        for p in peers:
            p.close()


@pytest.mark.parametrize("bomb", ["4000000**4000000", "max(9**4000000, 1)"])
def test_a_formula_bomb_is_rejected_at_reload_while_jobs_report(
    running, tmp_path: Path, bomb: str
) -> None:  # type: ignore[no-untyped-def]
    """Issue 15: accepted before, these held every job's replies up to 52.8 s."""
    path = tmp_path / "policy.yaml"
    c, w = running(path, plateau(patience=100))
    edit = (
        plateau(patience=100)
        + f'jobs:\n  - match: "job-*"\n    policy: {{type: formula, lr: "{bomb}"}}\n'
    )
    rename_into_place(path, edit)
    slowest, epoch = 0.0, 2
    deadline = time.monotonic() + 30
    while c.metric("lrpilot_policy_reloads_total", result="error") < 1:
        assert time.monotonic() < deadline, "the bomb was never rejected"
        t0 = time.monotonic()
        reply = w.report(epoch, {"val_loss": 1.0 / epoch})  # improving: the LR stays
        assert reply.lr == pytest.approx(0.1), reply
        slowest = max(slowest, time.monotonic() - t0)
        epoch += 1
    for _ in range(3):  # and after: the old policy decides, at once
        t0 = time.monotonic()
        assert w.report(epoch, {"val_loss": 1.0 / epoch}).lr == pytest.approx(0.1)
        slowest = max(slowest, time.monotonic() - t0)
        epoch += 1
    # Each reply within 100 ms as the controller measured it (report in to LR out: a loop
    # held by the bomb shows here); the trainer's own wait also counts this machine's load.
    decided = c.metric("lrpilot_decision_seconds_count")
    assert decided >= 4 and c.metric("lrpilot_decision_seconds_bucket", le="0.1") == decided
    assert slowest < 0.25, f"slowest reply {slowest * 1000:.1f} ms"
    log = c.log()
    expected = f"policy.yaml:6: formula {bomb!r} gives no finite value for any t in 0..10000"
    assert expected in log, log
    assert c.metric("lrpilot_policy_last_reload_success") == 0


def test_parse_leaves_the_collector_on_and_a_dropped_policy_set_to_reference_counting() -> None:
    # parse() freezes what survives a load; that is only free of leaks if a policy set
    # that a later reload drops holds no reference cycles.
    rules = "".join(
        f'  - match: "j{i}-*"\n    phases:\n      - {{type: warmup, to_lr: 0.1, epochs: 2}}\n'
        f'      - {{type: formula, lr: "lr0 * 0.5 ** t"}}\n'
        for i in range(50)
    )
    text = (
        plateau()
        + "  initial_lr: 0.1\njobs:\n"
        + rules
        + '  - match: "r*"\n    policy: {type: range_test}\n'
    )
    assert len(parse(text, "policy.yaml").rules) == 51 and gc.isenabled()
    gc.collect()
    policies = load_text(text, "policy.yaml")
    gc.collect()
    del policies
    assert gc.collect() == 0


def test_a_40000_rule_policy_file_is_parsed_off_the_loop(running, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A policy file that takes seconds to parse: 8 jobs' decisions go on meanwhile."""
    path = tmp_path / "policy.yaml"
    c, _ = running(path, plateau(patience=100))
    peers = [Wire(c.bind, f"busy-{i}") for i in range(8)]
    try:
        for p in peers:
            p.hello()
        rules = "".join(
            f'  - match: "nobody-{i}-*"\n'
            f"    policy: {{type: step, factor: 0.5, step_size: {i + 1}}}\n"
            for i in range(40_000)
        )
        big = plateau(patience=100) + "jobs:\n" + rules  # valid, 3.3 MB of YAML rules
        rename_into_place(path, big)
        slowest, epoch, reloads = 0.0, 0, 0.0
        deadline = time.monotonic() + 180
        while reloads < 1:
            assert time.monotonic() < deadline, "the big file was never applied"
            for p in peers:
                t0 = time.monotonic()
                p.report(epoch, {"val_loss": 1.0})
                slowest = max(slowest, time.monotonic() - t0)
            epoch += 1
            reloads = c.metric("lrpilot_policy_reloads_total", result="success")
        assert epoch >= 3, "the parse was too quick to show anything"
        # The parse takes seconds of CPU in the loader thread. Before issue 15, full garbage
        # collections of the parse's millions of objects held the GIL: reports waited 1.17 s.
        # Now a report waits at most a few GIL hand-overs (a bound with room for a loaded
        # 2-core CI machine, well below that stall).
        assert slowest < 0.5, f"slowest report {slowest * 1000:.1f} ms while parsing"
        assert "policy reloaded" in c.log()
    finally:
        for p in peers:
            p.close()


def test_restoring_jobs_runs_with_the_collector_off_and_frees_a_dropped_job_without_it(
    tmp_path: Path,
) -> None:
    # build_server restores the stored jobs inside quiet_gc(): the collector is off while
    # the rows are decoded and the states made, on again after, with the states frozen. A
    # frozen object is never looked at by the collector again, so a restored job that the
    # table drops must be freed by reference counting alone (it is part of no cycle).
    import weakref

    from lrpilot.client.protocol import Hello, Report
    from lrpilot.controller import transitions
    from lrpilot.controller.server import ServeConfig, build_server
    from lrpilot.controller.store import Store, Writes, encode_row

    policies = load_text(plateau(), "policy.yaml")
    env = transitions.Env(now=100.0, wall=time.time())
    session = os.urandom(16)
    hello = Hello("job", 0, 1, session, 0.1, 0)
    job = transitions.hello(None, hello, policies.rule_for("job"), env, lambda *a: None).job
    job = transitions.report(job, Report("job", 0, session, 1, 0, {"val_loss": 1.0}, 0.1), env).job
    assert job is not None
    store = Store(str(tmp_path / "state"))
    store.commit(Writes(jobs={f"job-{i}": encode_row(job.stored()) for i in range(200)}))
    store.close()

    gc.collect()
    frozen = gc.get_freeze_count()
    config = ServeConfig(
        bind="tcp://127.0.0.1:0",
        admin_bind="tcp://127.0.0.1:0",
        metrics_port=None,
        state_dir=str(tmp_path / "state"),
    )
    server = build_server(config, policies)
    try:
        assert len(server.table.jobs) == 200
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + 200  # the restored states, at least
        ref = weakref.ref(server.table.jobs["job-7"])
        gc.disable()
        try:
            server.table.drop("job-7")
            assert ref() is None, "a dropped restored job waits for the cyclic collector"
        finally:
            gc.enable()
    finally:
        server.close()
