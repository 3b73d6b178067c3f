"""Phases as plans: the next phase's plan is sent ahead, so every rank switches exactly.

A chain warmup → cosine per step against a real controller and real clients: the LR each
client sets at every step equals the engine's (`lrpilot simulate` folds the same
transitions), across the phase boundary too, with no message at the boundary; with the
controller SIGKILLed in the warmup the switch still happens at its step; two ranks switch
at the same step.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import Controller

from lrpilot.client import Client, plans
from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import SESSION_BYTES, Hello
from lrpilot.controller.policyfile import load_text
from lrpilot.controller.simulate import History, run
from lrpilot.controller.transitions import Env, plan_of, step

Factory = Callable[..., Controller]

# The warmup ends at step 95, between two reports (report_every 10): no reply can arrive
# at the boundary in time, only the plan sent ahead can make the switch there.
BOUNDARY = 95
STEPS = 300
CHAIN = f"""\
version: 1
defaults:
  phases:
    - {{type: warmup, unit: step, to_lr: 0.1, epochs: {BOUNDARY}, from_lr: 0.001}}
    - {{type: cosine, unit: step, decay_steps: 150, alpha: 0.01}}
"""


def engine_lrs(text: str, steps: int, lr0: float) -> list[float]:
    """The LR of every step 0..steps-1 as the controller's engine decides it (`simulate`:
    a report every step, each reply the LR from the next step)."""
    rule = load_text(text, "chain.yaml").defaults
    history = History("chain", (0,) * steps, tuple(range(steps)), ({"loss": 1.0},) * steps, None)
    replay = run(rule, history, lr0)
    return [replay.start_lr] + [row.lr for row in replay.rows[:-1]]


def train(
    clients: list[Client], steps: int, kill_at: int | None = None, c: Controller | None = None
) -> list[list[float]]:
    """Every client sets the LR of each step from its plan (lockstep ranks), reports the
    loss every 10 steps without waiting; the LRs each one used, per step."""
    used: list[list[float]] = [[] for _ in clients]
    for t in range(steps):
        for rank, client in enumerate(clients):
            used[rank].append(client.lr_at(step=t))
            if (t + 1) % 10 == 0:
                client.report(0, {"loss": 1.0 / (t + 1)}, step=t, wait=False)
        if t == kill_at and c is not None:
            for client in clients:
                assert client.flush(10)  # the controller answered every report so far
            c.kill()
    for client in clients:
        client.poll()  # the last reports go out (ranks wait for each other's)
    return used


def test_the_engine_and_the_plan_sent_ahead_agree() -> None:
    rule = load_text(CHAIN, "chain.yaml").defaults
    env = Env(now=0.0, wall=0.0, rules=lambda _name: rule)
    start = step(None, Hello("j", 0, 1, bytes(SESSION_BYTES), 0.001, 0, plans=True), env)
    assert start is not None and start.job is not None
    plan = plan_of(start.job)
    assert plan is not None and plan["kind"] == "warmup" and plan["until"] == BOUNDARY
    ahead = plan["next"]
    assert ahead["kind"] == "cosine" and ahead["from"] == BOUNDARY and ahead["until"] is None
    assert ahead["lr0"] == 0.1  # the LR the warmup leaves: `lr: previous`
    assert plans.check_plan(plan) == plan  # it crosses the wire as it is
    expected = engine_lrs(CHAIN, STEPS, 0.001)
    assert [plans.lr_at(plan, t) for t in range(STEPS)] == expected
    at = plans.compiled(plan)
    assert [at(t) for t in range(STEPS)] == expected


def test_every_step_follows_the_engine_across_the_boundary(controller_factory: Factory) -> None:
    c = controller_factory(CHAIN)
    expected = engine_lrs(CHAIN, STEPS, 0.001)
    client = Client(c.bind, "chain-one", initial_lr=0.001, timeout=5.0)
    try:
        assert client.plan is not None and client.plan["next"]["from"] == BOUNDARY
        used = train([client], STEPS)[0]
        assert client.flush(10)  # every report answered: the controller saw the phase change
    finally:
        client.close()
    assert used == expected
    assert used[BOUNDARY - 1] < used[BOUNDARY] == 0.1 > used[BOUNDARY + 1]  # it did switch
    assert c.log().count("job chain-one: lr ") == 2  # one line per plan: warmup, cosine


def test_the_switch_happens_while_the_controller_is_down(controller_factory: Factory) -> None:
    c = controller_factory(CHAIN)
    client = Client(c.bind, "chain-kill", initial_lr=0.001, timeout=0.5)
    try:
        used = train([client], STEPS, kill_at=49, c=c)[0]
        assert c.proc is not None and c.proc.returncode == -9  # SIGKILLed at step 49
    finally:
        client.close()
    assert used == engine_lrs(CHAIN, STEPS, 0.001)


def test_two_ranks_switch_at_the_same_step(controller_factory: Factory) -> None:
    c = controller_factory(CHAIN)
    ranks = [
        Client(c.bind, "chain-two", initial_lr=0.001, timeout=5.0, rank=r, world=2)
        for r in range(2)
    ]
    try:
        for client in ranks:
            assert client.plan is not None and client.plan["next"]["from"] == BOUNDARY
        used = train(ranks, STEPS)
    finally:
        for client in ranks:
            client.close()
    expected = engine_lrs(CHAIN, STEPS, 0.001)
    assert used[0] == used[1] == expected
    first_cosine = [next(t for t, lr in enumerate(u) if lr == 0.1) for u in used]
    assert first_cosine == [BOUNDARY, BOUNDARY]


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"from": 90}, "parent's until"),
        ({"unit": "epoch"}, "parent's until"),
        ({"kind": "nope"}, "unknown plan kind"),
    ],
)
def test_a_plan_sent_ahead_that_does_not_follow_on_is_refused(
    bad: dict[str, object], why: str
) -> None:
    plan = {"kind": "constant", "params": {}, "unit": "step", "from": 0, "until": 95, "lr0": 0.1}
    ahead = {**plan, "from": 95, "until": None, **bad}
    with pytest.raises(ProtocolError, match=why):
        plans.check_plan({**plan, "next": ahead})
    with pytest.raises(ProtocolError, match="parent's until"):
        plans.check_plan({**plan, "until": None, "next": {**plan, "from": 95, "until": None}})
