"""`type: formula` as a plan: a formula that does not read `lr` runs in the trainer.

The client evaluates it with the checker and simpleeval evaluator the controller uses
(`lrpilot.client.expression`), never Python's `eval`; its LRs equal the engine's on
generated formulas (including ones that fail at some `t` and keep the LR in force), a
formula that reads `lr` stays per report, a plan the checker refuses is a `schema` error,
and the plan goes on exactly with the controller SIGKILLed.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Controller, Wire

import lrpilot.client
from lrpilot.client import Client, plans
from lrpilot.client.errors import ProtocolError
from lrpilot.controller.policies import Formula, Phases, State
from lrpilot.controller.policies.phases import Phase
from lrpilot.controller.policies.warmup import Warmup

Factory = Callable[..., Controller]

PIECES = [
    "lr0 * 0.5 ** floor({t} / {a})",
    "lr0 / (1 + {b} * {t})",
    "lr0 * exp(-{b} * {t})",
    "1e-8 * 10 ** ({t} / {a})",
    "lr0 * (0.5 + 0.5 * cos(pi * min({t}, {a}) / {a}))",
    "lr0 * min(1, ({t} + 1) / {a})",
    "lr0 / sqrt(max({t}, 1))",
    "lr0 * log({t}) / {a}",  # log(0) fails: the LR in force stays
    "lr0 if {t} < {a} else lr0 / 10",
    "lr0 * 10 ** ({a} - {t})",  # grows past 10 until it is clamped
]


def formulas(rng: random.Random, unit: str) -> list[str]:
    """Every piece with generated constants, in `t` or in the unit's own name."""
    return [
        text.format(
            a=rng.randint(1, 40),
            b=round(rng.uniform(0.001, 0.3), 4),
            t=rng.choice(["t", unit]),
        )
        for text in PIECES
    ]


def follow(policy: Formula | Phases, lr0: float, n: int) -> None:
    """Step the engine for n reports; the client's compiled plan gives every LR too, as a
    client that got the plan at its start and no message after."""
    state: State = policy.start(lr0, 0)
    plan = policy.plan(state)
    assert plan is not None
    assert plans.check_plan(plan) == plan
    at = plans.compiled(plan)
    lr = state.lr
    for t in range(n):
        state, decision = policy.step(state, t, {}, {})
        value = at(t + 1)
        lr = lr if value is None else value
        assert lr == decision.lr == state.lr, (plan["params"], t + 1)


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_a_formula_plan_equals_the_engine_on_generated_formulas(unit: str) -> None:
    rng = random.Random(f"formula-{unit}")
    for _ in range(4):
        for text in formulas(rng, unit):
            follow(Formula(lr=text, unit=unit), rng.choice([0.1, 3e-4, 1.0]), 120)


def test_a_formula_phase_is_sent_ahead_of_the_warmup_before_it() -> None:
    chain = Phases(
        phases=(
            Phase(Warmup(unit="step", to_lr=0.1, epochs=20), until=20),
            Phase(Formula(unit="step", lr="lr0 * 0.9 ** floor(step / 5)")),
        )
    )
    plan = chain.plan(chain.start(0.001, 0))
    assert plan is not None and plan["next"]["kind"] == "formula"
    assert plan["next"]["from"] == 20 and plan["next"]["lr0"] == 0.1
    follow(chain, 0.001, 200)


def test_a_formula_that_reads_lr_is_decided_per_report() -> None:
    policy = Formula(lr="lr * 0.95")
    assert policy.plan(policy.start(0.1, 0)) is None
    assert Formula(lr="lr0 * 0.95 ** t", apply=False).plan(policy.start(0.1, 0)) is None


@pytest.mark.parametrize(
    "text, unit, why",
    [
        ("__import__('os').system('true')", "step", "attribute access"),
        ("__import__('os')", "step", "unknown function '__import__'"),
        ("(1).__class__", "step", "attribute access"),
        ("lr * 0.5", "step", "may not read lr"),
        ("lr0 * epoch", "step", "epoch is not known"),
        ("lr0 +", "epoch", "invalid syntax"),
    ],
)
def test_a_formula_plan_the_checker_refuses_is_a_schema_error(
    text: str, unit: str, why: str
) -> None:
    plan = {"kind": "formula", "unit": unit, "from": 0, "until": None, "lr0": 0.1}
    with pytest.raises(ProtocolError, match=why) as info:
        plans.check_plan({**plan, "params": {"lr": text, "unit": unit}})
    assert info.value.code == "schema"
    with pytest.raises(ProtocolError, match="lr: text, unit"):
        plans.check_plan({**plan, "params": {"lr": "lr0", "unit": "other"}})


def test_the_client_never_calls_python_eval() -> None:
    banned = {"eval", "exec", "compile", "__import__"}
    for path in sorted(Path(lrpilot.client.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in banned, f"{path.name}:{node.lineno} {node.func.id}"


FORMULA = """\
version: 1
defaults:
  policy: {type: formula, unit: step, lr: "lr0 * 0.5 ** floor(step / 7) + 1e-4 * sin(step)"}
"""


def test_a_formula_plan_goes_on_exactly_while_the_controller_is_down(
    controller_factory: Factory,
) -> None:
    c = controller_factory(FORMULA)
    policy = Formula(unit="step", lr="lr0 * 0.5 ** floor(step / 7) + 1e-4 * sin(step)")
    expected, state = [], policy.start(0.1, 0)
    for t in range(80):
        expected.append(state.lr)
        state, _ = policy.step(state, t, {}, {})
    client = Client(c.bind, "formula-kill", initial_lr=0.1, timeout=0.5)
    used = []
    try:
        assert client.plan is not None and client.plan["kind"] == "formula"
        for t in range(80):
            used.append(client.lr_at(step=t))
            if (t + 1) % 10 == 0:
                client.report(0, {"loss": 1.0}, step=t, wait=False)
            if t == 29:
                assert client.flush(10)
                c.kill()
    finally:
        client.close()
    assert used == expected
    assert c.log().count("job formula-kill: lr ") == 1  # one line for the plan


def test_a_peer_without_plans_gets_the_formula_per_report(controller_factory: Factory) -> None:
    c = controller_factory(FORMULA)
    peer = Wire(c.bind, "formula-old")
    try:
        assert peer.hello(lr=0.1).plan is None
        answer = peer.report(0, {"loss": 1.0}, lr=0.1, step=0)
        assert answer.plan is None and answer.apply_from_step == 1
    finally:
        peer.close()


def test_no_phase_is_sent_ahead_of_a_formula_that_gives_no_lr_at_its_end() -> None:
    chain = Phases(
        phases=(
            Phase(Formula(unit="step", lr="lr0 / (20 - step)"), until=20),  # 1/0 at step 20
            Phase(Warmup(unit="step", to_lr=0.1, epochs=10), until=10),
            Phase(Formula(unit="step", lr="lr0")),
        )
    )
    plan = chain.plan(chain.start(0.01, 0))
    assert plan is not None and plan["kind"] == "formula" and "next" not in plan
