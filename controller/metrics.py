"""Prometheus metrics of the controller, on their own registry (names fixed by DESIGN.md).

The per-job label is `training_job`: Prometheus owns `job` and `instance` as
target labels and would rename ours to `exported_job`.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lrpilot.client.protocol import ERROR_CODES, REASONS

if TYPE_CHECKING:
    from .jobs import Job

__all__ = ["Metrics"]

# Decisions take from tens of microseconds (schedules) to a second (a slow disk's fsync).
DECISION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


class Metrics:
    """Every lrpilot metric, registered on `registry` (a fresh one per controller or test).

    Args:
        registry: where to register; defaults to a new `CollectorRegistry`.
        version: the lrpilot version for `lrpilot_build_info`.
    """

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "0") -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        j = ["training_job"]
        self.learning_rate = Gauge(
            "lrpilot_learning_rate", "LR in force for the job", j, registry=r
        )
        self.monitor_value = Gauge(
            "lrpilot_monitor_value",
            "Last aggregated raw value of the monitored metric",
            j,
            registry=r,
        )
        self.monitor_best = Gauge(
            "lrpilot_monitor_best", "Best monitored value so far", j, registry=r
        )
        self.plateau_wait = Gauge(
            "lrpilot_plateau_wait", "Evaluations without improvement", j, registry=r
        )
        self.plateau_patience = Gauge("lrpilot_plateau_patience", "Plateau patience", j, registry=r)
        self.min_lr = Gauge("lrpilot_min_lr", "Lower bound on the job's LR", j, registry=r)
        self.policy_info = Gauge(
            "lrpilot_policy_info",
            "Policy and phase of the job (always 1)",
            ["training_job", "policy", "phase"],
            registry=r,
        )
        self.epoch = Gauge(
            "lrpilot_epoch", "Last decided epoch (step for unit: step)", j, registry=r
        )
        self.workers = Gauge("lrpilot_workers", "Ranks with a live session", j, registry=r)
        self.lr_changes = Counter(
            "lrpilot_lr_changes", "LR changes by reason", ["training_job", "reason"], registry=r
        )
        self.reports = Counter("lrpilot_reports", "Reports received", j, registry=r)
        self.late = Counter(
            "lrpilot_late_decisions",
            "Epochs decided without every rank, or late reports",
            j,
            registry=r,
        )
        self.range_test_suggested_lr = Gauge(
            "lrpilot_range_test_suggested_lr", "LR suggested by a range test", j, registry=r
        )
        self.invalid = Counter(
            "lrpilot_invalid_messages", "Invalid messages by reason", ["reason"], registry=r
        )
        for reason in ERROR_CODES:
            self.invalid.labels(reason)
        self.unroutable = Counter(
            "lrpilot_unroutable", "Messages to peers that are gone or full", registry=r
        )
        self.store_errors = Counter("lrpilot_store_errors", "Failed state commits", registry=r)
        self.jobs = Gauge("lrpilot_jobs", "Jobs in memory", registry=r)
        self.reloads = Counter(
            "lrpilot_policy_reloads", "Policy reloads by result", ["result"], registry=r
        )
        for result in ("success", "error"):
            self.reloads.labels(result)
        self.last_reload_success = Gauge(
            "lrpilot_policy_last_reload_success", "1 if the last reload applied", registry=r
        )
        self.last_reload_success.set(1)
        self.last_reload_timestamp = Gauge(
            "lrpilot_policy_last_reload_timestamp_seconds",
            "Time of the last successful load",
            registry=r,
        )
        self.decision_seconds = Histogram(
            "lrpilot_decision_seconds",
            "Report received to LR sent",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.last_report = Gauge(
            "lrpilot_last_report_timestamp_seconds",
            "Unix time of the job's last report",
            j,
            registry=r,
        )
        self.build_info = Gauge(
            "lrpilot_build_info", "lrpilot version (always 1)", ["version"], registry=r
        )
        self.build_info.labels(version).set(1)
        self._policy_labels: dict[str, tuple[str, str]] = {}

    def observe_job(self, job: Job, workers: int) -> None:
        """Bring the job's labelled series in line with its state."""
        name = job.name
        if name not in self._policy_labels:  # a new job: its counters start at zero
            for reason in REASONS:
                self.lr_changes.labels(name, reason)
            self.reports.labels(name)
            self.late.labels(name)
        info: dict[str, Any] = job.policy.describe(job.state)
        self.learning_rate.labels(name).set(job.lr)
        self.monitor_value.labels(name).set(_num(job.value))
        self.monitor_best.labels(name).set(_num(info.get("best")))
        self.plateau_wait.labels(name).set(_num(info.get("wait")))
        self.plateau_patience.labels(name).set(_num(info.get("patience")))
        self.min_lr.labels(name).set(_num(info.get("min_lr"), 0.0))
        labels = (job.policy.type, str(info.get("phase") or ""))
        old = self._policy_labels.get(name)
        if old != labels:
            if old is not None:
                self.policy_info.remove(name, *old)
            self.policy_info.labels(name, *labels).set(1)
            self._policy_labels[name] = labels
        self.epoch.labels(name).set(_num(job.last_epoch))
        self.workers.labels(name).set(workers)
        if job.last_report_wall:
            self.last_report.labels(name).set(job.last_report_wall)

    def remove_job(self, name: str) -> None:
        """Drop every series of a job (TTL, forget) so label cardinality stays bounded."""
        for gauge in (
            self.learning_rate,
            self.monitor_value,
            self.monitor_best,
            self.plateau_wait,
            self.plateau_patience,
            self.min_lr,
            self.epoch,
            self.workers,
            self.reports,
            self.late,
            self.range_test_suggested_lr,
            self.last_report,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(name)
        for reason in REASONS:
            with contextlib.suppress(KeyError):
                self.lr_changes.remove(name, reason)
        old = self._policy_labels.pop(name, None)
        if old is not None:
            with contextlib.suppress(KeyError):
                self.policy_info.remove(name, *old)

    def set_jobs(self, count: int) -> None:
        self.jobs.set(count)


def _num(x: Any, default: float = math.nan) -> float:
    if x is None or isinstance(x, bool):
        return default
    try:
        return float(x)
    except (TypeError, ValueError):
        return default
