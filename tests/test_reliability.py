"""Nothing is lost: a client that keeps and replays its reports gets, after any outage, the
decisions of an uninterrupted run (DESIGN.md "Nothing is lost"). Real controller processes
killed with SIGKILL, a real full disk (tmpfs); the reference is the pure engine (`simulate`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
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
    state = tmp_path / "state"
    policy = tmp_path / "serve.yaml"
    policy.write_text(POLICY)
    c = Controller(state, policy).start()
    bind = c.bind
    try:
        for run in range(5):  # five runs, each with a kill -9 at a random moment
            values = losses(run)
            job = f"killed-{run}"
            client = Client(bind, job=job, initial_lr=0.1, rank=0, world=1, timeout=0.5)
            kill_at = random.Random(100 + run).uniform(0.1, 1.2)  # seconds into the run
            holder = {"c": c}

            def outage(at: float = kill_at, holder: dict[str, Controller] = holder) -> None:
                time.sleep(at)
                holder["c"].kill()  # SIGKILL, mid-run
                time.sleep(1.0)  # down for a second
                holder["c"] = Controller(state, policy, "--bind", bind).start()

            killer = threading.Thread(target=outage)
            killer.start()
            try:
                for epoch, value in enumerate(values):  # an epoch every 50 ms
                    client.report(epoch, {"val_loss": value})
                    time.sleep(0.05)
                killer.join(30)
                assert client.flush(timeout=30), "the kept reports were never answered"
            finally:
                killer.join(30)
                client.close()
            c = holder["c"]
            got = history(c, job)
            assert got == expected(tmp_path, values, job), f"run {run}, kill at {kill_at:.2f} s"
            assert len(got) >= 2
            status = {j["job"]: j for j in json.loads(run_cli("status", "--json", "--admin",
                                                                c.admin).stdout)}  # fmt: skip
            assert status[job]["epoch"] == len(values) - 1
    finally:
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
