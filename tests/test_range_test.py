"""The LR range test: fastai's suggestions, the sweep, its stops, and the chain that trains on.

The suggestion tests write their expected values from fastai's published definitions
(fastai/callback/schedule.py: `valley`, `steep`, `minimum`, and the slicing `lr_find` does
before calling them), by hand on small curves and by an independent restatement on
generated ones, never from lrpilot's implementation.
"""

from __future__ import annotations

import json
import math
import os
import random
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import pytest

from lrpilot.client.protocol import Hello, Report
from lrpilot.controller import transitions
from lrpilot.controller.errors import PolicyError
from lrpilot.controller.policies import (
    POLICY_TYPES,
    Constant,
    Decision,
    Phase,
    Phases,
    PhasesState,
    Plateau,
    Policy,
    RangeTest,
    RangeTestState,
    State,
    float32,
)
from lrpilot.controller.policies.suggest import minimum, steep, suggest, valley
from lrpilot.controller.policyfile import load_text
from lrpilot.controller.transitions import Env

# -- suggestions, against fastai's definitions -----------------------------------------------

LRS = [10 ** (-6 + 0.5 * i) for i in range(11)]  # 1e-6 .. 1e-1, evenly spaced in log LR


def test_valley_on_a_hand_curve() -> None:
    losses = [3.0, 3.1, 2.9, 2.5, 2.0, 1.6, 1.0, 0.9, 1.5, 2.5, 4.0]
    # Longest strictly decreasing subsequence: 3.0 (or 3.1), 2.9, 2.5, 2.0, 1.6, 1.0, 0.9:
    # length 7, first reached at index 7, so the valley is [7 - 7, 7] = [0, 7];
    # sections = 7/3, index = 0 + int(7/3) + int(7/6) = 0 + 2 + 1 = 3.
    assert valley(LRS, losses) == LRS[3]


def test_valley_is_measured_back_from_its_end() -> None:
    # Decreasing 5, 4, 3, 2 (length 4, ending at index 4); fastai takes start = 4 - 4 = 0
    # even though the subsequence starts at 1: index = 0 + int(4/3) + int(4/6) = 1.
    losses = [1.0, 5.0, 4.0, 3.0, 2.0, 2.5, 6.0]
    assert valley(LRS[:7], losses) == LRS[1]


def test_valley_takes_the_first_end_of_equally_long_valleys() -> None:
    # Two decreasing runs of length 3: 9, 8, 7 (ends at 2) and 9.5, 8.5, 7.5 (ends at 5).
    # The later one cannot extend the first (7.5 > 7), so the first end, 2, wins:
    # valley [2 - 3, 2] = [-1, 2], index = -1 + int(3/3) + int(3/6) = 0.
    losses = [9.0, 8.0, 7.0, 9.5, 8.5, 7.5]
    assert valley(LRS[:6], losses) == LRS[0]


def test_steep_is_the_left_end_of_the_steepest_segment_in_log_lr() -> None:
    losses = [3.0, 3.1, 2.9, 2.5, 2.0, 1.6, 1.0, 0.9, 1.5, 2.5, 4.0]
    # Even log spacing: the steepest slope is the largest fall, 1.6 -> 1.0 (segment 5-6).
    assert steep(LRS, losses) == LRS[5]
    # The slope divides by the log-LR distance: a fall of 0.5 over a tenth of a decade is
    # steeper than a fall of 2 over a whole decade.
    lrs = [1e-4, 1e-3, 1e-2, 1.26e-2]
    assert steep(lrs, [5.0, 3.0, 2.0, 1.5]) == 1e-2


def test_minimum_is_a_tenth_of_the_lr_at_the_lowest_loss() -> None:
    losses = [3.0, 3.1, 2.9, 2.5, 2.0, 1.6, 1.0, 0.9, 1.5, 2.5, 4.0]
    assert minimum(LRS, losses) == LRS[7] / 10
    assert minimum(LRS[:3], [1.0, 0.5, 0.5]) == LRS[1] / 10  # the first of equal minima


def _valley_by_definition(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's valley restated: L = longest decreasing subsequence ending at each point."""
    length: list[int] = []
    for i, x in enumerate(losses):
        length.append(1 + max((length[j] for j in range(i) if losses[j] > x), default=0))
    end = length.index(max(length))  # the first point that reaches the longest
    span = length[end] if end > 0 else 0  # fastai keeps start = end = 0 when nothing falls
    start = end - span
    return lrs[start + int(span / 3) + int(span / 3 / 2)]


def _steep_by_definition(lrs: Sequence[float], losses: Sequence[float]) -> float:
    slopes = [
        (b - a) / (math.log10(y) - math.log10(x))  # log base does not move the argmin
        for a, b, x, y in zip(losses, losses[1:], lrs, lrs[1:], strict=False)
    ]
    return lrs[slopes.index(min(slopes))]


def _curve(rng: random.Random, n: int) -> tuple[list[float], list[float]]:
    """A range-test-like smoothed curve: flat with noise, a valley, a blow-up."""
    lrs = [1e-7 * 10 ** (i / 12) for i in range(n)]
    low = rng.uniform(0.3, 0.7) * n
    losses = []
    for i in range(n):
        shape = 2.0 - 1.5 / (1 + math.exp(-(i - low) / rng.uniform(2, 6)))
        blow = math.exp((i - 0.9 * n) / 2) if i > 0.8 * n else 0.0
        losses.append(shape + blow + rng.gauss(0, rng.choice([0.0, 0.003, 0.02])))
    return lrs, losses


@pytest.mark.parametrize("seed", range(40))
def test_suggestions_equal_fastais_definitions_on_generated_curves(seed: int) -> None:
    rng = random.Random(seed)
    lrs, losses = _curve(rng, rng.randint(30, 120))
    assert valley(lrs, losses) == _valley_by_definition(lrs, losses)
    assert steep(lrs, losses) == _steep_by_definition(lrs, losses)
    assert minimum(lrs, losses) == lrs[losses.index(min(losses))] / 10


def test_suggest_slices_the_curve_as_lr_find_does() -> None:
    rng = random.Random(3)
    lrs, losses = _curve(rng, 90)
    losses[70] = math.nan
    # lr_find: lrs[num_it // 10 : -5] = [18:85], then cut at the first NaN (index 70).
    xs, ys = lrs[18:70], losses[18:70]
    found = suggest(lrs, losses, skip_start=181 // 10)
    assert found == {
        "valley": _valley_by_definition(xs, ys),
        "steep": _steep_by_definition(xs, ys),
        "minimum": xs[ys.index(min(ys))] / 10,
    }


def test_suggest_on_a_short_curve_keeps_all_its_points() -> None:
    found = suggest([1e-3, 1e-2, 1e-1], [1.0, 0.5, 0.8], skip_start=18)
    assert found == {"valley": 1e-3, "steep": 1e-3, "minimum": 1e-2 / 10}
    assert suggest([], [], 0) == {"valley": None, "steep": None, "minimum": None}


def test_the_range_test_trims_by_the_sweep_not_by_the_report_count() -> None:
    """A report every step: lr_find's counts. Sparser reports: the same stretches of LR."""
    policy = RangeTest()
    rng = random.Random(5)
    _, losses = _curve(rng, 120)
    every = [(policy.lr_at(t), 1.0, loss) for t, loss in enumerate(losses)]
    xs, ys = [p[0] for p in every][18:115], [p[2] for p in every][18:115]
    assert policy.suggestions(every)["valley"] == _valley_by_definition(xs, ys)
    sparse = every[::10]  # a report every 10 steps: t = 0, 10, ..., 110
    kept = sparse[2:-1]  # t = 20 .. 100
    xs, ys = [p[0] for p in kept], [p[2] for p in kept]
    assert policy.suggestions(sparse)["minimum"] == xs[ys.index(min(ys))] / 10
    assert len(kept) == len(sparse) - 2 - 1  # t = 0 and 10 before the first tenth, 110 last


# -- the sweep ------------------------------------------------------------------------------


def feed(
    policy: Policy, loss_at: Callable[[float, int], float], n: int = 1000, lr0: float = 1e-3
) -> tuple[State, list[Decision], list[float]]:
    """Report `loss_at(lr in force, t)` until the policy restores (or n reports)."""
    state = policy.start(lr0, 0)
    lrs, decisions = [state.lr], []
    for t in range(n):
        state, d = policy.step(state, t, {"loss": loss_at(state.lr, t)}, {})
        decisions.append(d)
        lrs.append(d.lr)
        if d.action == "restore":
            break
    return state, decisions, lrs


def test_the_sweep_is_the_seed_formula_to_the_float() -> None:
    policy = RangeTest()
    _, _, lrs = feed(policy, lambda lr, t: 1.0, n=120)
    assert lrs[:120] == [1e-8 * 10 ** (t / 20) for t in range(120)]
    custom = RangeTest(start_lr=1e-6, steps_per_decade=7)
    _, _, lrs = feed(custom, lambda lr, t: 1.0, n=30)
    assert lrs[:30] == [1e-6 * 10 ** (t / 7) for t in range(30)]


def test_a_flat_loss_sweeps_to_end_lr_and_stops_there() -> None:
    policy = RangeTest(start_lr=1e-3, end_lr=0.1, steps_per_decade=2)
    state, decisions, lrs = feed(policy, lambda lr, t: 1.0)
    assert lrs[:5] == [1e-3, 10**0.5 * 1e-3, 1e-2, 10**1.5 * 1e-3, 0.1]
    assert len(decisions) == 5 and decisions[-1].action == "restore"
    report = policy.range_test_report(state)
    assert report is not None and report["stop_reason"] == "end_lr" and report["done"]
    assert [p[0] for p in report["points"]] == lrs[:5]
    # The default sweep ends at exactly 10 (1e-8 * 10**9 rounds to 10.000000000000002).
    default = RangeTest()
    _, decisions, lrs = feed(default, lambda lr, t: 1.0)
    assert max(lrs[:-1]) == 10.0 and len(decisions) == 181


def _ema_stop(losses: Sequence[float], beta: float = 0.98) -> int:
    """The first report at which fastai's smoothed loss passes 4x its best."""
    avg, best = 0.0, math.inf
    for n, x in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * x  # AvgSmoothLoss: lerp, then debias
        smooth = avg / (1 - beta**n)
        best = min(best, smooth)
        if smooth > 4 * best:
            return n - 1
    raise AssertionError("no divergence")


def test_stops_on_divergence_of_the_smoothed_loss() -> None:
    losses = [1.0 - 0.01 * t for t in range(40)] + [50.0 * 1.5**k for k in range(40)]
    policy = RangeTest()
    state, decisions, _ = feed(policy, lambda lr, t: losses[t])
    assert len(decisions) - 1 == _ema_stop(losses)  # it stops on the report fastai would
    assert decisions[-1].action == "restore" and decisions[-1].reason == "range_test"
    report = policy.range_test_report(state)
    assert report is not None and report["stop_reason"] == "divergence"
    assert [p[1] for p in report["points"]] == losses[: len(decisions)]


def test_a_non_finite_loss_stops_at_once() -> None:
    policy = RangeTest()
    losses = [2.0 - 0.01 * t for t in range(30)] + [math.nan]
    state, decisions, _ = feed(policy, lambda lr, t: losses[t])
    assert len(decisions) == 31 and decisions[-1].action == "restore"
    report = policy.range_test_report(state)
    assert report is not None and report["stop_reason"] == "divergence"
    assert report["points"][-1][1:] == [None, None]  # JSON-ready: no NaN
    detail = decisions[-1].detail
    assert detail is not None
    assert json.loads(detail, parse_constant=lambda c: pytest.fail(c)) == report


def test_a_test_with_no_next_phase_keeps_the_suggestion() -> None:
    losses = [1.0 - 0.01 * t for t in range(40)] + [50.0] * 20
    policy = RangeTest()
    state, decisions, _ = feed(policy, lambda lr, t: losses[t])
    suggested = decisions[-1].lr
    assert policy.finished(state) and policy.describe(state)["suggested_lr"] == suggested
    for t in range(len(decisions), len(decisions) + 5):
        state, d = policy.step(state, t, {"loss": 1e9}, {})
        assert (d.lr, d.event, d.action) == (suggested, None, None)


def test_missing_loss_warns_and_the_sweep_goes_on() -> None:
    policy = RangeTest()
    state = policy.start(1e-3, 0)
    state, d = policy.step(state, 0, {"val_loss": 1.0}, {})
    assert d.warning is not None and "`loss` which is not available" in d.warning
    assert d.lr == 10 ** (1 / 20) * 1e-8
    assert policy.range_test_report(state)["points"] == []  # type: ignore[index]


# -- a problem with a known stability limit ------------------------------------------------

# Linear regression, MSE, plain gradient descent on the full batch: an LR above
# 2 / λ_max(Hessian) diverges. The targets carry noise, so no error mode is ever exactly 0.
_rng = random.Random(11)
X = [[_rng.gauss(0, s) for s in (1.0, 3.0, 0.5)] + [1.0] for _ in range(64)]
Y = [2 * a - 0.5 * b + 3 * c + 1 + _rng.gauss(0, 0.3) for a, b, c, _ in X]
HESSIAN = [[2 * sum(r[i] * r[j] for r in X) / len(X) for j in range(4)] for i in range(4)]


def _largest_eigenvalue(m: list[list[float]]) -> float:
    v = [1.0] * len(m)
    for _ in range(500):
        u = [sum(a * b for a, b in zip(row, v, strict=True)) for row in m]
        norm = math.sqrt(sum(x * x for x in u))
        v = [x / norm for x in u]
    return sum(v[i] * sum(m[i][j] * v[j] for j in range(len(v))) for i in range(len(v)))


LIMIT = 2 / _largest_eigenvalue(HESSIAN)


def _loss(w: Sequence[float]) -> float:
    return sum(
        (sum(a * b for a, b in zip(r, w, strict=True)) - y) ** 2 for r, y in zip(X, Y, strict=True)
    ) / len(X)


def _sgd(w: list[float], lr: float) -> list[float]:
    errors = [sum(a * b for a, b in zip(r, w, strict=True)) - y for r, y in zip(X, Y, strict=True)]
    grad = [
        2 * sum(e * r[i] for e, r in zip(errors, X, strict=True)) / len(X) for i in range(len(w))
    ]
    return [x - lr * g for x, g in zip(w, grad, strict=True)]


def train(policy: Policy, steps: int) -> tuple[State, list[Decision], list[float], float]:
    """A training loop driven by the engine: snapshot, sweep, restore, train on."""
    w: list[float] = [0.0] * 4
    state = policy.start(1e-3, 0)
    lr, snapshot = state.lr, None
    if policy.start_action(state) == "snapshot":
        snapshot = list(w)
    decisions = []
    restored = math.nan
    for t in range(steps):
        state, d = policy.step(state, t, {"loss": _loss(w)}, {})
        w = _sgd(w, lr)
        decisions.append(d)
        if d.action == "restore":
            assert snapshot is not None
            w = list(snapshot)
            restored = _loss(w)
        lr = d.lr
    return state, decisions, w, restored


CHAIN = """\
version: 1
defaults:
  phases:
    - {type: range_test}
    - {type: plateau, unit: step, monitor: loss, lr: suggested, patience: 20, factor: 0.5,
       min_delta: 0.0}
"""


@pytest.mark.parametrize("choice", ["valley", "steep", "minimum"])
def test_range_test_then_plateau_on_a_problem_with_a_known_limit(choice: str) -> None:
    text = CHAIN.replace("{type: range_test}", f"{{type: range_test, suggest: {choice}}}")
    policy = load_text(text, "p.yaml").defaults.policy
    state, decisions, w, restored = train(policy, 1500)
    stop = next(i for i, d in enumerate(decisions) if d.action == "restore")
    report = policy.range_test_report(state)
    assert report is not None and report["stop_reason"] == "divergence"
    lrs = [p[0] for p in report["points"]]
    # It stops after the limit: once the unstable direction, decayed to almost nothing on
    # the way up, has grown back enough to move the smoothed loss (here within a decade).
    assert LIMIT < lrs[-1] < 10 * LIMIT
    suggestions = report["suggestions"]
    assert LIMIT / 100 < suggestions["minimum"] < LIMIT
    assert LIMIT / 100 < suggestions["steep"] < LIMIT
    # Deterministic full-batch losses fall from the very first LRs, so fastai's valley spans
    # that whole decreasing stretch and lands in its middle, decades below the limit.
    assert 1e-6 < suggestions["valley"] < LIMIT / 100
    # The chosen one is where phase 2 starts, from the weights before the test.
    d = decisions[stop]
    assert suggestions[choice] == report["suggested_lr"]
    assert d.lr == float32(suggestions[choice])  # the plateau holds it as Keras does
    assert d.reason == "range_test" and d.event is not None and d.event.new == d.lr
    assert restored == _loss([0.0] * 4)
    assert policy.describe(state)["phase"] == "2/2 plateau"
    assert isinstance(state, PhasesState) and state.suggested == suggestions[choice]
    initial = _loss([0.0] * 4)
    if choice == "valley":  # too small an LR to get far in the steps left
        assert _loss(w) < initial
    else:
        assert _loss(w) < 0.01 * initial


def test_valley_lands_in_the_descent_of_a_noisy_curve() -> None:
    """Per-step losses are noisy: fastai's valley then sits in the falling part."""

    def loss(lr: float, t: int, rng: random.Random) -> float:
        x = math.log10(lr)
        base = 0.4 + 1.9 / (1 + math.exp(3.0 * (x + 3.0)))  # falls from 2.3 to 0.4 around 1e-3
        return base * (1 + 0.05 * rng.gauss(0, 1)) + (math.exp(4 * (x + 1)) if x > -1.5 else 0)

    for seed in range(5):
        rng = random.Random(seed)
        policy = RangeTest()
        state, decisions, _ = feed(policy, lambda lr, t, rng=rng: loss(lr, t, rng))
        report = policy.range_test_report(state)
        assert report is not None and report["stop_reason"] == "divergence"
        assert 1e-4 < report["suggestions"]["valley"] < 1e-2
        assert 1e-4 < report["suggestions"]["steep"] < 1e-1
        assert decisions[-1].lr == report["suggestions"]["valley"]


# -- hooks -------------------------------------------------------------------------------------


def test_hooks_default_to_nothing_for_other_policies() -> None:
    for cls in POLICY_TYPES.values():
        if cls is RangeTest:
            continue
        policy = Plateau() if cls is Plateau else Constant(lr=0.1)
        state = policy.start(0.1, 0)
        assert not policy.finished(state)
        assert policy.start_action(state) is None
        assert policy.range_test_report(state) is None
    decision = Decision(0.1)
    assert decision.detail is None and decision.notice is None


def test_start_action_is_snapshot_until_the_first_report() -> None:
    policy = RangeTest()
    state = policy.start(0.01, 0)
    assert policy.start_action(state) == "snapshot" and not policy.finished(state)
    assert state.lr == 1e-8
    state, _ = policy.step(state, 0, {"loss": 1.0}, {})
    assert policy.start_action(state) is None


def _chain(*phases: Phase) -> Phases:
    return Phases(phases=phases, unit=phases[0].policy.unit)


def test_entering_a_range_test_mid_chain_sends_snapshot() -> None:
    chain = _chain(
        Phase(Constant(lr=0.5, unit="step"), until=3),
        Phase(RangeTest()),
        Phase(Constant(lr=0.01, unit="step")),
    )
    state = chain.start(0.1, 0)
    assert chain.start_action(state) is None
    for t in range(2):
        state, d = chain.step(state, t, {"loss": 1.0}, {})
        assert d.action is None
    state, d = chain.step(state, 2, {"loss": 1.0}, {})
    assert (d.lr, d.action, d.reason) == (1e-8, "snapshot", "phase")
    assert chain.describe(state)["phase"] == "2/3 range_test"
    # Phase 3 has a fixed LR: the restore goes with it; the report outlives phase 2.
    losses = [1.0 - 0.01 * k for k in range(40)] + [60.0] * 10
    for k, loss in enumerate(losses):
        state, d = chain.step(state, 3 + k, {"loss": loss}, {})
        if d.action == "restore":
            break
    assert (d.lr, d.reason) == (0.01, "range_test")
    assert chain.describe(state)["phase"] == "3/3 constant"
    report = chain.range_test_report(state)
    assert report is not None and report["done"] and d.detail is not None
    assert json.loads(d.detail) == report
    assert isinstance(state, PhasesState) and state.suggested == report["suggested_lr"]
    assert chain.describe(state)["suggested_lr"] == report["suggested_lr"]
    assert not chain.finished(state)


def test_a_last_phase_range_test_finishes_the_chain() -> None:
    chain = _chain(Phase(Constant(lr=0.5, unit="step"), until=1), Phase(RangeTest()))
    state = chain.start(0.1, 0)
    state, _ = chain.step(state, 0, {"loss": 1.0}, {})
    assert chain.start_action(state) == "snapshot" and not chain.finished(state)
    losses = [1.0] * 30 + [100.0] * 10
    for k, loss in enumerate(losses):
        state, d = chain.step(state, 1 + k, {"loss": loss}, {})
        if d.action == "restore":
            break
    assert chain.finished(state)
    report = chain.range_test_report(state)
    assert report is not None and d.lr == report["suggested_lr"]


def test_state_round_trips_through_the_store_format() -> None:
    chain = load_text(CHAIN, "p.yaml").defaults.policy
    assert isinstance(chain, Phases)
    state = chain.start(0.01, 0)
    losses = [2.0 - 0.02 * t for t in range(40)] + [80.0] * 5 + [1.0] * 5
    kinds = set()
    for t, loss in enumerate(losses):
        state, _ = chain.step(state, t, {"loss": loss}, {})
        stored = msgpack.unpackb(msgpack.packb(state.to_dict()), raw=False)  # as store.py
        assert chain.load_state(stored) == state
        assert isinstance(state, PhasesState)
        kinds.add(type(chain.inner_state(state)))
    assert RangeTestState in kinds and len(kinds) == 2  # both phases went through it


# -- the policy file ---------------------------------------------------------------------------


def errors_of(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_text(textwrap.dedent(text), "policy.yaml")
    return [e.located() for e in info.value.errors]


def test_lr_suggested_needs_a_range_test_before_it() -> None:
    text = """\
        version: 1
        defaults:
          phases:
            - {type: constant, lr: 0.1, until: 3}
            - {type: plateau, lr: suggested}
        """
    assert errors_of(text) == ["policy.yaml:5: lr: suggested needs a range_test phase before it"]
    ok = """\
        version: 1
        defaults:
          phases:
            - {type: range_test, unit: epoch}
            - {type: constant, until: 2}
            - {type: plateau, lr: suggested}
        """
    policy = load_text(textwrap.dedent(ok), "policy.yaml").defaults.policy
    assert isinstance(policy, Phases) and policy.phases[2].lr == "suggested"
    assert policy.phases[0].until is None  # a range test ends by itself


def test_range_test_phase_errors_name_their_line() -> None:
    text = """\
        version: 1
        defaults:
          phases:
            - {type: range_test, until: 50}
            - {type: plateau, unit: step}
        jobs:
          - match: a
            phases:
              - {type: range_test}
              - {type: plateau}
          - match: b
            policy: {type: range_test, suggest: lowest,
              start_lr: 1, end_lr: 0.5}
        """
    errors = errors_of(text)
    assert any(e.startswith("policy.yaml:4: a range_test phase ends by itself") for e in errors)
    assert any(
        e.startswith("policy.yaml:9: every phase must use the same unit")
        and "range_test counts steps unless it says unit: epoch" in e
        for e in errors
    )
    assert "policy.yaml:12: suggest must be one of valley, steep, minimum, got 'lowest'" in errors
    ok_but_bad = "version: 1\ndefaults:\n  policy: {type: range_test,\n    end_lr: 1e-9}\n"
    assert errors_of(ok_but_bad) == ["policy.yaml:4: end_lr must be > start_lr 1e-08"]


def test_the_example_policy_is_a_range_test_then_plateau() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "policies" / "find-lr-then-plateau.yaml"
    policy_set = load_text(path.read_text(), str(path))
    for job in ("any", "seed-course"):
        policy = policy_set.rule_for(job).policy
        assert isinstance(policy, Phases)
        first, second = policy.phases
        assert isinstance(first.policy, RangeTest) and isinstance(second.policy, Plateau)
        assert second.lr == "suggested"
    seed = policy_set.rule_for("seed-course").policy
    assert isinstance(seed, Phases) and seed.phases[0].policy.unit == "epoch"


# -- points are what was trained (outages, restarts) -------------------------------------------

SWEEP = """\
version: 1
defaults:
  phases:
    - {type: range_test, start_lr: 1.0e-4, steps_per_decade: 10, suggest: valley}
    - {type: plateau, unit: step, monitor: loss, lr: suggested, patience: 3, factor: 0.5}
"""


def _sweep_loss(lr: float) -> float:
    """Falls to lr ~ 0.03, blows up past 0.2; a function of the LR trained only."""
    x = math.log10(lr)
    return 1.0 + (x + 1.5) ** 2 + 0.05 * math.sin(7 * x) if lr < 0.2 else 1e6 * lr


def _trainer(name: str = "sweep", restore: bool = True, start: int = 0, rank: int = 0,
             world: int = 1) -> tuple[Hello, bytes]:  # fmt: skip
    s = os.urandom(16)
    return Hello(name, rank, world, s, 0.01, 0, start, "python", "host", 1, {}, restore), s


def _run_sweep(stale_from: int | None = None, stale_steps: int = 0) -> tuple[Any, list[float]]:
    """A trainer through the transitions, as the client does: each step trains at the LR it
    knows and reports it. From step `stale_from` it hears nothing for `stale_steps` steps
    (the controller is away) and trains on at its last LR; those reports are decided late,
    in order. Returns the job and the LR of every step trained."""
    rule = load_text(SWEEP, "p.yaml").rule_for("sweep")
    env = Env(now=0.0, wall=1.7e9)
    hello, s = _trainer()
    step = transitions.hello(None, hello, rule, env, lambda *a: None)
    job, lr = step.job, step.out[0][1].lr
    trained, late = [], []
    for t in range(400):
        trained.append(lr)
        r = Report("sweep", 0, s, t + 1, 0, {"loss": _sweep_loss(lr)}, lr, t)
        if stale_from is not None and stale_from <= t < stale_from + stale_steps:
            late.append(r)  # kept by the client, sent when the controller is back
            continue
        replies = []
        for n, kept in enumerate([*late, r]):
            step = transitions.report(job, kept, env)
            job = step.job
            replies.append(step.out[0][1])
            if 0 < n < len(late):  # the first was trained at the sweep's LR, the rest not
                assert not step.audit and replies[-1].lr == replies[0].lr
        late = []
        lr = replies[-1].lr
        if replies[-1].action == "restore":
            return job, trained
    raise AssertionError("the sweep never ended")


def test_a_loss_trained_at_another_lr_is_no_point_and_the_sweep_resumes_untried() -> None:
    clean, clean_lrs = _run_sweep()
    outage, outage_lrs = _run_sweep(stale_from=12, stale_steps=9)
    want = clean.policy.range_test_report(clean.state)
    got = outage.policy.range_test_report(outage.state)
    assert want is not None and got is not None and want["done"]
    assert got["points"] == want["points"]  # point for point
    assert got["suggested_lr"] == want["suggested_lr"] and got["stop_reason"] == "divergence"
    # The trainer went on at the LR it had (steps 12..20, and 21, whose report brought the
    # answer), then went on with the sweep's next LR: it never jumped ahead.
    assert outage_lrs[12:22] == [clean_lrs[12]] * 10
    assert outage_lrs[22:] == clean_lrs[13:]
    assert outage.lr == clean.lr


def test_counts_allows_a_float32_lr_and_the_index_counts_lrs_tried() -> None:
    policy = RangeTest(start_lr=1e-4, steps_per_decade=10)
    state = policy.start(0.01, 0)
    assert policy.counts(state, 1e-4) and policy.counts(state, float32(1e-4))
    assert not policy.counts(state, 0.01)
    state, d = policy.step(state, 0, {"loss": 1.0}, {})
    state, d = policy.step(state, 7, {"loss": 1.0}, {})  # t jumped: the index did not
    assert d.lr == policy.lr_at(2) and isinstance(state, RangeTestState) and state.index == 2
    assert not policy.counts(state, policy.lr_at(1))
    old = {k: v for k, v in state.to_dict().items() if k != "index"}  # a 0.2 row
    assert RangeTestState.from_dict(old).index == state.seen == 2


def _mid_sweep(world: int = 1) -> tuple[Any, list[bytes], Env]:
    rule = load_text(SWEEP, "p.yaml").rule_for("sweep")
    env = Env(now=0.0, wall=1.7e9)
    job, sessions = None, []
    for rank in range(world):
        hello, s = _trainer(rank=rank, world=world)
        job = transitions.hello(job, hello, rule, env, lambda *a: None).job
        sessions.append(s)
    assert job is not None
    for t in range(5):
        for rank, s in enumerate(sessions):
            step = transitions.report(job, Report("sweep", rank, s, t + 1, 0, {"loss": 1.0},
                                                  job.lr, t), env)  # fmt: skip
            job = step.job
    assert job.lr == RangeTest(start_lr=1e-4, steps_per_decade=10).lr_at(5)
    return job, sessions, env


def test_a_rank_that_cannot_restore_abandons_a_sweep_under_way() -> None:
    job, (s0, old1), env = _mid_sweep(world=2)
    hello, s2 = _trainer(restore=False, start=5, rank=1, world=2)  # rank 1 restarted
    step = transitions.hello(job, hello, job.rule, env, lambda *a: None)
    out = dict(step.out)
    assert set(out) == {s0, s2} and old1 not in out  # rank 1 restarted: a new session
    restore, told = out[s0], out[s2]
    before = float32(0.01)  # the LR from before the test, as the Keras-compat plateau holds it
    assert (restore.lr, restore.action, restore.reason) == (before, "restore", "range_test")
    assert (told.lr, told.action) == (before, None)  # and no restore
    assert [code for code, _ in told.notices] == ["restore_unsupported"]
    assert "abandoned" in told.notices[0][1] and step.warnings
    (row,) = step.audit
    assert (row.reason, row.old_lr, row.new_lr, row.source) == (
        "range_test",
        job.lr,
        before,
        "hello",
    )
    report = json.loads(row.detail or "")
    assert report["stop_reason"] == "abandoned" and report["suggested_lr"] is None
    assert len(report["points"]) == 5
    after = step.job
    assert after.policy.describe(after.state)["phase"] == "2/2 plateau" and after.lr == before
    # The sweep is over: a restoring hello later joins the plateau, no snapshot.
    again, _ = _trainer(start=5, rank=1, world=2)
    reply = transitions.hello(after, again, after.rule, env, lambda *a: None).out[0][1]
    assert (reply.lr, reply.action) == (before, None)


def test_a_trainer_restarted_from_scratch_without_restore_is_refused_and_ends_the_sweep() -> None:
    job, (s0,), env = _mid_sweep()
    hello, s1 = _trainer(restore=False)  # start 0: a new run, which begins with a test
    step = transitions.hello(job, hello, job.rule, env, lambda *a: None)
    out = dict(step.out)
    assert (out[s0].lr, out[s0].action) == (float32(0.01), "restore")  # the old session, if alive
    refusal = out[s1]
    assert (refusal.lr, refusal.version, refusal.action) == (0.01, 0, None)
    assert [code for code, _ in refusal.notices] == ["restore_unsupported"]
    assert s1.hex() not in step.job.sessions.seqs  # it did not join
    assert step.audit[0].reason == "range_test" and step.job.run == job.run
    # Nothing under way: only the refusal, nothing stored.
    again = transitions.hello(step.job, _trainer(restore=False)[0], job.rule, env, lambda *a: 0)
    assert len(again.out) == 1 and not again.audit and not again.persist
