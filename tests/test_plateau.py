"""Plateau beyond parity: non-finite values, missing metrics, auto mode, smoothing, stop."""

from __future__ import annotations

import math

import pytest

from lrpilot.client.errors import LRPilotError
from lrpilot.controller.policies import Plateau, resolve_mode
from lrpilot.controller.policies.errors import ModeUnresolved


def run(
    policy: Plateau, values: list[float], directions: dict[str, str] | None = None
) -> list[float]:
    state = policy.start(0.1, 0)
    out = []
    for t, v in enumerate(values):
        state, d = policy.step(state, t, {policy.monitor: v}, directions or {})
        out.append(d.lr)
    return out


def test_a_first_nan_is_not_taken_as_best() -> None:
    # Keras 3 would make NaN its best and then never see an improvement again.
    lrs = run(Plateau(patience=2, min_delta=0.0), [math.nan, 1.0, 0.9, 0.8, 0.7])
    assert lrs == [pytest.approx(0.1)] * 5


def test_nan_and_inf_count_as_no_improvement() -> None:
    lrs = run(Plateau(patience=2, min_delta=0.0), [1.0, math.nan, math.inf, 0.5])
    assert lrs[2] == pytest.approx(0.01) and lrs[3] == pytest.approx(0.01)
    # -inf in min mode is a diverged value too (frameworks would make it the best forever).
    lrs = run(Plateau(patience=0, min_delta=0.0, compat="torch"), [1.0, -math.inf, 0.9])
    assert lrs[1] == pytest.approx(0.01)


def test_a_missing_monitor_is_skipped_with_a_warning() -> None:
    policy = Plateau(patience=1)
    state = policy.start(0.1, 0)
    state, d = policy.step(state, 0, {"loss": 1.0}, {})
    assert d.lr == pytest.approx(0.1) and d.event is None
    assert d.warning is not None and "val_loss" in d.warning and "loss" in d.warning
    assert state.wait == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("monitor", "directions", "expected"),
    [
        ("val_loss", {}, "min"),
        ("loss", {}, "min"),
        ("val_accuracy", {}, "max"),
        ("val_auc", {}, "max"),
        ("val_f1", {"f1": "max"}, "max"),
        ("val_mae", {"val_mae": "min"}, "min"),
        ("val_mae", {}, None),
    ],
)
def test_auto_mode(monitor: str, directions: dict[str, str], expected: str | None) -> None:
    assert resolve_mode(monitor, "auto", directions) == expected


def test_unresolved_auto_mode_is_an_engine_error_naming_the_metric() -> None:
    policy = Plateau(monitor="val_mae", patience=1)
    with pytest.raises(ModeUnresolved, match=r"`val_mae`.*set mode: min or mode: max") as info:
        policy.step(policy.start(0.1, 0), 0, {"val_mae": 1.0}, {})
    assert isinstance(info.value, LRPilotError) and info.value.monitor == "val_mae"


def test_smoothing_is_an_ema_and_best_is_smoothed() -> None:
    policy = Plateau(patience=1, smoothing=0.5, min_delta=0.0)
    state = policy.start(0.1, 0)
    for t, v in enumerate([1.0, 0.0, 1.0]):
        state, _ = policy.step(state, t, {"val_loss": v}, {})
    # s0 = 1, s1 = 0.5, s2 = 0.75 -> best 0.5, wait 1 -> reduced
    assert state.smoothed == pytest.approx(0.75)  # type: ignore[attr-defined]
    assert state.best == pytest.approx(0.5)  # type: ignore[attr-defined]
    assert state.lr == pytest.approx(0.01)


def test_stop_at_min_lr_is_sent_once() -> None:
    policy = Plateau(patience=1, min_lr=0.01, stop_at_min_lr=True, min_delta=0.0)
    state = policy.start(0.1, 0)
    actions = []
    for t in range(8):
        state, d = policy.step(state, t, {"val_loss": 1.0}, {})
        actions.append(d.action)
    assert actions.count("stop") == 1
    assert state.lr == pytest.approx(0.01)


@pytest.mark.parametrize("compat", ["keras", "torch"])
def test_at_min_lr_holds_on_a_plateau_in_both_compat_modes_until_an_improvement(
    compat: str,
) -> None:
    """What `lrpilot_at_min_lr` and the LrpilotAtMinLrOnPlateau alert read. Under torch, wait
    cycles 0..patience at min_lr, so `wait >= patience` is false most of the time there."""
    policy = Plateau(compat=compat, factor=0.5, patience=2, min_delta=0.0, min_lr=0.025)
    state = policy.start(0.1, 0)
    seen = []
    for t in range(20):
        state, decision = policy.step(state, t, {"val_loss": 1.0}, {})
        described = policy.describe(state)
        seen.append((decision.lr, described["wait"], described["at_min_lr"]))
    first = next(t for t, (_, _, at_min) in enumerate(seen) if at_min)
    assert seen[first - 1][0] == pytest.approx(0.025)  # min_lr reached before it says so
    assert all(lr == pytest.approx(0.025) and at_min for lr, _, at_min in seen[first:])
    assert not any(at_min for _, _, at_min in seen[:first])
    waits = [wait for _, wait, _ in seen[first:]]
    if compat == "torch":
        assert min(waits) == 0 and any(w < policy.patience for w in waits)
    else:
        assert all(w >= policy.patience for w in waits)
    # An improvement ends it; being at min_lr without a plateau is not "at min_lr on a plateau".
    state, _ = policy.step(state, 20, {"val_loss": 0.5}, {})
    assert policy.describe(state)["at_min_lr"] is False
    # An LR set from outside (override, reload) is no longer the policy's stuck min_lr.
    state, _ = policy.step(state, 21, {"val_loss": 0.5}, {})
    state, _ = policy.step(state, 22, {"val_loss": 0.5}, {})
    state, _ = policy.step(state, 23, {"val_loss": 0.5}, {})
    assert policy.describe(state)["at_min_lr"] is True
    assert policy.describe(policy.rebase(state, 0.05, 24))["at_min_lr"] is False
