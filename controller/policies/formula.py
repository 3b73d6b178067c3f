"""An LR written as an expression (`type: formula`): `lr: "1e-8 * 10 ** (epoch / 20)"`.

The expression is what a Keras `LearningRateScheduler(lambda epoch, lr: ...)` would return,
written in the policy file. It is checked when the file is loaded — its syntax, and that it
uses only numbers, arithmetic (`+ - * / // % **`), comparisons, `and or not`,
`x if cond else y`, the names below and calls of the functions below — and evaluated by
simpleeval (a maintained safe-expression library; never Python's `eval`). The checker and
the evaluator are `lrpilot.client.expression`, which the client uses for a formula plan.

A formula that does not read `lr` is a function of time: it goes to clients as a plan
(`kind: formula`, `params: {lr: text}`) evaluated in the trainer with the same code.

Evaluation is in floating point only: every number, `t`, `floor` and `ceil` are floats and
`**` is `math.pow`, so `4000000 ** 4000000` overflows at once instead of building an integer
of 26 million digits (which stalled the loop for seconds). `lrpilot check` and every reload
also evaluate each formula on t = 0…10,000 and reject it, with its line, if one evaluation
takes over 1 ms or none gives a finite value.

Names: `t` (epochs, or steps with `unit: step`, since the phase started), `epoch` (the same
as `t` with `unit: epoch`) or `step` (the same as `t` with `unit: step`), `lr0` (the LR the
policy starts from: `initial_lr`, else the job's or the previous phase's LR), `lr` (the LR in
force), `pi`, `e`. Functions: `exp log log10 sqrt sin cos floor ceil min max`.

At run time a value outside [1e-12, 10] is clamped into it (the decision's notice is
`clamped`); a value that is not a finite number — or an expression that fails, such as
`log(0)` or a division by zero — keeps the LR in force, with a warning.
"""

from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lrpilot.client.expression as expression
from lrpilot.client.errors import ExpressionError
from lrpilot.client.expression import EVAL_ERRORS, FUNCTIONS, NAMES, uses_lr
from lrpilot.client.vocabulary import LR_RANGE, MIN_LR, clamp_lr

from .base import Decision, Policy, State
from .errors import FormulaError
from .fields import param

__all__ = [
    "EVAL_ERRORS",
    "FUNCTIONS",
    "LOWEST_LR",
    "NAMES",
    "Formula",
    "FormulaError",
    "FormulaState",
]

#: What a value at or below 0 is clamped to: an LR every framework takes, that barely moves.
LOWEST_LR = MIN_LR


@functools.lru_cache(maxsize=1024)
def compile_formula(text: str, unit: str = "epoch") -> ast.expr:
    """Parse and check a formula once (`lrpilot.client.expression`, the checker the client
    uses too); the tree is what simpleeval evaluates.

    Raises:
        FormulaError: a syntax error, an unknown name or function, or a construct that is
            not plain arithmetic (attribute access, indexing, strings, lambda, ...).
    """
    try:
        return expression.compile_formula(text, unit)
    except ExpressionError as exc:
        raise FormulaError(str(exc)) from None


def formula_problem(text: Any) -> str | None:
    """The policy file's check of `lr`: None, or what is wrong with the formula."""
    try:
        compile_formula(text, "epoch")
    except FormulaError as exc:
        if str(exc).startswith("step is not known"):
            return None  # fine with unit: step; problems() checks it against the unit
        return f"is not a valid formula: {exc}"
    return None


@dataclass(frozen=True, kw_only=True)
class FormulaState(State):
    lr0: float = 0.0
    scale: float = 1.0  # an operator's override rescales a formula that does not read `lr`


@dataclass(frozen=True, kw_only=True)
class Formula(Policy):
    """The LR is an expression of t, epoch or step, lr0 and lr.

    Example:
        >>> seed = Formula(lr="1e-8 * 10 ** (epoch / 20)")
        >>> seed.start(0.001, 20).lr == 1e-8 * 10 ** (20 / 20)
        True
    """

    type = "formula"
    equivalents = (
        "Keras `keras.callbacks.LearningRateScheduler(lambda epoch, lr: ...)`",
        "torch `LambdaLR` (write `lr0 * f(epoch)`: LambdaLR returns a factor of lr0)",
    )
    state_class = FormulaState

    lr: str = param(check=formula_problem, doc="the expression giving the LR (a string)")

    def problems(self) -> list[tuple[str | None, str]]:
        try:
            compile_formula(self.lr, self.unit)
        except FormulaError as exc:
            return [("lr", f"lr is not a valid formula: {exc}")]
        return []

    def evaluate(self, t: int, lr0: float, lr: float) -> float:
        """The expression's value at local time t (a float, possibly not finite).

        Raises:
            ArithmeticError, ValueError: the expression fails (division by zero, log(0),
                an overflow, an exponent too large for simpleeval).
        """
        return self.evaluator()(t, lr0, lr)

    def evaluator(self) -> Callable[[int, float, float], float]:
        """`evaluate` as a function that keeps one parsed tree and evaluator between calls
        (6 µs a call rather than 60): for many evaluations in one thread, as the loader's
        budget check on t = 0…10,000."""
        compile_formula(self.lr, self.unit)  # FormulaError, in the engine's words
        return expression.evaluator(self.lr, self.unit)

    def plan(
        self, state: State, origin: int = 0, until: int | None = None
    ) -> dict[str, Any] | None:
        """A formula that does not read `lr` as a plan (`kind: formula`, params
        `{lr: text, unit}`), evaluated in the trainer by the same evaluator; None for one
        that reads `lr` (each value depends on the last), and in shadow mode."""
        assert isinstance(state, FormulaState)
        if not self.apply or uses_lr(compile_formula(self.lr, self.unit)):
            return None
        return {
            "kind": self.type,
            "params": {"lr": self.lr, "unit": self.unit},
            "unit": self.unit,
            "from": origin,
            "until": until,
            "lr0": state.lr0,
            "scale": state.scale,
        }

    def _value(self, state: FormulaState, t: int) -> tuple[float | None, str | None]:
        """(scaled value or None when unusable, why it is unusable)."""
        try:
            raw = self.evaluate(t, state.lr0, state.lr)
        except EVAL_ERRORS as exc:
            return None, f"{type(exc).__name__}: {exc}"
        value = state.scale * raw
        if not math.isfinite(value):
            return None, f"the value {value!r}"
        return value, None

    def start(self, lr0: float, t: int) -> FormulaState:
        base = self.initial_lr if self.initial_lr is not None else lr0
        state = FormulaState(lr=base, lr0=base)
        value, _ = self._value(state, t)
        return state if value is None else state.replace(lr=_clamp(value))

    def step(
        self, state: State, t: int, metrics: Mapping[str, float], directions: Mapping[str, str]
    ) -> tuple[State, Decision]:
        assert isinstance(state, FormulaState)
        value, why = self._value(state, t + 1)
        if value is None:
            warning = f"formula {self.lr!r} gave no usable LR ({why}); the LR stays as it is"
            return state, Decision(state.lr, warning=warning, apply=self.apply)
        new_lr = _clamp(value)
        decision = self.decision(state, new_lr, "schedule")
        if new_lr != value:
            warning = f"formula {self.lr!r} left {LR_RANGE}; its LR is clamped to {new_lr:.6g}"
            decision = Decision(
                decision.lr, decision.event, warning=warning, apply=self.apply, notice="clamped"
            )
        return state.replace(lr=new_lr), decision

    def rebase(self, state: State, lr: float, t: int) -> State:
        assert isinstance(state, FormulaState)
        if uses_lr(compile_formula(self.lr, self.unit)):
            return state.replace(lr=lr)  # a recursive formula goes on from the new LR
        try:
            base = self.evaluate(t + 1, state.lr0, state.lr)
        except EVAL_ERRORS:
            base = math.nan
        scale = lr / base if math.isfinite(base) and base > 0 else state.scale
        return state.replace(lr=lr, scale=scale)


_clamp = clamp_lr
