"""The loss-spike guard in a real torch run against a real controller: weights corrupted at a
random step (× 50) are rolled back once, bit for bit, and training goes on at LR × lr_factor."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Controller, run_cli, wait_for

torch = pytest.importorskip("torch")
from lrpilot.client.torch import LRPilotScheduler  # noqa: E402
from lrpilot.controller.admin import Admin  # noqa: E402

Factory = Callable[..., Controller]
# A constant LR is a plan (it runs in the trainer); the guard only needs the reports.
POLICY = """\
version: 1
defaults:
  policy: {type: constant, unit: step}
  guard: {monitor: loss, spike: 3.0, window: 20, warmup: 30, snapshot_every: 25,
          lr_factor: 0.5, cooldown: 40, max_rollbacks: 2, on_exhausted: stop}
"""
STEPS = 260


def _data(seed: int) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return x, x @ w + 0.05 * torch.randn(512, 1, generator=g)


class Checkpoints:
    """A user's `snapshot_fn(unit)` / `restore_fn(unit)` for a model too large to copy (here:
    state dicts kept by unit, as files would be), with every call recorded."""

    def __init__(self, model: Any, opt: Any) -> None:
        self.model, self.opt = model, opt
        self.saved: dict[int, tuple[Any, Any]] = {}
        self.calls: list[tuple[str, int | None]] = []

    def snapshot_fn(self, unit: int | None = None) -> None:
        self.calls.append(("snapshot", unit))
        model_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.saved[-1 if unit is None else unit] = (
            model_state,
            copy.deepcopy(self.opt.state_dict()),
        )

    def restore_fn(self, unit: int | None = None) -> None:
        self.calls.append(("restore", unit))
        model_state, opt_state = self.saved[-1 if unit is None else unit]
        self.model.load_state_dict(model_state)
        self.opt.load_state_dict(copy.deepcopy(opt_state))


def _run(
    c: Controller,
    job: str,
    corrupt_at: int | None,
    seed: int = 0,
    hooks: bool = False,
    factor: float = 50.0,
) -> tuple[float, LRPilotScheduler, list[tuple[int, float, bool]], int | None]:
    """Trains STEPS steps; returns the final loss, the scheduler, (step, lr, restored-equal)
    at each rollback, and the step it stopped at (None: it ran to the end). `hooks`: the
    user's `Checkpoints` instead of `model=` (`sched.checkpoints`); `factor`: what the
    weights are multiplied by at `corrupt_at` (NaN makes every later loss NaN).

    Steps of this tiny model take microseconds: each waits until its report is answered
    (`flush`), as steps of a real model (longer than a reply takes) find the decision there.
    """
    torch.manual_seed(seed)
    x, y = _data(seed)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    points = Checkpoints(model, opt)
    if hooks:
        sched = LRPilotScheduler(
            opt,
            job=job,
            endpoint=c.bind,
            unit="step",
            monitor="loss",
            snapshot_fn=points.snapshot_fn,
            restore_fn=points.restore_fn,
        )
    else:
        sched = LRPilotScheduler(
            opt, job=job, endpoint=c.bind, unit="step", monitor="loss", model=model
        )
    sched.checkpoints = points  # type: ignore[attr-defined]
    at_start: dict[int, Any] = {}
    rollbacks: list[tuple[int, float, bool]] = []
    g = torch.Generator().manual_seed(seed + 1)
    try:
        for step in range(STEPS):
            at_start[step] = {k: v.clone() for k, v in model.state_dict().items()}
            if step == corrupt_at:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(factor)
            idx = torch.randint(0, 512, (32,), generator=g)
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen = len(sched._core.rollbacks)
            sched.step(loss)
            if len(sched._core.rollbacks) > seen:
                asked, unit = sched._core.rollbacks[-1]
                assert unit is not None, f"no snapshot held for {asked}"
                now = model.state_dict()
                equal = all(torch.equal(now[k], at_start[unit][k]) for k in now)
                rollbacks.append((step, opt.param_groups[0]["lr"], equal))
            if sched.client.stop_requested:
                return math.nan, sched, rollbacks, step
            sched.client.flush()
        with torch.no_grad():
            final = float(torch.nn.functional.mse_loss(model(x), y))
    finally:
        sched.close()
    return final, sched, rollbacks, None


def test_corrupted_weights_roll_back_once_bit_for_bit_at_half_the_lr(
    controller_factory: Factory,
) -> None:
    c = controller_factory(POLICY)
    clean, _, none, _ = _run(c, "torch-clean", None)
    assert none == []
    corrupt_at = random.Random().randint(60, 180)
    final, sched, rollbacks, _ = _run(c, "torch-spiked", corrupt_at)
    assert len(rollbacks) == 1, (corrupt_at, rollbacks)
    step, lr, equal = rollbacks[0]
    asked, unit = sched._core.rollbacks[0]
    assert equal, "the restored weights are not the snapshot's"
    assert asked == corrupt_at // 25 * 25 and unit == asked  # the newest healthy snapshot
    assert lr == pytest.approx(0.025)  # 0.05 × lr_factor
    assert step >= corrupt_at
    assert final <= 2 * clean, (final, clean)
    history = json.loads(run_cli("history", "torch-spiked", "--json", "--admin", c.admin).stdout)
    rows = [r for r in history if r["reason"] == "divergence"]
    assert len(rows) == 1 and rows[0]["epoch"] == corrupt_at + 1
    status = Admin(c.admin).status()
    assert {r["job"]: r["rollbacks"] for r in status}["torch-spiked"] == 1
    table = run_cli("status", "--admin", c.admin).stdout.splitlines()
    (line,) = [line for line in table if "rollback" in line]
    assert line.startswith("torch-spiked") and line.endswith("1 rollback (loss spikes)")
    assert c.metric("lrpilot_rollbacks_total", training_job="torch-spiked") == 1.0
    assert c.metric("lrpilot_rollbacks_total", training_job="torch-clean") == 0.0


def test_the_users_snapshot_fn_and_restore_fn_of_a_unit_serve_the_guard(
    controller_factory: Factory,
) -> None:
    """A model too large to copy: the guard calls `snapshot_fn(unit)` at every multiple of
    snapshot_every (no in-memory copy, no `model=`) and, on the spike, `restore_fn(unit)`
    once with the newest healthy snapshot's unit; the weights are that snapshot's."""
    c = controller_factory(POLICY)
    corrupt_at = random.Random().randint(60, 180)
    final, sched, rollbacks, _ = _run(c, "torch-hooks", corrupt_at, hooks=True)
    calls = sched.checkpoints.calls  # type: ignore[attr-defined]
    restores = [unit for kind, unit in calls if kind == "restore"]
    assert restores == [corrupt_at // 25 * 25], (corrupt_at, calls)
    snapshots = [unit for kind, unit in calls if kind == "snapshot"]
    # First the range test's `snapshot_fn()`, before the first step (the controller has
    # not said yet whether a test runs); the guard's first is at 25 (the scheduler says
    # hello at its first step()), then every multiple of 25.
    assert snapshots[0] is None and snapshots[1:4] == [25, 50, 75]
    assert all(u is not None and u % 25 == 0 for u in snapshots[1:])
    assert sched._core.kept and all(
        type(k).__name__ == "_UserSnapshot" for k in sched._core.kept.values()
    )
    assert len(rollbacks) == 1
    _step, lr, equal = rollbacks[0]
    assert equal and lr == pytest.approx(0.025)
    assert math.isfinite(final) and final < 0.05


def test_a_nan_loss_tensor_is_reported_as_nan_and_rolled_back(
    controller_factory: Factory,
) -> None:
    """Weights turned NaN: every later loss tensor (summed on its device, read at the
    report) is NaN; NaN reaches the controller as NaN, counts as a spike, and the one
    rollback brings finite weights back."""
    c = controller_factory(POLICY)
    corrupt_at = random.Random().randint(60, 180)
    final, sched, rollbacks, _ = _run(c, "torch-nan", corrupt_at, factor=math.nan)
    assert len(rollbacks) == 1, (corrupt_at, rollbacks)
    step, lr, equal = rollbacks[0]
    assert sched._core.rollbacks[0] == (corrupt_at // 25 * 25,) * 2
    assert equal and lr == pytest.approx(0.025) and step == corrupt_at + 1
    assert math.isfinite(final) and final < 0.05
    rows = json.loads(run_cli("history", "torch-nan", "--json", "--admin", c.admin).stdout)
    (row,) = [r for r in rows if r["reason"] == "divergence"]
    assert "value=nan" in str(row["detail"]), row


def test_a_plain_client_calls_restore_fn_with_the_snapshot_unit(
    controller_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A loop with the plain `Client` keeps its own snapshots (at each multiple of
    `client.snapshot_every`); on a spike the client calls `restore_fn(unit)` once, naming
    the newest healthy snapshot. One whose `restore_fn` takes no unit is warned, once."""
    from lrpilot.client import Client

    c = controller_factory(POLICY)
    restored: list[int | None] = []
    weights = {"w": 1.0}
    saved: dict[int, float] = {}

    def restore_fn(unit: int | None = None) -> None:
        restored.append(unit)
        assert unit is not None
        weights["w"] = saved[unit]

    with Client(
        c.bind,
        "plain-guard",
        initial_lr=0.05,
        snapshot_fn=lambda unit=None: None,
        restore_fn=restore_fn,
    ) as client:
        assert client.snapshot_every == 25
        for step in range(160):
            if step % 25 == 0:
                saved[step] = weights["w"]
            if step == 110:
                weights["w"] = 1e6  # the spike: a loss 1e6 times the usual
            weights["w"] = weights["w"] * 0.99 if weights["w"] < 10 else weights["w"]
            client.report(0, {"loss": weights["w"]}, step=step)
        assert restored == [100]
        assert client.lr == pytest.approx(0.025)
        assert weights["w"] < 10

    with (
        caplog.at_level(logging.WARNING, logger="lrpilot.client"),
        Client(
            c.bind,
            "plain-guard-no-unit",
            initial_lr=0.05,
            snapshot_fn=lambda: None,
            restore_fn=lambda: restored.append(None),
        ) as client,
    ):
        for step in range(160):
            client.report(0, {"loss": 1e6 if step == 110 else 1.0}, step=step)
        assert client.lr == pytest.approx(0.025)
    assert restored == [100]  # the range test's restore_fn() is never called for a guard
    assert "no restore_fn(unit)" in caplog.text


def test_max_rollbacks_spent_then_on_exhausted_stop_stops_training(
    controller_factory: Factory,
) -> None:
    c = controller_factory(POLICY.replace("max_rollbacks: 2", "max_rollbacks: 0"))
    _, _, rollbacks, stopped = _run(c, "torch-exhausted", 100)
    assert rollbacks == []
    assert stopped == 101  # the decision on step 100 applies from step 101


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _audited(state_dir: Path, reason: str) -> int:
    path = state_dir / "audit.jsonl"
    if not path.exists():
        return 0
    return sum(json.loads(line)["reason"] == reason for line in path.read_text().splitlines())


def test_a_controller_killed_between_the_spike_report_and_the_restore_restores_once(
    tmp_path: Path,
) -> None:
    """kill -9 once the spike's decision is committed (its reply may or may not have reached
    the trainer): the restarted controller answers the replay or the rejoining hello with the
    same restore, which the trainer applies once, never twice."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    state, bind = tmp_path / "state", f"tcp://127.0.0.1:{_free_port()}"
    c = Controller(state, policy, "--bind", bind).start()
    try:
        torch.manual_seed(0)
        x, y = _data(0)
        model = torch.nn.Linear(8, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = LRPilotScheduler(
            opt, job="torch-kill", endpoint=bind, unit="step", monitor="loss", model=model
        )
        try:
            for step in range(160):
                if step == 90:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.mul_(50.0)
                loss = torch.nn.functional.mse_loss(model(x[:64]), y[:64])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step(loss)
                if step == 90:
                    sched.client.poll()  # the spike's report goes out, unanswered yet
                    # a positive signal: the decision is committed
                    wait_for(lambda: _audited(state, "divergence") > 0, "divergence audited", 20)
                    assert _audited(state, "divergence") == 1
                    c.kill()
                    c = Controller(state, policy, "--bind", bind).start()
                sched.client.flush(timeout=10)
            assert len(sched._core.rollbacks) == 1
            assert sched._core.rollbacks[0] == (75, 75)
            assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
        finally:
            sched.close()
        assert _audited(state, "divergence") == 1
    finally:
        c.kill()


def test_the_readme_guard_program_spikes_and_recovers_as_written(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Loss spikes: roll back and go on", 1)[1].split("\n## ", 1)[0]
    yaml_text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    program = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "guard.yaml").write_text(yaml_text)
    (tmp_path / "demo.py").write_text(program)
    c = Controller(tmp_path / "state", tmp_path / "guard.yaml").start()
    try:
        env = {**os.environ, "LRPILOT_ENDPOINT": c.bind}
        done = subprocess.run(
            [sys.executable, str(tmp_path / "demo.py")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "loss spike at step 300" in done.stderr
        assert "restores the snapshot of step 300 and goes on at lr 0.025" in done.stderr
        final, lr, rollbacks = done.stdout.split(",")
        assert float(final.split()[-1]) < 0.01 and lr.split()[-1] == "0.025"
        assert rollbacks.split()[-1] == "1"
        print(done.stdout)  # the numbers the README quotes (pytest -s shows them)
    finally:
        c.kill()


def test_a_guard_copy_reuses_an_older_ones_buffers_and_restores_twice_exactly() -> None:
    from lrpilot.client.torch import GuardCopy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def train(n: int) -> None:
        for _ in range(n):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    train(3)
    old = GuardCopy(model, [opt])
    train(3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    new = GuardCopy(model, [opt], reuse=old)
    old_buffers = list(old.model_state.values())
    assert all(a is b for a, b in zip(new.model_state.values(), old_buffers, strict=True))
    for _ in range(2):  # restorable more than once: training after a restore changes no copy
        train(5)
        new.restore()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
        assert all(
            torch.equal(s["exp_avg"], m) for s, m in zip(opt.state.values(), moments, strict=True)
        )
