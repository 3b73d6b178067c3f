"""Reduce the LR when a monitored metric stops improving (`type: plateau`).

`compat: keras` repeats `keras.callbacks.ReduceLROnPlateau` decision for
decision (Keras 3: cooldown ticks first and clears `wait`; an improvement
resets `wait`; outside cooldown `wait` grows and reduces at `wait >= patience`;
at `min_lr` nothing is reduced, `wait` keeps counting and no cooldown starts;
values are compared and the LR held in float32, as TensorFlow does).
`compat: torch` repeats `torch.optim.lr_scheduler.ReduceLROnPlateau` (bad
epochs are counted, then cooldown clears them; reduce at `bad > patience`; rel
or abs threshold; a change smaller than `eps` is skipped but still starts the
cooldown).

`mode: auto`: a monitor named `loss` or ending in `_loss` is minimised;
otherwise the direction the client sent for that metric at `hello` (the Keras
callback sends each compiled metric's direction); otherwise a name containing
`acc` or `auc` is maximised; otherwise the controller answers
`mode_unresolved` and keeps the LR — set `mode` explicitly.

Where lrpilot differs from both frameworks, on purpose: a non-finite value
(NaN, +inf, and −inf too) is never an improvement, also as the first value.
Keras 3 would take a first NaN as its best and never see an improvement again;
both would make a −inf loss the best forever. A report without the monitored
metric is skipped with a warning, as Keras does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lrpilot.client.vocabulary import MIN_LR

from .base import Decision, Policy, State, float32
from .errors import ModeUnresolved
from .fields import at_least, between, one_of, param

__all__ = ["TORCH_FRAMEWORKS", "Plateau", "PlateauState", "resolve_mode"]

#: `hello.framework` values whose jobs get `compat: torch` under `compat: auto`.
TORCH_FRAMEWORKS = frozenset({"torch", "lightning", "hf", "transformers"})


@dataclass(frozen=True, kw_only=True)
class PlateauState(State):
    best: float | None = None
    wait: int = 0
    cooldown_counter: int = 0
    smoothed: float | None = None
    value: float | None = None
    stop_sent: bool = False
    # The policy would have reduced but the LR is at min_lr, and nothing improved since. Under
    # compat torch `wait` cycles 0..patience there, so `wait >= patience` cannot say this.
    at_min_lr: bool = False


def is_loss(monitor: str) -> bool:
    """A loss, by name: `loss` or anything ending in `_loss`."""
    return monitor == "loss" or monitor.endswith("_loss")


def resolve_mode(monitor: str, mode: str, directions: Mapping[str, str]) -> str | None:
    """min or max for `monitor`, or None when `mode: auto` cannot tell.

    Order: an explicit mode; a monitor named `loss` or ending in `_loss`
    (`val_loss`, `eval_loss`, `train_kl_loss`) is min; the direction the client
    sent in `hello.directions`; a name containing `acc` or `auc` is max.
    """
    if mode in ("min", "max"):
        return mode
    if is_loss(monitor):
        return "min"
    name = monitor.removeprefix("val_")
    direction = directions.get(monitor) or directions.get(name)
    if direction in ("min", "max"):
        return direction
    if "acc" in name or "auc" in name:
        return "max"
    return None


@dataclass(frozen=True, kw_only=True)
class Plateau(Policy):
    """Reduce-on-plateau with Keras' or PyTorch's exact semantics."""

    type = "plateau"
    equivalents = (
        "Keras `keras.callbacks.ReduceLROnPlateau` (`compat: keras`)",
        "torch `torch.optim.lr_scheduler.ReduceLROnPlateau` (`compat: torch`)",
    )
    state_class = PlateauState

    monitor: str = param("val_loss", doc="metric to watch, as the client reports it")
    mode: str | None = param(
        None,
        one_of("auto", "min", "max"),
        "`min`, `max` or `auto` (default: auto with compat keras, min with compat torch)",
    )
    factor: float = param(0.1, between(0, 1), "new_lr = lr · factor, 0 < factor < 1")
    patience: int = param(10, at_least(0), "evaluations without improvement before reducing")
    min_delta: float | None = param(
        None,
        at_least(0),
        "smallest change that counts as an improvement (torch's `threshold`; default 1e-4)",
    )
    threshold_mode: str | None = param(
        None,
        one_of("abs", "rel"),
        "`abs`: beat best by min_delta; `rel`: by best · min_delta (default: abs with keras, "
        "rel with torch)",
    )
    cooldown: int = param(
        0, at_least(0), "evaluations after a reduction during which nothing is counted"
    )
    min_lr: float = param(0.0, at_least(0), "lower bound on the LR (at least 1e-12)")
    eps: float = param(1e-8, at_least(0), "torch only: a reduction smaller than this is skipped")
    smoothing: float | None = param(
        None,
        between(0, 1, hi_open=False),
        "EMA α on the monitored value: s₀ = x₀, sₜ = α·xₜ + (1−α)·sₜ₋₁; best is on the smoothed "
        "value (default: none)",
    )
    compat: str = param(
        "auto",
        one_of("auto", "keras", "torch"),
        "whose semantics to repeat exactly: `keras`, `torch`, or `auto` (torch for jobs whose "
        "rank 0 is a torch, Lightning or Hugging Face client, keras otherwise)",
    )
    stop_at_min_lr: bool = param(
        False, doc="once at min_lr and still on a plateau, ask the trainer to stop (once)"
    )

    def __post_init__(self) -> None:
        if self.compat == "auto":
            return  # the framework defaults are filled in by for_framework()
        torch = self.compat == "torch"
        if self.mode is None:
            object.__setattr__(self, "mode", "min" if torch else "auto")
        if self.min_delta is None:
            object.__setattr__(self, "min_delta", 1e-4)
        if self.threshold_mode is None:
            object.__setattr__(self, "threshold_mode", "rel" if torch else "abs")

    def for_framework(self, framework: str) -> Plateau:
        """`compat: auto` made concrete for a job whose rank 0 runs `framework`."""
        if self.compat != "auto":
            return self
        compat = "torch" if framework in TORCH_FRAMEWORKS else "keras"
        return dataclasses.replace(self, compat=compat)

    def problems(self) -> list[tuple[str | None, str]]:
        out: list[tuple[str | None, str]] = []
        if self.compat in ("keras", "auto") and self.threshold_mode == "rel":
            out.append(("threshold_mode", "threshold_mode rel needs compat: torch (Keras is abs)"))
        if self.compat == "torch" and self.mode == "auto":
            out.append(("mode", "mode auto needs compat: keras (torch takes min or max)"))
        if self.initial_lr is not None and self.min_lr > self.initial_lr:
            out.append(("min_lr", f"min_lr must be <= initial_lr {self.initial_lr:g}"))
        return out

    # -- the engine ---------------------------------------------------------

    @property
    def keras(self) -> bool:
        return self.compat != "torch"  # an unbound `auto` decides as Keras does

    def _held(self, lr: float) -> float:
        return float32(lr) if self.keras else lr

    def start(self, lr0: float, t: int) -> PlateauState:
        return PlateauState(lr=self._held(lr0))

    def rebase(self, state: State, lr: float, t: int) -> State:
        return state.replace(lr=self._held(lr), at_min_lr=False)

    def _smooth(self, state: PlateauState, x: float) -> float:
        if self.smoothing is None or state.smoothed is None:
            return x
        return self.smoothing * x + (1.0 - self.smoothing) * state.smoothed

    def improved(self, x: float, best: float | None, mode: str) -> bool:
        """Whether `x` beats `best` the way the chosen framework decides it."""
        if not math.isfinite(x):
            return False  # a diverged value is information, never an improvement
        delta = self.min_delta or 0.0
        if self.keras:
            if best is None:
                return True
            if mode == "min":
                return float32(x + delta) < float32(best)
            return float32(x - delta) > float32(best)
        ref = best if best is not None else (math.inf if mode == "min" else -math.inf)
        if mode == "min":
            return x < (ref * (1.0 - delta) if self.threshold_mode == "rel" else ref - delta)
        return x > (ref * (1.0 + delta) if self.threshold_mode == "rel" else ref + delta)

    def step(
        self, state: State, t: int, metrics: Mapping[str, float], directions: Mapping[str, str]
    ) -> tuple[State, Decision]:
        assert isinstance(state, PlateauState)
        if self.compat == "auto":  # not bound to a framework (simulate, tests): Keras
            return self.for_framework("").step(state, t, metrics, directions)
        raw = metrics.get(self.monitor)
        if raw is None:
            available = ",".join(sorted(metrics)) or "none"
            warning = (
                f"plateau is conditioned on metric `{self.monitor}` which is not available; "
                f"available metrics are: {available}"
            )
            return state, Decision(state.lr, warning=warning, apply=self.apply)
        mode = resolve_mode(self.monitor, self.mode or "auto", directions)
        if mode is None:
            raise ModeUnresolved(self.monitor)
        x = float(raw)
        smoothed = state.smoothed
        if math.isfinite(x):
            x = self._smooth(state, x)
            smoothed = x
        state = state.replace(value=float(raw), smoothed=smoothed)
        if self.keras:
            return self._step_keras(state, x, mode)
        return self._step_torch(state, x, mode)

    def _step_keras(self, s: PlateauState, x: float, mode: str) -> tuple[State, Decision]:
        cooldown, wait, best = s.cooldown_counter, s.wait, s.best
        if cooldown > 0:
            cooldown -= 1
            wait = 0
        if self.improved(x, best, mode):
            return s.replace(best=x, wait=0, cooldown_counter=cooldown, at_min_lr=False), Decision(
                s.lr, apply=self.apply
            )
        if cooldown > 0:
            return s.replace(wait=wait, cooldown_counter=cooldown), Decision(s.lr, apply=self.apply)
        wait += 1
        if wait < self.patience:
            return s.replace(wait=wait, cooldown_counter=cooldown), Decision(s.lr, apply=self.apply)
        if s.lr > float32(self.floor):
            new_lr = float32(max(s.lr * self.factor, self.floor))
            decision = self.decision(s, new_lr, "plateau", wait=wait, patience=self.patience)
            after = s.replace(lr=new_lr, wait=0, cooldown_counter=self.cooldown, at_min_lr=False)
            return after, decision
        # At min_lr: Keras keeps counting and starts no cooldown.
        return self._at_min_lr(s.replace(wait=wait, cooldown_counter=cooldown))

    def _step_torch(self, s: PlateauState, x: float, mode: str) -> tuple[State, Decision]:
        best, bad, cooldown = s.best, s.wait, s.cooldown_counter
        at_min_lr = s.at_min_lr
        if self.improved(x, best, mode):
            best, bad, at_min_lr = x, 0, False
        else:
            bad += 1
        if cooldown > 0:
            cooldown -= 1
            bad = 0  # torch ignores bad epochs in cooldown
        if bad <= self.patience:
            state = s.replace(best=best, wait=bad, cooldown_counter=cooldown, at_min_lr=at_min_lr)
            return state, Decision(s.lr, apply=self.apply)
        new_lr = max(s.lr * self.factor, self.floor)
        after = s.replace(best=best, wait=0, cooldown_counter=self.cooldown)
        if s.lr - new_lr > self.eps:
            decision = self.decision(s, new_lr, "plateau", wait=bad, patience=self.patience)
            return after.replace(lr=new_lr, at_min_lr=False), decision
        return self._at_min_lr(after)

    @property
    def floor(self) -> float:
        """`min_lr`, but never below the LR range (a `min_lr` of 0 stops at 1e-12)."""
        return max(self.min_lr, MIN_LR)

    def _at_min_lr(self, s: PlateauState) -> tuple[State, Decision]:
        s = s.replace(at_min_lr=True)
        if self.stop_at_min_lr and not s.stop_sent:
            return s.replace(stop_sent=True), Decision(s.lr, action="stop", apply=self.apply)
        return s, Decision(s.lr, apply=self.apply)

    def monitors(self) -> tuple[str, ...]:
        return (self.monitor,)

    def transfer(self, state: State, new: Policy, t: int) -> State:
        """Best, wait and cooldown carry over to a plateau with the same monitor, mode and
        compat (the LR clamped to its min_lr); any other policy starts from the current LR."""
        if isinstance(new, Plateau) and (self.monitor, self.mode, self.compat) == (
            new.monitor,
            new.mode,
            new.compat,
        ):
            return state.replace(lr=max(state.lr, new.min_lr))
        return super().transfer(state, new, t)

    def describe(self, state: State) -> dict[str, Any]:
        assert isinstance(state, PlateauState)
        return {
            "policy": self.type,
            "phase": None,
            "monitor": self.monitor,
            "value": state.value,
            "best": state.best,
            "wait": state.wait,
            "patience": self.patience,
            "min_lr": self.min_lr,
            "at_min_lr": state.at_min_lr,
        }
