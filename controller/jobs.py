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
from .transitions import Env, Outgoing, Step

__all__ = ["Batch", "Counters", "JobTable"]

log = logging.getLogger("lrpilot.controller")


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

    def pop_due(self, now: float) -> list[tuple[float, str, str, int]]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap))
        return due

    def restore(self, entries: list[tuple[float, str, str, int]]) -> None:
        for entry in entries:
            heapq.heappush(self._heap, entry)

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

    def rule_for(self, name: str) -> JobRule:
        """The job's rule under the policy set in force (cached: globs are matched once)."""
        rule = self._rules.get(name)
        if rule is None:
            rule = self._rules[name] = self.policies.rule_for(name)
            if len(self._rules) > 4 * self.max_jobs:
                self._rules.clear()
        return rule

    def batch(self, now: float, wall: float) -> Batch:
        return Batch(self, Env(now, wall, self.worker_timeout))

    def restore(self, rows: Iterator[tuple[str, dict[str, Any]]], now: float, wall: float) -> int:
        """Bring back stored jobs reported within --job-ttl, most recent first, up to
        --max-jobs; a row that does not fit the schema is quarantined."""
        recent = [
            (name, data)
            for name, data in rows
            if wall - float(data.get("last_report_wall", 0.0) or 0.0) <= self.job_ttl
        ]
        recent.sort(key=lambda r: float(r[1].get("last_report_wall", 0.0) or 0.0), reverse=True)
        for name, data in recent[: self.max_jobs]:
            try:
                job = JobState.from_stored(name, self.rule_for(name), data, now, wall)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                self.store.quarantine(name, f"{type(exc).__name__}: {exc}")
                continue
            self._add(job)
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
        for job in batch.touched.values():
            self._add(job)
        for name in batch.forgotten:
            self.drop(name)
        for step in batch.steps:
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
        self.policies = new
        self._rules.clear()


class Batch:
    """One loop turn's decisions: the table's jobs overlaid with this turn's new states."""

    def __init__(self, table: JobTable, env: Env) -> None:
        self.table = table
        self.env = env
        self.touched: dict[str, JobState] = {}
        self.forgotten: list[str] = []
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
            data = self.table.store.load_job(name)
            if data is not None and self._has_room():
                try:
                    rule = self.table.rule_for(name)
                    job = JobState.from_stored(name, rule, data, self.env.now, self.env.wall)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    self.table.store.quarantine(name, f"{type(exc).__name__}: {exc}")
                    return None
                self.touched[name] = job
        return job

    def _has_room(self) -> bool:
        new = sum(1 for name in self.touched if name not in self.table.jobs)
        return len(self.table.jobs) + new < self.table.max_jobs

    def _apply(self, step: Step | None) -> None:
        if step is None:
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
        rule = job.rule if job is not None else self.table.rule_for(h.job)
        if not h.restore and transitions.needs_restore(job, h, rule):
            self.out += transitions.refuse_range_test(h)
            return
        self._apply(transitions.hello(job, h, rule, self.env, self.snapshot))

    def report(self, r: Report) -> None:
        self._apply(transitions.report(self.job(r.job), r, self.env))

    def bye(self, b: Bye) -> None:
        self._apply(transitions.bye(self.job(b.job), b, self.env))

    def expire(self, due: list[tuple[float, str, str, int]]) -> None:
        """Decide multi-worker epochs whose aggregate_timeout passed."""
        for _, kind, name, t in due:
            job = self.job(name) if kind in ("aggregate", "override") else None
            if job is None:
                continue
            if kind == "aggregate":
                self._apply(transitions.timeout(job, t, self.env))
            else:
                self._apply(transitions.expire_override(job, self.env))

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
        step = transitions.override(job, lr, reason, author, self.env, epochs, seconds)
        self._apply(step)
        return self.touched[name]

    def release(self, name: str, author: str) -> JobState | None:
        """End the job's pin now; None when no pin holds. Raises KeyError for an unknown job."""
        job = self.job(name)
        if job is None:
            raise KeyError(name)
        if job.override is None:
            return None
        self._apply(transitions.release(job, author, self.env))
        return self.touched[name]

    def rebind_all(self, policies: PolicySet) -> None:
        for name, job in self.table.jobs.items():
            self._apply(transitions.rebind(job, policies.rule_for(name), self.env))

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
        w = Writes(deleted=list(self.forgotten))
        encoded: dict[int, bytes] = {}
        for job, t in self._snapshots:
            row = encoded[id(job)] = encode_row(job.stored())
            w.snapshots.append((job.name, job.run, t, row))
            w.prune.append((job.name, job.run, t - SNAPSHOTS_KEPT))
        persist = {s.job.name for s in self.steps if s.persist}
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
