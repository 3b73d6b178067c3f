"""The job table and the group commit: from messages to decisions to one commit to replies.

A loop turn opens a `Batch`, feeds it every message it drained
(`batch.hello/report/bye`, `batch.expire` for deadlines that passed); each
call runs a pure transition (transitions.py) on the batch's view of the job
and keeps the resulting `Step`. `batch.writes()` is the turn's single
transaction; only once it committed does `table.publish(batch)` make the new
states current and hand back the messages to send. A failed commit drops the
batch: the table never saw it, so nothing is undone.

Nothing here is O(jobs) per turn: deadlines (aggregation timeouts, job TTL)
sit in a heap, and per-job metrics are read from the table at scrape time.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import Bye, Hello, Report
from lrpilot.client.vocabulary import REASONS

from . import transitions
from .jobstate import JobState
from .policyfile import JobRule, PolicySet
from .store import SNAPSHOTS_KEPT, StateStore, Writes, encode_row
from .transitions import AggregateDue, Env, Outgoing, OverrideDue, Rebind, Release, SetLr, Step

__all__ = ["Batch", "Counters", "JobTable"]

log = logging.getLogger("lrpilot.controller")

#: What a stored row that does not decode or fit the schema raises.
_UNUSABLE = (ValueError, TypeError, KeyError, AttributeError)


@dataclass
class Counters:
    """A job's Prometheus counters (in memory; they restart at 0 with the controller)."""

    reports: int = 0
    late: int = 0
    changes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))


class Deadlines:
    """A heap of (when, kind, job, t): aggregation timeouts and TTL checks.

    Entries are hints: whoever pops one re-checks the job's state, so a stale
    entry costs one pop and no bookkeeping is needed when a job changes.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, str, str, int]] = []

    def push(self, when: float, kind: str, job: str, t: int = 0) -> None:
        heapq.heappush(self._heap, (when, kind, job, t))

    def next(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[float, str, str, int]]:
        """The entries due at `now`, in order, left in the heap (`pop_due` once committed)."""
        heap, found, stack = self._heap, [], [0]
        while stack:  # the heap as a tree: a child is never due before its parent
            i = stack.pop()
            if i < len(heap) and heap[i][0] <= now:
                found.append(heap[i])
                stack += (2 * i + 1, 2 * i + 2)
        return sorted(found)

    def pop_due(self, now: float) -> list[tuple[float, str, str, int]]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def __len__(self) -> int:
        return len(self._heap)


class JobTable:
    """Every job in memory: `jobs` (name -> JobState), their counters and deadlines.

    Args:
        policies: the policy set in force (replaced by `swap_policies`).
        store: durable state, read for jobs not in memory and for resumes.
        max_jobs: bound on jobs in memory.
        worker_timeout: a rank not heard from for this long is no longer a worker.
        job_ttl: a job silent this long, with no live worker, leaves memory.
        owns: whether this controller decides for a job (False: another controller owns the
            job's shard, so the job is neither loaded nor decided here); default all.
    """

    def __init__(
        self,
        policies: PolicySet,
        store: StateStore,
        max_jobs: int = 10000,
        worker_timeout: float = 600.0,
        job_ttl: float = 86400.0,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.policies = policies
        self.owns: Callable[[str], bool] = owns or (lambda name: True)
        self.store = store
        self.max_jobs = max_jobs
        self.worker_timeout = worker_timeout
        self.job_ttl = job_ttl
        self.jobs: dict[str, JobState] = {}
        self.counters: dict[str, Counters] = {}
        self.deadlines = Deadlines()
        self._rules: dict[str, JobRule] = {}
        #: Bumped by each reload; a job whose `generation` differs is rebound before it decides.
        self.generation = 0
        #: Jobs in memory at the last reload, to rebind a few per loop turn.
        self.rebinding: list[str] = []

    def rule_for(self, name: str) -> JobRule:
        """The job's rule under the policy set in force (cached: globs are matched once)."""
        rule = self._rules.get(name)
        if rule is None:
            rule = self._rules[name] = self.policies.rule_for(name)
            if len(self._rules) > 4 * self.max_jobs:
                self._rules.clear()
        return rule

    def batch(self, now: float, wall: float) -> Batch:
        env = Env(now, wall, self.worker_timeout, rules=self.rule_for, generation=self.generation)
        return Batch(self, env)

    def restore(
        self, rows: Iterator[tuple[str, dict[str, Any] | ValueError]], now: float, wall: float
    ) -> int:
        """Bring back stored jobs reported within --job-ttl, most recent first, up to
        --max-jobs; rows that do not decode or fit the schema are quarantined, in one commit."""
        bad: list[tuple[str, str]] = []
        recent: list[tuple[str, dict[str, Any]]] = []
        for name, data in rows:
            if isinstance(data, ValueError):
                bad.append((name, str(data)))
            elif wall - float(data.get("last_report_wall", 0.0) or 0.0) <= self.job_ttl:
                recent.append((name, data))
        recent.sort(key=lambda r: float(r[1].get("last_report_wall", 0.0) or 0.0), reverse=True)
        for name, data in recent[: self.max_jobs]:
            try:
                job = JobState.from_stored(
                    name, self.rule_for(name), data, now, wall=wall, generation=self.generation
                )
            except _UNUSABLE as exc:
                bad.append((name, f"{type(exc).__name__}: {exc}"))
                continue
            self._add(job)
        if bad:
            try:
                self.store.commit(Writes(quarantine=bad))
            except Exception as exc:  # the rows stay; they are tried again on the next load
                log.error("cannot quarantine %d unusable job rows: %s", len(bad), exc)
        return len(self.jobs)

    def _add(self, job: JobState) -> None:
        if job.name not in self.counters:
            self.counters[job.name] = Counters()
            self.deadlines.push(job.last_seen + self.job_ttl, "ttl", job.name)
            ends = None if job.override is None else job.override.ends
            if ends is not None:  # a --for pin loaded from the store
                self.deadlines.push(ends, "override", job.name)
        self.jobs[job.name] = job

    def publish(self, batch: Batch) -> Outgoing:
        """The batch committed: make its states current; returns what to send."""
        if batch.rebound:
            del self.rebinding[-batch.rebound :]
        for job in batch.touched.values():
            self._add(job)
        for name in batch.forgotten:
            self.drop(name)
        for step in batch.steps:
            assert step.job is not None  # Batch keeps only Steps with a job
            name = step.job.name
            counters = self.counters[name]
            counters.reports += step.reports
            counters.late += step.late
            for row in step.audit:
                counters.changes[row.reason] = counters.changes.get(row.reason, 0) + 1
                log.info(
                    "job %s: lr %s -> %.6g (%s, version %d, from %s %s)",
                    name,
                    "-" if row.old_lr is None else f"{row.old_lr:.6g}",
                    row.new_lr,
                    row.reason,
                    row.version,
                    step.job.unit,
                    row.epoch,
                )
            for warning in step.warnings:
                log.warning("job %s: %s", name, warning)
            if step.waiting is not None:
                t, when = step.waiting
                self.deadlines.push(when, "aggregate", name, t)
            if step.override_until is not None:
                self.deadlines.push(step.override_until, "override", name)
        return batch.out

    def drop(self, name: str) -> None:
        """Forget a job in memory and metrics (its state stays on disk for a resume)."""
        self.jobs.pop(name, None)
        self.counters.pop(name, None)

    def expire_idle(self, due: list[tuple[float, str, str, int]], now: float) -> None:
        """TTL checks that came due: drop jobs silent past --job-ttl with no live worker."""
        for _, kind, name, _t in due:
            job = self.jobs.get(name)
            if kind != "ttl" or job is None:
                continue
            live = job.sessions.live(now, self.worker_timeout)
            if not live and now - job.last_seen > self.job_ttl:
                log.info("job %s: silent for --job-ttl; dropped from memory (kept on disk)", name)
                self.drop(name)
                continue
            later = job.last_seen + self.job_ttl
            if live:
                later = max(later, max(w.last_seen for w in live) + self.worker_timeout)
            self.deadlines.push(max(later, now) + 1e-3, "ttl", name)

    def swap_policies(self, new: PolicySet) -> None:
        """Put `new` in force: each job takes its new rule at its next decision (or within a
        few loop turns, `Batch.rebind`), so a reload costs the loop no O(jobs) turn."""
        self.policies = new
        self._rules.clear()
        self.generation += 1
        self.rebinding = list(self.jobs)  # names only: a C-level copy, no decision


class Batch:
    """One loop turn's decisions: the table's jobs overlaid with this turn's new states."""

    def __init__(self, table: JobTable, env: Env) -> None:
        self.table = table
        self.env = dataclasses.replace(env, snapshots=self.snapshot)
        self.touched: dict[str, JobState] = {}
        self.forgotten: list[str] = []
        self.quarantine: list[tuple[str, str]] = []
        self.rebound = 0  # names taken from the end of table.rebinding
        self.steps: list[Step] = []
        self.out: Outgoing = []
        self._snapshots: list[tuple[JobState, int]] = []
        self._loaded: set[str] = set()

    def job(self, name: str) -> JobState | None:
        """The job as this turn left it; a job known only on disk is loaded from there."""
        job = self.touched.get(name) or self.table.jobs.get(name)
        if job is None and not self.table.owns(name):
            return None  # another controller's (a deadline left from before a hand-over)
        if job is None and name not in self._loaded and name not in self.forgotten:
            self._loaded.add(name)
            table = self.table
            try:
                data = table.store.load_job(name)
                if data is None or not self._has_room():
                    return None
                job = JobState.from_stored(
                    name,
                    table.rule_for(name),
                    data,
                    self.env.now,
                    wall=self.env.wall,
                    generation=table.generation,
                )
            except _UNUSABLE as exc:  # moved aside in this turn's commit
                self.quarantine.append((name, f"{type(exc).__name__}: {exc}"))
                return None
            self.touched[name] = job
        elif job is not None and job.generation != self.table.generation:
            # A reload since the job's last decision: its new rule applies from this one.
            self._step(job, Rebind(self.table.rule_for(name)))
            job = self.touched[name]
        return job

    def _has_room(self) -> bool:
        new = sum(1 for name in self.touched if name not in self.table.jobs)
        return len(self.table.jobs) + new < self.table.max_jobs

    def _step(self, job: JobState | None, event: transitions.JobEvent) -> None:
        """Run the reducer on the job as this turn left it; keep the Step for the commit."""
        step = transitions.step(job, event, self.env)
        if step is None:
            return
        if step.job is None:  # refused before the job existed: an answer, nothing to keep
            self.out += step.out
            return
        self.touched[step.job.name] = step.job
        self.steps.append(step)
        self.out += step.out
        if step.snapshot is not None:
            self._snapshots.append((step.job, step.snapshot))

    # -- messages --------------------------------------------------------------------------

    def hello(self, h: Hello) -> None:
        job = self.job(h.job)
        if job is None and not self._has_room():
            limit = self.table.max_jobs
            raise ProtocolError("max_jobs", f"the controller holds --max-jobs {limit} jobs")
        self._step(job, h)

    def report(self, r: Report) -> None:
        self._step(self.job(r.job), r)

    def bye(self, b: Bye) -> None:
        self._step(self.job(b.job), b)

    def expire(self, due: list[tuple[float, str, str, int]]) -> None:
        """Decide multi-worker epochs whose aggregate_timeout passed."""
        for _, kind, name, t in due:
            job = self.job(name) if kind in ("aggregate", "override") else None
            if job is None:
                continue
            self._step(job, AggregateDue(t) if kind == "aggregate" else OverrideDue())

    def override(
        self,
        name: str,
        lr: float,
        reason: str,
        author: str,
        epochs: int | None = None,
        seconds: float | None = None,
    ) -> JobState:
        """Raises KeyError for an unknown job."""
        job = self.job(name)
        if job is None:
            raise KeyError(name)
        self._step(job, SetLr(lr, reason, author, epochs, seconds))
        return self.touched[name]

    def release(self, name: str, author: str) -> JobState | None:
        """End the job's pin now; None when no pin holds. Raises KeyError for an unknown job."""
        job = self.job(name)
        if job is None:
            raise KeyError(name)
        if job.override is None:
            return None
        self._step(job, Release(author))
        return self.touched[name]

    def rebind(self, limit: int = 256) -> None:
        """Rebind up to `limit` jobs still on the policy set before the last reload (those
        that decide first are rebound at that decision, by `job`)."""
        names = self.table.rebinding[-limit:] if limit > 0 else []
        self.rebound = len(names)  # leave the queue with the commit (`publish`)
        for name in names:
            if name in self.table.jobs:
                self.job(name)

    def forget(self, name: str) -> bool:
        known = self.job(name) is not None
        self.touched.pop(name, None)
        self.forgotten.append(name)
        return known

    def snapshot(self, name: str, run: int, t: int) -> Mapping[str, Any] | None:
        """The stored end-of-`t` state, including those this turn has not committed yet."""
        for job, at in reversed(self._snapshots):
            if job.name == name and job.run == run and at == t:
                return job.stored()
        stored: Mapping[str, Any] | None = self.table.store.snapshot(name, run, t)
        return stored

    # -- the commit --------------------------------------------------------------------------

    def writes(self) -> Writes:
        """The turn's transaction: each job's row encoded once, its snapshots, its audit."""
        w = Writes(deleted=list(self.forgotten), quarantine=list(self.quarantine))
        encoded: dict[int, bytes] = {}
        for job, t in self._snapshots:
            row = encoded[id(job)] = encode_row(job.stored())
            w.snapshots.append((job.name, job.run, t, row))
            w.prune.append((job.name, job.run, t - SNAPSHOTS_KEPT))
        persist = {s.job.name for s in self.steps if s.persist and s.job is not None}
        for name, job in self.touched.items():
            if name in persist or name not in self.table.jobs:
                w.jobs[name] = encoded.get(id(job)) or encode_row(job.stored())
                before = self.table.jobs.get(name)
                if before is not None and before.run != job.run:
                    w.old_runs.append((name, before.run))
        for step in self.steps:
            w.audit += step.audit
            if step.point is not None:
                w.metrics.append(step.point)
            # A resume from an older checkpoint redoes the epochs from there: the recorded
            # curve follows the run the job is on, not the one it abandoned.
            w.metrics_from += [
                (r.job, r.run, r.epoch)
                for r in step.audit
                if r.reason == "resume" and r.epoch is not None
            ]
        return w
