"""PyTorch against a real controller: LRPilotScheduler decides like torch's ReduceLROnPlateau,
and a checkpoint resume continues the job's run instead of starting a new one."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from conftest import Controller, run_cli

torch = pytest.importorskip("torch")
from lrpilot.client.torch import LRPilotScheduler  # noqa: E402

Factory = Callable[..., Controller]
POLICY = """\
version: 1
defaults:
  policy: {type: plateau, compat: torch, factor: 0.5, patience: 1, threshold_mode: abs,
           min_delta: 0.01, cooldown: 1}
"""
VALUES = [1.0, 0.9, 0.95, 0.96, 0.97, 0.85, 0.9, 0.91, 0.92, 0.93]


def _optimizer() -> object:
    model = torch.nn.Linear(2, 1)
    return torch.optim.SGD(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.2}], lr=0.1
    )


def test_scheduler_matches_torch_reduce_lr_on_plateau(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, factor=0.5, patience=1, threshold=0.01, threshold_mode="abs", cooldown=1
    )
    opt = _optimizer()
    sched = LRPilotScheduler(opt, job="torch-parity", endpoint=c.bind)
    try:
        for v in VALUES:
            ref.step(v)
            sched.step(v)
            assert sched.get_last_lr() == pytest.approx([g["lr"] for g in ref_opt.param_groups])
        assert sched.get_last_lr()[0] < 0.1  # it did reduce
    finally:
        sched.close()


def test_load_state_dict_resumes_the_run(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    opt = _optimizer()
    sched = LRPilotScheduler(opt, job="torch-resume", endpoint=c.bind)
    for v in VALUES[:5]:
        sched.step(v)
    checkpoint = sched.state_dict()
    before = json.loads(run_cli("status", "--json", "--admin", c.admin).stdout)[0]
    sched.close()

    # A new process: scheduler first, then the checkpoint, as torch code usually reads.
    opt2 = _optimizer()
    sched2 = LRPilotScheduler(opt2, job="torch-resume", endpoint=c.bind)
    try:
        sched2.load_state_dict(checkpoint)
        after = json.loads(run_cli("status", "--json", "--admin", c.admin).stdout)[0]
        assert (after["best"], after["wait"], after["epoch"]) == (
            before["best"],
            before["wait"],
            before["epoch"],
        )
        history = json.loads(
            run_cli("history", "torch-resume", "--json", "--admin", c.admin).stdout
        )
        assert [r["reason"] for r in history].count("initial") == 1  # no new run
        assert sched2.get_last_lr()[0] == pytest.approx(checkpoint["last_lr"][0])
    finally:
        sched2.close()


def test_without_a_policy_file_torch_users_get_torch_lrs_bit_for_bit(
    controller_factory: Factory,
) -> None:
    """`compat: auto` in the embedded default: a torch client's job decides as torch's own
    ReduceLROnPlateau with its defaults, exactly (no float32 rounding), on generated runs."""
    import random

    c = controller_factory(None)  # the embedded default policy
    rng = random.Random(11)
    reductions = 0
    for run in range(6):
        ref_opt = _optimizer()
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt)  # torch's defaults
        opt = _optimizer()
        sched = LRPilotScheduler(opt, job=f"torch-default-{run}", endpoint=c.bind)
        try:
            value = 1.0
            for _ in range(50):
                # improve, stall, drift within torch's threshold, worsen
                value *= rng.choices([0.9, 1.0, 1.00005, 1.02], weights=[1, 4, 3, 2])[0]
                ref.step(value)
                sched.step(value)
                assert sched.get_last_lr() == [g["lr"] for g in ref_opt.param_groups]
            reductions += ref_opt.param_groups[0]["lr"] < 0.1
        finally:
            sched.close()
    assert reductions >= 3  # the runs did reach plateaus


def test_torch_save_of_the_scheduler_resumes_the_run(
    controller_factory: Factory, tmp_path: object
) -> None:
    """`torch.save(scheduler)` mid-run, then `torch.load` in place of it: the decisions go on
    as torch's ReduceLROnPlateau's would, in the same run of the job."""
    from pathlib import Path

    c = controller_factory(POLICY)
    ref_opt = _optimizer()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, factor=0.5, patience=1, threshold=0.01, threshold_mode="abs", cooldown=1
    )
    sched = LRPilotScheduler(_optimizer(), job="torch-pickle", endpoint=c.bind)
    path = Path(str(tmp_path)) / "scheduler.pt"
    got, expected = [], []
    for epoch, v in enumerate(VALUES):
        if epoch == 4:  # a checkpoint, and a new process that loads it
            torch.save(sched, path)
            sched.close()
            sched = torch.load(path, weights_only=False)
        ref.step(v)
        sched.step(v)
        expected.append([g["lr"] for g in ref_opt.param_groups])
        got.append(sched.get_last_lr())
    sched.close()
    assert got == expected and got[-1][0] < 0.1
    history = json.loads(run_cli("history", "torch-pickle", "--json", "--admin", c.admin).stdout)
    assert [r["reason"] for r in history].count("initial") == 1  # one run throughout
