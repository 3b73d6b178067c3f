"""Plans: a deterministic schedule sent as a function of time, evaluated in the trainer.

A plan is what the controller sends in `lr.plan` for a schedule (`step`, `cosine`,
`one_cycle`, ...) instead of one `lr` message per boundary:

    {"kind": "exponential", "params": {...}, "unit": "step", "from": 0, "until": None,
     "lr0": 0.1, "scale": 1.0}

`lr_at(plan, t)` is its LR at boundary `t` (an epoch, or an optimizer step with unit
"step"), for `from <= t < until`: `scale * value(kind, params, lr0, t - from)` kept in [1e-12, 10].
`from` is where the schedule's local time is 0 (the start of its phase); `scale` is what an
operator's override changed. A phase of a chain may carry the plans of the phases after it,
sent ahead: `next` is the plan in force from its `until` on (`next.from == until`, the same
unit), so every rank switches at that very boundary with no message, also while the
controller is down. The controller's schedule classes compute their own LRs with
this very module (`value`), so a plan's LRs equal the controller's by construction.

Pure functions of numbers, importing nothing beyond the standard library and the
vocabulary (a `formula` plan loads `lrpilot.client.expression`, simpleeval, when it comes):
the client can
evaluate a plan at every step without the controller (down, slow, or far away).

Example:

    >>> plan = {"kind": "step", "params": {"factor": 0.5, "step_size": 10},
    ...         "unit": "epoch", "from": 0, "until": None, "lr0": 0.1}
    >>> lr_at(plan, 25)
    0.025
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ProtocolError
from .vocabulary import clamp_lr

__all__ = [
    "KINDS",
    "MAX_AHEAD",
    "active",
    "check_plan",
    "compiled",
    "compiled_momentum",
    "lr_at",
    "momentum",
    "span_at",
    "spans",
    "value",
]

Params = Mapping[str, Any]


def _step(p: Params, lr0: float, t: int) -> float:
    return float(lr0 * p["factor"] ** (t // p["step_size"]))


def _multistep(p: Params, lr0: float, t: int) -> float:
    return float(lr0 * p["factor"] ** bisect.bisect_right(p["milestones"], t))


def _exponential(p: Params, lr0: float, t: int) -> float:
    k = p.get("k")
    if k is not None:
        return lr0 * math.exp(-k * t)
    e = t / p["decay_steps"]
    if p.get("staircase"):
        e = math.floor(e)
    return lr0 * float(p["decay_rate"] ** e)


def _inverse_time(p: Params, lr0: float, t: int) -> float:
    e = t / p.get("decay_steps", 1)
    if p.get("staircase"):
        e = math.floor(e)
    return float(lr0 / (1.0 + p["decay_rate"] * e))


def _cosine(p: Params, lr0: float, t: int) -> float:
    steps = p["decay_steps"]
    alpha = p.get("alpha", 0.0)
    done = min(t, steps) / steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * done))
    return float(lr0 * ((1.0 - alpha) * cosine + alpha))


def _warmup(p: Params, lr0: float, t: int) -> float:
    start = p.get("from_lr")
    start = lr0 if start is None else start
    done = min(t, p["epochs"]) / p["epochs"]
    return float(start + (p["to_lr"] - start) * done)


def _constant(p: Params, lr0: float, t: int) -> float:
    lr = p.get("lr")
    return float(lr0 if lr is None else lr)


def anneal(kind: str, start: float, end: float, pct: float) -> float:
    """torch's `_annealing_cos` / `_annealing_linear` from `start` to `end` at `pct` in [0, 1]."""
    if kind == "cos":
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _one_cycle_at(p: Params, lr0: float, t: int) -> tuple[float, float]:
    """(lr, momentum) of torch's OneCycleLR at `t`; the last LR is held past the cycle."""
    peak = p.get("max_lr")
    peak = lr0 if peak is None else peak
    total, pct_start = p["total_steps"], p.get("pct_start", 0.3)
    initial = peak / p.get("div_factor", 25.0)
    final = initial / p.get("final_div_factor", 1e4)
    rise = float(pct_start * total) - 1
    hi, lo = p.get("max_momentum", 0.95), p.get("base_momentum", 0.85)
    last = float(total - 1)
    if p.get("three_phase"):
        phases = [
            (rise, initial, peak, hi, lo),
            (float(2 * pct_start * total) - 2, peak, initial, lo, hi),
            (last, initial, final, hi, hi),
        ]
    else:
        phases = [(rise, initial, peak, hi, lo), (last, peak, final, lo, hi)]
    kind = p.get("anneal", "cos")
    step = min(t, total - 1)
    begin = 0.0
    for i, (end, lr_a, lr_b, m_a, m_b) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - begin) / (end - begin)
            return anneal(kind, lr_a, lr_b, pct), anneal(kind, m_a, m_b, pct)
        begin = end
    raise AssertionError("unreachable")  # pragma: no cover


def _one_cycle(p: Params, lr0: float, t: int) -> float:
    return _one_cycle_at(p, lr0, t)[0]


def _cyclic_scale(p: Params, t: int) -> tuple[float, float]:
    """(height of the triangle in [0, 1], amplitude factor) at `t`, as torch's CyclicLR."""
    up = float(p.get("step_size_up", 2000))
    down = p.get("step_size_down")
    down = up if down is None else float(down)
    total = up + down
    ratio = up / total
    cycle = math.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    height = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    mode = p.get("mode", "triangular")
    if mode == "triangular":
        amplitude = 1.0
    elif mode == "triangular2":
        amplitude = 1 / (2.0 ** (cycle - 1))
    else:
        amplitude = float(p.get("gamma", 1.0) ** t)
    return height, amplitude


def _cyclic(p: Params, lr0: float, t: int) -> float:
    height, amplitude = _cyclic_scale(p, t)
    return float(p["base_lr"] + (p["max_lr"] - p["base_lr"]) * height * amplitude)


def restarts_cycle(p: Params, t: int) -> tuple[int, float]:
    """(index of the SGDR cycle `t` falls in, fraction of that cycle done)."""
    first, t_mul = p["first_decay_steps"], p.get("t_mul", 2.0)
    done = t / first
    if t_mul == 1.0:
        i = math.floor(done)
        return i, done - i
    i = math.floor(math.log(1.0 - done * (1.0 - t_mul)) / math.log(t_mul))

    def fraction(i: int) -> float:
        before = (1.0 - t_mul**i) / (1.0 - t_mul)
        return float((done - before) / t_mul**i)

    # The logarithm can land one cycle off at an exact restart: settle it exactly.
    while i > 0 and fraction(i) < 0:
        i -= 1
    while fraction(i) >= 1:
        i += 1
    return i, fraction(i)


def _cosine_restarts(p: Params, lr0: float, t: int) -> float:
    i, frac = restarts_cycle(p, t)
    alpha = p.get("alpha", 0.0)
    cosine = 0.5 * p.get("m_mul", 1.0) ** i * (1.0 + math.cos(math.pi * frac))
    return float(lr0 * ((1.0 - alpha) * cosine + alpha))


def _polynomial(p: Params, lr0: float, t: int) -> float:
    decay_steps = p["decay_steps"]
    end_lr, power = p.get("end_lr", 1e-4), p.get("power", 1.0)
    steps = float(decay_steps)
    if p.get("cycle"):
        steps *= 1.0 if t == 0 else math.ceil(t / decay_steps)
        done = t / steps
    else:
        done = min(t, decay_steps) / steps
    return float((lr0 - end_lr) * (1.0 - done) ** power + end_lr)


def _piecewise(p: Params, lr0: float, t: int) -> float:
    return float(p["values"][bisect.bisect_left(p["boundaries"], t)])


def _range_test(p: Params, lr0: float, t: int) -> float:
    """The LR range test's sweep: `start_lr · 10^(t / steps_per_decade)`, computed as the
    seeds' lambda does, kept at most `end_lr` (the plan's `until` ends it there)."""
    return float(min(10 ** (t / p["steps_per_decade"]) * p["start_lr"], p["end_lr"]))


def _formula_evaluator(p: Params) -> Callable[[int, float, float], float]:
    """A new evaluator of a `formula` plan's text (one per compiled plan: not thread-safe)."""
    # simpleeval: loaded only by a client that gets a formula plan
    from .expression import EVAL_ERRORS, evaluator

    evaluate = evaluator(p["lr"], p["unit"])

    def value(t: int, lr0: float, lr: float) -> float:
        try:
            return evaluate(t, lr0, lr)
        except EVAL_ERRORS:
            return math.nan

    return value


def _formula(p: Params, lr0: float, t: int) -> float:
    """A `formula` that does not read `lr` (params `{lr: text, unit}`): its value at `t`,
    NaN where it gives none (an error such as log(0)): the LR in force then stays."""
    return _formula_evaluator(p)(t, lr0, lr0)


#: The evaluator of each plan kind: (params, lr0, local t) -> LR before scale and ceiling.
KINDS: dict[str, Callable[[Params, float, int], float]] = {
    "step": _step,
    "multistep": _multistep,
    "exponential": _exponential,
    "inverse_time": _inverse_time,
    "cosine": _cosine,
    "warmup": _warmup,
    "constant": _constant,
    "one_cycle": _one_cycle,
    "cyclic": _cyclic,
    "cosine_restarts": _cosine_restarts,
    "polynomial": _polynomial,
    "piecewise": _piecewise,
    "formula": _formula,
    "range_test": _range_test,
}


def value(kind: str, params: Params, lr0: float, t: int) -> float:
    """The schedule `kind`'s LR at local time `t` when it starts from `lr0` (no scale)."""
    return KINDS[kind](params, lr0, t)


#: At most this many phases are sent ahead of the one in force (`next` nested this deep).
MAX_AHEAD = 8


def spans(plan: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The plan and the phases sent ahead with it (`next`), in order."""
    out = [plan]
    while (ahead := out[-1].get("next")) is not None:
        out.append(ahead)
    return out


def span_at(plan: Mapping[str, Any], t: int) -> Mapping[str, Any]:
    """The phase of the plan whose span holds `t` (the plan itself when none does: `lr_at`
    then evaluates it past its end, as before `next` existed)."""
    for span in spans(plan):
        if active(span, t):
            return span
    return plan


def lr_at(plan: Mapping[str, Any], t: int) -> float:
    """The plan's LR at boundary `t` (absolute: an epoch, or a step with unit "step"); from
    its `until` on, the LR of the phase sent ahead (`next`) whose span holds `t`."""
    span = span_at(plan, t)
    raw = KINDS[span["kind"]](span["params"], span["lr0"], t - span["from"])
    return clamp_lr(float(span.get("scale", 1.0)) * raw)


def _compiled_span(plan: Mapping[str, Any]) -> Callable[[int], float | None]:
    fn, params, lr0 = KINDS[plan["kind"]], plan["params"], plan["lr0"]
    origin, until, scale = plan["from"], plan["until"], float(plan.get("scale", 1.0))
    end = math.inf if until is None else until
    if fn is _formula:  # a value that is no finite number keeps the LR in force (None)
        evaluate = _formula_evaluator(params)

        def formula_at(t: int) -> float | None:
            if origin <= t < end:
                value = scale * evaluate(t - origin, lr0, lr0)
                return clamp_lr(value) if math.isfinite(value) else None
            return None

        return formula_at

    def at(t: int) -> float | None:
        if origin <= t < end:
            return clamp_lr(scale * fn(params, lr0, t - origin))
        return None

    return at


def compiled(plan: Mapping[str, Any]) -> Callable[[int], float | None]:
    """The plan as a function of boundary `t`: its LR inside [from, until) (or inside the
    span of a phase sent ahead), None outside. The same arithmetic as `lr_at`, with the
    lookups done once (the per-step path)."""
    chain = [_compiled_span(span) for span in spans(plan)]
    if len(chain) == 1:
        return chain[0]
    first = chain[0]
    rest = chain[1:]

    def at(t: int) -> float | None:
        lr = first(t)
        if lr is None:
            for span in rest:
                lr = span(t)
                if lr is not None:
                    break
        return lr

    return at


def compiled_momentum(plan: Mapping[str, Any]) -> Callable[[int], float | None] | None:
    """The plan's momentum as a function of boundary `t` (None outside the spans that set
    one), or None for a plan none of whose phases sets momentum (no `cycle_momentum`)."""
    cycling = [
        span
        for span in spans(plan)
        if span["params"].get("cycle_momentum") and span["kind"] in ("one_cycle", "cyclic")
    ]
    if not cycling:
        return None

    def at(t: int) -> float | None:
        for span in cycling:
            if active(span, t):
                return momentum(span, t)
        return None

    return at


def momentum(plan: Mapping[str, Any], t: int) -> float | None:
    """The momentum a `one_cycle` / `cyclic` plan with `cycle_momentum` sets at `t`, else None
    (at a `t` past its `until`, that of the phase sent ahead whose span holds `t`)."""
    plan = span_at(plan, t)
    p = plan["params"]
    if not p.get("cycle_momentum"):
        return None
    local = t - plan["from"]
    if plan["kind"] == "one_cycle":
        return _one_cycle_at(p, plan["lr0"], local)[1]
    if plan["kind"] == "cyclic":
        height, amplitude = _cyclic_scale(p, local)
        hi, lo = p.get("max_momentum", 0.9), p.get("base_momentum", 0.8)
        return float(hi - (hi - lo) * height * amplitude)
    return None


def active(plan: Mapping[str, Any], t: int) -> bool:
    """Whether boundary `t` lies in the plan's span [from, until)."""
    until = plan.get("until")
    return bool(plan["from"] <= t and (until is None or t < until))


def check_plan(plan: Any, depth: int = 0) -> dict[str, Any]:
    """A plan from the wire, checked: known kind, numbers where numbers go, and an LR at
    its start that evaluates (so a plan that cannot is refused, not used); so is every
    phase sent ahead (`next`: from its parent's `until`, in the same unit).

    Raises:
        ProtocolError: `schema`, with what is wrong.
    """
    if not isinstance(plan, dict):
        raise ProtocolError("schema", "plan must be a map")
    kind, params = plan.get("kind"), plan.get("params")
    if kind not in KINDS:
        raise ProtocolError("schema", f"unknown plan kind {kind!r}")
    if not isinstance(params, dict):
        raise ProtocolError("schema", "plan params must be a map")
    if plan.get("unit") not in ("epoch", "step"):
        raise ProtocolError("schema", "plan unit must be epoch or step")
    start, until = plan.get("from"), plan.get("until")
    if type(start) is not int or start < 0:
        raise ProtocolError("schema", "plan from must be an integer >= 0")
    if until is not None and (type(until) is not int or until <= start):
        raise ProtocolError("schema", "plan until must be null or an integer > from")
    for key in ("lr0", "scale"):
        number = plan.get(key, 1.0)
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ProtocolError("schema", f"plan {key} must be a number")
        if not (math.isfinite(number) and number > 0):
            raise ProtocolError("schema", f"plan {key} must be finite and > 0")
    if kind == "formula":
        from .expression import ExpressionError, compile_formula, uses_lr

        text = params.get("lr")
        if not isinstance(text, str) or params.get("unit") != plan["unit"]:
            raise ProtocolError("schema", "a formula plan's params are {lr: text, unit}")
        try:
            if uses_lr(compile_formula(text, plan["unit"])):
                raise ProtocolError("schema", "a formula plan may not read lr")
        except ExpressionError as exc:
            raise ProtocolError("schema", f"plan formula {text!r}: {exc}") from None
    checked = {
        "kind": kind,
        "params": params,
        "unit": plan["unit"],
        "from": start,
        "until": until,
        "lr0": float(plan["lr0"]),
        "scale": float(plan.get("scale", 1.0)),
    }
    try:
        first = lr_at(checked, start)
    except (KeyError, TypeError, ValueError, ArithmeticError, IndexError) as exc:
        raise ProtocolError(
            "schema", f"plan {kind} cannot be evaluated: {type(exc).__name__}: {exc}"
        ) from None
    if not (math.isfinite(first) and first > 0):
        raise ProtocolError("schema", f"plan {kind} gives LR {first!r} at its start")
    ahead = plan.get("next")
    if ahead is not None:
        if depth >= MAX_AHEAD:
            raise ProtocolError("schema", f"plan next nests deeper than {MAX_AHEAD}")
        following = check_plan(ahead, depth + 1)
        if until is None or following["from"] != until or following["unit"] != checked["unit"]:
            raise ProtocolError(
                "schema", "plan next must start at its parent's until, in the same unit"
            )
        checked["next"] = following
    return checked
