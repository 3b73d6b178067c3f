"""The LR range test as a plan: the trainer runs the sweep, streams its losses, waits once.

The controller sends the sweep once (`lr.plan`, kind `range_test`) with the snapshot; the
client evaluates it at every step with no message and no wait, and reports every step's
loss without waiting for the answer; the controller labels each loss with the LR the report
says it trained at, ends the sweep (divergence, or end_lr) with `action: restore` and the
suggestion, and the trainer applies it at the first step after the answer reaches it.
Policy-level rules are tested without sockets; the rest with a real controller, a real torch
loop written as the README writes it, and a real Keras `fit`. The controller killed mid
sweep: tests/test_reliability.py (`plan`); two gloo ranks restoring at the same step:
tests/test_range_test_e2e.py.
"""

from __future__ import annotations

import math
import random
import traceback
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Controller

from lrpilot.client import Client
from lrpilot.client.plans import check_plan, compiled, lr_at
from lrpilot.controller.admin import Admin
from lrpilot.controller.policies.phases import Phase, Phases
from lrpilot.controller.policies.plateau import Plateau
from lrpilot.controller.policies.range_test import RangeTest, RangeTestState

Factory = Callable[..., Controller]

SWEEP = """\
version: 1
defaults:
  policy: {type: range_test, start_lr: 1.0e-5, steps_per_decade: 20}
"""


#: Where each wait counted came from, for the assertions' messages.
callers: list[str] = []


def count_waits(client: Client) -> list[int]:
    """Every wait of `client` for the controller from now on, as the step it happened at
    (the client's own `_await`, counted where it is called)."""
    waits: list[int] = []
    original = client._await

    def counted(*args: Any, **kwargs: Any) -> None:
        waits.append(client._decisions.step)
        callers.append(" < ".join(f.name for f in traceback.extract_stack(limit=6)[:-1]))
        original(*args, **kwargs)

    client._await = counted  # type: ignore[method-assign]
    return waits


# -- the policy: no sockets ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_the_sweeps_plan_gives_the_policys_lrs_to_the_float(seed: int) -> None:
    rng = random.Random(seed)
    start = 10 ** rng.uniform(-9, -3)
    policy = RangeTest(
        start_lr=start,
        end_lr=min(10.0, start * 10 ** rng.uniform(1, 8)),
        steps_per_decade=rng.choice([5, 10, 20, 40, 7.5]),
        unit=rng.choice(["step", "epoch"]),
    )
    origin = rng.randrange(0, 1000)
    plan = policy.plan(policy.start(0.01, 0), origin)
    assert plan is not None and check_plan(plan) == plan
    assert plan["kind"] == "range_test" and plan["unit"] == policy.unit
    assert (plan["from"], plan["until"]) == (origin, origin + policy.planned)
    at = compiled(plan)
    for i in range(policy.planned):
        want = policy._next_lr(i)
        assert want is not None and at(origin + i) == lr_at(plan, origin + i) == want
    assert policy._next_lr(policy.planned) is None and at(plan["until"]) is None
    assert at(origin - 1) is None if origin else True


def test_a_report_ahead_of_the_sweep_counts_only_when_a_plan_can_have_put_it_there() -> None:
    policy = RangeTest(start_lr=1e-4, steps_per_decade=10)
    state = policy.start(0.01, 0)
    ahead = policy.lr_at(3)
    # An old client (no plans) trains only LRs the controller sent: the current one.
    assert policy.admit(state, 3, [ahead]) is None
    moved = policy.admit(state, 3, [ahead], ahead=True)
    assert isinstance(moved, RangeTestState) and (moved.index, moved.lr) == (3, ahead)
    # Step 2 cannot have run index 3 of a plan that starts at step 0 or later.
    assert policy.admit(state, 2, [ahead], ahead=True) is None
    # The LR from before the test is a trainer that had no plan yet, even where it is one
    # of the sweep's LRs (0.01 is index 20 here).
    assert policy.index_of(0.01) == 20 and policy.admit(state, 40, [0.01], ahead=True) is None
    # Not one of the sweep's LRs, an LR tried already, ranks that disagree: no point.
    assert policy.admit(state, 5, [0.00123], ahead=True) is None
    tried = moved.replace(index=4, lr=policy.lr_at(4))
    assert policy.admit(tried, 5, [ahead], ahead=True) is None
    assert policy.admit(state, 5, [policy.lr_at(3), policy.lr_at(4)], ahead=True) is None


def test_the_plan_moves_only_while_no_point_is_recorded() -> None:
    policy = RangeTest(start_lr=1e-4, steps_per_decade=10)
    state = policy.start(0.01, 0)
    plan = policy.plan(state)
    assert plan is not None and plan["from"] == 0
    # Step 0 trained at the optimizer's LR (the hello came after it): the sweep starts at 1.
    state = policy.missed(state, 0)
    assert policy.plan(state)["from"] == 1  # type: ignore[index]
    fed, _ = policy.step(state, 1, {"loss": 1.0}, {})
    assert isinstance(fed, RangeTestState) and fed.points == ((1e-4, 1.0, 1.0),)
    assert policy.plan(fed) == policy.plan(state)  # the same plan while the sweep runs on it
    assert policy.missed(fed, 2) == fed  # a point is recorded: the sweep stays where it is


def test_after_a_sweep_reports_trained_past_its_last_point_are_no_input_to_the_next_phase() -> None:
    chain = Phases(
        phases=(
            Phase(policy=RangeTest(start_lr=1e-4, steps_per_decade=10)),
            Phase(policy=Plateau(unit="step", monitor="loss", patience=1), lr="suggested"),
        )
    )
    state = chain.start(0.01, 0)
    assert chain.plan(state)["kind"] == "range_test"  # type: ignore[index]
    assert "next" not in chain.plan(state)  # type: ignore[operator]  # nothing known ahead
    t = 0
    while chain.current(state).type == "range_test":
        loss = 1.0 if t < 20 else math.inf
        lr = chain.phases[0].policy.lr_at(t)  # type: ignore[attr-defined]
        admitted = chain.admit(state, t, [lr], ahead=True)
        assert admitted is not None
        state, decision = chain.step(admitted, t, {"loss": loss}, {})
        t += 1
    assert decision.action == "restore" and chain.plan(state) is None
    last = state.range_test["points"][-1][0]  # type: ignore[attr-defined,index]
    # The trainer ran the plan on until the restore reached it: those steps are no input.
    assert chain.admit(state, t, [last * 10**0.1], ahead=True) is None
    assert chain.admit(state, t, [state.lr], ahead=True) is not None


# -- a real controller -------------------------------------------------------------------


def digits() -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    return x, (x @ torch.randn(64, 10, generator=g)).argmax(1)


def test_torch_range_test_written_as_the_readme_says_waits_for_no_reply_per_step(
    controller_factory: Factory,
) -> None:
    """`LRPilotScheduler(opt, model=m, unit="step")` and `sched.step(loss)`: the number is
    the training loss; the sweep runs in the trainer, every step reported, no step waits;
    the curve is the losses the trainer saw at the LRs it trained; status shows the pick."""
    torch = pytest.importorskip("torch")
    from lrpilot.client.torch import LRPilotScheduler

    c = controller_factory(SWEEP)
    x, y = digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sched = LRPilotScheduler(opt, job="readme-sweep", endpoint=c.bind, model=model, unit="step")
    used: list[float] = []
    seen: list[float] = []
    waits: list[int] = []
    restored_at = None
    try:
        for step in range(400):
            i = step * 64 % 448
            used.append(opt.param_groups[0]["lr"])
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            seen.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step(loss)
            if step == 0:
                waits = count_waits(sched.client)  # from the first step of the sweep on
            if sched.client.last_action == "restore":
                restored_at = step
                break
        waits = list(waits)  # the sweep's (the flush below waits, as a run's end does)
        assert sched.client.flush(timeout=10)
        stats = dict(sched.client.stats)
    finally:
        sched.close()
    assert restored_at is not None, "the sweep never ended"
    report = Admin(c.admin).range_test("readme-sweep")
    assert report["done"] and report["stop_reason"] in ("divergence", "end_lr")
    points = report["points"]
    # Step 0 ran at the optimizer's LR before the hello: no point. Steps 1.. ran the sweep.
    assert used[0] == 0.01
    assert [p[0] for p in points] == pytest.approx(
        [1e-5 * 10 ** (t / 20) for t in range(len(points))], rel=1e-12
    )
    assert [[p[0], p[1]] for p in points] == [[used[s], seen[s]] for s in range(1, len(points) + 1)]
    # No step of the sweep waited: at most its last planned step (it began at step 1), for
    # the answer, when the restore had not reached the trainer by then.
    planned = RangeTest(start_lr=1e-5, steps_per_decade=20).planned
    assert set(waits) <= {planned}, (waits, callers)
    assert stats["replies"] >= restored_at and stats["timeouts"] == 0
    assert opt.param_groups[0]["lr"] == pytest.approx(report["suggested_lr"], rel=1e-12)
    (row,) = Admin(c.admin).status()
    assert row["suggested_lr"] == report["suggested_lr"] and row["policy"] == "range_test"


def test_keras_range_test_runs_as_a_plan_with_no_wait_per_step(
    controller_factory: Factory,
) -> None:
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import numpy as np

    from lrpilot.client.keras import LRPilotCallback

    c = controller_factory(SWEEP.replace("1.0e-5", "1.0e-4"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ rng.normal(size=(4, 1))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    callback = LRPilotCallback(job="keras-sweep", endpoint=c.bind, unit="step", timeout=10.0)
    trained: list[tuple[float, float]] = []  # (LR, full-batch loss before the step)
    waits: list[int] = []
    restored: list[int] = []

    class Watch(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if not trained:  # the hello (at the first epoch's begin) has been answered
                assert callback.client is not None
                self.waits = count_waits(callback.client)
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            (w,) = self.model.get_weights()
            trained.append((lr, float(np.mean((x @ w - y) ** 2))))

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if not restored:  # the sweep's waits, up to the step its restore applied at
                waits[:] = self.waits
                if callback.client.last_action == "restore":
                    restored.append(len(trained))

    model.fit(  # every batch is the whole set: full-batch steps, 40 an epoch
        np.tile(x, (40, 1)), np.tile(y, (40, 1)), batch_size=64, epochs=3, shuffle=False,
        verbose=0, callbacks=[callback, Watch()],
    )  # fmt: skip
    report = Admin(c.admin).range_test("keras-sweep")
    assert report["done"] and restored, report["stop_reason"]
    points = report["points"]
    assert len(points) > 20
    # Every point is a step the trainer ran: its LR and the loss of the weights it ran on.
    ran = trained[: len(points)]
    assert [p[0] for p in points] == pytest.approx([lr for lr, _ in ran], rel=1e-6)
    # (Keras' loss is a float32 running mean: each step's own loss is read from it.)
    assert [p[1] for p in points] == pytest.approx([loss for _, loss in ran], rel=1e-3, abs=1e-4)
    # No step of the sweep waited: at most its last planned step, for the answer, when the
    # restore had not reached the trainer by then (the controller is a report or so behind).
    planned = RangeTest(start_lr=1e-4, steps_per_decade=20).planned
    assert set(waits) <= {planned - 1}, (waits, callers)


def test_a_reply_repeating_the_plan_in_force_is_not_checked_again_yet_a_bad_one_is_refused() -> (
    None
):
    from lrpilot.client.errors import ProtocolError
    from lrpilot.client.protocol import encode, parse_server_message

    policy = RangeTest(start_lr=1e-4, steps_per_decade=10)
    plan = policy.plan(policy.start(0.01, 0))
    assert plan is not None

    def reply(plan: dict[str, Any], version: int) -> dict[str, Any]:
        return {
            "t": "lr", "job": "j", "lr": 1e-4, "version": version, "run": 1,
            "reason": "range_test", "seq": version, "apply_from_epoch": None,
            "apply_from_step": version, "plan": plan,
        }  # fmt: skip

    first = parse_server_message(encode(reply(plan, 1)))
    again = parse_server_message(encode(reply(plan, 2)))
    assert first.plan == plan and again.plan is first.plan  # the check's result, reused
    bad = {**plan, "params": {**plan["params"], "steps_per_decade": 0}}
    with pytest.raises(ProtocolError):
        parse_server_message(encode(reply(bad, 3)))
    moved = {**plan, "from": 5, "until": 5 + policy.planned}
    assert parse_server_message(encode(reply(moved, 4))).plan == moved


def test_two_ranks_stream_the_sweep_wait_every_16th_step_and_restore_at_the_same_one(
    controller_factory: Factory,
) -> None:
    """A job of two ranks (two threads in lockstep, as DDP's all-reduce keeps them) streams
    its sweep: a rank waits for an answer only before every 16th step, and the restore that
    ends the sweep (the loss diverges at step 40) applies on both at the first of those
    after it (step 48), though each rank's reply may come at any step before: rank 0 has
    each answer before its next step (it waits for them, as a rank whose replies are quick
    would have them), rank 1 only the answers that came by themselves."""
    import threading

    from lrpilot.client.adapter import SWEEP_SYNC_EVERY, AdapterCore

    c = controller_factory(SWEEP)
    diverges = 40
    barrier = threading.Barrier(2, timeout=20)
    lrs: dict[int, list[float]] = {0: [], 1: []}
    restored: dict[int, list[int]] = {0: [], 1: []}
    waits: dict[int, list[int]] = {}
    failed: list[BaseException] = []

    def rank(r: int) -> None:
        core = AdapterCore(
            job="two-rank-sweep", endpoint=c.bind, timeout=10.0, strict=True, unit="step",
            report_every=1, framework="test",
        )  # fmt: skip
        step = 0

        class Copy:
            def restore(self) -> None:
                restored[r].append(step)

        try:
            core.connect(initial_lr=0.01, start_epoch=0, rank=r, world=2, copy=Copy)
            assert core.client is not None
            if r == 1:
                waits[r] = count_waits(core.client)
            lr = core.begin(epoch=0, step=0)
            for step in range(200):
                lrs[r].append(lr)
                barrier.wait()  # the all-reduce of the step: neither rank runs ahead
                loss = 1.0 if step < diverges else 1e6
                lr = core.step_end(0, step, step, lambda: {"loss": loss})  # noqa: B023
                core.client.poll(step=step + 1)  # the report goes out now, nothing waits
                barrier.wait()
                if r == 0:
                    core.client.flush(timeout=10)  # every answer in hand before the next step
                if restored[r]:
                    break
        except BaseException as exc:  # re-raised by the test
            failed.append(exc)
            barrier.abort()
        finally:
            core.close()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failed, failed
    sync = -(-(diverges + 1) // SWEEP_SYNC_EVERY) * SWEEP_SYNC_EVERY  # 48
    # Both restored in the step_end before step 48, and ran the same LR at every step.
    assert restored == {0: [sync - 1], 1: [sync - 1]}
    assert lrs[0] == lrs[1] and len(lrs[0]) == sync
    assert lrs[0] == pytest.approx([1e-5 * 10 ** (t / 20) for t in range(sync)], rel=1e-12)
    # Rank 1 waits before step 16, 32 and 48 only (the reports of steps 15, 31 and 47).
    assert waits == {1: [15, 31, 47]}, (waits, callers)
    report = Admin(c.admin).range_test("two-rank-sweep")
    assert report["done"] and report["stop_reason"] == "divergence"
    assert len(report["points"]) == diverges + 1  # steps 0..40, the mean of both ranks
