"""A job's state: one immutable, typed view that transitions, the store, `status`,
the metrics collector and the admin API all read.

`stored()` / `from_stored()` are the one definition of what survives a
restart (the job row, and the same row as an epoch snapshot). Policy state is
tied to the policy's `fingerprint` (its non-default parameters), so an upgrade
that adds a parameter with a default keeps a job's plateau memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from lrpilot.client.plans import compiled_momentum

from .aggregate import Pending
from .guard import GuardState
from .policies import Policy, State, fingerprint
from .policyfile import JobRule
from .sessions import Sessions
from .units import MAX_DURATION

__all__ = [
    "STATUS_FIELDS",
    "JobState",
    "Override",
    "momentum",
    "override_view",
    "start_from",
    "status_row",
]

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
    """An operator's pin: `set-lr --epochs N` or `--for DURATION` holds `lr` exactly.

    While it holds, the job's policy keeps deciding underneath (its state advances, its
    own LR is `JobState.policy_lr`), but every rank is told `lr`; when it ends, the
    policy's LR takes over. `--epochs N` counts the epochs (steps) trained at `lr`, from
    the first report that says it trained at it (back to the report before it: a step
    job reports every `report_every` steps), so N means N whether the pin came mid-epoch
    or at a boundary.
    `--for` runs on the controller's monotonic clock: `remaining` seconds as read at
    monotonic `since` (Unix `since_wall`); a restart takes the downtime from the wall
    clock, clamped to [0, remaining], so a clock step never ends a pin early or late.
    """

    lr: float
    author: str
    reason: str = ""
    from_t: int = 0  # the first epoch (step) it applies from
    epochs: int | None = None  # --epochs N
    first_trained: int | None = None  # the first epoch (step) trained at `lr`
    last_trained: int | None = None  # the last one reported so far
    remaining: float | None = None  # --for: seconds left at `since`
    since: float = 0.0  # monotonic seconds
    since_wall: float = 0.0  # Unix seconds at `since`

    @property
    def ends(self) -> float | None:
        """The monotonic time a --for pin ends (None: it ends by epochs)."""
        return None if self.remaining is None else self.since + self.remaining

    def until_epoch(self) -> int | None:
        """The first epoch (step) at the policy's LR, once the first pinned one is known."""
        if self.epochs is None or self.first_trained is None:
            return None
        return self.first_trained + self.epochs

    @property
    def trained(self) -> int:
        """Epochs (steps) trained at the pin so far, as reported."""
        if self.first_trained is None or self.last_trained is None:
            return 0
        return self.last_trained - self.first_trained + 1

    def left(self, now: float) -> float | None:
        """Seconds left of a --for pin at monotonic `now`."""
        ends = self.ends
        return None if ends is None else max(ends - now, 0.0)

    def until_wall(self, now: float, wall: float) -> float | None:
        """The Unix time a --for pin ends, as the wall clock reads now."""
        left = self.left(now)
        return None if left is None else wall + left

    def tick(self, now: float, wall: float) -> Override:
        """The same pin with its remaining time read now (what the store keeps)."""
        left = self.left(now)
        if left is None:
            return self
        return replace(self, remaining=left, since=now, since_wall=wall)

    def observe(self, t: int, previous: int | None, trained_at: list[float]) -> Override:
        """Epoch (step) t was decided, after `previous`; its reports trained at `trained_at`
        (Keras reports float32 LRs: equal within 1e-6 counts)."""
        if self.epochs is None or t < self.from_t or not trained_at:
            return self
        if not all(math.isclose(lr, self.lr, rel_tol=1e-6) for lr in trained_at):
            return self
        first = self.first_trained
        if first is None:
            first = min(max(self.from_t, t if previous is None else previous + 1), t)
        last = t if self.last_trained is None else max(self.last_trained, t)
        return replace(self, first_trained=first, last_trained=last)

    def over(self, now: float) -> bool:
        """Whether the pin has run its course (the LR from the next epoch is the policy's)."""
        if self.epochs is not None:
            return self.trained >= self.epochs
        ends = self.ends
        return ends is not None and now >= ends

    def to_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "author": self.author,
            "reason": self.reason,
            "from_t": self.from_t,
            "epochs": self.epochs,
            "first_trained": self.first_trained,
            "last_trained": self.last_trained,
            "remaining": self.remaining,
            "since_wall": self.since_wall,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], now: float, wall: float | None) -> Override:
        """A stored pin; a --for pin's downtime is the wall time since it was stored,
        clamped to [0, remaining]. Rows of lrpilot 0.2 (`until_epoch`, `until_wall`) load
        as pins of what was left of them, a duration capped at 365 days."""
        remaining = _opt_float(data.get("remaining"))
        since_wall = float(data.get("since_wall") or 0.0)
        if wall is None:  # no wall clock to measure the downtime by: none counted
            wall = since_wall
        epochs, from_t = _opt_int(data.get("epochs")), int(data.get("from_t", 0))
        first = _opt_int(data.get("first_trained"))
        if "remaining" not in data and "epochs" not in data:  # lrpilot 0.2
            until_wall, until_epoch = data.get("until_wall"), data.get("until_epoch")
            if until_wall is not None:
                remaining, since_wall = float(until_wall) - wall, wall
            if until_epoch is not None:  # its last epoch: one more trained at it
                from_t = first = int(until_epoch) - 1
                epochs = 1
        if remaining is not None:
            remaining = min(max(remaining, 0.0), MAX_DURATION)
            if not math.isfinite(remaining):
                remaining = 0.0
            remaining -= min(max(wall - since_wall, 0.0), remaining)
        return cls(
            float(data["lr"]),
            str(data.get("author", "")),
            str(data.get("reason", "")),
            from_t=from_t,
            epochs=epochs,
            first_trained=first,
            last_trained=_opt_int(data.get("last_trained")),
            remaining=remaining,
            since=now,
            since_wall=wall,
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
    override: Override | None = None  # an operator's pin in force
    finished: bool = False  # every worker said bye (cleared by the next hello)
    generation: int = 0  # the policy reloads its rule has seen (memory only)
    guard: GuardState = field(default_factory=GuardState)  # the loss-spike guard's memory
    rollbacks: int = 0  # rollbacks over every run (lrpilot_rollbacks_total)

    @property
    def policy(self) -> Policy:
        return self.rule.policy

    @property
    def lr(self) -> float:
        """The LR in force: a pin's while one holds, else the policy's."""
        return self.state.lr if self.override is None else self.override.lr

    @property
    def policy_lr(self) -> float:
        """The policy's own LR (under a pin, what it would set without the pin)."""
        return self.state.lr

    @property
    def unit(self) -> str:
        return self.policy.unit

    def next_t(self) -> int:
        """The first epoch (or step) not decided yet."""
        return 0 if self.last_epoch is None else self.last_epoch + 1

    def with_(self, **changes: Any) -> JobState:
        """A copy with `changes`; a misspelt field is a TypeError, as with
        `dataclasses.replace`.

        Shallow: every field is itself immutable. A report makes a few copies, so this
        copies the instance dict instead of re-running `__init__` (`replace` costs ~25 µs
        a call on the loop's hot path; JobState has no `__post_init__` to skip).
        """
        if not _FIELDS.issuperset(changes):
            unknown = sorted(set(changes) - _FIELDS)
            raise TypeError(f"JobState has no field {', '.join(unknown)}")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

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
            "finished": self.finished,
            "guard": self.guard.to_dict(),
            "rollbacks": self.rollbacks,
        }

    @classmethod
    def from_stored(
        cls,
        name: str,
        rule: JobRule,
        data: Mapping[str, Any],
        now: float,
        *,
        wall: float | None = None,
        generation: int = 0,
    ) -> JobState:
        """A job from its stored row under `rule` (not yet bound to the job's framework);
        a changed policy restarts from the stored LR. `now`, `wall`: the monotonic and Unix
        time of the load (a --for pin's downtime is measured with them; no `wall`: none);
        `generation`: the table's policy reloads so far (the job needs no rebind).

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
            override=(
                Override.from_dict(data["override"], now, wall) if data.get("override") else None
            ),
            finished=bool(data.get("finished", False)),
            generation=generation,
            guard=GuardState.from_dict(data.get("guard") or {}),
            rollbacks=int(data.get("rollbacks", 0)),
        )


_FIELDS = frozenset(f.name for f in fields(JobState))


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


#: Finite points a sweep under way needs before `status` shows what its curve suggests.
SUGGEST_AFTER = 20


def status_row(
    job: JobState, now: float, worker_timeout: float, wall: float | None = None
) -> dict[str, Any]:
    """One row of `lrpilot status` (STATUS_FIELDS, then run, version, shadow_lr, override,
    suggested_lr, and what the table shows or labels: momentum, unit, min_lr, finished);
    `wall`: the Unix time now, for the end of a --for pin."""
    info = job.policy.describe(job.state)
    value, suggested = job.value, info.get("suggested_lr")
    if info.get("policy") == "range_test":
        # A range test shows its curve's smoothed loss, not the last (perhaps diverged) one,
        # and its suggestion during the sweep too: what the curve so far suggests.
        value = info.get("value")
        report = job.policy.range_test_report(job.state)
        if report is not None:
            points = sum(1 for p in report["points"] if p[2] is not None)
            known = report["done"] or points >= SUGGEST_AFTER
            suggested = report["suggested_lr"] if known else None
    return {
        "job": job.name,
        "workers": len(job.sessions.live(now, worker_timeout)),
        "epoch": job.last_epoch,
        "lr": job.lr,
        "monitor": info.get("monitor"),
        "value": finite(value),
        "best": finite(info.get("best")),
        "wait": info.get("wait"),
        "patience": info.get("patience"),
        "policy": job.policy.type,
        "phase": info.get("phase"),
        "last_report_age_s": round(now - job.last_report, 3) if job.last_report else None,
        "run": job.run,
        "version": job.version,
        "shadow_lr": job.shadow_lr,
        "override": override_view(job, now, wall),
        "suggested_lr": finite(suggested),
        "momentum": momentum(job),  # a cycle_momentum plan's, for the next epoch (step)
        "unit": job.unit,  # `epoch` counts epochs, or steps for unit: step
        "min_lr": finite(info.get("min_lr")),
        "finished": job.finished,  # every worker said bye (stored: also after a restart)
        "rollbacks": job.rollbacks,  # the guard's rollbacks, every run
    }


def momentum(job: JobState) -> float | None:
    """The momentum the job's trainers set for the next epoch (step): the plan's in force
    when it cycles momentum (`cycle_momentum` of one_cycle, cyclic), else None (the
    optimizer's own; also while a pin holds the LR, as the trainers get no plan then)."""
    if job.override is not None or not getattr(job.policy.current(job.state), "cycle_momentum", 0):
        return None
    plan = job.policy.plan(job.state)
    at = None if plan is None else compiled_momentum(plan)
    return None if at is None else at(job.next_t())


def override_view(job: JobState, now: float, wall: float | None) -> dict[str, Any] | None:
    """A pin as `status` and `set-lr` show it: its LR, who, why, and its end (`until`, an
    RFC 3339 time, and `remaining_s`, for --for; `until_epoch`, once the first epoch
    trained at it is known, else `epochs` from `from_epoch`, for --epochs); `policy_lr`:
    the LR the policy would set now."""
    o = job.override
    if o is None:
        return None
    from .store import rfc3339

    until = o.until_wall(now, wall) if wall is not None else None
    left = o.left(now)
    return {
        "lr": o.lr,
        "author": o.author,
        "reason": o.reason,
        "unit": job.unit,
        "epochs": o.epochs,
        "from_epoch": o.from_t,
        "trained": o.trained if o.epochs is not None else None,
        "until_epoch": o.until_epoch(),
        "until": None if until is None else rfc3339(until),
        "remaining_s": None if left is None else round(left, 3),
        "policy_lr": job.policy_lr,
    }


def finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _next(last: Any) -> int:
    return 0 if last is None else int(last) + 1


def _opt_int(x: Any) -> int | None:
    return None if x is None else int(x)


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)
