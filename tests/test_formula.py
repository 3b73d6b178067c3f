"""`type: formula`: the seeds' Keras lambda as a policy, checked at load time, safe at run time."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from lrpilot.controller.errors import PolicyError
from lrpilot.controller.policies import Formula, Phases, Policy, float32
from lrpilot.controller.policyfile import load_text

SEED = "1e-8 * 10 ** (epoch / 20)"
EPOCHS = 100


def seed_lambda(epoch: int) -> float:
    return 1e-8 * 10 ** (epoch / 20)


def policy_of(yaml_policy: str) -> Policy:
    text = f"version: 1\ndefaults:\n  policy: {yaml_policy}\n"
    return load_text(text, "policy.yaml").defaults.policy


def engine_lrs(policy: Policy, losses: list[float], lr0: float = 0.001) -> list[float]:
    """The LR in force at each epoch, as the daemon hands them out: hello, then per report."""
    state = policy.start(lr0, 0)
    out = [state.lr]
    for epoch, loss in enumerate(losses[:-1]):
        state, decision = policy.step(state, epoch, {"loss": loss}, {})
        out.append(decision.lr)
    return out


@pytest.fixture(scope="module")
def keras_run() -> tuple[list[float], list[float]]:
    """A real fit with the seeds' LearningRateScheduler: the LR each epoch ran with, the loss."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    keras = pytest.importorskip("keras")
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5], dtype="float32") + 0.3).astype("float32")
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), loss="mse")
    used: list[float] = []

    class ReadLR(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if batch == 0:  # the LR the optimizer really holds for this epoch's updates
                used.append(float(np.asarray(self.model.optimizer.learning_rate)))

    history = model.fit(
        x,
        y,
        epochs=EPOCHS,
        batch_size=64,
        verbose=0,
        callbacks=[
            keras.callbacks.LearningRateScheduler(lambda epoch: 1e-8 * 10 ** (epoch / 20)),
            ReadLR(),
        ],
    )
    return used, [float(v) for v in history.history["loss"]]


def test_the_seed_formula_equals_keras_learning_rate_scheduler(
    keras_run: tuple[list[float], list[float]],
) -> None:
    used, losses = keras_run
    got = engine_lrs(policy_of(f'{{type: formula, lr: "{SEED}"}}'), losses)
    assert len(got) == len(used) == EPOCHS
    assert got == [seed_lambda(e) for e in range(EPOCHS)]  # the lambda's value, to the float
    assert [float32(lr) for lr in got] == used  # what Keras' float32 variable holds


def test_a_range_test_by_epoch_gives_the_same_lrs(
    keras_run: tuple[list[float], list[float]],
) -> None:
    used, losses = keras_run
    policy = policy_of("{type: range_test, unit: epoch}")
    got = engine_lrs(policy, losses)
    assert got == [seed_lambda(e) for e in range(EPOCHS)]
    assert [float32(lr) for lr in got] == used


# -- load-time checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("formula", "fragment"),
    [
        ("__import__('os').system('true')", "attribute access (.system) is not allowed"),
        ("__import__('os')", "unknown function '__import__'"),
        ("().__class__", "attribute access (.__class__) is not allowed"),
        ("lr0.real", "attribute access (.real) is not allowed"),
        ("lr0 * (1 +", "invalid syntax"),
        ("lr0 * decay", "unknown name 'decay'; names: t, epoch, lr0, lr, pi, e"),
        ("lr0 * pow(2, t)", "unknown function 'pow'"),
        ("exp", "exp is a function: call it"),
        ("lr0 * exp(-0.1, t)", "exp takes 1 argument, got 2"),
        ("min(lr0)", "min takes at least 2 arguments, got 1"),
        ("'0.1'", "only numbers may appear"),
        ("[lr0][0]", "indexing is not allowed"),
        ("(lambda: lr0)()", "lambda is not allowed"),
        ("lr0 | 1", "operator | is not allowed"),
        ("lr0 * step", "step is not known with unit: epoch; use epoch or t"),
        ("", "empty formula"),
    ],
)
def test_check_reports_bad_formulas_with_their_line(formula: str, fragment: str) -> None:
    text = f"version: 1\ndefaults:\n  policy:\n    type: formula\n    lr: {formula!r}\n"
    with pytest.raises(PolicyError) as info:
        load_text(text, "policy.yaml")
    (error,) = info.value.errors
    assert error.line == 5 and fragment in error.message, error.located()
    assert error.located().startswith("policy.yaml:5: lr is not a valid formula: ")


def test_lrpilot_check_rejects_import_and_attribute_access(
    write: Callable[[str, str], Path],
) -> None:
    path = write(
        "policy.yaml",
        textwrap.dedent(
            """\
            version: 1
            defaults:
              policy: {type: formula, lr: "1e-3"}
            jobs:
              - match: "a-*"
                policy: {type: formula, lr: "__import__('os').getcwd() and 0.1"}
              - match: "b-*"
                phases:
                  - {type: warmup, to_lr: 0.1, epochs: 2}
                  - {type: formula, lr: "().__class__.__base__ and lr0"}
            """
        ),
    )
    result = run_cli("check", str(path))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert any(
        ln.startswith(f"{path}:6: lr is not a valid formula: attribute access") for ln in lines
    )
    assert any(
        ln.startswith(f"{path}:10: lr is not a valid formula: attribute access") for ln in lines
    )
    assert f"{path}: ok" not in result.stdout


def test_valid_formulas_pass_check(write: Callable[[str, str], Path]) -> None:
    path = write(
        "policy.yaml",
        textwrap.dedent(
            """\
            version: 1
            defaults:
              policy: {type: formula, lr: "1e-8 * 10 ** (epoch / 20)"}
            jobs:
              - match: "decay-*"
                policy: {type: formula, lr: "lr0 / (1 + 0.01 * epoch)", initial_lr: 0.1}
              - match: "piecewise-*"
                policy: {type: formula, lr: "lr0 if t < 10 else lr0 * exp(-0.1 * (t - 10))"}
              - match: "steps-*"
                policy: {type: formula, unit: step, lr: "max(1e-5, lr * 0.999) + 0 * step"}
            """
        ),
    )
    result = run_cli("check", str(path))
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == f"{path}: ok"


def test_epoch_is_not_known_with_unit_step() -> None:
    with pytest.raises(PolicyError) as info:
        policy_of('{type: formula, unit: step,\n    lr: "lr0 * 0.9 ** epoch"}')
    assert "epoch is not known with unit: step; use step or t" in str(info.value)


# -- run time --------------------------------------------------------------------------------


def run(policy: Policy, n: int, lr0: float = 0.1) -> list[tuple[float, Any]]:
    state = policy.start(lr0, 0)
    out = []
    for t in range(n):
        state, d = policy.step(state, t, {}, {})
        out.append((d.lr, d))
    return out


def test_names_and_functions() -> None:
    steps = run(Formula(lr="lr0 / (1 + 0.5 * t) + 0 * epoch"), 4, lr0=0.1)
    assert [lr for lr, _ in steps] == [0.1 / (1 + 0.5 * t) for t in range(1, 5)]
    policy = Formula(lr="lr * 0.5")  # `lr` is the LR in force: lambda epoch, lr: lr * 0.5
    assert policy.start(0.8, 0).lr == 0.4  # Keras, too, applies it at epoch 0
    assert [lr for lr, _ in run(policy, 3, lr0=0.8)] == [0.2, 0.1, 0.05]
    f = Formula(
        lr="min(lr0, 1e-3 * sqrt(t + 1)) * (1 + 0 * (floor(pi) + ceil(e) + sin(0) + cos(0)"
        " + log(e) + log10(10) + log(8, 2) + max(1, 2, 3)))"
    )
    assert f.evaluate(3, 0.1, 0.1) == pytest.approx(1e-3 * 2)
    assert Formula(lr="3 if t < 2 else 5").evaluate(2, 0.1, 0.1) == 5.0


def test_a_value_outside_the_lr_range_is_clamped_with_a_notice() -> None:
    steps = run(Formula(lr="lr0 * 10 ** t"), 3, lr0=0.1)  # 1, 10, 100
    assert [lr for lr, _ in steps] == [1.0, 10.0, 10.0]
    assert steps[0][1].notice is None
    clamped = steps[2][1]
    assert clamped.notice == "clamped" and clamped.lr == 10.0
    assert clamped.warning is not None and "clamped to 10" in clamped.warning
    low = run(Formula(lr="lr0 - 0.05 * t"), 3, lr0=0.1)  # 0.05, 0, -0.05
    assert low[0][0] == pytest.approx(0.05) and low[0][1].notice is None
    assert [lr for lr, _ in low[1:]] == [1e-12, 1e-12]
    assert low[1][1].notice == "clamped"


@pytest.mark.parametrize(
    "formula", ["lr0 / (3 - t)", "lr0 + 0 * log(3 - t)", "lr0 * exp(1000 * t)", "(t - 3) ** 0.5"]
)
def test_a_failing_or_non_finite_value_keeps_the_lr(formula: str) -> None:
    policy = Formula(lr=formula)
    steps = run(policy, 4, lr0=0.1)
    bad = next(d for _, d in steps if d.warning)
    assert "gave no usable LR" in bad.warning and bad.notice is None
    index = [d for _, d in steps].index(bad)
    before = steps[index - 1][0] if index else policy.start(0.1, 0).lr
    assert bad.lr == before and bad.event is None
    assert all(math.isfinite(lr) and 0 < lr <= 10 for lr, _ in steps)


def test_a_huge_power_is_computed_in_floating_point() -> None:
    # Integer arithmetic would build numbers of millions of digits; floats overflow at once.
    assert run(Formula(lr="lr0 * 0 ** (10 ** 10 * t) + 1e-3"), 2)[0][0] == 1e-3
    (lr, decision), _ = run(Formula(lr="1e-3 if t < 1 else 4000000 ** 4000000"), 2)
    assert decision.warning is not None and "gave no usable LR (OverflowError" in decision.warning
    assert lr == 1e-3 and Formula(lr="floor(7.5) // 2").evaluate(0, 0.1, 0.1) == 3.0


@pytest.mark.parametrize(
    ("formula", "fragment"),
    [
        ("4000000**4000000", "gives no finite value for any t in 0..10000"),
        ("max(9**4000000, 1)", "gives no finite value for any t in 0..10000"),
        ("lr0 / 0", "gives no finite value"),
        (
            "max(" + ",".join(["max(" + ",".join(["sin(t)"] * 64) + ")"] * 64) + ")",
            "a formula must evaluate within 1 ms",
        ),
    ],
    ids=["power-bomb", "max-bomb", "never-finite", "slow"],
)
def test_check_rejects_formulas_that_would_stall_the_loop(
    write: Callable[[str, str], Path], formula: str, fragment: str
) -> None:
    # The bombs of issue 15: accepted by check, they held every job's replies up to 52.8 s.
    path = write(
        "policy.yaml",
        "version: 1\njobs:\n  - match: 'a-*'\n    policy:\n      type: formula\n"
        f"      lr: {formula!r}\n  - match: '*'\n    policy: {{type: formula, lr: '1e-3'}}\n",
    )
    result = run_cli("check", str(path))
    assert result.returncode == 2, result.stdout
    (line,) = [ln for ln in result.stdout.splitlines() if ln.startswith(f"{path}:")]
    assert line.startswith(f"{path}:6: formula ") and fragment in line, line


def test_an_override_keeps_the_formulas_shape() -> None:
    policy = Formula(lr="lr0 * 0.5 ** t")
    state = policy.start(0.8, 0)
    state, _ = policy.step(state, 0, {}, {})
    state = policy.rebase(state, 0.1, 0)  # an operator: 0.1 from t=1 (the formula said 0.4)
    lrs = []
    for t in range(1, 4):
        state, d = policy.step(state, t, {}, {})
        lrs.append(d.lr)
    assert lrs == pytest.approx([0.05, 0.025, 0.0125])


def test_a_formula_phase_starts_from_the_lr_the_previous_phase_left() -> None:
    chain = load_text(
        textwrap.dedent(
            """\
            version: 1
            defaults:
              phases:
                - {type: warmup, from_lr: 0.01, to_lr: 0.1, epochs: 2}
                - {type: formula, lr: "lr0 * 0.5 ** t"}
            """
        ),
        "policy.yaml",
    ).defaults.policy
    assert isinstance(chain, Phases) and isinstance(chain.phases[1].policy, Formula)
    lrs = run(chain, 5, lr0=0.01)
    assert [lr for lr, _ in lrs] == pytest.approx([0.055, 0.1, 0.05, 0.025, 0.0125])
