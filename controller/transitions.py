"""How a job reacts to each event: one pure reducer, `step(job, event, env) -> Step`.

`step` is the one entry of every decision: the daemon (jobs.Batch) feeds it each
message and deadline of a loop turn, `lrpilot simulate` folds it over a
recorded history, so shadow mode, phases, notices and overrides are decided by
the same code in both. A transition never mutates anything and touches no
socket, clock, file or metric: it returns the job's new state, the audit rows
to commit and the messages to send, in a `Step`. The daemon commits every Step
of a loop turn in one transaction, then assigns the new states, then sends; if
the commit fails it simply drops the Steps, so nothing needs undoing.

Timing matches the frameworks: the decision on the report of epoch e applies
from epoch e+1; the `hello` reply carries the LR for the start epoch.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import (
    MAX_METRICS,
    MAX_UNDECIDED,
    Bye,
    ErrorMessage,
    Hello,
    LrMessage,
    Report,
)
from lrpilot.client.vocabulary import clamp_lr

from .aggregate import Pending, combine
from .guard import Guard, GuardState, Spike, observe
from .jobstate import JobState, Override, state_for
from .policies import Decision, Event, PhasesState, fingerprint
from .policies.errors import EngineError, ModeUnresolved
from .policies.plateau import is_loss
from .policyfile import JobRule
from .sessions import Worker
from .store import AuditRow, MetricPoint, rfc3339

__all__ = [
    "AggregateDue",
    "Env",
    "JobEvent",
    "Outgoing",
    "OverrideDue",
    "Rebind",
    "Release",
    "SetLr",
    "Step",
    "bye",
    "expire_override",
    "hello",
    "override",
    "pin_notices",
    "rebind",
    "release",
    "report",
    "step",
    "timeout",
]

#: (routing id, message) pairs to send once the Step is committed.
Outgoing = list[tuple[bytes, LrMessage | ErrorMessage]]

#: Reads the stored state of (job, run, t) for a resume; None when there is none.
SnapshotReader = Callable[[str, int, int], Mapping[str, Any] | None]


def _no_snapshots(job: str, run: int, t: int) -> Mapping[str, Any] | None:
    return None


@dataclass(frozen=True)
class Env:
    """What a transition may know besides the job: the time and the daemon's settings.

    Args:
        now: monotonic seconds; wall: Unix seconds.
        worker_timeout: a rank not heard from for this long is no longer a worker.
        rules: the rule of a job not seen yet (its hello starts it); None: no new jobs.
        snapshots: reads the stored end-of-t state of (job, run, t) for a resume.
        generation: the reloads so far; a job bound to `rules` carries it.
    """

    now: float
    wall: float
    worker_timeout: float = 600.0
    rules: Callable[[str], JobRule] | None = None
    snapshots: SnapshotReader = _no_snapshots
    generation: int = 0


# -- the events a job reacts to (besides the protocol's Hello, Report and Bye) -------------


@dataclass(frozen=True)
class AggregateDue:
    """Epoch (or step) t's aggregate_timeout ran out: decide on the reports that came."""

    t: int


@dataclass(frozen=True)
class OverrideDue:
    """A --for pin's end (`set-lr --for DURATION`) came due."""


@dataclass(frozen=True)
class SetLr:
    """`lrpilot set-lr`: an operator's LR from the next epoch, for good or for a while."""

    lr: float
    reason: str
    author: str
    epochs: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class Release:
    """`lrpilot release`: the job's pin ends now."""

    author: str


@dataclass(frozen=True)
class Rebind:
    """A reloaded policy file gave the job `rule` (applied at the job's next decision)."""

    rule: JobRule


#: Everything a job reacts to; `step` dispatches on its type.
JobEvent: TypeAlias = Hello | Report | Bye | AggregateDue | OverrideDue | SetLr | Release | Rebind


@dataclass
class Step:
    """The effects of one transition, applied only once committed.

    Args:
        job: the job's new state (None: a hello refused before the job existed).
        out: messages to send.
        audit: LR changes to record.
        snapshot: t whose end-of-epoch state `job` is (stored for resumes), or None.
        persist: whether the job row changed in a way the store keeps.
        reports, late: counts for `lrpilot_reports_total`, `lrpilot_late_decisions_total`.
        invalid: error codes to count in `lrpilot_invalid_messages_total`.
        warnings: lines for the controller's log.
        waiting: a new aggregation deadline (t, when) for the job.
        override_until: the monotonic time a timed override ends.
        decision: the policy's own decision, when the policy decided (shadow mode included).
        point: the decided metrics and the LR trained, for the recorded metrics.
    """

    job: JobState | None
    out: Outgoing = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    snapshot: int | None = None
    persist: bool = True
    reports: int = 0
    late: int = 0
    invalid: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    waiting: tuple[int, float] | None = None
    override_until: float | None = None
    decision: Decision | None = None
    point: MetricPoint | None = None


def step(job: JobState | None, event: JobEvent, env: Env) -> Step | None:
    """The job's reaction to `event`: its new state, what to store and what to send.

    None when the event changes nothing (a stale deadline, a bye of an unknown rank).

    Raises:
        ProtocolError: a message that cannot be decided (`unknown_session`, `schema`, ...).
    """
    match event:
        case Report():
            return report(job, event, env)
        case Hello():
            if job is not None:
                rule = job.rule
            elif env.rules is not None:
                rule = env.rules(event.job)
            else:
                raise ProtocolError("unknown_job", f"no job {event.job!r}")
            if not event.restore and needs_restore(job, event, rule):
                return Step(job, refuse_range_test(event), persist=False)
            return hello(job, event, rule, env, env.snapshots)
        case Bye():
            return bye(job, event, env)
        case AggregateDue():
            return None if job is None else timeout(job, event.t, env)
        case OverrideDue():
            return None if job is None else expire_override(job, env)
        case SetLr():
            if job is None:
                raise ProtocolError("unknown_job", "no such job")
            e = event
            return override(job, e.lr, e.reason, e.author, env, e.epochs, e.seconds)
        case Release():
            return None if job is None or job.override is None else release(job, event.author, env)
        case Rebind():
            return None if job is None else rebind(job, event.rule, env)
    raise TypeError(f"not a job event: {event!r}")  # pragma: no cover


# -- helpers ---------------------------------------------------------------------------


def lr_message(
    job: JobState,
    reason: str,
    seq: int | None,
    apply_from: int,
    action: str | None = None,
    notices: tuple[tuple[str, str], ...] = (),
    plan: dict[str, Any] | None = None,
) -> LrMessage:
    step = job.unit == "step"
    detail: dict[str, int] | None = None
    guard = guard_of(job)
    if guard is not None:
        detail = {"snapshot_every": guard.snapshot_every}
        g = job.guard
        # The decision that rolled back carries its restore whenever it is sent again (a
        # replayed report, a hello after a controller restart): clients apply a version once.
        if g.restore_version == job.version and g.restore_unit is not None and action is None:
            action = "restore"
        if action == "restore" and g.restore_version == job.version:
            detail["snapshot_unit"] = g.restore_unit or 0
    return LrMessage(
        job=job.name,
        lr=job.lr,
        version=job.version,
        run=job.run,
        reason=reason,
        seq=seq,
        apply_from_epoch=None if step else apply_from,
        apply_from_step=apply_from if step else None,
        action=action,
        notices=notices,
        plan=plan,
        detail=detail,
    )


def guard_of(job: JobState) -> Guard | None:
    """The loss-spike guard in force: the current phase's own, else the rule's."""
    rule = job.rule
    if rule.guard is None and not rule.phase_guards:
        return None
    state = job.state
    return rule.guard_at(state.index if isinstance(state, PhasesState) else None)


def minimizes(job: JobState, guard: Guard) -> bool:
    """Whether a spike of `guard.monitor` is a jump up (min) or a drop (max); `mode:
    auto` as plateau's: a loss is min, else the client's direction, else acc/auc is max."""
    if guard.mode != "auto":
        return guard.mode == "min"
    if is_loss(guard.monitor):
        return True
    direction = job.directions.get(guard.monitor)
    if direction is not None:
        return direction == "min"
    name = guard.monitor.lower()
    return not ("acc" in name or "auc" in name)


def plan_of(job: JobState) -> dict[str, Any] | None:
    """The plan in force (a schedule, or a chain's schedule phase), or None (also while an
    operator's pin holds the LR)."""
    if job.override is not None:
        return None
    return job.policy.plan(job.state)


def plan_detail(plan: Mapping[str, Any]) -> str:
    """A plan as the audit row's detail: `plan {json}`."""
    return "plan " + json.dumps(plan, sort_keys=True, separators=(",", ":"))


def audit_row(
    job: JobState,
    env: Env,
    old: float | None,
    reason: str,
    epoch: int | None,
    source: str = "policy",
    detail: str | None = None,
) -> AuditRow:
    return AuditRow(
        rfc3339(env.wall),
        job.name,
        old,
        job.lr,
        reason,
        job.version,
        epoch,
        source,
        job.run,
        detail,
    )


def new_run_id(previous: int, wall: float) -> int:
    """Run ids grow with time (microseconds), so a job whose state was lost or forgotten
    never reuses an id that its clients still hold."""
    return max(previous + 1, int(wall * 1e6))


def _push(
    job: JobState,
    env: Env,
    reason: str,
    apply_from: int,
    answered: Mapping[int, object] | None = None,
    action: str | None = None,
    notices: tuple[tuple[str, str], ...] = (),
) -> Outgoing:
    """The decision to every live worker, but the ranks in `answered` (they got a reply);
    workers whose hello said `plans: true` get the plan in force with it."""
    plan = plan_of(job)
    return [
        (
            w.session,
            lr_message(job, reason, None, apply_from, action, notices, plan if w.plans else None),
        )
        for w in job.sessions.live(env.now, env.worker_timeout)
        if answered is None or w.rank not in answered
    ]


# -- hello -----------------------------------------------------------------------------


def hello(
    job: JobState | None, h: Hello, rule: JobRule, env: Env, snapshots: SnapshotReader
) -> Step:
    """A rank starts: a new job, a resumed run, a new run, or a rank joining the run."""
    audit: list[AuditRow] = []
    reason = "unchanged"
    before = job
    rejoined = False
    if job is None:
        rule = rule.for_framework(h.framework)
        start = h.start_step if rule.policy.unit == "step" else h.start_epoch
        job = JobState(
            h.job,
            rule,
            rule.policy.start(rule.lr0(h.lr), start),
            fingerprint(rule.policy),
            run=new_run_id(0, env.wall),
            last_epoch=start - 1 if start > 0 else None,
            framework=h.framework,
            generation=env.generation,
        )
        reason = "initial"
        plan = plan_of(job)
        detail = None if plan is None else plan_detail(plan)
        audit.append(audit_row(job, env, None, "initial", start, source="hello", detail=detail))
    else:
        start = h.start_step if job.unit == "step" else h.start_epoch
        rejoined = h.session.hex() in job.sessions.seqs
        if rejoined:
            # The same client object again (it lost the controller and reconnects, then
            # replays the reports it kept): it rejoins; replayed reports are decided in order
            # and those decided already are deduplicated by seq. No rollback, no new run.
            pass
        elif start > 0:
            job, reason, audit = _resume(job, start, env, snapshots)
        elif _starts_new_run(job, h.rank, env):
            old = job.lr
            job = job.with_(
                run=new_run_id(job.run, env.wall),
                version=1,
                state=job.policy.start(job.rule.lr0(h.lr), 0),
                last_epoch=None,
                pending={},
                value=None,
                sessions=job.sessions.new_run(),
                override=None,  # a pin belongs to the run it was set in
                guard=GuardState(),  # max_rollbacks count per run
            )
            reason = "initial"
            plan = plan_of(job)
            detail = None if plan is None else plan_detail(plan)
            audit.append(audit_row(job, env, old, "initial", 0, source="hello", detail=detail))
    directions = {**job.directions, **h.directions} if h.directions else job.directions
    if len(directions) > MAX_METRICS:  # bounded: many hellos never grow the stored row
        directions = dict(h.directions)
    job = job.with_(
        world=h.world,
        directions=directions,
        sessions=job.sessions.join(h.rank, h.session, env.now, h.host, h.pid, h.plans),
        last_seen=env.now,
        finished=False,
    )
    # A policy that starts with a range test: every rank keeps a copy of its weights first.
    action = job.policy.start_action(job.state)
    if not h.restore:
        if action == "snapshot":
            # A new run that begins with a test: refused (it does not join), and the sweep
            # the current run may be in is over too: its weights are no longer trained.
            assert before is not None  # a new job is refused before this: needs_restore
            refused = _abandon_sweep(before, h, start, env, joined=False)
            if refused is None:
                refused = Step(before, persist=False)
            refused.out += refuse_range_test(h)
            return refused
        abandoned = _abandon_sweep(job, h, start, env, joined=True)
        if abandoned is not None:
            abandoned.audit[:0] = audit
            return abandoned
    plan = plan_of(job) if h.plans else None
    answer = lr_message(job, reason, None, start, action, pin_notices(job), plan)
    if answer.action == "restore" and action is None and not rejoined:
        # A guard's restore is for the ranks whose weights spiked, not a new process.
        answer = dataclasses.replace(
            answer,
            action=None,
            detail={k: v for k, v in (answer.detail or {}).items() if k != "snapshot_unit"},
        )
    return Step(job, [(h.session, answer)], audit)


def _abandon_sweep(job: JobState, h: Hello, start: int, env: Env, joined: bool) -> Step | None:
    """A rank that cannot restore its weights says hello while a range test sweeps: the
    sweep ends with no suggestion and the LR from before it (audited `range_test`, stop
    reason `abandoned`); every other live rank restores its weights (`action: restore`).
    A rank that `joined` is told why (notice `restore_unsupported`) with that LR, so its
    weights never train at the sweep's LRs. None: no sweep under way."""
    t = job.next_t() - 1
    ended = job.policy.abandon(job.state, t)
    if ended is None:
        return None
    state, decision = ended
    old = job.lr
    job = job.with_(state=state, version=job.version + 1)
    where = f"{h.host}:{h.pid}" if h.host else f"pid {h.pid}"
    text = (
        f"rank {h.rank} of job {h.job} ({where}) said hello during an LR range test but "
        "cannot put its weights back; the test is abandoned with no suggestion and the LR "
        f"from before it, {job.lr:.6g}, applies (a client with snapshot/restore: the Keras "
        "callback, LRPilotScheduler(optimizer, model=model), or "
        "Client(snapshot_fn=..., restore_fn=...))"
    )
    out: Outgoing = [
        (w.session, lr_message(job, decision.reason, None, t + 1, decision.action))
        for w in job.sessions.live(env.now, env.worker_timeout)
        if w.session != h.session
    ]
    if joined:
        notice = (("restore_unsupported", text),)
        out.append((h.session, lr_message(job, decision.reason, None, start, None, notice)))
    row = audit_row(job, env, old, decision.reason, t + 1, source="hello", detail=decision.detail)
    return Step(job, out, [row], warnings=[text])


def needs_restore(job: JobState | None, h: Hello, rule: JobRule) -> bool:
    """Whether this hello would start (or join) a range test that has not begun yet."""
    if job is None:
        rule = rule.for_framework(h.framework)
        start = h.start_step if rule.policy.unit == "step" else h.start_epoch
        state = rule.policy.start(rule.lr0(h.lr), start)
        return rule.policy.start_action(state) == "snapshot"
    return job.policy.start_action(job.state) == "snapshot"


def refuse_range_test(h: Hello) -> Outgoing:
    """The answer to a client that cannot restore weights, for a job that starts with a
    range test: its own LR and notice `restore_unsupported`; the rank does not join."""
    text = (
        f"job {h.job}'s policy starts with an LR range test, which needs a client that can "
        "put its weights back: the Keras callback, LRPilotScheduler(optimizer, model=model), "
        "or Client(snapshot_fn=..., restore_fn=...); training goes on at its own LR"
    )
    refusal = LrMessage(
        job=h.job,
        lr=h.lr,
        version=0,
        run=0,
        reason="unchanged",
        apply_from_epoch=h.start_epoch,
        notices=(("restore_unsupported", text),),
    )
    return [(h.session, refusal)]


def _starts_new_run(job: JobState, rank: int, env: Env) -> bool:
    """A hello at epoch 0 starts a new run if this rank already reported in the current
    run, or the job has been silent past aggregate_timeout with no live worker."""
    if rank in job.sessions.reported:
        return True
    silent = env.now - job.last_report > job.rule.aggregate_timeout if job.last_report else True
    return silent and not job.sessions.live(env.now, env.worker_timeout)


def _resume(
    job: JobState, start: int, env: Env, snapshots: SnapshotReader
) -> tuple[JobState, str, list[AuditRow]]:
    """A client restarts at `start` > 0: continue, or roll back to the end of start-1."""
    if job.last_epoch is None or start > job.last_epoch:
        return job, "unchanged", []
    snap = snapshots(job.name, job.run, start - 1)
    if snap is None:
        return job, "unchanged", []
    old = job.lr
    job = job.with_(
        state=state_for(job.rule, snap, next_t=start),
        version=job.version + 1,
        last_epoch=start - 1,
        value=snap.get("value"),
        shadow_lr=snap.get("shadow_lr"),
        pending={t: p for t, p in job.pending.items() if t < start},
    )
    return job, "resume", [audit_row(job, env, old, "resume", start, source="hello")]


# -- reports and decisions ---------------------------------------------------------------


def report(job: JobState | None, r: Report, env: Env) -> Step:
    """A rank's metrics for one epoch (or step): decide, wait for the other ranks, or
    answer a duplicate or late report with the decision in force.

    Raises:
        ProtocolError: `unknown_session` (say hello first) or `schema`.
    """
    if job is None or job.sessions.worker(r.rank, r.session) is None:
        raise ProtocolError(
            "unknown_session", "say hello first (the controller may have restarted)"
        )
    if job.unit == "step":
        if r.step is None:
            raise ProtocolError("schema", f"job {job.name} runs a unit: step policy; report step")
        t = r.step
    else:
        t = r.epoch
    duplicate = job.sessions.seen(r.session, r.seq)
    late = not duplicate and job.last_epoch is not None and t <= job.last_epoch
    sessions = job.sessions.record(
        r.rank, r.session, r.seq, env.now, counts=not (duplicate or late)
    )
    if duplicate or late:
        # Answer with the decision in force, change nothing else.
        job = job.with_(sessions=sessions, last_seen=env.now)
        return Step(job, [(r.session, lr_message(job, "unchanged", r.seq, t + 1))], late=int(late))
    # One copy of the job per report (what a report changes, whatever the world size).
    heard = {
        "sessions": sessions,
        "last_seen": env.now,
        "last_report": env.now,
        "last_report_wall": env.wall,
    }
    aggregate = job.rule.aggregate
    if job.world <= 1 or aggregate == "chief":
        job = job.with_(**heard)
        if aggregate == "chief" and r.rank != 0:
            return Step(job, [(r.session, lr_message(job, "unchanged", r.seq, t + 1))], reports=1)
        step = decide(job, t, r.metrics, {r.rank: r}, env)
    else:
        waiting = job.pending.get(t)
        if waiting is None and len(job.pending) >= MAX_UNDECIDED:
            raise ProtocolError(
                "out_of_range",
                f"job {job.name} already waits for other ranks on {MAX_UNDECIDED} epochs; "
                f"{job.unit} {t} is too far ahead",
            )
        pending = (waiting or Pending(t, env.now)).add(r)
        if not pending.complete(job.world):
            job = job.with_(**heard, pending={**job.pending, t: pending})
            deadline = None if waiting else (t, env.now + job.rule.aggregate_timeout)
            return Step(job, reports=1, waiting=deadline)
        job = job.with_(**heard, pending={k: v for k, v in job.pending.items() if k != t})
        step = decide(job, t, combine(pending.reports, aggregate), pending.reports, env)
    step.reports = 1
    return step


def timeout(job: JobState, t: int, env: Env) -> Step | None:
    """Epoch t's aggregate_timeout ran out: decide on the reports that came (late)."""
    pending = job.pending.get(t)
    if pending is None or env.now < pending.first_seen + job.rule.aggregate_timeout:
        return None
    job = job.with_(pending={k: v for k, v in job.pending.items() if k != t})
    step = decide(job, t, combine(pending.reports, job.rule.aggregate), pending.reports, env)
    step.late = 1
    return step


def wire_code(exc: EngineError) -> str:
    """The wire's error code for an engine error (`mode_unresolved`, else `schema`)."""
    return "mode_unresolved" if isinstance(exc, ModeUnresolved) else "schema"


def decide(
    job: JobState, t: int, metrics: Mapping[str, float], reports: Mapping[int, Report], env: Env
) -> Step:
    """The policy decides on the (aggregated) metrics of time t; every rank gets the LR."""
    # In shadow mode the policy runs on its own LR (shadow_lr), the job keeps the one it sent.
    before = job.state if job.shadow_lr is None else job.state.replace(lr=job.shadow_lr)
    try:
        workers = job.sessions.workers
        ahead = all(_has_plans(workers.get(r.rank), r.session) for r in reports.values())
        admitted = job.policy.admit(before, t, [r.lr for r in reports.values()], ahead)
        if admitted is not None:
            state, decision = job.policy.step(admitted, t, metrics, job.directions)
        else:
            # Trained at an LR the range test did not set (the trainer went on at its last
            # LR while the controller was away, or ran its sweep past the restore): no
            # point, the policy decides nothing, and every rank is told the sweep's next
            # untried LR again, from t+1.
            state = job.policy.missed(job.state, t)
            decision = Decision(state.lr)
    except EngineError as exc:  # nothing changes, every rank is told
        code, message = wire_code(exc), str(exc)
        errors: Outgoing = [
            (r.session, ErrorMessage(code, message, r.seq)) for r in reports.values()
        ]
        return Step(job, errors, invalid=[code], warnings=[message])
    decided = decision
    warnings = [decision.warning] if decision.warning else []
    monitor = next(iter(job.policy.current(state).monitors()), None)
    value = metrics.get(monitor) if monitor is not None else None
    notices: list[tuple[str, str]] = []
    if monitor is not None and monitor not in metrics and decision.warning:
        notices.append(("monitor_missing", decision.warning))
    if decision.notice is not None:
        notices.append((decision.notice, decision.warning or decision.notice))
    old_lr, old_policy_lr, previous = job.lr, job.policy_lr, job.last_epoch
    # The LR trained is what the first rank says it used (a plan runs in the trainer), else
    # the LR in force.
    first = reports[min(reports)] if reports else None
    trained = first.lr if first is not None else old_lr
    epoch = first.epoch if first is not None else t
    point = MetricPoint(job.name, job.run, t, epoch, trained, env.wall, dict(metrics))
    audit: list[AuditRow] = []
    plan_before = plan_of(job)
    if not decision.apply:
        notices.append(
            (
                "shadow",
                f"the policy runs in shadow mode (apply: false): it decided lr "
                f"{decision.lr:.6g}, the LR stays {old_policy_lr:.6g}",
            )
        )
        # Shadow mode: keep the policy's memory and its LR (shadow_lr), send the LR in force
        # (under a pin the policy's own LR stays underneath it).
        job = job.with_(shadow_lr=decision.lr, state=state.replace(lr=old_policy_lr))
        if decision.lr != before.lr:
            detail = f"shadow lr {decision.lr:.6g}"
            audit.append(
                audit_row(job, env, old_lr, decision.reason, t + 1, source="shadow", detail=detail)
            )
        decision = Decision(old_policy_lr)
        job = job.with_(last_epoch=t, value=value)
    else:
        job = job.with_(state=state, shadow_lr=None, last_epoch=t, value=value)
    reason, pin_ended = decision.reason, False
    job, spike = _judge(job, t, metrics)
    if spike is not None:
        return _rolled_back(job, t, spike, old_lr, reports, point, decided, warnings, env)
    if job.override is not None:
        # A pin: the policy decided underneath (its state advanced), the pinned LR holds
        # until the pin has run its course; then the policy's LR applies from t+1.
        trained_at = [r.lr for r in reports.values()]
        pin = job.override.observe(t, previous, trained_at).tick(env.now, env.wall)
        pin_ended = pin.over(env.now)
        job = job.with_(override=None if pin_ended else pin)
        reason = "override" if pin_ended else "unchanged"
    changed = job.lr != old_lr or decision.action in ("snapshot", "restore")
    plan = plan_of(job)
    # A sweep that starts over (no point yet: see RangeTest.missed) moves its plan with the
    # same LR: a new version, so that the trainers take it; no audit row.
    moved = not changed and plan is not None and plan != plan_before
    if changed or moved:
        job = job.with_(version=job.version + 1)
    if pin_ended:
        audit.append(audit_row(job, env, old_lr, "override", t + 1, "expiry", "expired"))
    elif (
        changed
        and job.override is None
        # A plan is audited (and logged) once, when it starts, not at each of its values.
        and (plan is None or plan != plan_before or decision.action)
    ):
        why = decision.detail
        if plan is not None and why is None:
            why = plan_detail(plan)
        audit.append(audit_row(job, env, old_lr, reason, t + 1, detail=why))
    reason = reason if changed else "unchanged"
    notices += pin_notices(job)
    workers = job.sessions.workers
    out: Outgoing = [
        (
            r.session,
            lr_message(
                job,
                reason,
                r.seq,
                t + 1,
                decision.action,
                tuple(notices),
                plan if plan is not None and _has_plans(workers.get(r.rank), r.session) else None,
            ),
        )
        for r in reports.values()
    ]
    if changed or moved or decision.action:
        out += _push(job, env, reason, t + 1, reports, decision.action)
    return Step(job, out, audit, snapshot=t, warnings=warnings, decision=decided, point=point)


def _judge(job: JobState, t: int, metrics: Mapping[str, float]) -> tuple[JobState, Spike | None]:
    """The guard in force judges unit t's (aggregated) monitor."""
    guard = guard_of(job)
    if guard is None:
        return job, None
    g, spike = observe(guard, job.guard, t, metrics.get(guard.monitor), minimizes(job, guard))
    return job.with_(guard=g), spike


def _rolled_back(
    job: JobState,
    t: int,
    spike: Spike,
    old_lr: float,
    reports: Mapping[int, Report],
    point: MetricPoint,
    decided: Decision,
    warnings: list[str],
    env: Env,
) -> Step:
    """Unit t spiked: every rank restores the snapshot of `spike.snapshot_unit` and goes
    on at the LR × lr_factor from t+1 (audited `divergence`, notice `rolled_back`); with
    max_rollbacks spent, notice only, or `action: stop` with `on_exhausted: stop`."""
    guard = guard_of(job)
    assert guard is not None
    action: str | None = None
    if spike.rollback:
        new_lr = clamp_lr(job.policy_lr * guard.lr_factor)
        job = job.with_(
            state=job.policy.rebase(job.state, new_lr, t),
            version=job.version + 1,
            rollbacks=job.rollbacks + 1,
        )
        job = job.with_(
            guard=dataclasses.replace(
                job.guard, restore_version=job.version, restore_unit=spike.snapshot_unit
            )
        )
        action = "restore"
        text = (
            f"loss spike at {job.unit} {spike.unit} ({guard.monitor} {spike.value:.6g}, EMA "
            f"{'none' if spike.ema is None else format(spike.ema, '.6g')}): every rank "
            f"restores the snapshot of {job.unit} {spike.snapshot_unit} and goes on at lr "
            f"{job.lr:.6g} (rollback {job.guard.rollbacks} of {guard.max_rollbacks})"
        )
    else:
        stop = guard.on_exhausted == "stop"
        if stop:
            action = "stop"
            job = job.with_(version=job.version + 1)
        text = (
            f"loss spike at {job.unit} {spike.unit} ({guard.monitor} {spike.value:.6g}), but "
            f"max_rollbacks ({guard.max_rollbacks}) are spent in this run: "
            + ("training stops (on_exhausted: stop)" if stop else "no rollback, training goes on")
        )
    warnings = [*warnings, text]
    row = audit_row(job, env, old_lr, "divergence", t + 1, detail=spike.detail())
    notices = (("rolled_back", text), *pin_notices(job))
    plan = plan_of(job)
    workers = job.sessions.workers
    out: Outgoing = [
        (
            r.session,
            lr_message(
                job,
                "divergence",
                r.seq,
                t + 1,
                action,
                notices,
                plan if plan is not None and _has_plans(workers.get(r.rank), r.session) else None,
            ),
        )
        for r in reports.values()
    ]
    if action is not None:
        out += _push(job, env, "divergence", t + 1, reports, action, notices)
    # What `simulate` marks: the rollback (or the stop), as the policy's own events are.
    marked = Decision(
        job.lr,
        event=Event("divergence", old_lr, job.lr),
        action=action,
        detail=spike.detail(),
    )
    return Step(job, out, [row], snapshot=t, warnings=warnings, decision=marked, point=point)


def _has_plans(worker: Worker | None, session: bytes) -> bool:
    return worker is not None and worker.session == session and worker.plans


def bye(job: JobState | None, b: Bye, env: Env) -> Step | None:
    """A rank is done: it no longer counts as a worker; the job is finished (stored) once
    every rank that said hello said bye."""
    if job is None or job.sessions.worker(b.rank, b.session) is None:
        return None
    sessions = job.sessions.leave(b.rank, b.session)
    finished = sessions.finished()  # stored: `set-lr` on a finished job is refused
    return Step(job.with_(sessions=sessions, finished=finished), persist=finished)


# -- operator and reload -------------------------------------------------------------------


def override(
    job: JobState,
    lr: float,
    reason: str,
    author: str,
    env: Env,
    epochs: int | None = None,
    seconds: float | None = None,
) -> Step:
    """`lrpilot set-lr`: the job's LR from its next epoch (step), pushed to every worker.

    Without `epochs` or `seconds` it is a new base: a plateau keeps best/wait and reduces
    from it, a schedule rebases. With one of them it is a pin (see `Override`): the LR
    holds exactly, the policy keeps deciding underneath, and its LR takes over at the end
    (audited as `override` with detail `expired`). A new set-lr replaces a pin.
    """
    old = job.lr
    t = job.last_epoch if job.last_epoch is not None else -1
    detail = reason or None
    if epochs is None and seconds is None:
        state = job.policy.rebase(job.state, lr, t)
        job = job.with_(state=state, version=job.version + 1, override=None)
    else:
        pin = Override(
            lr,
            author,
            reason,
            from_t=t + 1,
            epochs=epochs,
            remaining=seconds,
            since=env.now,
            since_wall=env.wall,
        )
        job = job.with_(version=job.version + 1, override=pin)
        ends = f"{epochs} {job.unit}s" if epochs is not None else f"{seconds:g} s"
        detail = f"{reason}; for {ends}" if reason else f"for {ends}"
    row = audit_row(job, env, old, "override", t + 1, source=author or "operator", detail=detail)
    notices = pin_notices(job)
    step = Step(job, _push(job, env, "override", t + 1, notices=notices), [row])
    if seconds is not None:
        step.override_until = env.now + seconds
    return step


def release(job: JobState, author: str, env: Env) -> Step:
    """`lrpilot release`: the pin ends now; the policy's LR from the next epoch (step)."""
    return _end_pin(job, env, author or "operator", "released")


def expire_override(job: JobState, env: Env) -> Step | None:
    """A --for pin's time ran out: the policy's LR from the next epoch (step)."""
    o = job.override
    ends = None if o is None else o.ends
    if ends is None or env.now < ends:
        return None
    return _end_pin(job, env, "expiry", "expired")


def _end_pin(job: JobState, env: Env, source: str, detail: str) -> Step:
    old, t = job.lr, job.next_t()
    job = job.with_(override=None)
    changed = job.lr != old
    if changed:
        job = job.with_(version=job.version + 1)
    row = audit_row(job, env, old, "override", t, source=source, detail=detail)
    return Step(job, _push(job, env, "override", t) if changed else [], [row])


def pin_notices(job: JobState) -> tuple[tuple[str, str], ...]:
    """Notice `override` for the trainer while a pin holds: its LR, who, and its end."""
    o = job.override
    if o is None:
        return ()
    if o.epochs is not None:
        n = f"{o.epochs} {job.unit}{'s' if o.epochs != 1 else ''}"
        end = f"for {n} trained at it, from {job.unit} {o.from_t} or later"
    else:
        until = rfc3339(round(o.since_wall + (o.remaining or 0.0)))
        end = f"until {until[:19]}Z"
    who = f" by {o.author}" if o.author else ""
    why = f" ({o.reason})" if o.reason else ""
    text = f"lr {o.lr:.6g} pinned{who}{why} {end}; then the policy's LR applies"
    return (("override", text),)


def rebind(job: JobState, rule: JobRule, env: Env) -> Step | None:
    """A reloaded policy file gave the job `rule`: carry its state over (None: no change)."""
    rule = rule.for_framework(job.framework)
    if rule.policy == job.policy and rule.match == job.rule.match:
        return Step(job.with_(rule=rule, generation=env.generation), persist=False)
    t = job.next_t()
    old_lr = job.lr
    job = job.with_(
        generation=env.generation,
        rule=rule,
        state=job.policy.transfer(job.state, rule.policy, t),
        fingerprint=fingerprint(rule.policy),
        shadow_lr=None,  # the new policy starts from the LR in force
    )
    if job.lr == old_lr:
        return Step(job)
    job = job.with_(version=job.version + 1)
    row = audit_row(job, env, old_lr, "reload", t, source="reload")
    return Step(job, _push(job, env, "reload", t), [row])
