"""Plateau decisions equal Keras' and PyTorch's own ReduceLROnPlateau on generated sequences.

Both frameworks run for real in the same test: Keras' callback drives a
compiled model's optimizer, torch's scheduler drives an SGD optimizer. The
generator is checked to produce reductions, cooldowns and min_lr floors, so
the comparison cannot pass vacuously.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from lrpilot.client.vocabulary import MIN_LR
from lrpilot.controller.policies import Plateau

N_SEQUENCES = 250


@dataclass
class Case:
    seed: int
    lr0: float
    mode: str
    factor: float
    patience: int
    min_delta: float
    cooldown: int
    min_lr: float
    threshold_mode: str
    values: list[float] = field(default_factory=list)


def _values(rng: random.Random, mode: str, min_delta: float, n: int) -> list[float]:
    """A metric history with plateaus, near-threshold steps, NaN and diverged values."""
    sign = 1.0 if mode == "min" else -1.0
    x = rng.uniform(0.2, 3.0) * sign
    best = x
    out = [x]
    while len(out) < n:
        kind = rng.random()
        if kind < 0.25:  # a real improvement
            x = best - sign * rng.uniform(0.0, 0.2) * abs(best)
        elif kind < 0.45:  # just below / at / just above the min_delta threshold
            eps = rng.choice([0.0, 1e-9, -1e-9, 1e-7, -1e-7, 1e-12])
            x = best - sign * (min_delta + eps)
        elif kind < 0.55:  # a relative step around torch's rel threshold
            x = best * (1 - sign * min_delta * rng.choice([0.999, 1.0, 1.001]))
        elif kind < 0.60:
            x = math.nan
        elif kind < 0.63:
            x = math.inf * sign  # diverged: the bad direction
        elif kind < 0.80:  # a long plateau
            for _ in range(rng.randint(2, 8)):
                out.append(best + sign * rng.uniform(0, 0.05))
            continue
        else:  # noise around the best
            x = best + rng.uniform(-0.02, 0.05) * sign
        out.append(x)
        if math.isfinite(x) and (x - best) * sign < 0:
            best = x
    return out[:n]


def cases(seed0: int) -> Iterator[Case]:
    for i in range(N_SEQUENCES):
        rng = random.Random(seed0 + i)
        mode = rng.choice(["min", "max"])
        lr0 = rng.choice([0.1, 0.01, 1e-3, 3e-4, 0.05, 1.0])
        factor = rng.choice([0.1, 0.2, 0.5, 0.9, rng.uniform(0.05, 0.95)])
        min_delta = rng.choice([0.0, 1e-4, 1e-3, 0.01, 0.05, rng.uniform(0, 0.1)])
        min_lr = rng.choice(
            [0.0, 0.0, lr0 * factor**2, lr0 * factor ** rng.randint(1, 4) * 1.5, 1e-6]
        )
        case = Case(
            seed=seed0 + i,
            lr0=lr0,
            mode=mode,
            factor=factor,
            patience=rng.randint(0, 5),
            min_delta=min_delta,
            cooldown=rng.choice([0, 0, 1, 2, 3]),
            min_lr=min_lr,
            threshold_mode=rng.choice(["abs", "rel"]),
        )
        case.values = _values(rng, mode, min_delta, rng.randint(15, 60))
        yield case


def ours(policy: Plateau, lr0: float, values: list[float]) -> list[float]:
    state = policy.start(lr0, 0)
    lrs = []
    for epoch, v in enumerate(values):
        state, decision = policy.step(state, epoch, {"val_loss": v}, {})
        lrs.append(decision.lr)
    return lrs


def _stats(results: list[tuple[Case, list[float]]]) -> dict[str, int]:
    reductions = sum(
        sum(b < a for a, b in zip([c.lr0, *lrs], lrs, strict=False)) for c, lrs in results
    )
    floored = sum(
        1 for c, lrs in results if c.min_lr > 0 and math.isclose(lrs[-1], c.min_lr, rel_tol=1e-6)
    )
    with_reduction = sum(1 for c, lrs in results if lrs[-1] < c.lr0 * 0.999999)
    return {"reductions": reductions, "floored": floored, "sequences_reduced": with_reduction}


@pytest.fixture(scope="module")
def keras_model() -> Any:
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    return model


def keras_lrs(model: Any, case: Case) -> list[float]:
    import keras

    model.optimizer.learning_rate = case.lr0
    cb = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss",
        mode=case.mode,
        factor=case.factor,
        patience=case.patience,
        min_delta=case.min_delta,
        cooldown=case.cooldown,
        min_lr=max(case.min_lr, MIN_LR),  # lrpilot never sends an LR below 1e-12
    )
    cb.set_model(model)
    cb.on_train_begin()
    lrs = []
    for epoch, v in enumerate(case.values):
        cb.on_epoch_end(epoch, {"val_loss": v})
        lrs.append(float(model.optimizer.learning_rate.numpy()))
    return lrs


def test_keras_parity_on_generated_sequences(keras_model: Any) -> None:
    results = []
    mismatches = []
    for case in cases(1000):
        expected = keras_lrs(keras_model, case)
        policy = Plateau(
            mode=case.mode,
            factor=case.factor,
            patience=case.patience,
            min_delta=case.min_delta,
            cooldown=case.cooldown,
            min_lr=case.min_lr,
            compat="keras",
        )
        got = ours(policy, case.lr0, case.values)
        if got != expected:
            mismatches.append((case, expected, got))
        results.append((case, expected))
    assert not mismatches, f"{len(mismatches)} of {N_SEQUENCES} differ; first: {mismatches[0]}"
    stats = _stats(results)
    # The generator must exercise the interesting paths, or the comparison proves little.
    assert stats["sequences_reduced"] >= N_SEQUENCES // 2, stats
    assert stats["reductions"] >= N_SEQUENCES, stats
    assert stats["floored"] >= 10, stats


def torch_lrs(case: Case) -> list[float]:
    torch = pytest.importorskip("torch")
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=case.lr0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt,
        mode=case.mode,
        factor=case.factor,
        patience=case.patience,
        threshold=case.min_delta,
        threshold_mode=case.threshold_mode,
        cooldown=case.cooldown,
        min_lr=max(case.min_lr, MIN_LR),  # lrpilot never sends an LR below 1e-12
    )
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for v in case.values:
            sched.step(v)
            lrs.append(float(opt.param_groups[0]["lr"]))
    return lrs


def test_torch_parity_on_generated_sequences() -> None:
    results = []
    mismatches = []
    modes = set()
    for case in cases(5000):
        expected = torch_lrs(case)
        policy = Plateau(
            mode=case.mode,
            factor=case.factor,
            patience=case.patience,
            min_delta=case.min_delta,
            threshold_mode=case.threshold_mode,
            cooldown=case.cooldown,
            min_lr=case.min_lr,
            compat="torch",
        )
        got = ours(policy, case.lr0, case.values)
        if got != expected:
            mismatches.append((case, expected, got))
        results.append((case, expected))
        modes.add((case.mode, case.threshold_mode))
    assert not mismatches, f"{len(mismatches)} of {N_SEQUENCES} differ; first: {mismatches[0]}"
    assert modes == {("min", "abs"), ("min", "rel"), ("max", "abs"), ("max", "rel")}
    stats = _stats(results)
    assert stats["sequences_reduced"] >= N_SEQUENCES // 2, stats
    assert stats["reductions"] >= N_SEQUENCES, stats
    assert stats["floored"] >= 10, stats


def test_keras_defaults_are_keras_callback_defaults() -> None:
    keras = pytest.importorskip("keras")
    cb = keras.callbacks.ReduceLROnPlateau()
    p = Plateau().for_framework("keras")  # compat: auto, bound for a Keras client
    assert p.compat == "keras"
    assert (p.monitor, p.mode, p.factor, p.patience, p.min_delta, p.cooldown, p.min_lr) == (
        cb.monitor,
        cb.mode,
        cb.factor,
        cb.patience,
        abs(cb.min_delta),
        cb.cooldown,
        cb.min_lr,
    )


def test_torch_defaults_are_torch_scheduler_defaults() -> None:
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    for p in (Plateau(compat="torch"), Plateau().for_framework("torch")):
        assert (
            p.mode,
            p.factor,
            p.patience,
            p.min_delta,
            p.threshold_mode,
            p.cooldown,
            p.min_lr,
            p.eps,
        ) == (
            s.mode,
            s.factor,
            s.patience,
            s.threshold,
            s.threshold_mode,
            s.cooldown,
            s.min_lrs[0],
            s.eps,
        )
