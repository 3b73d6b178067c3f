"""Hijack attempts and out-of-bounds input: each answered with its error code, none changes
a job (DESIGN.md "Wire protocol" limits). Real controller, raw protocol peers."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from conftest import Controller, Wire, run_cli

from lrpilot.client.protocol import ErrorMessage, Hello, LrMessage, Report, encode

Factory = Callable[..., Controller]
PLATEAU = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.0}
  aggregate_timeout: 30
"""


def _raw_hello(w: Wire, **fields: object) -> object:
    base = Hello(w.job, w.rank, w.world, w.session, 0.1, 0).to_wire()
    base.update(fields)
    w.send_raw(msgpack.packb(base, use_bin_type=True))
    return w.recv()


def _status(c: Controller) -> dict[str, dict[str, object]]:
    out = run_cli("status", "--json", "--admin", c.admin)
    return {row["job"]: row for row in json.loads(out.stdout)}


def test_hijack_attempts_are_refused_and_change_nothing(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    victim = Wire(c.bind, "victim")
    attacker = Wire(c.bind, "victim")
    try:
        victim.hello(lr=0.1)
        victim.report(0, {"val_loss": 1.0})
        before = _status(c)["victim"]
        refused = {
            "lr 0": _raw_hello(attacker, lr=0.0),
            "lr 11": _raw_hello(attacker, lr=11.0),
            "lr 1e-300": _raw_hello(attacker, lr=1e-300),  # float32: 0.0, a job at LR 0
            "world 5000": _raw_hello(attacker, world=5000),
            "rank >= world": _raw_hello(attacker, rank=2, world=2),
            "name with newline": _raw_hello(attacker, job="victim\n"),
            "300 directions": _raw_hello(attacker, directions={f"m{i}": "min" for i in range(300)}),
        }
        codes = {k: v.code if isinstance(v, ErrorMessage) else v for k, v in refused.items()}
        assert codes == {
            "lr 0": "out_of_range",
            "lr 11": "out_of_range",
            "lr 1e-300": "out_of_range",
            "world 5000": "out_of_range",
            "rank >= world": "out_of_range",
            "name with newline": "schema",
            "300 directions": "schema",
        }
        # A report carrying the victim's session from another socket: schema, and the
        # answer goes to the sender, not to the victim.
        forged = Report("victim", 0, victim.session, 2, 1, {"val_loss": 9.0}, 0.1)
        attacker.send_raw(encode(forged.to_wire()))
        answer = attacker.recv()
        assert isinstance(answer, ErrorMessage) and answer.code == "schema"
        assert not victim.sock.poll(200)
        # A hello whose session is not its socket's routing id: schema, no phantom worker.
        other = Hello("victim", 0, 1, os.urandom(16), 0.1, 0)
        attacker.send_raw(encode(other.to_wire()))
        answer = attacker.recv()
        assert isinstance(answer, ErrorMessage) and answer.code == "schema"
        assert "phantom" not in _status(c)
        after = _status(c)["victim"]
        for key in ("lr", "epoch", "best", "wait", "workers"):
            assert after[key] == before[key], key
        assert c.metric("lrpilot_invalid_messages_total", reason="out_of_range") == 5
        assert c.metric("lrpilot_invalid_messages_total", reason="schema") >= 4
        # The victim decides on as before: the second bad epoch reduces.
        assert victim.report(1, {"val_loss": 1.0}).lr == pytest.approx(0.05)
    finally:
        victim.close(), attacker.close()


def test_a_rank_cannot_park_more_than_64_epochs_ahead(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    r0, r1 = Wire(c.bind, "ddp", 0, 2), Wire(c.bind, "ddp", 1, 2)
    try:
        r0.hello(), r1.hello()
        for e in range(64):  # rank 1 never reports: 64 epochs wait for it
            r0.report(e, {"val_loss": 1.0}, wait=False)
        far = r0.report(64, {"val_loss": 1.0})
        assert isinstance(far, ErrorMessage) and far.code == "out_of_range"
        assert not r0.sock.poll(100)  # the 64 parked reports are still undecided
        r1.report(0, {"val_loss": 1.0}, wait=False)  # rank 1 catches up on epoch 0
        for sock in (r0, r1):
            answer = sock.recv()
            assert isinstance(answer, LrMessage) and answer.apply_from_epoch == 1
    finally:
        r0.close(), r1.close()


def test_many_hellos_never_grow_a_jobs_directions(controller_factory: Factory) -> None:
    c = controller_factory(PLATEAU)
    for i in range(30):
        w = Wire(c.bind, "many-hellos")
        answer = w.hello(directions={f"metric{i}_{k}": "max" for k in range(20)})
        assert isinstance(answer, LrMessage)
        w.close()
    import sqlite3

    c.stop()  # the controller holds the database exclusively while it runs
    db = sqlite3.connect(c.state_dir / "state.db")
    (row,) = db.execute("SELECT data FROM jobs WHERE job = 'many-hellos'").fetchone()
    db.close()
    assert len(msgpack.unpackb(row, raw=False)["directions"]) <= 256


CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("refused")
else:
    print("connected")
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"),
    reason="needs root and setpriv to act as another user",
)
def test_the_ipc_admin_socket_refuses_other_users(controller_factory: Factory) -> None:
    import subprocess

    shared = Path(tempfile.mkdtemp(prefix="lrpilot-admin-"))  # a directory anyone may enter
    try:
        shared.chmod(0o755)
        sock = shared / "admin.sock"
        c = controller_factory(PLATEAU, "--admin-bind", f"ipc://{sock}")
        assert c.admin == f"ipc://{sock}"
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600

        def connect(*prefix: str) -> str:
            argv = [*prefix, "/usr/bin/python3", "-c", CONNECT, str(sock)]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            return out.stdout.strip() or out.stderr

        assert connect() == "connected"  # the controller's own user
        nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
        assert connect(*nobody) == "refused"
        assert run_cli("status", "--admin", c.admin).returncode == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


SERVE = ["serve", "--bind", "tcp://127.0.0.1:0", "--admin-bind", "tcp://127.0.0.1:0",
         "--metrics-port", "0"]  # fmt: skip


def test_deleting_the_lock_file_does_not_let_a_second_controller_in(
    controller_factory: Factory,
) -> None:
    c = controller_factory(PLATEAU)
    (c.state_dir / "lock").unlink()  # someone tidies up
    second = run_cli(*SERVE, "--state-dir", str(c.state_dir))
    assert second.returncode == 1 and "locked by another controller" in second.stderr


def test_a_job_row_that_does_not_decode_is_quarantined_and_the_rest_start(
    controller_factory: Factory, tmp_path: Path
) -> None:
    import sqlite3

    c = controller_factory(PLATEAU)
    for name in ("good-1", "good-2", "bad"):
        w = Wire(c.bind, name)
        w.hello()
        w.report(0, {"val_loss": 1.0})
        w.close()
    assert c.stop() == 0
    db = sqlite3.connect(c.state_dir / "state.db")
    with db:
        db.execute("UPDATE jobs SET data = ? WHERE job = 'bad'", (b"\xc1\xc1 not msgpack",))
    db.close()
    again = controller_factory(PLATEAU, state_dir=c.state_dir)
    status = {
        j["job"] for j in json.loads(run_cli("status", "--json", "--admin", again.admin).stdout)
    }
    assert status == {"good-1", "good-2"}
    assert "quarantine" in again.log() and "'bad'" in again.log()
    assert again.stop() == 0
    db = sqlite3.connect(again.state_dir / "state.db")
    rows = db.execute("SELECT job, error FROM quarantine").fetchall()
    db.close()
    assert [r[0] for r in rows] == ["bad"]


def test_a_huge_admin_request_is_dropped_and_the_controller_stays_small(
    controller_factory: Factory,
) -> None:
    import zmq

    c = controller_factory(PLATEAU)
    assert c.proc is not None
    rss = lambda: int(  # noqa: E731
        next(
            line.split()[1]
            for line in Path(f"/proc/{c.proc.pid}/status").read_text().splitlines()  # type: ignore[union-attr]
            if line.startswith("VmRSS:")
        )
    )
    before = rss()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(c.admin)
        sock.send(b"\x00" * (64 << 20))  # 64 MiB: far over the 1 MiB admin limit
        sock.send(encode({"t": "status"}))  # on the same socket, behind the huge one
        assert sock.poll(10_000), "the controller stopped answering"
        reply = msgpack.unpackb(sock.recv())  # the first answer: the huge one got none
        assert reply["t"] == "status" and reply["jobs"] == [], reply
    finally:
        sock.close(linger=0)
        ctx.term()
    assert run_cli("status", "--admin", c.admin).returncode == 0  # still serving
    assert rss() - before < 32 * 1024  # kB: the frame was never buffered whole


@pytest.mark.parametrize("limit", [0, 4096, 40_000])
def test_an_empty_state_dir_on_a_full_disk_says_the_disk_is_full(
    tmp_path: Path, limit: int
) -> None:
    """RLIMIT_FSIZE makes every write past `limit` bytes fail as a full disk does (EFBIG;
    SQLite: "database or disk is full"). Before: "state.db is damaged ... move it aside"."""
    import resource
    import subprocess

    from conftest import LRPILOT

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    state = tmp_path / "state"
    args = ["serve", "--bind", "tcp://127.0.0.1:0", "--admin-bind", "tcp://127.0.0.1:0"]
    args += ["--metrics-port", "0", "--metrics-host", "127.0.0.1", "--state-dir", str(state)]
    proc = subprocess.run(
        [*LRPILOT, *args], capture_output=True, text=True, timeout=60, preexec_fn=full_disk
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "damaged" not in proc.stderr and "move it aside" not in proc.stderr, proc.stderr
    # SQLite says "disk I/O error" or "database or disk is full"; the message says which disk.
    assert f"the disk holding {state} is full (" in proc.stderr, proc.stderr


def test_an_lr_below_1e_12_is_refused_by_the_cli_the_policy_file_and_the_admin_api(
    controller_factory: Factory, write: Callable[[str, str], Path]
) -> None:
    # One bound, [1e-12, 10] after float32 rounding, wherever an LR enters.
    out = run_cli("set-lr", "job", "1e-300", "--admin", "tcp://127.0.0.1:9")
    assert (
        out.returncode == 2 and "must be a finite number in [1e-12, 10], got 1e-300" in out.stderr
    )
    path = write("policy.yaml", "version: 1\ndefaults:\n  initial_lr: 1e-300\n")
    out = run_cli("check", str(path))
    assert out.returncode == 2
    assert f"{path}:3: initial_lr must be a finite number in [1e-12, 10], got 1e-300" in out.stdout
    c = controller_factory(PLATEAU)
    w = Wire(c.bind, "job-a")
    try:
        w.hello(lr=0.1)
        from lrpilot.controller.admin import Admin
        from lrpilot.controller.errors import AdminError

        with pytest.raises(AdminError, match=r"\[1e-12, 10\], got 1e-300") as info:
            Admin(c.admin).set_lr("job-a", 1e-300)
        assert info.value.code == "out_of_range"
        assert _status(c)["job-a"]["lr"] == pytest.approx(0.1)
    finally:
        w.close()
