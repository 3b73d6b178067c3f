"""Pins (`set-lr --for/--epochs`), `release`, and the bounds around them, in live runs.

A controller runs in a thread with injected monotonic and wall clocks that move only when a
test says so; real `Client`s train in lockstep, each epoch reading its LR at the epoch
boundary (`poll(epoch=e)`) and reporting at its end, as the framework adapters do. The
policy is a plateau that halves the LR every 2 epochs of a flat loss. Every pinned job has
an unpinned twin fed the same losses: when a pin ends, the pinned job's LR must be the
twin's, which is what the policy would have set without the pin.
"""

from __future__ import annotations

import getpass
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Clock, Wire, run_cli

from lrpilot.client import Client
from lrpilot.client.protocol import Hello, LrMessage, encode
from lrpilot.controller.admin import Admin, request
from lrpilot.controller.errors import AdminError
from lrpilot.controller.jobstate import Override
from lrpilot.controller.policyfile import load_file
from lrpilot.controller.server import ServeConfig, build_server

#: A plateau that halves the LR every 2 epochs of a flat loss (Keras: wait >= patience).
PLATEAU = """version: 1
defaults:
  initial_lr: 0.5
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2, min_lr: 1.0e-9}
"""
#: Two phases: a warmup to 0.5 over 3 epochs, then a step schedule.
PHASES = """version: 1
defaults:
  initial_lr: 0.5
  phases:
    - {{type: warmup, from_lr: 0.1, to_lr: 0.5, epochs: 3}}
    - {{type: step, factor: {factor}, step_size: 2}}
"""
CLAIMED = f"claimed:{getpass.getuser()}@{socket.gethostname()}"


class Clocks(Clock):
    """Monotonic time `t` and a wall clock that a test can step apart from it (`offset`)."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def wall(self) -> float:
        return 1.7e9 + self.t + self.offset


class Trainer:
    """A training loop around a real `Client`: `begin(e)` takes the LR at epoch e's boundary
    (what the epoch trains at), `end(e)` reports epoch e's loss."""

    def __init__(self, endpoint: str, job: str) -> None:
        self.client = Client(endpoint, job=job, initial_lr=0.5, timeout=5.0)
        self.trained: dict[int, float] = {}

    def begin(self, epoch: int) -> None:
        self.trained[epoch] = self.client.poll(epoch=epoch)

    def end(self, epoch: int, loss: float = 1.0) -> None:
        self.client.report(epoch, {"val_loss": loss})

    def receive(self, epoch: int) -> None:
        """Wait (bounded) until a pushed decision has arrived, before epoch's boundary."""
        seen = self.client.stats["replies"]
        readable = self.client._link.looked_at  # the reply socket and its monitor
        deadline = time.monotonic() + 5
        for _ in range(500):  # at most 500 waits of 10 ms: 5 s
            self.client.poll(epoch=epoch)
            if self.client.stats["replies"] > seen:
                return
            if time.monotonic() > deadline:
                break
            zmq.zmq_poll(readable, 10)  # returns as soon as a frame arrives
        raise AssertionError(f"no push reached job {self.client.job}")


class Live:
    """A controller serving in a thread, with injected clocks."""

    def __init__(
        self,
        tmp_path: Path,
        policy_text: str,
        state_dir: Path | None = None,
        clock: Clocks | None = None,
    ) -> None:
        self.policy = tmp_path / "policy.yaml"
        self.policy.write_text(policy_text)
        self.state_dir = state_dir or tmp_path / "state"
        self.clock = clock or Clocks()
        self.server = build_server(
            ServeConfig(
                policy=str(self.policy),
                bind="tcp://127.0.0.1:0",
                admin_bind="tcp://127.0.0.1:0",
                metrics_host="127.0.0.1",
                metrics_port=0,
                state_dir=str(self.state_dir),
                worker_timeout=86400.0,  # a rank silent for the hours a test skips stays
            ),
            load_file(str(self.policy)),
            clock=self.clock,
            wall=self.clock.wall,
        )
        self.bind, self.admin = self.server.endpoints()["bind"], self.server.endpoints()["admin"]
        self.metrics = self.server.endpoints()["metrics"]
        self.trainers: list[Trainer] = []
        self.wires: list[Wire] = []
        self.thread: threading.Thread | None = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def trainer(self, job: str) -> Trainer:
        t = Trainer(self.bind, job)
        self.trainers.append(t)
        return t

    def cli(self, *args: str) -> Any:
        return run_cli(*args, "--admin", self.admin)

    def status(self, job: str) -> dict[str, Any]:
        return next(j for j in Admin(self.admin).status() if j["job"] == job)

    def gauge(self, name: str, job: str) -> float:
        """One per-job series from a real scrape; a missing series fails the test."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.metrics, timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels.get("training_job") == job:
                    return float(sample.value)
        raise AssertionError(f"no series {name}{{training_job={job!r}}} in the scrape")

    def wire(self, job: str) -> Wire:
        """A raw protocol peer that said hello at LR 0.5."""
        w = Wire(self.bind, job)
        self.wires.append(w)
        w.hello(lr=0.5)
        return w

    def close(self) -> None:
        if self.thread is None:
            return
        for t in self.trainers:
            t.client.close()
        for w in self.wires:
            w.close()
        self.server.stop()
        self.thread.join(10)
        self.server.close()
        self.thread = None


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Callable[..., Live]]:
    started: list[Live] = []

    def make(
        policy_text: str = PLATEAU, state_dir: Path | None = None, clock: Clocks | None = None
    ) -> Live:
        lv = Live(tmp_path, policy_text, state_dir, clock)
        started.append(lv)
        return lv

    yield make
    for lv in started:
        lv.close()


def _lockstep(trainers: list[Trainer], epochs: range, clock: Clocks, tick: float = 0.0) -> None:
    for e in epochs:
        clock.t += tick
        for t in trainers:
            t.begin(e)
        for t in trainers:
            t.end(e)


def test_a_pin_for_a_duration_holds_against_the_plateau_while_it_keeps_deciding(
    live: Callable[..., Live],
) -> None:
    lv = live()
    pinned, twin = lv.trainer("pinned"), lv.trainer("twin")
    _lockstep([pinned, twin], range(2), lv.clock)
    assert lv.status("pinned")["wait"] == 1  # wait 1/2: the next flat epoch halves the LR

    out = lv.cli("set-lr", "pinned", "0.005", "--for", "10s", "--reason", "spike")
    assert out.returncode == 0, out.stderr
    assert "pinned until" in out.stdout and "(10s left)" in out.stdout, out.stdout
    pinned.receive(2)
    (code, text), *_ = pinned.client.notices
    assert code == "override" and "lr 0.005 pinned" in text and "(spike) until 20" in text
    for e in range(2, 6):  # 2 s of controller time per epoch: 8 s of the 10
        lv.clock.t += 2
        for t in (pinned, twin):
            t.begin(e)
        if e == 5:
            lv.clock.t += 2  # mid-epoch 5, the 10 s are over
        for t in (pinned, twin):
            t.end(e)
        if e == 3:
            row = lv.status("pinned")
            # The LR holds; the plateau went on underneath, as on the unpinned twin.
            assert row["lr"] == 0.005 and row["override"]["policy_lr"] == twin.client.lr
            assert (row["wait"], row["best"]) == (lv.status("twin")["wait"], 1.0)
            assert row["override"]["remaining_s"] == pytest.approx(6.0)  # 4 s of 10 run
            note = lv.cli("status").stdout
            assert f"pinned by {CLAIMED} until " in note and "(6s left)" in note, note
            assert lv.gauge("lrpilot_override_active", "pinned") == 1
            assert lv.gauge("lrpilot_override_active", "twin") == 0
    assert [pinned.trained[e] for e in range(2, 6)] == [0.005] * 4
    assert [twin.trained[e] for e in range(2, 6)] == [0.5, 0.25, 0.25, 0.125]
    _lockstep([pinned, twin], range(6, 9), lv.clock)
    # From the first boundary after its end, the policy's LR: the twin's.
    assert [pinned.trained[e] for e in range(6, 9)] == [twin.trained[e] for e in range(6, 9)]
    assert lv.status("pinned")["override"] is None
    assert lv.gauge("lrpilot_override_active", "pinned") == 0
    rows = Admin(lv.admin).history("pinned")
    assert [(r["reason"], r["source"], r["detail"]) for r in rows if r["reason"] != "initial"][
        :2
    ] == [("override", CLAIMED, "spike; for 10 s"), ("override", "expiry", "expired")]


def test_a_pin_for_n_epochs_trains_n_epochs_set_at_a_boundary_or_mid_epoch(
    live: Callable[..., Live],
) -> None:
    lv = live()
    boundary, mid, twin = lv.trainer("boundary"), lv.trainer("mid"), lv.trainer("twin")
    everyone = [boundary, mid, twin]
    _lockstep(everyone, range(2), lv.clock)

    # Between epochs 1 and 2 (at a boundary): 4 epochs, 2 to 5.
    out = lv.cli("set-lr", "boundary", "0.02", "--epochs", "4")
    assert out.returncode == 0, out.stderr
    assert "pinned for 4 epochs trained at it, from epoch 2 or later" in out.stdout, out.stdout
    boundary.receive(2)
    for t in everyone:
        t.begin(2)
    # Mid-epoch 2: the trainer takes it at its next boundary, so 3 epochs are 3 to 5.
    out = lv.cli("set-lr", "mid", "0.02", "--epochs", "3")
    assert out.returncode == 0, out.stderr
    assert "pinned for 3 epochs trained at it, from epoch 2 or later" in out.stdout, out.stdout
    for t in everyone:
        t.end(2)
    _lockstep(everyone, range(3, 4), lv.clock)
    ends = {job: lv.status(job)["override"]["until_epoch"] for job in ("boundary", "mid")}
    assert ends == {"boundary": 6, "mid": 6}  # known from the first epoch trained at it
    assert "until epoch 6 (1/3 trained at it)" in lv.cli("status").stdout
    _lockstep(everyone, range(4, 10), lv.clock)

    assert [boundary.trained[e] for e in range(2, 6)] == [0.02] * 4
    assert [mid.trained[e] for e in range(3, 6)] == [0.02] * 3
    assert mid.trained[2] == twin.trained[2] == 0.5
    for pinned in (boundary, mid):  # the plateau halved the twin twice meanwhile
        assert [pinned.trained[e] for e in range(6, 10)] == [twin.trained[e] for e in range(6, 10)]
    assert twin.trained[6] == 0.125


def test_a_pin_holds_across_a_phase_change_a_schedule_and_a_reload(
    live: Callable[..., Live],
) -> None:
    lv = live(PHASES.format(factor=0.5))
    pinned, twin = lv.trainer("pinned"), lv.trainer("twin")
    _lockstep([pinned, twin], range(1), lv.clock)
    Admin(lv.admin).set_lr("pinned", 0.03, epochs=6)
    pinned.receive(1)
    _lockstep([pinned, twin], range(1, 4), lv.clock)  # the warmup ends at epoch 3
    for t in (pinned, twin):
        t.begin(4)
    lv.policy.write_text(PHASES.format(factor=0.25))  # mid-epoch 4: a faster decay
    assert Admin(lv.admin).reload()["changed"] is True
    for t in (pinned, twin):
        t.end(4)
    _lockstep([pinned, twin], range(5, 11), lv.clock)

    assert [pinned.trained[e] for e in range(1, 7)] == [0.03] * 6
    assert twin.trained[1] != twin.trained[3] != twin.trained[5]  # warmup, phase, schedule
    assert [pinned.trained[e] for e in range(7, 11)] == [twin.trained[e] for e in range(7, 11)]
    assert lv.status("pinned")["phase"] == lv.status("twin")["phase"]


def test_release_ends_a_pin_and_only_a_pin(live: Callable[..., Live]) -> None:
    lv = live()
    pinned, twin = lv.trainer("pinned"), lv.trainer("twin")
    _lockstep([pinned, twin], range(2), lv.clock)
    assert lv.cli("set-lr", "pinned", "0.01", "--for", "1h").returncode == 0
    pinned.receive(2)
    _lockstep([pinned, twin], range(2, 4), lv.clock)
    out = lv.cli("release", "pinned")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pinned: pin released; the policy's lr 0.25 from epoch 4")
    pinned.receive(4)
    _lockstep([pinned, twin], range(4, 6), lv.clock)
    assert [pinned.trained[e] for e in range(2, 6)] == [0.01, 0.01, 0.25, 0.125]
    assert pinned.trained[5] == twin.trained[5]
    rows = Admin(lv.admin).history("pinned")
    ended = [(r["reason"], r["source"], r["epoch"]) for r in rows if r["detail"] == "released"]
    assert ended == [("override", CLAIMED, 4)]
    again = lv.cli("release", "pinned")
    assert again.returncode == 1 and "no pinned LR" in again.stderr
    assert lv.cli("set-lr", "pinned", "0.01").returncode == 0  # a new base is no pin
    assert lv.cli("release", "pinned").returncode == 1
    assert lv.cli("release", "nope").returncode == 1


def test_set_lr_on_a_finished_job_is_refused_unless_forced(live: Callable[..., Live]) -> None:
    lv = live()
    done = lv.trainer("done")
    _lockstep([done], range(3), lv.clock)
    done.client.close()
    # The bye and the status request reach the controller's loop on two sockets: ask until
    # the bye has been handled (each answer is a turn of that loop; no pause needed).
    deadline = time.monotonic() + 5
    for _ in range(500):
        if lv.status("done")["workers"] == 0 or time.monotonic() > deadline:
            break
    out = lv.cli("set-lr", "done", "0.01")
    assert out.returncode == 1 and "has finished" in out.stderr and "--force" in out.stderr
    assert [r["reason"] for r in Admin(lv.admin).history("done")][-1] != "override"
    forced = lv.cli("set-lr", "done", "0.01", "--force")
    assert forced.returncode == 0, forced.stderr
    assert lv.status("done")["lr"] == pytest.approx(0.01, rel=1e-7)  # Keras' float32


def test_durations_past_a_year_are_refused_everywhere_and_status_survives(
    controller_factory: Callable[..., Any], write: Callable[[str, str], Path]
) -> None:
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "j1")
    try:
        w.hello(lr=0.5)
        w.report(0, {"val_loss": 1.0}, lr=0.5)
        out = run_cli("set-lr", "j1", "0.2", "--for", "10000000d", "--admin", c.admin)
        assert out.returncode == 2 and "at most 365 days" in out.stderr, out.stderr
        raw = request(c.admin, {"t": "set_lr", "job": "j1", "lr": 0.2, "seconds": 8.64e11})
        assert raw["code"] == "out_of_range" and "365 days" in raw["message"]
        bad = request(c.admin, {"t": "history", "job": "j1", "since": 1e300})
        assert bad["code"] == "out_of_range" and "since" in bad["message"]
        assert run_cli("history", "j1", "--since", "400d", "--admin", c.admin).returncode == 2
        assert run_cli("status", "--admin", c.admin).returncode == 0
        assert Admin(c.admin).history("j1")[-1]["reason"] == "initial"  # nothing stored
        year = run_cli("set-lr", "j1", "0.2", "--for", "365d", "--admin", c.admin)
        assert year.returncode == 0, year.stderr
    finally:
        w.close()
    c.kill()  # kill -9 with a year-long pin stored: status still works after the restart
    c.start()
    status = run_cli("status", "--admin", c.admin)
    assert status.returncode == 0 and "pinned by" in status.stdout, status.stdout
    policy = write("slow.yaml", "version: 1\ndefaults:\n  aggregate_timeout: 400d\n")
    checked = run_cli("check", str(policy))
    assert checked.returncode == 2 and "at most 365 days" in checked.stdout, checked.stdout


def test_a_stored_pin_from_lrpilot_0_2_past_year_9999_loads(live: Callable[..., Live]) -> None:
    """0.2 stored the end of a --for override as a Unix time: year 29405 broke `status`."""
    from lrpilot.controller.store import Store, Writes, encode_row

    lv = live()
    lv.wire("j1").report(0, {"val_loss": 1.0}, lr=0.5)
    lv.close()
    store = Store(lv.state_dir)
    try:
        row = store.load_job("j1")
        assert row is not None
        row["override"] = {"lr": 0.2, "author": "x", "until_epoch": None, "until_wall": 8.6e11}
        store.commit(Writes(jobs={"j1": encode_row(row)}))
    finally:
        store.close()
    again = live(state_dir=lv.state_dir, clock=lv.clock)
    job = again.status("j1")
    assert job["lr"] == 0.2 and job["override"]["remaining_s"] == 365 * 86400
    assert job["override"]["until"].startswith("2024-11-")  # 1.7e9 s + a year
    assert run_cli("status", "--admin", again.admin).returncode == 0


def test_the_audit_author_is_who_the_controller_authenticated(
    controller_factory: Callable[..., Any], tmp_path: Path
) -> None:
    sock = tmp_path / "admin.sock"
    c = controller_factory(PLATEAU)
    ipc = controller_factory(PLATEAU, "--admin-bind", f"ipc://{sock}", state_dir=tmp_path / "s2")
    for ctl in (c, ipc):
        w = Wire(ctl.bind, "j")
        w.hello(lr=0.5)
        w.close()
    claim = {"t": "set_lr", "job": "j", "lr": 0.2, "author": "alice@prod-admin"}
    assert request(c.admin, claim)["t"] == "ok"
    assert Admin(c.admin).history("j")[-1]["source"] == "claimed:alice@prod-admin"
    assert request(ipc.admin, claim)["t"] == "ok"
    import pwd

    me = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    assert Admin(ipc.admin).history("j")[-1]["source"] == me  # the socket's peer, not alice


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_a_job_limited_key_is_its_own_author_and_cannot_break_status(
    controller_factory: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zmq.auth import create_certificates

    from lrpilot.controller.auth import write_jobs

    authorized = tmp_path / "authorized"
    authorized.mkdir()
    keys = {}
    for name in ("server", "bert", "ops"):
        (tmp_path / name).mkdir()
        public, secret = create_certificates(tmp_path / name, name)
        keys[name] = (Path(public), Path(secret))
    write_jobs(keys["bert"][0], "bert-*")
    for name in ("bert", "ops"):
        (authorized / f"{name}.key").write_bytes(keys[name][0].read_bytes())
    c = controller_factory(
        PLATEAU,
        "--curve-secret-key",
        str(keys["server"][1]),
        "--curve-authorized-dir",
        str(authorized),
    )

    def ask(key: str, message: dict[str, Any]) -> dict[str, Any]:
        monkeypatch.setenv("LRPILOT_CURVE_SERVER_KEY", str(keys["server"][0]))
        monkeypatch.setenv("LRPILOT_CURVE_SECRET_KEY", str(keys[key][1]))
        return request(c.admin, message, timeout=5.0)

    peer = _CurvePeer(c.bind, keys["server"][0], keys["bert"][1])
    try:
        peer.sock.send(encode(Hello("bert-1", 0, 1, peer.session, 0.5, 0).to_wire()))
        assert peer.sock.poll(5000)
        poison = {"t": "set_lr", "job": "bert-1", "lr": 0.2, "seconds": 8.64e11}
        assert ask("bert", poison)["code"] == "out_of_range"
        fine = {"t": "set_lr", "job": "bert-1", "lr": 0.2, "seconds": 60, "author": "ops"}
        assert ask("bert", fine)["t"] == "ok"
        status = ask("ops", {"t": "status"})
        assert status["t"] == "status", status
        (job,) = status["jobs"]
        assert job["override"]["author"] == "bert"  # the key's name, not what it claimed
    finally:
        peer.close()


class _CurvePeer:
    def __init__(self, endpoint: str, server_public: Path, secret: Path) -> None:
        from zmq.auth import load_certificate

        self.ctx = zmq.Context()
        self.session = os.urandom(16)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.session)
        public, secret_key = load_certificate(secret)
        self.sock.curve_serverkey = load_certificate(server_public)[0]
        self.sock.curve_publickey = public
        self.sock.curve_secretkey = secret_key
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def _pinned_lr(lv: Live, job: str = "j") -> float:
    """The LR `status` shows (an admin request also turns the loop: due deadlines first)."""
    lr: float = lv.status(job)["lr"]
    return lr


@pytest.mark.parametrize("step", [3600.0, -3600.0])
def test_a_pin_keeps_its_time_when_the_wall_clock_steps(
    live: Callable[..., Live], step: float
) -> None:
    lv = live()
    w = lv.wire("j")
    Admin(lv.admin).set_lr("j", 0.01, expires="10m")
    assert w.recv().lr == 0.01  # its push
    lv.clock.offset += step  # ntpd, a VM resumed, an operator's `date -s`
    lv.clock.t += 1
    assert _pinned_lr(lv) == 0.01
    answer = w.report(0, {"val_loss": 1.0}, lr=0.01)
    assert isinstance(answer, LrMessage) and answer.lr == 0.01
    assert lv.status("j")["override"]["remaining_s"] == pytest.approx(599)
    lv.clock.t += 598  # 599 s of the 600
    assert _pinned_lr(lv) == 0.01
    lv.clock.t += 1.5
    assert _pinned_lr(lv) == 0.5  # over after 600 s on the monotonic clock: not 3 s, not 70 min
    back = w.recv()
    assert isinstance(back, LrMessage) and back.reason == "override" and back.lr == 0.5


@pytest.mark.parametrize(("downtime", "left"), [(200.0, 300.0), (-3600.0, 500.0)])
def test_a_pin_counts_downtime_by_the_wall_clock_clamped(
    live: Callable[..., Live], downtime: float, left: float
) -> None:
    """Stopped 100 s into a 10 min pin, after its last decision; back `downtime` later by
    the wall clock (a step back counts as none) on a new monotonic clock."""
    lv = live()
    w = lv.wire("j")
    Admin(lv.admin).set_lr("j", 0.01, expires="10m")
    lv.clock.t += 100
    w.report(0, {"val_loss": 1.0}, lr=0.01)  # stored with the decision: 500 s left
    lv.close()  # the state was committed with the decision, as before a kill -9
    after = Clocks()  # a new boot: the monotonic clock starts elsewhere
    after.t, after.offset = 5.0, lv.clock.wall() + downtime - (1.7e9 + 5.0)
    back = live(state_dir=lv.state_dir, clock=after)
    assert back.status("j")["override"]["remaining_s"] == pytest.approx(left)
    after.t += left - 1
    assert _pinned_lr(back) == 0.01
    after.t += 2
    assert _pinned_lr(back) == 0.5


def test_override_notice_logged_once_per_pin(live: Callable[..., Live]) -> None:
    lv = live()
    t = lv.trainer("n")
    _lockstep([t], range(1), lv.clock)
    for lr in (0.01, 0.02):
        Admin(lv.admin).set_lr("n", lr, epochs=1)
        t.receive(1)
    texts = [text for code, text in t.client.notices if code == "override"]
    assert len(texts) == 2 and "lr 0.01 pinned" in texts[0] and "lr 0.02 pinned" in texts[1]
    assert "for 1 epoch trained at it, from epoch 1 or later;" in texts[1]


def test_admin_error_codes_for_pins(live: Callable[..., Live]) -> None:
    lv = live()
    lv.wire("e")
    admin = Admin(lv.admin)
    with pytest.raises(AdminError) as err:
        admin.release("e")
    assert err.value.code == "no_override"
    with pytest.raises(ValueError, match="365 days"):
        admin.set_lr("e", 0.1, expires="366d")
    for seconds in (float("inf"), float("nan"), -1.0, 0, "1h", True):
        raw = {"t": "set_lr", "job": "e", "lr": 0.1, "seconds": seconds}
        assert request(lv.admin, raw)["code"] == "out_of_range", seconds
    assert lv.status("e")["override"] is None and lv.status("e")["lr"] == 0.5


def test_an_epochs_pin_counts_what_was_trained_at_it() -> None:
    """The counting alone: reports every epoch, a mid-epoch start, steps reported every 10."""
    pin = Override(0.02, "ops", from_t=2, epochs=3)
    pin = pin.observe(2, 1, [0.5])  # epoch 2 trained at the old LR: not counted
    assert pin.until_epoch() is None and not pin.over(0.0)
    pin = pin.observe(3, 2, [0.019999999552965164])  # Keras' float32 of 0.02
    assert (pin.first_trained, pin.trained, pin.until_epoch()) == (3, 1, 6)
    pin = pin.observe(4, 3, [0.02]).observe(5, 4, [0.02])
    assert pin.trained == 3 and pin.over(0.0)
    steps = Override(0.02, "ops", from_t=10, epochs=25)
    for t in (19, 29):  # steps 10..29 trained at it
        steps = steps.observe(t, t - 10, [0.02])
    assert (steps.trained, steps.over(0.0)) == (20, False)
    assert steps.observe(39, 29, [0.02]).over(0.0)  # the first report past 25 steps
    two_ranks = Override(0.02, "ops", from_t=0, epochs=1).observe(0, None, [0.02, 0.5])
    assert two_ranks.trained == 0  # every rank must have trained at it


def test_a_pin_stored_by_lrpilot_0_2_loads_as_what_was_left_of_it() -> None:
    wall = 1.7e9
    legacy = {"lr": 0.05, "author": "a", "until_epoch": 4, "until_wall": None, "saved": {}}
    pin = Override.from_dict(legacy, now=10.0, wall=wall)
    assert pin.until_epoch() == 4 and pin.observe(3, 2, [0.05]).over(0.0)
    timed = {"lr": 0.05, "author": "a", "until_epoch": None, "until_wall": wall + 90}
    assert Override.from_dict(timed, now=10.0, wall=wall).ends == 100.0
