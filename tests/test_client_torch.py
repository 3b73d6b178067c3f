"""LRPilotScheduler with a real torch optimizer against a scripted controller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from test_client import ScriptedPeer, free_endpoint, range_test_handler  # noqa: E402

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
    assert (state["epoch"], state["job"]) == (3, "job-a")
    assert state["last_lr"] == pytest.approx([0.05, 0.005])
    # torch's own keys are there too, for code that reads a ReduceLROnPlateau checkpoint.
    assert state["last_epoch"] == 3 and state["_last_lr"] == pytest.approx([0.05, 0.005])
    assert not {"_client", "endpoint", "timeout", "optimizer"} & set(state)

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


def test_it_is_a_reduce_lr_on_plateau_with_torch_signatures(peer: ScriptedPeer) -> None:
    """What trainers check and call: isinstance, step(metrics, epoch), one-element tensors."""
    import numpy as np

    peer.decide = lambda r: 0.05 if r.epoch == 4 else None
    optimizer = two_group_sgd()
    with LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint) as sched:
        assert isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
        sched.step(torch.tensor([0.9]))  # one element, shape (1,): torch's float() takes it
        sched.step(np.array([[0.8]]))
        sched.step({"val_loss": torch.tensor([0.7]), "val_acc": np.float32(0.5)})
        sched.step(0.6, 4)  # torch's (deprecated) epoch argument: the epoch just finished
        assert sched.last_epoch == 5
        sched.step(0.6)
        with pytest.raises(ValueError, match="number or a mapping"):
            sched.step(torch.ones(2))
    reports = peer.of_type(Report)
    assert [r.epoch for r in reports] == [0, 1, 2, 4, 5]
    assert [r.metrics.get("val_loss") for r in reports] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.6])
    assert reports[2].metrics["val_acc"] == 0.5
    assert lrs(optimizer) == pytest.approx([0.05, 0.005])


def test_a_first_step_with_an_epoch_says_hello_from_it(peer: ScriptedPeer) -> None:
    with LRPilotScheduler(two_group_sgd(), job="job-a", endpoint=peer.endpoint) as sched:
        sched.step(0.5, epoch=7)  # a script that resumes by counting its own epochs
    assert [h.start_epoch for h in peer.of_type(Hello)] == [7]
    assert [r.epoch for r in peer.of_type(Report)] == [7]


def test_torch_reduce_lr_on_plateau_state_dict_resumes(peer: ScriptedPeer) -> None:
    """A checkpoint written by torch's own scheduler (last_epoch, _last_lr) loads."""
    ref_opt = two_group_sgd()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, patience=0)
    for value in (1.0, 1.0, 1.0):
        ref.step(value)
    optimizer = two_group_sgd()
    optimizer.load_state_dict(ref_opt.state_dict())
    with LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint) as sched:
        sched.load_state_dict(ref.state_dict())
        assert sched.last_epoch == 3
        sched.step(1.0)
    hello = peer.of_type(Hello)[0]
    assert hello.start_epoch == 3 and hello.lr == pytest.approx(ref.get_last_lr()[0])
    assert [r.epoch for r in peer.of_type(Report)] == [3]


def test_torch_save_and_load_keep_the_epoch_and_reconnect(
    peer: ScriptedPeer, tmp_path: Any
) -> None:
    peer.decide = lambda r: 0.05 if r.epoch == 1 else None
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint)
    for value in (1.0, 0.9):
        sched.step(value)
    path = tmp_path / "sched.pt"
    torch.save(sched, path)  # the socket is left out; the optimizer goes along, as torch's
    sched.close()

    loaded = torch.load(path, weights_only=False)
    assert isinstance(loaded, LRPilotScheduler) and loaded.last_epoch == 2
    assert loaded.get_last_lr() == pytest.approx([0.05])
    loaded.step(0.8)
    loaded.close()
    hellos = peer.of_type(Hello)
    assert [h.start_epoch for h in hellos] == [0, 2] and hellos[1].session != hellos[0].session
    assert [r.epoch for r in peer.of_type(Report)] == [0, 1, 2]


def test_unit_step_reports_every_n_steps_without_waiting(peer: ScriptedPeer) -> None:
    """unit="step": step() after each optimizer step; a decision for step s+1 that has
    arrived is applied at the next step() call (as the Keras callback does)."""
    peer.decide = lambda r: 0.1 * 0.5 ** ((r.step + 1) // 4)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    used: list[float] = []
    with LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step", report_every=2
    ) as sched:
        for step in range(12):
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            sched.step({"loss": 1.0 / (step + 1)}, epoch=step // 6)
            # Wait until this step's report (if any) is answered, so the test is exact.
            assert sched.client.flush(timeout=5)
        hello = peer.of_type(Hello)[0]
    reports = peer.of_type(Report)
    assert [r.step for r in reports] == [1, 3, 5, 7, 9, 11]
    assert [r.epoch for r in reports] == [0, 0, 0, 1, 1, 1]
    # Numbers take no device: each window's mean goes out at its own boundary.
    assert reports[0].metrics == {"loss": pytest.approx((1.0 + 0.5) / 2)}
    assert (hello.start_step, hello.start_epoch) == (0, 0)
    # The answer to the report of step s (for s+1) is not waited for: the next step() call,
    # after step s+1, applies it, from step s+2. Step 3's report lowers the LR from step 5.
    expected = [0.1] * 5 + [0.05] * 4 + [0.025] * 3
    assert used == pytest.approx(expected)


def test_strict_fails_the_first_step_without_a_controller() -> None:
    from lrpilot.client import ControllerUnavailable

    endpoint = free_endpoint()
    model = torch.nn.Linear(1, 1)
    sched = LRPilotScheduler(
        torch.optim.SGD(model.parameters(), lr=0.1),
        job="strict",
        endpoint=endpoint,
        timeout=0.3,
        strict=True,
    )
    with pytest.raises(ControllerUnavailable):
        sched.step(1.0)


# -- LR range tests: snapshot and restore ------------------------------------------------------


def regression() -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(32, 4)
    return model, x, x.sum(dim=1, keepdim=True)


def copy_state(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import copy

    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_same_state(a: Any, b: Any) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    assert model_a.keys() == model_b.keys()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, slots in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][i][k]) for k, v in slots.items())


def train(sched: Any, model: Any, optimizer: Any, x: Any, y: Any, steps: int) -> list[Any]:
    """`steps` full-batch steps; after each `sched.step`: (LR, model state, optimizer state)."""
    out = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        sched.step({"loss": loss.item()})
        out.append((optimizer.param_groups[0]["lr"], copy_state(model, optimizer)))
    return out


def test_a_range_test_restores_the_state_from_before_the_first_optimizer_step(
    peer: ScriptedPeer,
) -> None:
    """The hello comes after the first optimizer step; the copy was made before it, after
    the weights loaded since construction. The restore decided on step 5 applies before
    step 6: model and Adam state as before any training, then the suggested LR."""
    peer.handler = range_test_handler(peer, stop_after=5, suggested=0.003, steps_only=True)
    model, x, y = regression()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step", model=model
    )
    with torch.no_grad():  # e.g. pretrained weights loaded after the scheduler was made
        model[0].weight.mul_(0.5)
    before = copy_state(model, optimizer)
    with sched:
        rows = train(sched, model, optimizer, x, y, steps=9)
    (hello,) = peer.of_type(Hello)
    assert hello.restore and hello.start_step == 0
    assert [lr for lr, _ in rows[:5]] == pytest.approx(
        [1e-4 * 10 ** ((s + 1) / 4) for s in range(5)]
    )
    assert_same_state(rows[5][1], before)  # right after the restore: Adam's state is empty
    assert rows[5][1][1]["state"] == {} and rows[4][1][1]["state"] != {}
    assert [lr for lr, _ in rows[5:]] == pytest.approx([0.003] * 4)
    assert sched.get_last_lr() == pytest.approx([0.003])
    assert [r.step for r in peer.of_type(Report)] == list(range(9))


def test_every_group_keeps_its_ratio_after_a_restore(peer: ScriptedPeer) -> None:
    peer.handler = range_test_handler(peer, stop_after=2, suggested=0.02, steps_only=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[1].parameters(), "lr": 0.01},
        ],
        momentum=0.9,
    )
    x = torch.randn(16, 4)
    with LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step", model=model
    ) as sched:
        assert sched.client.online  # hello before the first step: the sweep's LR from step 0
        assert lrs(optimizer) == pytest.approx([1e-4, 1e-5])
        rows = train(sched, model, optimizer, x, x[:, :1], steps=4)
    assert [lr for lr, _ in rows] == pytest.approx([1e-4 * 10**0.25, 1e-4 * 10**0.5, 0.02, 0.02])
    assert lrs(optimizer) == pytest.approx([0.02, 0.002])


def test_without_a_range_test_the_copy_is_dropped_at_the_hello_reply(peer: ScriptedPeer) -> None:
    model, x, y = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step", model=model
    ) as sched:
        train(sched, model, optimizer, x, y, steps=1)
        assert sched._snapshot is None and not optimizer._optimizer_step_pre_hooks  # freed
        train(sched, model, optimizer, x, y, steps=2)
    assert [h.restore for h in peer.of_type(Hello)] == [True]


def test_without_a_model_the_hello_says_it_cannot_restore(peer: ScriptedPeer) -> None:
    model, x, y = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint, unit="step") as sched:
        train(sched, model, optimizer, x, y, steps=1)
    assert [h.restore for h in peer.of_type(Hello)] == [False]
    assert not optimizer._optimizer_step_pre_hooks


def test_snapshot_and_restore_hooks_replace_the_copy(peer: ScriptedPeer) -> None:
    peer.handler = range_test_handler(peer, stop_after=1, suggested=0.004, steps_only=True)
    model, x, y = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    calls: list[tuple[str, float]] = []
    sched = LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step",
        snapshot_fn=lambda: calls.append(("snapshot", optimizer.param_groups[0]["lr"])),
        restore_fn=lambda: calls.append(("restore", optimizer.param_groups[0]["lr"])),
    )  # fmt: skip
    with sched:
        rows = train(sched, model, optimizer, x, y, steps=3)
    # Before the first optimizer step (at the optimizer's own LR), and at the stop.
    assert calls == [("snapshot", 0.01), ("restore", pytest.approx(1e-4 * 10**0.25))]
    assert [lr for lr, _ in rows] == pytest.approx([1e-4 * 10**0.25, 0.004, 0.004])
    with pytest.raises(ValueError, match="go together"):
        LRPilotScheduler(optimizer, job="j", restore_fn=lambda: None)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        LRPilotScheduler(optimizer, job="j", model=object())  # type: ignore[arg-type]


def test_pickling_keeps_the_model_but_not_the_copy(peer: ScriptedPeer, tmp_path: Any) -> None:
    model, _, _ = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = LRPilotScheduler(optimizer, job="job-a", endpoint=peer.endpoint, model=model)
    path = tmp_path / "sched.pt"
    torch.save(sched, path)  # before the first step: the hook is in the optimizer
    loaded = torch.load(path, weights_only=False)
    state = sched.state_dict()
    assert not {"model", "_snapshot", "snapshot_fn", "restore_fn", "_kept"} & set(state)
    # The unpickled optimizer trains the unpickled model, whose copy was not pickled.
    assert loaded.model is not model and loaded._snapshot is None
    assert loaded.optimizer.param_groups[0]["params"][0] is next(loaded.model.parameters())
    loaded.optimizer.step()  # its copy of the first-step hook does nothing
    loaded.step(1.0)
    loaded.close()
    sched.close()
    assert [h.restore for h in peer.of_type(Hello)] == [True]


def test_a_step_pre_hook_of_someone_else_after_ours_is_fine(peer: ScriptedPeer) -> None:
    """The first-step hook is removed after `optimizer.step()`, not while torch iterates
    over the hooks (which would raise in the training step)."""
    peer.handler = range_test_handler(peer, stop_after=2, suggested=0.02, steps_only=True)
    model, x, y = regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step", model=model
    )
    calls: list[int] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(1))
    before = copy_state(model, optimizer)
    with sched:
        rows = train(sched, model, optimizer, x, y, steps=4)
    assert calls == [1] * 4 and len(optimizer._optimizer_step_pre_hooks) == 1  # ours is gone
    assert_same_state(rows[2][1], before)
