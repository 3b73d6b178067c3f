"""Policy files: YAML → validated, immutable policy sets, with every error located.

    version: 1
    defaults: {policy: {type: plateau, monitor: val_loss, factor: 0.1, patience: 10}}
    jobs:
      - match: "bert-*"
        phases: [...]

Every error is collected (not just the first) as `file:line: message`, with
the line taken from the YAML node, so `lrpilot check` can list them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import hashlib
import math
import re
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lrpilot.client.vocabulary import NAME_RE, clamp_lr, lr_problem

from .errors import PolicyError, SourceError
from .guard import Guard
from .policies import POLICY_TYPES, Formula, Phase, Phases, Plateau, Policy, RangeTest
from .policies.formula import EVAL_ERRORS
from .policies.plateau import is_loss
from .units import parse_duration

__all__ = [
    "DEFAULT_SOURCE",
    "JobRule",
    "PolicySet",
    "default_policy_text",
    "load_default",
    "load_file",
    "load_text",
]

DEFAULT_SOURCE = "policies/default.yaml"
AGGREGATES = ("mean", "max", "chief")

# -- YAML with line numbers -------------------------------------------------


class LocDict(dict[Any, Any]):
    """A mapping that remembers its own line and the line of each key."""

    line: int = 0
    key_lines: dict[Any, int]
    value_lines: dict[Any, int]


class LocList(list[Any]):
    """A sequence that remembers its own line and the line of each item."""

    line: int = 0
    item_lines: list[int]


# libyaml's parser where PyYAML was built with it (the wheels are): 5 times faster on big
# files; the constructors below, which record lines, are Python either way.
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_SafeLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that records lines and reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LocDict:
    loader.flatten_mapping(node)
    out = LocDict()
    out.line = node.start_mark.line + 1
    out.key_lines, out.value_lines = {}, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
        out.value_lines[key] = value_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LocList:
    out = LocList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


# -- the validated result ------------------------------------------------------


@dataclass(frozen=True)
class JobRule:
    """Which policy a job gets, and the job-wide settings that come with it.

    Args:
        match: glob on the job name (`*` for the defaults).
        policy: the policy (a `Phases` for a chain).
        initial_lr: lr0 imposed on the client at hello, or None to take the client's.
        aggregate: how reports of several ranks become one value: mean, max or chief.
        aggregate_timeout: seconds to wait for every rank's report of an epoch.
        guard: the loss-spike guard of the rule (or the defaults), or None.
        phase_guards: each phase's own guard (None: the rule's applies in that phase).
    """

    match: str
    policy: Policy
    initial_lr: float | None = None
    aggregate: str = "mean"
    aggregate_timeout: float = 30.0
    line: int = 0
    guard: Guard | None = None
    phase_guards: tuple[Guard | None, ...] = ()

    def guard_at(self, phase: int | None) -> Guard | None:
        """The guard in force in phase `phase` (0-based; None: not a chain)."""
        if phase is not None and phase < len(self.phase_guards):
            own = self.phase_guards[phase]
            if own is not None:
                return own
        return self.guard

    def for_framework(self, framework: str) -> JobRule:
        """This rule for a job whose rank 0 runs `framework` (`compat: auto` resolved);
        one object per framework (a restart asks once per job)."""
        made: dict[str, JobRule] = self.__dict__.setdefault("_for_framework", {})
        rule = made.get(framework)
        if rule is None:
            policy = self.policy.for_framework(framework)
            rule = self if policy is self.policy else dataclasses.replace(self, policy=policy)
            made[framework] = rule
        return rule

    def lr0(self, client_lr: float) -> float:
        """lr0 is the rule's (or policy's) `initial_lr`, else the LR the client said hello with."""
        if self.initial_lr is not None:
            return self.initial_lr
        if self.policy.initial_lr is not None:
            return self.policy.initial_lr
        return client_lr


@dataclass(frozen=True)
class PolicySet:
    """Every rule of one policy file; `rule_for(job)` picks the first matching rule."""

    source: str
    defaults: JobRule
    rules: tuple[JobRule, ...] = ()
    digest: str = ""
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        # Compiled once, where the file is loaded (off the daemon's loop): matching a job
        # against thousands of globs then costs no regex compilation on the loop.
        matchers = tuple(re.compile(fnmatch.translate(r.match)).match for r in self.rules)
        object.__setattr__(self, "_matchers", matchers)

    def rule_for(self, job: str) -> JobRule:
        matchers: tuple[Callable[[str], object], ...] = self._matchers  # type: ignore[attr-defined]
        for rule, matches in zip(self.rules, matchers, strict=True):
            if matches(job):
                return rule
        return self.defaults


# -- validation ----------------------------------------------------------------


class _Errors:
    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[SourceError] = []
        self.warnings: list[str] = []

    def add(self, line: int | None, message: str) -> None:
        self.items.append(SourceError(message, self.file, line))

    def warn(self, line: int | None, message: str) -> None:
        self.warnings.append(SourceError("warning: " + message, self.file, line).located())


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return repr(value)


def _unknown(key: Any, allowed: Sequence[str], where: str) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r} in {where}{hint}; allowed: {', '.join(sorted(allowed))}"


def _line(m: LocDict, key: Any) -> int:
    return m.value_lines.get(key, m.line) if isinstance(m, LocDict) else 0


def _coerce(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """(ok, converted value, expected-type words) for a value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return True, None, ""
        return _coerce(value, args[0])
    if origin is typing.Literal:
        return isinstance(value, str), value, "one of " + ", ".join(typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        if item is float:
            ok = isinstance(value, list) and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value
            )
            return ok, [float(v) for v in value] if ok else value, "a list of numbers"
        ok = isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
        return ok, list(value) if ok else value, "a list of integers"
    if hint is bool:
        return isinstance(value, bool), value, "true or false"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok, value, "an integer"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    return False, value, str(hint)  # pragma: no cover - every field type is handled above


#: A formula is evaluated within this many seconds, for each t in 0…FORMULA_HORIZON.
FORMULA_BUDGET = 1e-3
FORMULA_HORIZON = 10_000


def formula_budget(policy: Formula, lr0: float = 1e-3) -> str | None:
    """None, or why the formula cannot run in the loop: an evaluation on t = 0…10,000 over
    the 1 ms budget, or no finite value at any of them.

    `lr0` (the policy's initial_lr when set) stands for the LR it starts from; a formula
    that reads `lr` is fed its own previous value, clamped as at run time.
    """
    return _formula_budget(policy.lr, policy.unit, policy.initial_lr or lr0)


@functools.lru_cache(maxsize=256)
def _formula_budget(text: str, unit: str, lr0: float) -> str | None:
    evaluate = Formula(lr=text, unit=unit).evaluator()  # type: ignore[arg-type]

    def timed(t: int, lr: float) -> tuple[float, float]:
        start = time.perf_counter()
        try:
            value = evaluate(t, lr0, lr)
        except EVAL_ERRORS:
            value = math.nan
        return value, time.perf_counter() - start

    lr, finite = lr0, False
    for t in range(FORMULA_HORIZON + 1):
        value, took = timed(t, lr)
        if took > FORMULA_BUDGET:
            # A thread descheduled mid-call is not a slow formula: the fastest of 3 counts.
            took = min(took, timed(t, lr)[1], timed(t, lr)[1])
            if took > FORMULA_BUDGET:
                return (
                    f"formula {_short(text)} takes {took * 1e3:.2g} ms at t = {t}; "
                    f"a formula must evaluate within {FORMULA_BUDGET * 1e3:g} ms"
                )
        if math.isfinite(value):
            finite, lr = True, clamp_lr(value)
    if not finite:
        return (
            f"formula {_short(text)} gives no finite value for any t in 0..{FORMULA_HORIZON} "
            "(an overflow, a division by zero, a log of 0 ...)"
        )
    return None


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


@functools.cache
def _type_hints(cls: type[Policy]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build_policy(m: Any, line: int, errs: _Errors, extra: Sequence[str] = ()) -> Policy | None:
    if not isinstance(m, LocDict):
        errs.add(line, f"a policy must be a mapping with a type, got {_show(m)}")
        return None
    kind = m.get("type")
    if kind is None:
        errs.add(m.line, "policy needs a type, one of " + ", ".join(POLICY_TYPES))
        return None
    if not isinstance(kind, str) or kind not in POLICY_TYPES:
        close = difflib.get_close_matches(str(kind), list(POLICY_TYPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        errs.add(
            _line(m, "type"),
            f"unknown policy type {kind!r}{hint}; one of {', '.join(POLICY_TYPES)}",
        )
        return None
    cls = POLICY_TYPES[kind]
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "phases"}
    kwargs: dict[str, Any] = {}
    before = len(errs.items)
    for key, value in m.items():
        if key == "type" or key in extra:
            continue
        if key not in fields:
            errs.add(m.key_lines.get(key, m.line), _unknown(key, [*fields, "type", *extra], kind))
            continue
        ok, value, expected = _coerce(value, hints[key])
        if not ok:
            errs.add(_line(m, key), f"{key} must be {expected}, got {_show(value)}")
            continue
        check = fields[key].metadata.get("check")
        problem = check(value) if check is not None and value is not None else None
        if problem:
            errs.add(_line(m, key), f"{key} {problem}, got {_show(value)}")
            continue
        kwargs[key] = value
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in m:
            errs.add(m.line, f"{kind} needs {name}")
    if len(errs.items) > before:
        return None
    policy = cls(**kwargs)
    for key, message in policy.problems():
        errs.add(_line(m, key) if key else m.line, message)
    if len(errs.items) > before:
        return None
    if isinstance(policy, Formula) and (problem := formula_budget(policy)) is not None:
        errs.add(_line(m, "lr"), problem)
        return None
    if isinstance(policy, RangeTest) and not NAME_RE.fullmatch(policy.monitor):
        errs.add(
            _line(m, "monitor"),
            f"monitor must be 1-128 of [A-Za-z0-9._:/@-], got {policy.monitor!r}",
        )
    if isinstance(policy, Plateau):
        if not NAME_RE.fullmatch(policy.monitor):
            errs.add(
                _line(m, "monitor"),
                f"monitor must be 1-128 of [A-Za-z0-9._:/@-], got {policy.monitor!r}",
            )
        elif policy.mode in ("auto", None) and not is_loss(policy.monitor):
            errs.warn(
                _line(m, "monitor"),
                f"mode auto: the direction of {policy.monitor!r} comes from the client's hello "
                "(or a name with acc/auc means max); set mode: min or max to be sure",
            )
    return policy


def _build_phases(seq: Any, line: int, errs: _Errors) -> Policy | None:
    if not isinstance(seq, LocList) or not seq:
        errs.add(line, f"phases must be a non-empty list of policies, got {_show(seq)}")
        return None
    built: list[Phase] = []
    before = len(errs.items)
    range_test_before = False
    for i, (item, item_line) in enumerate(zip(seq, seq.item_lines, strict=True)):
        kind = item.get("type") if isinstance(item, LocDict) else None
        suggested_ok = range_test_before  # `lr: suggested` needs a range test before it
        range_test_before = range_test_before or kind == "range_test"
        # A formula's own `lr` is its expression; it starts from the LR the phase before left.
        formula = kind == "formula"
        extra = ("until", "guard") if formula else ("until", "lr", "guard")
        policy = _build_policy(item, item_line, errs, extra=extra)
        if policy is None or not isinstance(item, LocDict):
            continue
        until = item.get(
            "until", getattr(policy, "epochs", None) if policy.type == "warmup" else None
        )
        last = i == len(seq) - 1
        if isinstance(policy, RangeTest):
            if "until" in item:
                errs.add(
                    _line(item, "until"),
                    "a range_test phase ends by itself (divergence or end_lr) and then "
                    "restores the weights; shorten it with end_lr, not until",
                )
        elif until is None and not last:
            errs.add(item.line, f"phase {i + 1} needs until (only the last phase may run forever)")
        elif until is not None and (
            isinstance(until, bool) or not isinstance(until, int) or until < 1
        ):
            errs.add(_line(item, "until"), f"until must be an integer >= 1, got {_show(until)}")
        lr = "previous" if formula else item.get("lr", "previous")
        if isinstance(lr, int | float) and not isinstance(lr, bool):
            if (problem := lr_problem(lr)) is not None:
                errs.add(_line(item, "lr"), f"lr {problem}, got {lr!r}")
            lr = float(lr)
        elif lr == "suggested" and not suggested_ok:
            errs.add(_line(item, "lr"), "lr: suggested needs a range_test phase before it")
        elif lr not in ("previous", "suggested"):
            errs.add(
                _line(item, "lr"), f"lr must be a number, previous or suggested, got {_show(lr)}"
            )
        built.append(Phase(policy, until, lr))
    if len(errs.items) > before:
        return None
    units = {p.policy.unit for p in built}
    if len(units) > 1:
        hint = ""
        if any(isinstance(p.policy, RangeTest) for p in built):
            hint = " (range_test counts steps unless it says unit: epoch)"
        errs.add(
            line,
            "every phase must use the same unit (epoch or step), got "
            + ", ".join(sorted(units))
            + hint,
        )
        return None
    return Phases(phases=tuple(built), unit=built[0].policy.unit)


_RULE_KEYS = ("policy", "phases", "initial_lr", "aggregate", "aggregate_timeout", "guard")


def _build_rule(m: Any, line: int, errs: _Errors, *, needs_match: bool) -> JobRule | None:
    where = "a jobs rule" if needs_match else "defaults"
    if not isinstance(m, LocDict):
        errs.add(line, f"{where} must be a mapping, got {_show(m)}")
        return None
    allowed = ("match", *_RULE_KEYS) if needs_match else _RULE_KEYS
    before = len(errs.items)
    for key in m:
        if key not in allowed:
            errs.add(m.key_lines.get(key, m.line), _unknown(key, allowed, where))
    match = m.get("match", "*") if needs_match else "*"
    if not isinstance(match, str) or not match or (needs_match and "match" not in m):
        errs.add(
            _line(m, "match") if "match" in m else m.line,
            f"a jobs rule needs match: a glob on the job name, got {_show(m.get('match'))}",
        )
        match = "*"
    policy: Policy | None = None
    if ("policy" in m) == ("phases" in m):
        errs.add(m.line, f"{where} needs exactly one of policy or phases")
    elif "policy" in m:
        policy = _build_policy(m["policy"], _line(m, "policy"), errs)
    else:
        policy = _build_phases(m["phases"], _line(m, "phases"), errs)
    initial_lr = m.get("initial_lr")
    if initial_lr is not None and (problem := lr_problem(initial_lr)) is not None:
        errs.add(_line(m, "initial_lr"), f"initial_lr {problem}, got {_show(initial_lr)}")
    aggregate = m.get("aggregate", "mean")
    if aggregate not in AGGREGATES:
        errs.add(
            _line(m, "aggregate"),
            f"aggregate must be one of {', '.join(AGGREGATES)}, got {_show(aggregate)}",
        )
    timeout = 30.0
    if "aggregate_timeout" in m:
        try:
            timeout = parse_duration(m["aggregate_timeout"])
        except (ValueError, TypeError) as exc:
            errs.add(_line(m, "aggregate_timeout"), f"aggregate_timeout: {exc}")
    if policy is not None and initial_lr is not None:
        floor = getattr(policy, "min_lr", None)
        for p in policy.phases if isinstance(policy, Phases) else ():
            floor = getattr(p.policy, "min_lr", floor) if floor is None else floor
        if floor is not None and floor > initial_lr:
            errs.add(
                _line(m, "initial_lr"),
                f"min_lr {floor:g} must be <= initial_lr, got {initial_lr!r}",
            )
    guard: Guard | None = None
    phase_guards: list[Guard | None] = []
    if policy is not None:
        if "guard" in m:
            guard = _build_guard(m["guard"], _line(m, "guard"), errs, policy.unit)
        items = m["phases"] if "phases" in m and isinstance(m["phases"], list) else []
        for item in items:
            own = item.get("guard") if isinstance(item, LocDict) else None
            phase_guards.append(
                None if own is None else _build_guard(own, _line(item, "guard"), errs, policy.unit)
            )
    if policy is None or len(errs.items) > before:
        return None
    return JobRule(
        match,
        policy,
        float(initial_lr) if initial_lr is not None else None,
        aggregate,
        timeout,
        m.line,
        guard,
        tuple(phase_guards) if any(g is not None for g in phase_guards) else (),
    )


def _build_guard(m: Any, line: int, errs: _Errors, unit: str) -> Guard | None:
    """A `guard` mapping (on a rule, a phase or the defaults), every error located."""
    if not isinstance(m, LocDict):
        errs.add(line, f"guard must be a mapping (monitor, spike, window, ...), got {_show(m)}")
        return None
    hints = typing.get_type_hints(Guard)
    fields = {f.name: f for f in dataclasses.fields(Guard)}
    kwargs: dict[str, Any] = {}
    before = len(errs.items)
    for key, value in m.items():
        if key not in fields:
            errs.add(m.key_lines.get(key, m.line), _unknown(key, list(fields), "guard"))
            continue
        ok, value, expected = _coerce(value, hints[key])
        if not ok:
            errs.add(_line(m, key), f"guard {key} must be {expected}, got {_show(value)}")
            continue
        check = fields[key].metadata.get("check")
        problem = check(value) if check is not None and value is not None else None
        if problem:
            errs.add(_line(m, key), f"guard {key} {problem}, got {_show(value)}")
            continue
        kwargs[key] = value
    if "monitor" in kwargs and not NAME_RE.fullmatch(kwargs["monitor"]):
        errs.add(
            _line(m, "monitor"),
            f"guard monitor must be 1-128 of [A-Za-z0-9._:/@-], got {kwargs['monitor']!r}",
        )
    if kwargs.get("unit") not in (None, unit):
        errs.add(
            _line(m, "unit"),
            f"guard unit must be the policy's unit ({unit}): the guard judges its reports, "
            f"got {kwargs['unit']!r}",
        )
    if len(errs.items) > before:
        return None
    kwargs["unit"] = unit
    return Guard(**kwargs)


def _default_rule() -> JobRule:
    return JobRule("*", Plateau())


def load_text(text: str, file: str) -> PolicySet:
    """Validate a policy file's text; `file` names it in error messages.

    Raises:
        PolicyError: carrying every error found, each with file and line.
    """
    try:
        return _load_text(text, file)
    except PolicyError:
        raise
    except Exception as exc:  # a shape no check foresaw: still a rejected file, never a crash
        message = f"cannot validate this file: {type(exc).__name__}: {exc}"
        raise PolicyError([SourceError(message, file, None)]) from None


def _load_text(text: str, file: str) -> PolicySet:
    loader = _Loader(text)
    node: yaml.Node | None = None
    doc: Any = None
    try:
        node = loader.get_single_node()
        doc = loader.construct_document(node) if node is not None else None
        return _validate(doc, text, file)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(
            [SourceError(f"invalid YAML: {exc.problem or exc}", file, line)]
        ) from None
    except yaml.YAMLError as exc:
        raise PolicyError([SourceError(f"invalid YAML: {exc}", file, None)]) from None
    finally:
        loader.dispose()
        _release(node)
        _release(doc)


def _release(root: Any) -> None:
    """Take a parse tree (YAML nodes, or the LocDicts built from them) apart piece by piece.

    Dropped at once, the tree of a 40,000-rule file is one deallocation cascade of a million
    objects that holds the GIL for 0.2 s; taken apart here, it is many short steps between
    which the loop thread runs. Only the loader's own containers are emptied: the validated
    policies copy what they keep.
    """
    stack = [root]
    while stack:
        x = stack.pop()
        if isinstance(x, yaml.CollectionNode):
            items, x.value = x.value, []
            for item in items:
                stack.extend(item) if isinstance(item, tuple) else stack.append(item)
        elif isinstance(x, LocDict):
            stack.extend(x.values())
            x.clear()
        elif isinstance(x, LocList):
            stack.extend(x)
            x.clear()


def _validate(doc: Any, text: str, file: str) -> PolicySet:
    errs = _Errors(file)
    if not isinstance(doc, LocDict):
        raise PolicyError(
            [SourceError(f"a policy file is a mapping with version: 1, got {_show(doc)}", file, 1)]
        )
    for key in doc:
        if key not in ("version", "defaults", "jobs"):
            errs.add(
                doc.key_lines.get(key, doc.line),
                _unknown(key, ("version", "defaults", "jobs"), "the policy file"),
            )
    if doc.get("version") != 1:
        errs.add(
            _line(doc, "version") if "version" in doc else doc.line,
            f"version must be 1, got {_show(doc.get('version'))}",
        )
    defaults = _default_rule()
    if "defaults" in doc:
        built = _build_rule(doc["defaults"], _line(doc, "defaults"), errs, needs_match=False)
        defaults = built or defaults
    rules: list[JobRule] = []
    jobs = doc.get("jobs", [])
    if jobs is None:
        jobs = []
    if not isinstance(jobs, list):
        errs.add(_line(doc, "jobs"), f"jobs must be a list of rules, got {_show(jobs)}")
    else:
        lines = jobs.item_lines if isinstance(jobs, LocList) else [doc.line] * len(jobs)
        for item, line in zip(jobs, lines, strict=True):
            rule = _build_rule(item, line, errs, needs_match=True)
            if rule is not None:
                rules.append(rule)
    if errs.items:
        raise PolicyError(sorted(errs.items, key=lambda e: e.line or 0))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return PolicySet(file, defaults, tuple(rules), digest, tuple(errs.warnings))


def load_file(path: str | Path) -> PolicySet:
    """Read and validate a policy file.

    Raises:
        PolicyError: unreadable file, invalid YAML, or invalid content (every error listed).
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([SourceError(f"cannot read policy file: {exc}", name, None)]) from None
    return load_text(text, name)


def default_policy_text() -> str:
    """The embedded default policy (policies/default.yaml: Keras ReduceLROnPlateau defaults)."""
    return resources.files("lrpilot.controller").joinpath("default_policy.yaml").read_text("utf-8")


def load_default() -> PolicySet:
    """The embedded default policy set, used when `serve` or `simulate` get no file."""
    return load_text(default_policy_text(), DEFAULT_SOURCE)
