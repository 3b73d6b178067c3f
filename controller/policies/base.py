"""What every policy shares: decisions, events, states, and the float32 rounding Keras uses.

A policy is an immutable, validated configuration. Its state is a small frozen
dataclass; `step` returns a new state and a `Decision` and never mutates
anything, so the daemon can keep snapshots, refuse bad input without a trace,
and `simulate` and the tests run exactly the code the daemon runs.
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from lrpilot.client.vocabulary import REASONS, float32

from .fields import an_lr, one_of, param

__all__ = [
    "REASONS",
    "Decision",
    "Event",
    "Policy",
    "State",
    "Unit",
    "fingerprint",
    "float32",
    "parameters",
]

Unit = Literal["epoch", "step"]


#: Each State class's field names (`State.from_dict`).
_STATE_FIELDS: dict[type, frozenset[str]] = {}


@dataclass(frozen=True)
class Event:
    """A change worth telling the user about: `reduce 0.1 -> 0.05 (plateau, wait 3/3)`."""

    kind: str
    old: float
    new: float
    wait: int | None = None
    patience: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        verb = "reduce" if self.new < self.old else "raise" if self.new > self.old else "keep"
        text = f"{verb} {self.old:.6g} -> {self.new:.6g} ({self.kind}"
        if self.wait is not None and self.patience is not None:
            text += f", wait {self.wait}/{self.patience}"
        return text + ")"


@dataclass(frozen=True)
class Decision:
    """The outcome of one report: the LR in force from the next epoch (or step).

    Args:
        lr: the learning rate to use from t+1.
        event: what changed, or None when nothing did.
        action: what the trainer should do at the boundary, besides using `lr`: `"stop"`
            (stop training), `"snapshot"` (keep a copy of the model and optimizer state: a
            range test starts) or `"restore"` (put that copy back: a range test ended).
        warning: something the user should hear about (a missing metric, say).
        apply: False in shadow mode: the decision is recorded but not sent.
        detail: a line for the audit row (a range test's curve and suggestions, as JSON).
        notice: a notice code for the client (`"clamped"`: the LR computed left [1e-12, 10]).
    """

    lr: float
    event: Event | None = None
    action: str | None = None
    warning: str | None = None
    apply: bool = True
    detail: str | None = None
    notice: str | None = None

    @property
    def reason(self) -> str:
        return self.event.kind if self.event is not None else "unchanged"


S = TypeVar("S", bound="State")


@dataclass(frozen=True, kw_only=True)
class State:
    """Base of every policy state: `lr` is the LR in force; the rest is the policy's memory."""

    lr: float

    # States are flat records of numbers (a chain nests its phase's state as a plain dict),
    # read and written on every decision: shallow copies, no deep recursion.

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls: type[S], data: Mapping[str, Any]) -> S:
        names = _STATE_FIELDS.get(cls)
        if names is None:  # once per class: a restart loads a state per job
            names = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            _STATE_FIELDS[cls] = names
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self: S, **changes: Any) -> S:
        """A copy with `changes` (states have no __post_init__ to re-run)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new


@dataclass(frozen=True, kw_only=True)
class Policy(ABC):
    """An immutable, validated policy configuration.

    Subclasses are frozen, keyword-only dataclasses whose fields are the YAML
    keys; field metadata carries a `check` (value -> message or None) and `doc`.
    """

    state_class: ClassVar[builtins.type[State]]
    type: ClassVar[str]
    #: The framework classes (or calls) this type reproduces, for the policy reference.
    equivalents: ClassVar[tuple[str, ...]] = ()

    unit: Unit = param("epoch", one_of("epoch", "step"), "count t in epochs or in steps")
    initial_lr: float | None = param(None, an_lr, "lr0 imposed on the client at hello")
    apply: bool = param(True, doc="false: shadow mode, decisions recorded but not sent")

    def problems(self) -> list[tuple[str | None, str]]:
        """Cross-field problems as (key, message); key None means the whole mapping."""
        return []

    @abstractmethod
    def start(self, lr0: float, t: int) -> State:
        """The state at local time `t` for a policy that starts from `lr0` at time 0."""

    @abstractmethod
    def step(
        self, state: State, t: int, metrics: Mapping[str, float], directions: Mapping[str, str]
    ) -> tuple[State, Decision]:
        """Feed the report of time `t`; returns the new state and the LR for t+1."""

    @abstractmethod
    def rebase(self, state: State, lr: float, t: int) -> State:
        """An operator set `lr` from t+1 on; keep the policy's memory and shape."""

    def for_framework(self, framework: str) -> Policy:
        """This policy for a job whose rank 0 runs `framework` (`compat: auto` resolved)."""
        return self

    def load_state(self, data: Mapping[str, Any]) -> State:
        return self.state_class.from_dict(data)

    def monitors(self) -> tuple[str, ...]:
        """Every metric this policy watches (each phase's, for a chain), in order."""
        return ()

    def current(self, state: State) -> Policy:
        """The policy deciding now in `state`: itself, or the phase in force for a chain."""
        return self

    def start_from(self, lr: float, t: int) -> State:
        """Start at time t so that the LR in force is `lr` and the policy's shape continues."""
        state = self.start(lr, t)
        return self.rebase(state, lr, t - 1) if state.lr != lr else state

    def transfer(self, state: State, new: Policy, t: int) -> State:
        """The state `new` continues with when a reload replaces this policy at time t.

        By default the new policy starts from the job's current LR; a plateau keeps its
        memory under a compatible plateau, a chain the phase of the same index and type.
        """
        return new.start_from(state.lr, t)

    def describe(self, state: State) -> dict[str, Any]:
        """What `status` shows about this policy's state: monitor, value, best, wait, patience."""
        return {"policy": self.type, "phase": None}

    # -- hooks for policies that end by themselves (the range test); no-ops for the rest --

    def plan(
        self, state: State, origin: int = 0, until: int | None = None
    ) -> dict[str, Any] | None:
        """This policy in `state` as a plan (see `lrpilot.client.plans`), local time 0 at
        boundary `origin`; None when its LRs depend on reports (plateau, range test)."""
        return None

    def finished(self, state: State) -> bool:
        """Whether this policy has done its work; a finished phase ends even without `until`."""
        return False

    def start_action(self, state: State) -> str | None:
        """The action to send with the first LR of this policy (hello, or entering its phase).

        A range test that has not started yet returns `"snapshot"`; every other policy None.
        """
        return None

    def counts(self, state: State, lr: float) -> bool:
        """Whether a report trained at `lr` is fed to this policy in `state`.

        Only a range test refuses one: a loss trained at an LR other than its sweep's is no
        point of its curve (the trainer went on at an older LR while the controller was away).
        """
        return True

    def admit(
        self, state: State, t: int, lrs: Sequence[float], ahead: bool = False
    ) -> State | None:
        """The state that the report of time t, trained at `lrs` (one per rank), is fed to,
        or None when it is no input (see `counts`). `ahead`: every rank runs plans; a range
        test then moves its sweep to the LR the trainer ran, when the plan had it there
        first."""
        return state if all(self.counts(state, lr) for lr in lrs) else None

    def missed(self, state: State, t: int) -> State:
        """The state after the report of time t was no input (`admit` gave None)."""
        return state

    def abandon(self, state: State, t: int) -> tuple[State, Decision] | None:
        """End a range test under way at local time t without a suggestion (a rank that
        cannot restore its weights joined): the new state and the decision, or None when no
        sweep is under way."""
        return None

    def range_test_report(self, state: State) -> dict[str, Any] | None:
        """The LR range test's curve and suggestions, or None for policies that run none.

        Shape: `{"points": [[lr, loss, smoothed], ...], "suggestions": {"valley": x,
        "steep": y, "minimum": z}, "suggest": "valley", "suggested_lr": x,
        "stop_reason": "divergence"|"end_lr"|None, "done": bool}`; non-finite numbers are None.
        """
        return None

    def decision(self, state: State, new_lr: float, kind: str, **extra: Any) -> Decision:
        event = Event(kind, state.lr, new_lr, extra.get("wait"), extra.get("patience"))
        changed = new_lr != state.lr
        return Decision(
            new_lr,
            event if changed else None,
            action=extra.get("action"),
            warning=extra.get("warning"),
            apply=self.apply,
        )


def _canonical(value: Any) -> Any:
    """A JSON-able form of a policy parameter (policies and phases nest)."""
    if isinstance(value, Policy):
        return parameters(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, builtins.type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def parameters(policy: Policy) -> dict[str, Any]:
    """The policy's type and every parameter that differs from its default.

    Parameters left at their default are omitted, so a later version that adds
    a parameter with a default describes an unchanged policy the same way.
    """
    out: dict[str, Any] = {"type": policy.type}
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        out[f.name] = _canonical(value)
    return out


def fingerprint(policy: Policy) -> str:
    """A stable id of a policy's parameters: stored state is reused only by the same policy.

    Computed once per policy object (policies are frozen): a restart reads it per job.
    """
    cached: str | None = policy.__dict__.get("_fingerprint")
    if cached is None:
        text = json.dumps(parameters(policy), sort_keys=True, separators=(",", ":"), default=repr)
        cached = hashlib.sha256(text.encode()).hexdigest()[:24]
        object.__setattr__(policy, "_fingerprint", cached)
    return cached
