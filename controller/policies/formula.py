"""An LR written as an expression (`type: formula`): `lr: "1e-8 * 10 ** (epoch / 20)"`.

The expression is what a Keras `LearningRateScheduler(lambda epoch, lr: ...)` would return,
written in the policy file. It is checked when the file is loaded — its syntax, and that it
uses only numbers, arithmetic (`+ - * / // % **`), comparisons, `and or not`,
`x if cond else y`, the names below and calls of the functions below — and evaluated by
simpleeval (a maintained safe-expression library; never Python's `eval`).

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
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import simpleeval  # type: ignore[import-untyped]

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

#: Functions a formula may call, with how many arguments each takes (min, max).
FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "exp": (math.exp, 1, 1),
    "log": (math.log, 1, 2),
    "log10": (math.log10, 1, 1),
    "sqrt": (math.sqrt, 1, 1),
    "sin": (math.sin, 1, 1),
    "cos": (math.cos, 1, 1),
    "floor": (lambda x: float(math.floor(x)), 1, 1),
    "ceil": (lambda x: float(math.ceil(x)), 1, 1),
    "min": (min, 2, 64),
    "max": (max, 2, 64),
}

#: What an evaluation may raise (division by zero, log(0), an overflow): no usable value.
EVAL_ERRORS = (ArithmeticError, ValueError, TypeError, RecursionError, simpleeval.InvalidExpression)

#: Names a formula may use (`epoch` only with unit: epoch, `step` only with unit: step).
NAMES = ("t", "epoch", "step", "lr0", "lr", "pi", "e")
_CONSTANTS = {"pi": math.pi, "e": math.e}

_OPERATORS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: math.pow,  # floats only: overflow raises, never a huge integer
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.Not: operator.not_,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_SYMBOLS = {
    ast.BitOr: "|",
    ast.BitAnd: "&",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Is: "is",
    ast.IsNot: "is not",
    ast.In: "in",
    ast.NotIn: "not in",
}
_WHAT = {
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Lambda: "lambda",
    ast.NamedExpr: "assignment (:=)",
    ast.JoinedStr: "f-strings",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.Starred: "unpacking (*)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
    ast.Slice: "slices",
}


MAX_DEPTH = 100  # nesting; simpleeval evaluates recursively


def _check(node: ast.AST, names: frozenset[str], depth: int = 0) -> None:
    """Raise FormulaError for anything but numbers, arithmetic, known names and functions."""
    if depth > MAX_DEPTH:
        raise FormulaError(f"formula is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise FormulaError(f"only numbers may appear, got {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            raise FormulaError(f"{node.id} is a function: call it, as in {node.id}(t)")
        if node.id not in names:
            known = ", ".join(n for n in NAMES if n in names)
            raise FormulaError(f"unknown name {node.id!r}; names: {known}")
    elif isinstance(node, ast.Call):
        func = node.func
        if not isinstance(func, ast.Name):
            _check(func, names, depth + 1)  # attribute access and the like: their own message
            raise FormulaError("only the listed functions may be called")
        if func.id not in FUNCTIONS:
            raise FormulaError(f"unknown function {func.id!r}; functions: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise FormulaError(f"{func.id} takes no keyword arguments")
        _, lo, hi = FUNCTIONS[func.id]
        if not lo <= len(node.args) <= hi:
            wanted = (
                "1 argument"
                if lo == hi == 1
                else f"{lo} to {hi} arguments"
                if hi < 64
                else f"at least {lo} arguments"
            )
            raise FormulaError(f"{func.id} takes {wanted}, got {len(node.args)}")
        for arg in node.args:
            _check(arg, names, depth + 1)
    elif isinstance(node, ast.BinOp | ast.UnaryOp):
        if type(node.op) not in _OPERATORS:
            symbol = _SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise FormulaError(f"operator {symbol} is not allowed")
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.operator | ast.unaryop):
                _check(child, names, depth + 1)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _OPERATORS:
                symbol = _SYMBOLS.get(type(op), type(op).__name__)
                raise FormulaError(f"operator {symbol} is not allowed")
        for child in (node.left, *node.comparators):
            _check(child, names, depth + 1)
    elif isinstance(node, ast.BoolOp | ast.IfExp):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.boolop):
                _check(child, names, depth + 1)
    else:
        what = _WHAT.get(type(node), type(node).__name__)
        detail = f" (.{node.attr})" if isinstance(node, ast.Attribute) else ""
        raise FormulaError(f"{what}{detail} is not allowed")


@functools.lru_cache(maxsize=1024)
def compile_formula(text: str, unit: str = "epoch") -> ast.expr:
    """Parse and check a formula once; the tree is what simpleeval evaluates.

    Raises:
        FormulaError: a syntax error, an unknown name or function, or a construct that is
            not plain arithmetic (attribute access, indexing, strings, lambda, ...).
    """
    source = text.strip()
    if not source:
        raise FormulaError("empty formula")
    try:
        tree = ast.parse(source, mode="eval")
    except (RecursionError, MemoryError):
        raise FormulaError("formula is nested too deeply") from None
    except ValueError:  # a NUL byte, on Python versions that do not call it a SyntaxError
        raise FormulaError("invalid characters in formula") from None
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        why = "" if exc.msg == "invalid syntax" else f": {exc.msg}"
        raise FormulaError(f"invalid syntax{where}{why}") from None
    names = set(NAMES) - {"step" if unit == "epoch" else "epoch"}
    try:
        _check(tree.body, frozenset(names))
    except FormulaError as exc:
        if unit == "epoch" and "unknown name 'step'" in str(exc):
            raise FormulaError("step is not known with unit: epoch; use epoch or t") from None
        if unit == "step" and "unknown name 'epoch'" in str(exc):
            raise FormulaError("epoch is not known with unit: step; use step or t") from None
        raise
    except RecursionError:
        raise FormulaError("formula is nested too deeply") from None
    return _FloatConstants().visit(tree).body  # type: ignore[no-any-return]


class _FloatConstants(ast.NodeTransformer):
    """Every number literal as a float (`9 ** 4000000` must not become integer arithmetic)."""

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        value = node.value  # _check admits int and float only
        assert isinstance(value, int | float)
        return ast.copy_location(ast.Constant(float(value)), node)


def formula_problem(text: Any) -> str | None:
    """The policy file's check of `lr`: None, or what is wrong with the formula."""
    try:
        compile_formula(text, "epoch")
    except FormulaError as exc:
        if str(exc).startswith("step is not known"):
            return None  # fine with unit: step; problems() checks it against the unit
        return f"is not a valid formula: {exc}"
    return None


def _uses_lr(tree: ast.expr) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "lr" for n in ast.walk(tree))


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
        tree = compile_formula(self.lr, self.unit)
        evaluator = simpleeval.SimpleEval(
            operators=_OPERATORS,
            functions={name: f for name, (f, _, _) in FUNCTIONS.items()},
            names={},
            allowed_attrs={},  # no attribute of anything, even if a tree slipped past _check
        )
        text, unit = self.lr, self.unit

        def evaluate(t: int, lr0: float, lr: float) -> float:
            x = float(t)
            evaluator.names = {"t": x, unit: x, "lr0": lr0, "lr": lr, **_CONSTANTS}
            value = evaluator.eval(text, previously_parsed=tree)
            if isinstance(value, complex) or not isinstance(value, int | float):
                return math.nan  # not an LR
            return float(value)

        return evaluate

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
        if _uses_lr(compile_formula(self.lr, self.unit)):
            return state.replace(lr=lr)  # a recursive formula goes on from the new LR
        try:
            base = self.evaluate(t + 1, state.lr0, state.lr)
        except EVAL_ERRORS:
            base = math.nan
        scale = lr / base if math.isfinite(base) and base > 0 else state.scale
        return state.replace(lr=lr, scale=scale)


_clamp = clamp_lr
