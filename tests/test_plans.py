"""Plans: a schedule's plan, evaluated by the client, equals the controller's LR at every t.

Each test draws schedule parameters from a seeded generator, runs the controller's engine
(hello, then one decision per report, as the daemon does) and evaluates the plan the engine
exposes with `lrpilot.client.plans.lr_at`, as a client with `plans: true` does at every
boundary; for a few kinds the plan is also compared with torch's and Keras' own schedulers.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import pytest

from lrpilot.client import plans
from lrpilot.client.errors import ProtocolError
from lrpilot.controller.policies import POLICY_TYPES, Phase, Phases, Policy, Schedule, State

#: Every deterministic schedule type and a generator of its parameters.
GENERATORS: dict[str, Any] = {
    "step": lambda r: {"factor": r.choice([0.1, 0.5, 0.9]), "step_size": r.randint(1, 30)},
    "multistep": lambda r: {
        "milestones": sorted(r.sample(range(1, 200), r.randint(1, 5))),
        "factor": r.choice([0.1, 0.3]),
    },
    "exponential": lambda r: (
        {"k": r.uniform(0, 0.05)}
        if r.random() < 0.3
        else {
            "decay_rate": r.uniform(0.5, 0.999),
            "decay_steps": r.randint(1, 50),
            "staircase": r.random() < 0.5,
        }
    ),
    "inverse_time": lambda r: {
        "decay_rate": r.uniform(0, 2),
        "decay_steps": r.randint(1, 20),
        "staircase": r.random() < 0.5,
    },
    "cosine": lambda r: {"decay_steps": r.randint(1, 300), "alpha": r.uniform(0, 0.5)},
    "warmup": lambda r: {"to_lr": r.uniform(1e-4, 1), "epochs": r.randint(1, 50)},
    "constant": lambda r: {"lr": r.uniform(1e-4, 1)} if r.random() < 0.5 else {},
    "one_cycle": lambda r: {
        "total_steps": r.randint(20, 400),
        "pct_start": r.uniform(0.1, 0.45),
        "anneal": r.choice(["cos", "linear"]),
        "three_phase": r.random() < 0.5,
        "div_factor": r.choice([25.0, 10.0]),
        "max_lr": r.choice([None, 0.1, 1.0]),
    },
    "cyclic": lambda r: {
        "base_lr": (b := r.uniform(1e-4, 0.01)),
        "max_lr": b * r.uniform(1, 100),
        "step_size_up": r.randint(1, 40),
        "step_size_down": r.choice([None, r.randint(1, 40)]),
        "mode": r.choice(["triangular", "triangular2", "exp_range"]),
        "gamma": r.uniform(0.99, 1.0),
    },
    "cosine_restarts": lambda r: {
        "first_decay_steps": r.randint(1, 40),
        "t_mul": r.choice([1.0, 2.0, 1.5]),
        "m_mul": r.uniform(0.5, 1),
        "alpha": r.uniform(0, 0.3),
    },
    "polynomial": lambda r: {
        "decay_steps": r.randint(1, 200),
        "end_lr": r.uniform(0, 1e-3),
        "power": r.uniform(0.5, 3),
        "cycle": r.random() < 0.3,
    },
    "piecewise": lambda r: {
        "boundaries": (bs := sorted(r.sample(range(0, 300), r.randint(1, 5)))),
        "values": [r.uniform(1e-4, 1) for _ in range(len(bs) + 1)],
    },
}


def make(kind: str, params: dict[str, Any], unit: str = "step") -> Policy:
    policy = POLICY_TYPES[kind](unit=unit, **params)
    assert not policy.problems(), (kind, params, policy.problems())
    return policy


def engine_and_plan(policy: Policy, lr0: float, n: int, start: int = 0) -> None:
    """Step the engine from `start` for n reports; the plan in force gives each LR too."""
    state: State = policy.start(lr0, start)
    plan = policy.plan(state)
    assert plan is not None
    assert plans.check_plan(plan) == plan  # what goes on the wire comes back the same
    assert plans.lr_at(plan, start) == state.lr
    for t in range(start, start + n):
        state, decision = policy.step(state, t, {}, {})
        now = policy.plan(state)
        assert now is not None
        if now != plan:  # a phase ended: its plan ends where the next one starts
            assert plan["until"] == t + 1 == now["from"], (plan, now)
            plan = now
        assert plans.active(plan, t + 1)
        assert plans.lr_at(plan, t + 1) == decision.lr == state.lr, (policy, t + 1)


def test_every_deterministic_schedule_type_has_a_plan_kind() -> None:
    schedules = {k for k, cls in POLICY_TYPES.items() if issubclass(cls, Schedule)}
    assert schedules == set(GENERATORS)
    # formulas: tests/test_plans_formula.py; the range test's sweep: test_range_test_plan.py
    assert set(plans.KINDS) == schedules | {"formula", "range_test"}


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_plan_equals_the_engine_on_generated_schedules(kind: str) -> None:
    rng = random.Random(f"plans-{kind}")
    for _ in range(12):
        policy = make(kind, GENERATORS[kind](rng))
        engine_and_plan(policy, rng.choice([0.1, 3e-4, 1.0]), 350, start=rng.choice([0, 0, 17]))


def test_plan_after_an_override_keeps_the_scale() -> None:
    policy = make("exponential", {"decay_rate": 0.9, "decay_steps": 3})
    state = policy.rebase(policy.start(0.1, 0), 0.5, 10)  # set-lr 0.5 from t = 11
    plan = policy.plan(state)
    assert plan is not None and plan["scale"] != 1.0
    for t in range(11, 60):
        state, decision = policy.step(state, t, {}, {})
        assert plans.lr_at(plan, t + 1) == decision.lr


def test_phases_plan_each_phase_with_its_span() -> None:
    rng = random.Random(7)
    for _ in range(8):
        warm = rng.randint(1, 30)
        phases = Phases(
            unit="step",
            phases=(
                Phase(make("warmup", {"to_lr": 0.3, "epochs": warm}), until=warm),
                Phase(make("cosine", GENERATORS["cosine"](rng)), until=rng.randint(5, 100)),
                Phase(make("step", GENERATORS["step"](rng))),
            ),
        )
        engine_and_plan(phases, 0.01, 300)


def test_policies_that_need_reports_have_no_plan() -> None:
    plateau = POLICY_TYPES["plateau"](monitor="loss")
    assert plateau.plan(plateau.start(0.1, 0)) is None
    shadow = POLICY_TYPES["step"](factor=0.5, step_size=2, apply=False)
    assert shadow.plan(shadow.start(0.1, 0)) is None


def test_check_plan_refuses_what_it_cannot_evaluate() -> None:
    policy = make("step", {"factor": 0.5, "step_size": 2})
    good = policy.plan(policy.start(0.1, 0))
    assert good is not None
    for bad in (
        {**good, "kind": "nope"},
        {**good, "params": {}},
        {**good, "lr0": -1.0},
        {**good, "until": 0},
        {**good, "from": -3},
        [],
    ):
        with pytest.raises(ProtocolError):
            plans.check_plan(bad)


# -- against the frameworks' own schedulers ------------------------------------------------


def _torch_lrs(make_sched: Any, lr0: float, n: int) -> list[float]:
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0, momentum=0.9)
    sched = make_sched(opt)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


def _plan_lrs(kind: str, params: dict[str, Any], lr0: float, n: int) -> list[float]:
    policy = make(kind, params)
    plan = policy.plan(policy.start(lr0, 0))
    assert plan is not None
    return [plans.lr_at(plan, t) for t in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_plans_equal_torch_schedulers(seed: int) -> None:
    torch = pytest.importorskip("torch")
    s = torch.optim.lr_scheduler
    rng = random.Random(seed)
    lr0, n = rng.choice([0.1, 0.01]), 300
    gamma, size = rng.uniform(0.9, 0.999), rng.randint(1, 20)
    assert _plan_lrs(
        "exponential", {"decay_rate": gamma, "decay_steps": 1}, lr0, n
    ) == pytest.approx(_torch_lrs(lambda o: s.ExponentialLR(o, gamma), lr0, n), rel=1e-9)
    assert _plan_lrs("step", {"factor": gamma, "step_size": size}, lr0, n) == pytest.approx(
        _torch_lrs(lambda o: s.StepLR(o, size, gamma), lr0, n), rel=1e-9
    )
    total = rng.randint(50, 300)
    pct = rng.uniform(0.1, 0.5)
    assert _plan_lrs(
        "one_cycle", {"total_steps": total, "pct_start": pct, "max_lr": lr0}, lr0, total
    ) == pytest.approx(
        _torch_lrs(lambda o: s.OneCycleLR(o, lr0, total_steps=total, pct_start=pct), lr0, total),
        rel=1e-9,
    )


@pytest.mark.parametrize("seed", range(4))
def test_plans_equal_keras_schedules(seed: int) -> None:
    keras = pytest.importorskip("keras")
    rng = random.Random(seed)
    lr0, n = rng.choice([0.1, 0.01]), 200
    rate, steps = rng.uniform(0.5, 0.99), rng.randint(1, 30)
    decay = rng.randint(10, 300)
    pairs = [
        (
            _plan_lrs("exponential", {"decay_rate": rate, "decay_steps": steps}, lr0, n),
            keras.optimizers.schedules.ExponentialDecay(lr0, steps, rate),
        ),
        (
            _plan_lrs("cosine", {"decay_steps": decay}, lr0, n),
            keras.optimizers.schedules.CosineDecay(lr0, decay),
        ),
    ]
    for ours, theirs in pairs:
        expected = [float(theirs(t)) for t in range(n)]
        assert ours == pytest.approx(expected, rel=2e-6, abs=2e-6 * lr0)  # Keras: float32
