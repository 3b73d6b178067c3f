"""LRPilotScheduler with a real torch optimizer against a scripted controller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from test_client import ScriptedPeer, free_endpoint  # noqa: E402

from lrpilot.client.protocol import Bye, Hello, Report  # noqa: E402
from lrpilot.client.torch import LRPilotScheduler  # noqa: E402


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer(lr=0.1)
    yield p
    p.close()


def two_group_sgd() -> Any:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    return torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[1].parameters(), "lr": 0.01},
        ],
        momentum=0.9,
    )


def lrs(optimizer: Any) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def test_every_group_is_scaled_by_the_ratio_of_group_0(peer: ScriptedPeer) -> None:
    peer.decide = lambda r: 0.05 if r.epoch == 1 else None
    optimizer = two_group_sgd()
    with LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint) as sched:
        sched.step(0.9)
        assert lrs(optimizer) == [0.1, 0.01]
        sched.step(torch.tensor(0.95))  # a 0-d tensor is fine
        assert lrs(optimizer) == pytest.approx([0.05, 0.005])
        assert sched.get_last_lr() == pytest.approx([0.05, 0.005])
        sched.step({"val_loss": 0.9, "val_acc": 0.7, "hist": torch.ones(3)})
    hello = peer.of_type(Hello)[0]
    assert hello.framework == "torch" and hello.lr == 0.1 and hello.start_epoch == 0
    reports = peer.of_type(Report)
    assert [(r.epoch, r.lr) for r in reports] == [(0, 0.1), (1, 0.1), (2, 0.05)]
    assert reports[0].metrics == {"val_loss": 0.9}
    assert reports[2].metrics == {"val_loss": 0.9, "val_acc": 0.7}  # non-scalars left out
    peer.wait_for(lambda ms: isinstance(ms[-1], Bye))


def test_the_hello_reply_is_applied_at_the_first_use(peer: ScriptedPeer) -> None:
    peer.lr = 0.2  # e.g. the policy's initial_lr
    optimizer = two_group_sgd()
    sched = LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint, monitor="loss")
    # No hello yet: a load_state_dict() may still come and must say hello with its epoch.
    assert lrs(optimizer) == pytest.approx([0.1, 0.01]) and not peer.of_type(Hello)
    assert sched.client.lr == pytest.approx(0.2)  # says hello and applies the reply
    assert lrs(optimizer) == pytest.approx([0.2, 0.02])
    sched.step(1.0)
    assert peer.of_type(Report)[0].metrics == {"loss": 1.0}
    sched.close()
    sched.close()


def test_state_dict_round_trip_resumes_the_epoch_count(peer: ScriptedPeer) -> None:
    peer.decide = lambda r: 0.05 if r.epoch == 1 else None
    optimizer = two_group_sgd()
    sched = LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint)
    for value in (1.0, 0.9, 0.8):
        sched.step(value)
    state = sched.state_dict()
    sched.close()
    assert state == {"epoch": 3, "last_lr": pytest.approx([0.05, 0.005]), "job": "job-a"}

    # A new process: fresh optimizer (its saved state loaded first), fresh scheduler.
    restored_optimizer = two_group_sgd()
    restored_optimizer.load_state_dict(optimizer.state_dict())
    resumed = LRPilotScheduler(restored_optimizer, job="job-a", endpoint=peer.endpoint)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 3 and resumed.state_dict()["epoch"] == 3
    resumed.step(0.7)
    resumed.close()

    hellos = peer.of_type(Hello)
    # The resumed scheduler's only hello carries the checkpoint's epoch: no new run.
    assert [h.start_epoch for h in hellos] == [0, 3]
    assert hellos[1].lr == pytest.approx(0.05)
    assert [r.epoch for r in peer.of_type(Report)] == [0, 1, 2, 3]
    assert lrs(restored_optimizer) == pytest.approx([0.05, 0.005])


def test_an_absent_controller_leaves_the_lr_alone() -> None:
    optimizer = two_group_sgd()
    with LRPilotScheduler(optimizer, job="job-a", endpoint=free_endpoint(), timeout=0.2) as s:
        for epoch in range(10):
            s.step(1.0 / (epoch + 1))
        assert s.last_epoch == 10 and not s.client.online
    assert lrs(optimizer) == [0.1, 0.01]


def test_bad_input_is_a_clear_error(peer: ScriptedPeer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRPILOT_JOB", raising=False)
    with pytest.raises(ValueError, match=r"job=.*LRPILOT_JOB"):
        LRPilotScheduler(two_group_sgd(), endpoint=peer.endpoint)
    with LRPilotScheduler(two_group_sgd(), job="job-a", endpoint=peer.endpoint) as sched:
        with pytest.raises(ValueError, match="number or a mapping"):
            sched.step("low")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="epoch"):
            sched.load_state_dict({"epoch": -1})
