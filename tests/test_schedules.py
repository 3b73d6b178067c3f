"""Schedules equal the Keras/PyTorch schedules and the textbook formulas they are named after."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from lrpilot.controller.policies import (
    Constant,
    CosineDecay,
    ExponentialDecay,
    InverseTimeDecay,
    MultiStep,
    Phase,
    Phases,
    Plateau,
    Policy,
    StepDecay,
    Warmup,
    float32,
)

T = range(0, 120)
F32 = 2e-6  # Keras computes schedules in float32


def lrs_through_engine(policy: Policy, lr0: float, n: int) -> list[float]:
    """LR in force at epochs 0..n-1, as the daemon hands them out: hello, then one per report."""
    state = policy.start(lr0, 0)
    out = [state.lr]
    for t in range(n - 1):
        state, decision = policy.step(state, t, {}, {})
        out.append(decision.lr)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_exponential_equals_keras_exponential_decay(seed: int) -> None:
    keras = pytest.importorskip("keras")
    rng = random.Random(seed)
    lr0, steps, rate = rng.choice([0.1, 0.01, 1e-3]), rng.randint(1, 20), rng.uniform(0.5, 0.99)
    staircase = rng.random() < 0.5
    ref = keras.optimizers.schedules.ExponentialDecay(lr0, steps, rate, staircase=staircase)
    policy = ExponentialDecay(decay_rate=rate, decay_steps=steps, staircase=staircase)
    got = lrs_through_engine(policy, lr0, len(T))
    for t in T:
        assert got[t] == pytest.approx(float(ref(t)), rel=F32), t


@pytest.mark.parametrize("seed", range(20))
def test_inverse_time_equals_keras_inverse_time_decay(seed: int) -> None:
    keras = pytest.importorskip("keras")
    rng = random.Random(seed)
    lr0, steps, rate = rng.choice([0.1, 0.01, 1e-3]), rng.randint(1, 20), rng.uniform(0.01, 2)
    staircase = rng.random() < 0.5
    ref = keras.optimizers.schedules.InverseTimeDecay(lr0, steps, rate, staircase=staircase)
    policy = InverseTimeDecay(decay_rate=rate, decay_steps=steps, staircase=staircase)
    got = lrs_through_engine(policy, lr0, len(T))
    for t in T:
        assert got[t] == pytest.approx(float(ref(t)), rel=F32), t


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
def test_cosine_equals_keras_cosine_decay(alpha: float) -> None:
    keras = pytest.importorskip("keras")
    ref = keras.optimizers.schedules.CosineDecay(0.1, 50, alpha=alpha)
    got = lrs_through_engine(CosineDecay(decay_steps=50, alpha=alpha), 0.1, len(T))
    for t in T:
        assert got[t] == pytest.approx(float(ref(t)), rel=F32, abs=1e-6 * 0.1), t  # float32 cos


def _torch_lrs(make_sched: object, lr0: float, n: int) -> list[float]:
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr0)
    sched = make_sched(opt)  # type: ignore[operator]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return out


@pytest.mark.parametrize(("step_size", "factor"), [(1, 0.9), (7, 0.5), (10, 0.1), (30, 0.3)])
def test_step_equals_torch_steplr_and_the_formula(step_size: int, factor: float) -> None:
    torch = pytest.importorskip("torch")
    expected = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size, factor), 0.1, len(T)
    )
    got = lrs_through_engine(StepDecay(factor=factor, step_size=step_size), 0.1, len(T))
    for t in T:
        assert got[t] == pytest.approx(expected[t], rel=1e-9)
        assert got[t] == pytest.approx(0.1 * factor ** math.floor(t / step_size), rel=1e-12)


def test_multistep_equals_torch_multisteplr() -> None:
    torch = pytest.importorskip("torch")
    ms = [5, 17, 40, 90]
    expected = _torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, ms, 0.2), 0.05, len(T))
    got = lrs_through_engine(MultiStep(milestones=ms, factor=0.2), 0.05, len(T))
    assert got == pytest.approx(expected, rel=1e-9)


def test_seed_formulas() -> None:
    lr0, k = 0.1, 0.05
    time_based = lrs_through_engine(InverseTimeDecay(decay_rate=k), lr0, len(T))
    expo = lrs_through_engine(ExponentialDecay(k=k), lr0, len(T))
    for t in T:
        assert time_based[t] == pytest.approx(lr0 / (1 + k * t), rel=1e-12)
        assert expo[t] == pytest.approx(lr0 * math.exp(-k * t), rel=1e-12)


def test_warmup_ramps_and_hands_to_lr_to_the_next_phase() -> None:
    chain = Phases(
        phases=(
            Phase(Warmup(from_lr=1e-4, to_lr=1e-3, epochs=4), until=4),
            Phase(Plateau(patience=1, factor=0.5, min_delta=0.0)),
        )
    )
    state = chain.start(0.5, 0)
    lrs, events = [state.lr], []
    values = [1.0, 0.9, 0.8, 0.7, 0.6, 0.6, 0.6, 0.6]
    for t, v in enumerate(values):
        state, d = chain.step(state, t, {"val_loss": v}, {})
        lrs.append(d.lr)
        events.append(d.reason)
    assert lrs[:5] == pytest.approx([1e-4, 3.25e-4, 5.5e-4, 7.75e-4, 1e-3])
    assert events[3] == "phase"
    # Plateau from epoch 4 on: 0.6 is its first value and best; 0.6 again at epochs 5 and 6.
    assert lrs[5] == pytest.approx(1e-3, rel=1e-6)
    assert lrs[6] == pytest.approx(5e-4, rel=1e-6) and events[5] == "plateau"
    assert chain.describe(state)["phase"] == "2/2 plateau"


def test_phase_resume_mid_chain_starts_in_the_right_phase() -> None:
    chain = Phases(
        phases=(Phase(Constant(lr=0.3), until=5), Phase(StepDecay(factor=0.5, step_size=2)))
    )
    state = chain.start(0.1, 8)  # a job first seen at epoch 8: phase 2, local t = 3
    assert chain.describe(state)["phase"] == "2/2 step"
    assert state.lr == pytest.approx(0.3 * 0.5)


def test_override_rebases_a_schedule_and_keeps_its_shape() -> None:
    policy = StepDecay(factor=0.5, step_size=10)
    state = policy.start(0.1, 0)
    for t in range(5):
        state, _ = policy.step(state, t, {}, {})
    state = policy.rebase(state, 0.02, 4)  # operator: 0.02 from epoch 5
    lrs = []
    for t in range(5, 25):
        lrs.append(state.lr)
        state, _ = policy.step(state, t, {}, {})
    assert lrs[0] == pytest.approx(0.02)
    assert lrs[5] == pytest.approx(0.01)  # epoch 10: the schedule's halving, from the new level
    assert lrs[15] == pytest.approx(0.005)


def test_override_keeps_plateau_memory() -> None:
    policy = Plateau(patience=3)
    state = policy.start(0.1, 0)
    for t, v in enumerate([1.0, 1.0, 1.0]):
        state, _ = policy.step(state, t, {"val_loss": v}, {})
    state = policy.rebase(state, 0.05, 2)
    assert (state.wait, state.best) == (2, 1.0)  # type: ignore[attr-defined]
    state, d = policy.step(state, 3, {"val_loss": 1.0}, {})
    assert d.reason == "plateau" and d.lr == pytest.approx(0.005, rel=1e-6)


def test_state_round_trips_through_dict() -> None:
    chain = Phases(phases=(Phase(Warmup(to_lr=0.1, epochs=2), until=2), Phase(Plateau(patience=2))))
    state = chain.start(0.01, 0)
    for t, v in enumerate([1.0, 0.9, 0.95, 0.97]):
        state, _ = chain.step(state, t, {"val_loss": v}, {})
        again = chain.load_state(state.to_dict())
        assert again == state


def test_a_schedule_that_ends_at_zero_stays_at_the_floor_and_says_so() -> None:
    # Cosine with alpha 0 ends at 0 (Keras, torch): lrpilot sends 1e-12, never a job at LR 0.
    policy = CosineDecay(decay_steps=5, alpha=0.0)
    state = policy.start(0.1, 0)
    decisions = []
    for t in range(8):
        state, decision = policy.step(state, t, {}, {})
        decisions.append(decision)
    assert [d.lr for d in decisions[4:]] == [1e-12] * 4
    # Told once, when the LR reaches the floor (a unit: step job would log it every step).
    assert [d.notice for d in decisions] == [None] * 4 + ["clamped"] + [None] * 3
    assert "cosine computed lr 0, outside [1e-12, 10]; it is 1e-12" in str(decisions[4].warning)
    assert all(1e-12 <= d.lr <= 10 for d in decisions)


@pytest.mark.parametrize("compat", ["keras", "torch"])
def test_a_plateau_with_min_lr_0_stops_reducing_at_the_floor(compat: str) -> None:
    policy = Plateau(monitor="loss", factor=0.1, patience=1, min_lr=0.0, compat=compat, eps=0)
    state = policy.start(0.1, 0)
    lrs = []
    for t in range(40):
        state, decision = policy.step(state, t, {"loss": 1.0}, {})
        lrs.append(decision.lr)
    assert min(lrs) == lrs[-1] and float32(lrs[-1]) == float32(1e-12), lrs[-5:]
    assert lrs[-3] == lrs[-2] == lrs[-1]
