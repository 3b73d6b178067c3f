"""Nothing is lost: a client that keeps and replays its reports gets, after any outage, the
decisions of an uninterrupted run (DESIGN.md "Nothing is lost"). Real controller processes
killed with SIGKILL, a real full disk (tmpfs); the reference is the pure engine (`simulate`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Controller, run_cli

from lrpilot.client import Client

Factory = Callable[..., Controller]
POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2, min_delta: 0.0, cooldown: 1}
"""


def losses(seed: int, n: int = 30) -> list[float]:
    rng = random.Random(seed)
    value, out = 1.0, []
    for _ in range(n):
        value *= rng.choice([0.9, 1.0, 1.01, 1.05])
        out.append(round(value, 6))
    return out


def expected(tmp_path: Path, values: list[float], name: str) -> list[tuple[int, float]]:
    """(first epoch, new lr) of every LR change, by the engine alone (`lrpilot simulate`)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    csv = tmp_path / f"{name}.csv"
    csv.write_text("epoch,val_loss\n" + "".join(f"{e},{v}\n" for e, v in enumerate(values)))
    out = run_cli(
        "simulate", "--policy", str(policy), "--job", name, "--metrics", str(csv),
        "--initial-lr", "0.1", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    return [(r["epoch"] + 1, r["event"]["new"]) for r in rows if r["event"]]


def history(c: Controller, job: str) -> list[tuple[int, float]]:
    out = run_cli("history", job, "--json", "--admin", c.admin)
    assert out.returncode == 0, out.stderr
    return [(r["epoch"], r["new_lr"]) for r in json.loads(out.stdout) if r["reason"] != "initial"]


def test_kill_9_at_random_points_then_restart_decides_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """Each kill lands mid-run (at a random epoch, sometimes with a report in flight), the
    trainer goes on for a few epochs while the controller is down, then it restarts: no
    sleeps, the outage is measured in epochs trained."""
    state = tmp_path / "state"
    policy = tmp_path / "serve.yaml"
    policy.write_text(POLICY)
    c = Controller(state, policy).start()
    bind = c.bind
    try:
        for run in range(5):  # five runs, each with a kill -9 at a random moment
            values = losses(run)
            job = f"killed-{run}"
            rng = random.Random(100 + run)
            kill_at, down_for = rng.randrange(2, 20), rng.randrange(2, 6)  # in epochs
            in_flight = rng.random() < 0.5  # kill with the report of kill_at sent, unanswered
            client = Client(bind, job=job, initial_lr=0.1, rank=0, world=1, timeout=0.5)
            try:
                for epoch, value in enumerate(values):
                    if epoch == kill_at + down_for:
                        kept_while_down = client.unanswered
                        c = Controller(state, policy, "--bind", bind).start()
                    if epoch == kill_at and in_flight:
                        client.report(epoch, {"val_loss": value}, wait=False)
                        client.poll()  # sent now; the kill races its answer
                        c.kill()
                        continue
                    if epoch == kill_at:
                        c.kill()  # SIGKILL, between two epochs
                    client.report(epoch, {"val_loss": value})
                assert client.flush(timeout=30), "the kept reports were never answered"
            finally:
                client.close()
            # The kill landed mid-run: reports were kept while it was down, a new hello
            # replayed them.
            assert kept_while_down >= down_for - 1 >= 1, f"run {run}: the kill missed the run"
            assert client.stats["hellos"] >= 2, client.stats
            got = history(c, job)
            assert got == expected(tmp_path, values, job), f"run {run}, kill at {kill_at}"
            assert len(got) >= 2
            status = {j["job"]: j for j in json.loads(run_cli("status", "--json", "--admin",
                                                                c.admin).stdout)}  # fmt: skip
            assert status[job]["epoch"] == len(values) - 1
    finally:
        c.kill()


def test_a_restart_storm_is_answered_within_about_a_second_of_each_restart(
    tmp_path: Path,
) -> None:
    """Kill -9, restart once the client's reconnect backoff has grown to its cap (five
    failed attempts, counted from the socket's monitor), kill again as soon as the client is
    answered: four times. The client retries at most a second apart (100 ms, doubling,
    capped at 1 s), so each restart is answered about a second after the controller
    listens at the latest; a 2 s cap once left a 7 s dark spell across such a storm."""
    state = tmp_path / "state"
    policy = tmp_path / "serve.yaml"
    policy.write_text(POLICY)
    c = Controller(state, policy).start()
    bind = c.bind
    client = Client(bind, job="storm", initial_lr=0.1, rank=0, world=1, timeout=0.5)
    gaps: list[float] = []
    try:
        epoch = 0
        for _ in range(4):
            client.report(epoch, {"val_loss": 1.0})
            epoch += 1
            c.kill()
            client.report(epoch, {"val_loss": 1.0})  # made while down: kept
            epoch += 1
            retried = client.stats["retries"]
            for _ in range(100):  # each flush waits on the socket and its monitor, <= 0.1 s
                if client.stats["retries"] >= retried + 5:
                    break
                client.flush(timeout=0.1)
            assert client.stats["retries"] >= retried + 5 and client.unanswered >= 1
            c = Controller(state, policy, "--bind", bind).start()
            listening = time.monotonic()  # the ready line: the new controller is bound
            for _ in range(200):
                if client.flush(timeout=0.1):
                    break
            assert client.unanswered == 0, "a restart was never answered"
            gaps.append(time.monotonic() - listening)
        print("restart -> answered, s:", " ".join(f"{g:.2f}" for g in gaps))
        assert max(gaps) < 1.0 + 0.5, gaps  # the 1 s reconnect cap, plus scheduling
        assert client.stats["hellos"] >= 5 and client.online
    finally:
        client.close()
        c.kill()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs (a disk that fills) needs root"
)
def test_a_full_disk_loses_nothing_once_space_returns(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], check=True)
    c = None
    try:
        policy = tmp_path / "serve.yaml"
        policy.write_text(POLICY)
        c = Controller(disk / "state", policy).start()
        values = losses(7, n=40)
        client = Client(c.bind, job="full", initial_lr=0.1, rank=0, world=1, timeout=0.5)
        try:
            for epoch, value in enumerate(values[:10]):
                client.report(epoch, {"val_loss": value})
            filler = disk / "filler"
            with open(filler, "wb") as fh:  # fill the disk to the last byte
                block = b"\0" * 65536
                try:
                    while True:
                        fh.write(block)
                        fh.flush()
                except OSError:
                    pass
            for epoch, value in enumerate(values[10:30], start=10):
                client.report(epoch, {"val_loss": value})  # answered unavailable, kept
            assert c.metric("lrpilot_store_errors_total") >= 1
            assert client.unanswered > 0
            assert c.proc is not None and c.proc.poll() is None  # still serving
            filler.unlink()  # space returns
            for epoch, value in enumerate(values[30:], start=30):
                client.report(epoch, {"val_loss": value})
            assert client.flush(timeout=60), "the kept reports were never decided"
        finally:
            client.close()
        assert history(c, "full") == expected(tmp_path, values, "full")
    finally:
        if c is not None:
            c.kill()
        subprocess.run(["umount", "-l", str(disk)], check=False)
        shutil.rmtree(disk, ignore_errors=True)


SWEEP = """\
version: 1
defaults:
  phases:
    - {type: range_test, start_lr: 1.0e-4, steps_per_decade: 10, suggest: valley}
    - {type: plateau, unit: step, monitor: loss, lr: suggested, patience: 3, factor: 0.5}
"""


def sweep_loss(lr: float) -> float:
    """Falls to lr ~ 0.03, blows up past 0.2: a function of the LR trained only, so two
    runs that train the same LRs measure the same curve."""
    x = math.log10(lr)
    return 1.0 + (x + 1.5) ** 2 + 0.05 * math.sin(7 * x) if lr < 0.2 else 1e6 * lr


def train_through_a_sweep(
    client: Client, outage: Callable[[int], None] = lambda step: None
) -> list[float]:
    """A trainer: each step trains at the LR the client holds and reports its loss, until
    the controller's `restore`; `outage(step)` runs before each step. Returns the LRs trained."""
    trained = []
    for step in range(400):
        outage(step)
        lr = client.lr
        trained.append(lr)
        client.report(0, {"loss": sweep_loss(lr)}, step=step)
        if client.last_action == "restore":
            return trained
    raise AssertionError(f"the sweep never ended; trained {trained}")


@pytest.mark.parametrize("plans", [False, True], ids=["one-lr-per-report", "plan"])
def test_a_kill_9_mid_sweep_gives_the_curve_of_a_clean_run_point_for_point(
    tmp_path: Path, plans: bool
) -> None:
    """An old client (no plans) goes on at its last LR while the controller is down and
    then takes the sweep's next untried LR; a client with plans runs the sweep itself, so
    the outage changes nothing it trains. Either way the curve is a clean run's."""
    state = tmp_path / "state"
    policy = tmp_path / "sweep.yaml"
    policy.write_text(SWEEP)
    c = Controller(state, policy).start()
    bind, calls = c.bind, {"snapshot": 0, "restore": 0}

    def restoring(job: str) -> Client:
        return Client(
            bind, job=job, initial_lr=0.01, timeout=0.5, rank=0, world=1, plans=plans,
            snapshot_fn=lambda: calls.__setitem__("snapshot", calls["snapshot"] + 1),
            restore_fn=lambda: calls.__setitem__("restore", calls["restore"] + 1),
        )  # fmt: skip

    kept = []

    def kill_9(step: int) -> None:
        """Before step 12 the controller dies; steps 12..19 train with it dead (the client
        goes on at its last LR); before step 20 it is back on the same port and state."""
        nonlocal c
        if step == 12:
            c.kill()
        elif step == 20:
            kept.append(client.unanswered)
            c = Controller(state, policy, "--bind", bind).start()
            assert client.flush(timeout=30), "the kept reports were never answered"

    try:
        with restoring("clean") as clean:
            clean_lrs = train_through_a_sweep(clean)
        want = json.loads(run_cli("range-test", "clean", "--json", "--admin", c.admin).stdout)
        client = restoring("killed")
        try:
            killed_lrs = train_through_a_sweep(client, kill_9)
            hellos = client.stats["hellos"]
        finally:
            client.close()
        got = json.loads(run_cli("range-test", "killed", "--json", "--admin", c.admin).stdout)
    finally:
        c.kill()
    assert kept == [8] and hellos >= 2  # the kill landed mid-sweep: 8 reports kept, resent
    assert want["done"] and want["stop_reason"] == "divergence" and len(want["points"]) > 25
    assert got["points"] == want["points"]  # every point is an LR the trainer trained
    assert got["suggested_lr"] == want["suggested_lr"] and got["suggestions"] == want["suggestions"]
    if plans:
        # The sweep ran in the trainer: the outage changed no LR it trained.
        assert killed_lrs == clean_lrs
    else:
        # The trainer went on at its last LR while the controller was away and then took
        # the sweep's next one: never an LR outside the sweep, never a jump ahead of it.
        # (Step 20 too: the replies reached the client during the flush, applied at its
        # report.)
        assert killed_lrs[:12] == clean_lrs[:12] and killed_lrs[12:21] == [clean_lrs[12]] * 9
        assert killed_lrs[21:] == clean_lrs[13:]
    assert calls == {"snapshot": 2, "restore": 2}
