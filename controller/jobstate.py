"""A job's state: one immutable, typed view that transitions, the store, `status`,
the metrics collector and the admin API all read.

`stored()` / `from_stored()` are the one definition of what survives a
restart (the job row, and the same row as an epoch snapshot). Policy state is
tied to the policy's `fingerprint` (its non-default parameters), so an upgrade
that adds a parameter with a default keeps a job's plateau memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .aggregate import Pending
from .policies import Policy, State, fingerprint
from .policyfile import JobRule
from .sessions import Sessions

__all__ = ["STATUS_FIELDS", "JobState", "Override", "start_from", "status_row"]

#: The fields of `lrpilot status --json`, in order (DESIGN.md).
STATUS_FIELDS = (
    "job",
    "workers",
    "epoch",
    "lr",
    "monitor",
    "value",
    "best",
    "wait",
    "patience",
    "policy",
    "phase",
    "last_report_age_s",
)


@dataclass(frozen=True)
class Override:
    """An operator's LR that ends by itself (`set-lr --epochs N` or `--for DURATION`).

    `saved` is the policy state from just before the override: at expiry the policy's own
    LR comes back (a plateau's LR as it was, a schedule's curve without the override).
    """

    lr: float
    author: str
    reason: str = ""
    until_epoch: int | None = None  # first epoch (step) run without the override
    until_wall: float | None = None  # Unix time it ends
    saved: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "author": self.author,
            "reason": self.reason,
            "until_epoch": self.until_epoch,
            "until_wall": self.until_wall,
            "saved": self.saved,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Override:
        return cls(
            float(data["lr"]),
            str(data.get("author", "")),
            str(data.get("reason", "")),
            _opt_int(data.get("until_epoch")),
            _opt_float(data.get("until_wall")),
            dict(data.get("saved") or {}),
        )


@dataclass(frozen=True)
class JobState:
    """Everything the controller knows about one job; never mutated, only replaced.

    Times: `last_report`/`last_seen` are monotonic seconds, `last_report_wall` Unix seconds.
    `last_epoch` is the last decided time (epoch, or step for `unit: step`).
    """

    name: str
    rule: JobRule
    state: State
    fingerprint: str
    run: int = 1
    version: int = 1
    last_epoch: int | None = None
    world: int = 1
    directions: Mapping[str, str] = field(default_factory=dict)
    sessions: Sessions = field(default_factory=Sessions)
    pending: Mapping[int, Pending] = field(default_factory=dict)
    last_report: float = 0.0
    last_seen: float = 0.0
    last_report_wall: float = 0.0
    value: float | None = None
    shadow_lr: float | None = None
    framework: str = ""  # rank 0's, from its hello: binds `compat: auto`
    override: Override | None = None  # an expiring operator override in force
    generation: int = 0  # the policy reloads its rule has seen (memory only)

    @property
    def policy(self) -> Policy:
        return self.rule.policy

    @property
    def lr(self) -> float:
        return self.state.lr

    @property
    def unit(self) -> str:
        return self.policy.unit

    def next_t(self) -> int:
        """The first epoch (or step) not decided yet."""
        return 0 if self.last_epoch is None else self.last_epoch + 1

    def with_(self, **changes: Any) -> JobState:
        """A copy with `changes` (`dataclasses.replace`: a misspelt field is a TypeError).

        Shallow: every field is itself immutable.
        """
        return dataclasses.replace(self, **changes)

    # -- the stored schema (defined here only) ----------------------------------------

    def stored(self) -> dict[str, Any]:
        """What the store keeps for this job, and what an epoch snapshot holds."""
        return {
            "run": self.run,
            "version": self.version,
            "last_epoch": self.last_epoch,
            "world": self.world,
            "directions": dict(self.directions),
            "seqs": dict(self.sessions.seqs),
            "reported_ranks": sorted(self.sessions.reported),
            "policy": self.fingerprint,
            "state": self.state.to_dict(),
            "last_report_wall": self.last_report_wall,
            "value": self.value,
            "shadow_lr": self.shadow_lr,
            "framework": self.framework,
            "override": None if self.override is None else self.override.to_dict(),
        }

    @classmethod
    def from_stored(
        cls, name: str, rule: JobRule, data: Mapping[str, Any], now: float, generation: int = 0
    ) -> JobState:
        """A job from its stored row under `rule` (not yet bound to the job's framework);
        a changed policy restarts from the stored LR.

        Raises:
            ValueError, TypeError, KeyError: a row that does not fit the schema.
        """
        framework = str(data.get("framework") or "")
        rule = rule.for_framework(framework)
        state = state_for(rule, data, next_t=_next(data.get("last_epoch")))
        seqs = {str(k): int(v) for k, v in dict(data.get("seqs", {})).items()}
        return cls(
            name,
            rule,
            state,
            fingerprint(rule.policy),
            run=int(data.get("run", 1)),
            version=int(data.get("version", 1)),
            last_epoch=_opt_int(data.get("last_epoch")),
            world=int(data.get("world", 1)),
            directions={str(k): str(v) for k, v in dict(data.get("directions", {})).items()},
            sessions=Sessions.restored(seqs, (int(r) for r in data.get("reported_ranks", []))),
            last_seen=now,
            last_report_wall=float(data.get("last_report_wall", 0.0)),
            value=_opt_float(data.get("value")),
            shadow_lr=_opt_float(data.get("shadow_lr")),
            framework=framework,
            override=Override.from_dict(data["override"]) if data.get("override") else None,
            generation=generation,
        )


def state_for(rule: JobRule, data: Mapping[str, Any], next_t: int) -> State:
    """The policy state of a stored row (or snapshot) under `rule`'s policy.

    The same policy (by fingerprint, or by 0.1's `policy_key`) loads its memory; a
    different one starts from the stored LR at `next_t`, keeping its shape.
    """
    stored_state = data.get("state", {})
    policy = rule.policy
    if data.get("policy") == fingerprint(policy) or (
        data.get("policy_key") == f"{rule.match}|{policy!r}"  # written by lrpilot 0.1
    ):
        return policy.load_state(stored_state)
    return start_from(policy, float(stored_state.get("lr", 0.001)), next_t)


def start_from(policy: Policy, lr: float, t: int) -> State:
    """Start `policy` at time t so that the LR in force is `lr` and its shape continues."""
    return policy.start_from(lr, t)


def status_row(job: JobState, now: float, worker_timeout: float) -> dict[str, Any]:
    """One row of `lrpilot status` (STATUS_FIELDS, then run, version, shadow_lr, override,
    suggested_lr, and what the table labels: unit, min_lr, finished)."""
    info = job.policy.describe(job.state)
    return {
        "job": job.name,
        "workers": len(job.sessions.live(now, worker_timeout)),
        "epoch": job.last_epoch,
        "lr": job.lr,
        "monitor": info.get("monitor"),
        "value": finite(job.value),
        "best": finite(info.get("best")),
        "wait": info.get("wait"),
        "patience": info.get("patience"),
        "policy": job.policy.type,
        "phase": info.get("phase"),
        "last_report_age_s": round(now - job.last_report, 3) if job.last_report else None,
        "run": job.run,
        "version": job.version,
        "shadow_lr": job.shadow_lr,
        "override": _override_view(job.override),
        "suggested_lr": finite(info.get("suggested_lr")),
        "unit": job.unit,  # `epoch` counts epochs, or steps for unit: step
        "min_lr": finite(info.get("min_lr")),
        "finished": job.sessions.finished(),  # every worker said bye
    }


def _override_view(o: Override | None) -> dict[str, Any] | None:
    if o is None:
        return None
    from .store import rfc3339

    until = None if o.until_wall is None else rfc3339(o.until_wall)
    return {
        "lr": o.lr,
        "author": o.author,
        "reason": o.reason,
        "until_epoch": o.until_epoch,
        "until": until,
    }


def finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _next(last: Any) -> int:
    return 0 if last is None else int(last) + 1


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)
