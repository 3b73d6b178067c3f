"""Jobs: what the controller knows about each training job, and how messages change it.

This is the daemon's logic without sockets: `JobTable.hello/report/bye/
set_lr/...` take validated messages and the time, update the job, persist
what must survive (before returning), and return the messages to send and to
whom. `server.py` only moves bytes; tests can drive this module directly.

Timing matches the frameworks: the decision on the report of epoch e applies
from epoch e+1; the `hello` reply carries the LR for the start epoch.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import Bye, ErrorMessage, Hello, LrMessage, Report

from .metrics import Metrics
from .policies import Decision, Phases, Plateau, Policy, State
from .policyfile import JobRule, PolicySet
from .store import AuditRow, Store, rfc3339

__all__ = ["STATUS_FIELDS", "Job", "JobTable", "Outgoing", "Worker"]

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

log = logging.getLogger("lrpilot.controller")

#: (routing id, message) pairs for the server to send.
Outgoing = list[tuple[bytes, LrMessage | ErrorMessage]]


@dataclass
class Worker:
    """One rank's live session."""

    rank: int
    session: bytes
    last_seen: float
    host: str = ""
    pid: int = 0
    gone: bool = False


@dataclass
class Pending:
    """Reports of one epoch waiting for the other ranks (multi-worker jobs)."""

    first_seen: float
    reports: dict[int, Report] = field(default_factory=dict)


@dataclass
class Job:
    """A job's full state; `persisted()` is what the store keeps."""

    name: str
    rule: JobRule
    state: State
    run: int = 1
    version: int = 1
    last_epoch: int | None = None  # last decided time (epoch, or step for unit: step)
    world: int = 1
    directions: dict[str, str] = field(default_factory=dict)
    seqs: dict[str, int] = field(default_factory=dict)  # session hex -> last seq
    reported_ranks: set[int] = field(default_factory=set)
    workers: dict[int, Worker] = field(default_factory=dict)
    pending: dict[int, Pending] = field(default_factory=dict)
    last_report: float = 0.0
    last_seen: float = 0.0  # last hello or report, for --job-ttl
    last_report_wall: float = 0.0
    value: float | None = None
    policy_key: str = ""
    shadow_lr: float | None = None

    @property
    def policy(self) -> Policy:
        return self.rule.policy

    @property
    def lr(self) -> float:
        return self.state.lr

    def persisted(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "version": self.version,
            "last_epoch": self.last_epoch,
            "world": self.world,
            "directions": self.directions,
            "seqs": self.seqs,
            "reported_ranks": sorted(self.reported_ranks),
            "policy_key": self.policy_key,
            "state": self.state.to_dict(),
            "last_report_wall": self.last_report_wall,
            "shadow_lr": self.shadow_lr,
        }


def policy_key(rule: JobRule) -> str:
    """Identifies a rule's policy, so stored state is only reused by the same policy."""
    return f"{rule.match}|{rule.policy!r}"


def _units(job: Job, report: Report) -> int:
    if job.policy.unit == "step":
        if report.step is None:
            raise ProtocolError("schema", f"job {job.name} runs a unit: step policy; report step")
        return report.step
    return report.epoch


class JobTable:
    """Every job the controller knows; applies messages and returns what to send.

    Args:
        policies: the current policy set (`swap_policies` replaces it).
        store: durable state; committed before any reply is returned.
        metrics: Prometheus metrics to keep in step.
        clock: monotonic seconds; wall: Unix seconds (both injectable for tests).
        max_jobs: bound on jobs in memory.
        worker_timeout: a rank not heard from for this long is no longer a worker.
    """

    def __init__(
        self,
        policies: PolicySet,
        store: Store,
        metrics: Metrics,
        clock: Callable[[], float],
        wall: Callable[[], float],
        max_jobs: int = 10000,
        worker_timeout: float = 600.0,
        job_ttl: float = 86400.0,
    ) -> None:
        self.policies = policies
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.max_jobs = max_jobs
        self.worker_timeout = worker_timeout
        self.job_ttl = job_ttl
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    # -- helpers --------------------------------------------------------------

    def _lr_message(
        self, job: Job, reason: str, seq: int | None, apply_from: int, action: str | None = None
    ) -> LrMessage:
        step = job.policy.unit == "step"
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
        )

    def _audit(
        self,
        job: Job,
        old: float | None,
        reason: str,
        epoch: int | None,
        source: str = "policy",
        detail: str | None = None,
    ) -> AuditRow:
        return AuditRow(
            rfc3339(self.wall()),
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

    def _commit(self, job: Job, audit: list[AuditRow], snapshot_epoch: int | None = None) -> None:
        snap = None
        if snapshot_epoch is not None:
            snap = (
                job.run,
                snapshot_epoch,
                {
                    "state": job.state.to_dict(),
                    "version": job.version,
                    "value": job.value,
                    "policy_key": job.policy_key,
                },
            )
        try:
            self.store.commit(job.name, job.persisted(), snap, audit)
        except Exception:
            self.metrics.store_errors.inc()
            raise
        for row in audit:
            self.metrics.lr_changes.labels(job.name, row.reason).inc()
            log.info(
                "job %s: lr %s -> %.6g (%s, version %d, from %s %s)",
                job.name,
                f"{row.old_lr:.6g}" if row.old_lr is not None else "-",
                row.new_lr,
                row.reason,
                row.version,
                job.policy.unit,
                row.epoch,
            )
        self.observe(job)

    def observe(self, job: Job) -> None:
        """Bring the job's metrics in line with its state."""
        self.metrics.observe_job(job, len(self._workers(job, self.clock())))

    def _restore(self, name: str, rule: JobRule, data: dict[str, Any]) -> Job:
        """A job from its stored state; a changed policy restarts from the stored LR."""
        key = policy_key(rule)
        stored_state = data.get("state", {})
        lr = float(stored_state.get("lr", 0.001))
        if data.get("policy_key") == key:
            state = rule.policy.load_state(stored_state)
        else:
            last = data.get("last_epoch")
            state = self._start_from(rule.policy, lr, (-1 if last is None else int(last)) + 1)
        job = Job(
            name,
            rule,
            state,
            run=int(data.get("run", 1)),
            version=int(data.get("version", 1)),
            last_epoch=data.get("last_epoch"),
            world=int(data.get("world", 1)),
            directions=dict(data.get("directions", {})),
            seqs=dict(data.get("seqs", {})),
            reported_ranks=set(data.get("reported_ranks", [])),
            policy_key=key,
            last_report_wall=float(data.get("last_report_wall", 0.0)),
            shadow_lr=data.get("shadow_lr"),
        )
        job.last_seen = self.clock()
        return job

    @staticmethod
    def _start_from(policy: Policy, lr: float, t: int) -> State:
        """Start `policy` at time t so that the LR in force is `lr` and its shape continues."""
        state = policy.start(lr, t)
        return policy.rebase(state, lr, t - 1) if state.lr != lr else state

    def _get(self, name: str) -> Job | None:
        job = self.jobs.get(name)
        if job is None:
            data = self.store.load_job(name)
            if data is not None:
                if len(self.jobs) >= self.max_jobs:
                    return None
                job = self._restore(name, self.policies.rule_for(name), data)
                self.jobs[name] = job
        return job

    def _workers(self, job: Job, now: float) -> list[Worker]:
        return [
            w
            for w in job.workers.values()
            if not w.gone and now - w.last_seen <= self.worker_timeout
        ]

    # -- messages ---------------------------------------------------------------

    def hello(self, h: Hello) -> Outgoing:
        existing = self.jobs.get(h.job)
        try:
            with _all_or_nothing(existing):
                return self._hello(h)
        except Exception as exc:
            if existing is None and not isinstance(exc, ProtocolError):
                self.jobs.pop(h.job, None)  # a new job that could not be stored is not a job
            raise

    def _hello(self, h: Hello) -> Outgoing:
        now = self.clock()
        job = self._get(h.job)
        rule = self.policies.rule_for(h.job)
        if job is None and len(self.jobs) >= self.max_jobs:
            raise ProtocolError("max_jobs", f"the controller holds --max-jobs {self.max_jobs} jobs")
        start = h.start_step if rule.policy.unit == "step" else h.start_epoch
        audit: list[AuditRow] = []
        reason = "unchanged"
        if job is None:
            job = Job(
                h.job,
                rule,
                self._fresh_state(rule, h.lr, start),
                run=self._new_run_id(0),
                policy_key=policy_key(rule),
            )
            job.last_epoch = start - 1 if start > 0 else None
            self.jobs[h.job] = job
            reason = "initial"
            audit.append(self._audit(job, None, "initial", start, source="hello"))
        elif start > 0:
            reason = self._resume(job, start, audit)
        else:
            silent = now - job.last_report > job.rule.aggregate_timeout if job.last_report else True
            if h.rank in job.reported_ranks or (silent and not self._workers(job, now)):
                old = job.lr
                job.run = self._new_run_id(job.run)
                job.version = 1
                job.state = self._fresh_state(job.rule, h.lr, 0)
                job.last_epoch, job.reported_ranks, job.pending, job.seqs = None, set(), {}, {}
                job.value = None
                reason = "initial"
                audit.append(self._audit(job, old, "initial", 0, source="hello"))
        job.world = h.world
        if h.directions:
            job.directions.update(h.directions)
        replaced = job.workers.get(h.rank)
        if replaced is not None and replaced.session != h.session:
            job.seqs.pop(replaced.session.hex(), None)  # a restarted worker: forget its old session
        job.workers[h.rank] = Worker(h.rank, h.session, now, h.host, h.pid)
        job.seqs.setdefault(h.session.hex(), -1)
        job.last_seen = now
        self.jobs.move_to_end(h.job)
        self._commit(job, audit)
        return [(h.session, self._lr_message(job, reason, None, start))]

    def _new_run_id(self, previous: int) -> int:
        """Run ids grow with time (microseconds), so a job whose state was lost or forgotten
        never reuses an id that its clients still hold."""
        return max(previous + 1, int(self.wall() * 1e6))

    def _fresh_state(self, rule: JobRule, client_lr: float, start: int) -> State:
        return rule.policy.start(rule.lr0(client_lr), start)

    def _resume(self, job: Job, start: int, audit: list[AuditRow]) -> str:
        """A client restarts at `start` > 0: continue, or roll back to the end of start-1."""
        if job.last_epoch is None or start > job.last_epoch:
            return "unchanged"
        snap = self.store.snapshot(job.name, job.run, start - 1)
        if snap is None:
            log.warning(
                "job %s: no snapshot for %s %d; continuing from the latest state",
                job.name,
                job.policy.unit,
                start - 1,
            )
            return "unchanged"
        old = job.lr
        if snap.get("policy_key") == job.policy_key:
            job.state = job.policy.load_state(snap["state"])
        else:  # the policy changed since: its LR of that epoch, the current policy's memory
            lr = float(snap["state"].get("lr", job.lr))
            job.state = self._start_from(job.policy, lr, start)
            log.warning(
                "job %s: policy changed since %s %d; resuming from its LR %.6g",
                job.name,
                job.policy.unit,
                start - 1,
                lr,
            )
        job.version += 1
        job.last_epoch = start - 1
        job.value = snap.get("value")
        job.pending = {t: p for t, p in job.pending.items() if t < start}
        audit.append(self._audit(job, old, "resume", start, source="hello"))
        return "resume"

    def report(self, r: Report) -> Outgoing:
        with _all_or_nothing(self.jobs.get(r.job)):
            return self._report(r)

    def _report(self, r: Report) -> Outgoing:
        now = self.clock()
        job = self.jobs.get(r.job)
        worker = job.workers.get(r.rank) if job is not None else None
        if job is None or worker is None or worker.session != r.session or worker.gone:
            raise ProtocolError(
                "unknown_session", "say hello first (the controller may have restarted)"
            )
        worker.last_seen = job.last_seen = now
        t = _units(job, r)
        key = r.session.hex()
        if r.seq <= job.seqs.get(key, -1) or (job.last_epoch is not None and t <= job.last_epoch):
            # A duplicate, or a late rank: answer with the decision in force, change nothing.
            if r.seq > job.seqs.get(key, -1):
                job.seqs[key] = r.seq
                self.metrics.late.labels(job.name).inc()
            return [(r.session, self._lr_message(job, "unchanged", r.seq, t + 1))]
        job.seqs[key] = r.seq
        job.reported_ranks.add(r.rank)
        job.last_report = now
        job.last_report_wall = self.wall()
        self.metrics.reports.labels(job.name).inc()
        aggregate = job.rule.aggregate
        if job.world <= 1 or aggregate == "chief":
            if aggregate == "chief" and r.rank != 0:
                return [(r.session, self._lr_message(job, "unchanged", r.seq, t + 1))]
            return self._decide(job, t, r.metrics, {r.rank: r})
        pending = job.pending.setdefault(t, Pending(now))
        pending.reports[r.rank] = r
        if len(pending.reports) < job.world:
            return []
        del job.pending[t]
        return self._decide(job, t, self._aggregate(job, pending), pending.reports)

    def _aggregate(self, job: Job, pending: Pending) -> dict[str, float]:
        names = set().union(*(r.metrics for r in pending.reports.values()))
        out: dict[str, float] = {}
        for name in names:
            values = [r.metrics[name] for r in pending.reports.values() if name in r.metrics]
            if any(math.isnan(v) for v in values):
                out[name] = math.nan  # one diverged rank is a diverged job
            elif job.rule.aggregate == "max":
                out[name] = max(values)
            else:
                out[name] = math.fsum(values) / len(values)
        return out

    def _decide(
        self, job: Job, t: int, metrics: dict[str, float], reports: dict[int, Report]
    ) -> Outgoing:
        started = self.clock()
        old_lr = job.lr
        try:
            state, decision = job.policy.step(job.state, t, metrics, job.directions)
        except ProtocolError as exc:  # mode_unresolved: nothing changes, every rank is told
            self.metrics.invalid.labels(exc.code).inc()
            log.warning("job %s: %s", job.name, exc.message)
            return [
                (r.session, ErrorMessage(exc.code, exc.message, r.seq)) for r in reports.values()
            ]
        if decision.warning:
            log.warning("job %s: %s", job.name, decision.warning)
        monitor = job.policy.describe(state).get("monitor")
        job.value = metrics.get(monitor) if isinstance(monitor, str) else None
        audit: list[AuditRow] = []
        if not decision.apply:
            # Shadow mode: keep the policy's memory and record the decision, send the old LR.
            job.shadow_lr = decision.lr
            job.state = state.replace(lr=old_lr)
            if decision.lr != old_lr:
                audit.append(
                    self._audit(
                        job,
                        old_lr,
                        decision.reason,
                        t + 1,
                        source="shadow",
                        detail=f"shadow lr {decision.lr:.6g}",
                    )
                )
            decision = Decision(old_lr)
        else:
            job.state = state
            if decision.lr != old_lr:
                job.version += 1
                audit.append(self._audit(job, old_lr, decision.reason, t + 1))
        job.last_epoch = t
        self._commit(job, audit, snapshot_epoch=t)  # the caller restores the job if this fails
        reason = decision.reason if decision.lr != old_lr else "unchanged"
        out: Outgoing = []
        answered = set()
        for r in reports.values():
            out.append((r.session, self._lr_message(job, reason, r.seq, t + 1, decision.action)))
            answered.add(r.rank)
        if decision.lr != old_lr or decision.action:
            for w in self._workers(job, started):
                if w.rank not in answered:
                    out.append(
                        (w.session, self._lr_message(job, reason, None, t + 1, decision.action))
                    )
        self.metrics.decision_seconds.observe(max(self.clock() - started, 0.0))
        return out

    def bye(self, b: Bye) -> Outgoing:
        job = self.jobs.get(b.job)
        if job is not None:
            worker = job.workers.get(b.rank)
            if worker is not None and worker.session == b.session:
                worker.gone = True
                self.observe(job)
        return []

    def expire(self) -> Outgoing:
        """Decide pending epochs whose aggregate_timeout passed; drop jobs silent past --job-ttl."""
        now = self.clock()
        out: Outgoing = []
        for job in list(self.jobs.values()):
            for t in sorted(job.pending):
                pending = job.pending[t]
                if now - pending.first_seen >= job.rule.aggregate_timeout:
                    with _all_or_nothing(job):
                        del job.pending[t]
                        self.metrics.late.labels(job.name).inc()
                        out += self._decide(job, t, self._aggregate(job, pending), pending.reports)
            if now - job.last_seen > self.job_ttl and not self._workers(job, now):
                self.drop(job.name)
        return out

    def refresh_metrics(self) -> None:
        """Keep `lrpilot_workers` true between decisions (ranks time out without a message)."""
        now = self.clock()
        for job in self.jobs.values():
            self.metrics.workers.labels(job.name).set(len(self._workers(job, now)))

    def next_deadline(self) -> float | None:
        deadlines = [
            p.first_seen + j.rule.aggregate_timeout
            for j in self.jobs.values()
            for p in j.pending.values()
        ]
        return min(deadlines) if deadlines else None

    def drop(self, name: str) -> None:
        """Forget a job in memory and metrics (its state stays on disk for a resume)."""
        self.jobs.pop(name, None)
        self.metrics.remove_job(name)

    # -- admin --------------------------------------------------------------------

    def set_lr(self, name: str, lr: float, reason: str) -> Outgoing:
        with _all_or_nothing(self.jobs.get(name)):
            return self._set_lr(name, lr, reason)

    def _set_lr(self, name: str, lr: float, reason: str) -> Outgoing:
        job = self._get(name)
        if job is None:
            raise KeyError(name)
        old = job.lr
        t = job.last_epoch if job.last_epoch is not None else -1
        job.state = job.policy.rebase(job.state, lr, t)
        job.version += 1
        self._commit(
            job,
            [self._audit(job, old, "override", t + 1, source="operator", detail=reason or None)],
        )
        return [
            (w.session, self._lr_message(job, "override", None, t + 1))
            for w in self._workers(job, self.clock())
        ]

    def forget(self, name: str) -> bool:
        known = name in self.jobs or self.store.load_job(name) is not None
        self.drop(name)
        self.store.delete_job(name)
        return known

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        rows = []
        for job in self.jobs.values():
            info = job.policy.describe(job.state)
            rows.append(
                {
                    "job": job.name,
                    "workers": len(self._workers(job, now)),
                    "epoch": job.last_epoch,
                    "lr": job.lr,
                    "monitor": info.get("monitor"),
                    "value": _finite(job.value),
                    "best": _finite(info.get("best")),
                    "wait": info.get("wait"),
                    "patience": info.get("patience"),
                    "policy": job.policy.type,
                    "phase": info.get("phase"),
                    "last_report_age_s": round(now - job.last_report, 3)
                    if job.last_report
                    else None,
                    "run": job.run,
                    "version": job.version,
                    "shadow_lr": job.shadow_lr,
                }
            )
        return rows

    def swap_policies(self, new: PolicySet) -> Outgoing:
        """Validate-then-swap reload: every job moves to its (possibly new) rule."""
        self.policies = new
        out: Outgoing = []
        for job in self.jobs.values():
            with _all_or_nothing(job):
                out += self._rebind(job, new.rule_for(job.name))
        return out

    def _rebind(self, job: Job, rule: JobRule) -> Outgoing:
        old_policy, old_lr = job.policy, job.lr
        if rule.policy == old_policy and rule.match == job.rule.match:
            job.rule = rule
            return []
        t = (job.last_epoch if job.last_epoch is not None else -1) + 1
        state = transfer_state(old_policy, job.state, rule.policy, t)
        job.rule, job.state, job.policy_key = rule, state, policy_key(rule)
        audit = []
        out: Outgoing = []
        if job.lr != old_lr:
            job.version += 1
            audit.append(self._audit(job, old_lr, "reload", t, source="reload"))
            out = [
                (w.session, self._lr_message(job, "reload", None, t))
                for w in self._workers(job, self.clock())
            ]
        self._commit(job, audit)
        return out


@contextmanager
def _all_or_nothing(job: Job | None) -> Iterator[None]:
    """On an exception (a failed commit), put the job back exactly as it was."""
    if job is None:
        yield
        return
    backup = copy.copy(job)
    backup.seqs, backup.directions = dict(job.seqs), dict(job.directions)
    backup.reported_ranks, backup.pending = set(job.reported_ranks), dict(job.pending)
    backup.workers = dict(job.workers)
    try:
        yield
    except Exception:
        job.__dict__.update(backup.__dict__)
        raise


def _plateau_compatible(a: Policy, b: Policy) -> bool:
    return (
        isinstance(a, Plateau)
        and isinstance(b, Plateau)
        and (a.monitor, a.mode, a.compat) == (b.monitor, b.mode, b.compat)
    )


def transfer_state(old: Policy, state: State, new: Policy, t: int) -> State:
    """The state a job continues with after a reload changed its policy.

    A plateau keeps best/wait/cooldown when monitor, mode and compat are
    unchanged (its LR clamped to a new min_lr); a chain stays in the phase of
    the same index and type, else enters the phase containing `t`; any other
    change starts the new policy from the job's current LR.
    """
    lr = state.lr
    if _plateau_compatible(old, new):
        assert isinstance(new, Plateau)
        return state.replace(lr=max(lr, new.min_lr))
    if isinstance(old, Phases) and isinstance(new, Phases):
        from .policies import PhasesState

        assert isinstance(state, PhasesState)
        i = state.index
        if (
            i < len(new.phases)
            and i < len(old.phases)
            and type(new.phases[i].policy) is type(old.phases[i].policy)
        ):
            inner = transfer_state(
                old.phases[i].policy,
                old.phases[i].policy.load_state(state.inner),
                new.phases[i].policy,
                t - state.start,
            )
            return state.replace(lr=inner.lr, inner=inner.to_dict())
    return JobTable._start_from(new, lr, t)


def _finite(x: Any) -> Any:
    return x if not isinstance(x, float) or math.isfinite(x) else None
