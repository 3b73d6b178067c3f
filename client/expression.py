"""Safe arithmetic expressions (a `formula`'s `lr`): checked, then evaluated by simpleeval.

The policy engine checks a `type: formula` with this module when it loads a policy file,
and the client evaluates a formula sent as a plan (`lr.plan` of kind `formula`) with it:
one checker and one evaluator on both sides, so a plan's values equal the controller's.
An expression is parsed with `ast`, admitted only if it uses numbers, arithmetic
(`+ - * / // % **`), comparisons, `and or not`, `x if cond else y`, the names `NAMES` and
calls of `FUNCTIONS`, and then evaluated by simpleeval (a maintained safe-expression
library; never Python's `eval`). Every number is a float and `**` is `math.pow`, so
`4000000 ** 4000000` overflows at once instead of building a huge integer.

Example:

    >>> at = evaluator("lr0 * 0.5 ** floor(t / 10)", "epoch")
    >>> at(25, 0.1, 0.1)
    0.025
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import simpleeval  # type: ignore[import-untyped]

from .errors import ExpressionError

__all__ = [
    "EVAL_ERRORS",
    "FUNCTIONS",
    "NAMES",
    "ExpressionError",
    "compile_formula",
    "evaluator",
    "uses_lr",
]


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
    """Raise ExpressionError for anything but numbers, arithmetic, known names and functions."""
    if depth > MAX_DEPTH:
        raise ExpressionError(f"formula is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ExpressionError(f"only numbers may appear, got {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id in FUNCTIONS:
            raise ExpressionError(f"{node.id} is a function: call it, as in {node.id}(t)")
        if node.id not in names:
            known = ", ".join(n for n in NAMES if n in names)
            raise ExpressionError(f"unknown name {node.id!r}; names: {known}")
    elif isinstance(node, ast.Call):
        func = node.func
        if not isinstance(func, ast.Name):
            _check(func, names, depth + 1)  # attribute access and the like: their own message
            raise ExpressionError("only the listed functions may be called")
        if func.id not in FUNCTIONS:
            known = ", ".join(FUNCTIONS)
            raise ExpressionError(f"unknown function {func.id!r}; functions: {known}")
        if node.keywords:
            raise ExpressionError(f"{func.id} takes no keyword arguments")
        _, lo, hi = FUNCTIONS[func.id]
        if not lo <= len(node.args) <= hi:
            wanted = (
                "1 argument"
                if lo == hi == 1
                else f"{lo} to {hi} arguments"
                if hi < 64
                else f"at least {lo} arguments"
            )
            raise ExpressionError(f"{func.id} takes {wanted}, got {len(node.args)}")
        for arg in node.args:
            _check(arg, names, depth + 1)
    elif isinstance(node, ast.BinOp | ast.UnaryOp):
        if type(node.op) not in _OPERATORS:
            symbol = _SYMBOLS.get(type(node.op), type(node.op).__name__)
            raise ExpressionError(f"operator {symbol} is not allowed")
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.operator | ast.unaryop):
                _check(child, names, depth + 1)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _OPERATORS:
                symbol = _SYMBOLS.get(type(op), type(op).__name__)
                raise ExpressionError(f"operator {symbol} is not allowed")
        for child in (node.left, *node.comparators):
            _check(child, names, depth + 1)
    elif isinstance(node, ast.BoolOp | ast.IfExp):
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.boolop):
                _check(child, names, depth + 1)
    else:
        what = _WHAT.get(type(node), type(node).__name__)
        detail = f" (.{node.attr})" if isinstance(node, ast.Attribute) else ""
        raise ExpressionError(f"{what}{detail} is not allowed")


@functools.lru_cache(maxsize=1024)
def compile_formula(text: str, unit: str = "epoch") -> ast.expr:
    """Parse and check a formula once; the tree is what simpleeval evaluates.

    Raises:
        ExpressionError: a syntax error, an unknown name or function, or a construct that is
            not plain arithmetic (attribute access, indexing, strings, lambda, ...).
    """
    source = text.strip()
    if not source:
        raise ExpressionError("empty formula")
    try:
        tree = ast.parse(source, mode="eval")
    except (RecursionError, MemoryError):
        raise ExpressionError("formula is nested too deeply") from None
    except ValueError:  # a NUL byte, on Python versions that do not call it a SyntaxError
        raise ExpressionError("invalid characters in formula") from None
    except SyntaxError as exc:
        where = f" at column {exc.offset}" if exc.offset else ""
        why = "" if exc.msg == "invalid syntax" else f": {exc.msg}"
        raise ExpressionError(f"invalid syntax{where}{why}") from None
    names = set(NAMES) - {"step" if unit == "epoch" else "epoch"}
    try:
        _check(tree.body, frozenset(names))
    except ExpressionError as exc:
        if unit == "epoch" and "unknown name 'step'" in str(exc):
            raise ExpressionError("step is not known with unit: epoch; use epoch or t") from None
        if unit == "step" and "unknown name 'epoch'" in str(exc):
            raise ExpressionError("epoch is not known with unit: step; use step or t") from None
        raise
    except RecursionError:
        raise ExpressionError("formula is nested too deeply") from None
    return _FloatConstants().visit(tree).body  # type: ignore[no-any-return]


class _FloatConstants(ast.NodeTransformer):
    """Every number literal as a float (`9 ** 4000000` must not become integer arithmetic)."""

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        value = node.value  # _check admits int and float only
        assert isinstance(value, int | float)
        return ast.copy_location(ast.Constant(float(value)), node)


def uses_lr(tree: ast.expr) -> bool:
    """Whether the expression reads `lr` (the LR in force): then it is no function of time."""
    return any(isinstance(n, ast.Name) and n.id == "lr" for n in ast.walk(tree))


def evaluator(text: str, unit: str = "epoch") -> Callable[[int, float, float], float]:
    """The checked expression as a function `(t, lr0, lr) -> value` (a float, NaN when it
    gives no number) that keeps one parsed tree and simpleeval evaluator between calls
    (about 6 µs a call). Not thread-safe: one per thread.

    Raises:
        ExpressionError: the expression does not pass the check (see `compile_formula`).
        EVAL_ERRORS, from the returned function: the expression fails at that `t`
            (division by zero, log(0), an overflow).
    """
    tree = compile_formula(text, unit)
    engine = simpleeval.SimpleEval(
        operators=_OPERATORS,
        functions={name: f for name, (f, _, _) in FUNCTIONS.items()},
        names={},
        allowed_attrs={},  # no attribute of anything, even if a tree slipped past _check
    )

    names = engine.names = dict(_CONSTANTS)

    def evaluate(t: int, lr0: float, lr: float) -> float:
        x = float(t)
        names["t"] = names[unit] = x
        names["lr0"], names["lr"] = lr0, lr
        value = engine.eval(text, previously_parsed=tree)
        if isinstance(value, complex) or not isinstance(value, int | float):
            return math.nan  # not an LR
        return float(value)

    return evaluate
