"""Prometheus metrics of the controller, on their own registry (names fixed by DESIGN.md).

Controller-wide metrics are ordinary prometheus_client objects. Per-job
series are rendered at scrape time by `JobSeries` from the job table (no
per-report gauge updates), so a report costs nothing here and a scrape reads
one consistent state per job. The per-job label is `training_job`:
Prometheus owns `job` and `instance` as target labels and would rename ours
to `exported_job`.
"""

from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lrpilot.client.vocabulary import ERROR_CODES, REASONS

if TYPE_CHECKING:
    from .jobs import Counters, JobTable
    from .jobstate import JobState

__all__ = ["JobSeries", "Metrics"]

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


#: The web view loads nothing from elsewhere (uPlot ships in the package) and is never framed.
_PAGE_POLICY = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'"
)


class Metrics:
    """Every controller-wide lrpilot metric, registered on `registry` (fresh per controller
    or test); `watch(table, clock)` adds the per-job series.

    Args:
        registry: where to register; defaults to a new `CollectorRegistry`.
        version: the lrpilot version for `lrpilot_build_info`.
    """

    def __init__(self, registry: CollectorRegistry | None = None, version: str = "0") -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.invalid = Counter(
            "lrpilot_invalid_messages", "Invalid messages by reason", ["reason"], registry=r
        )
        for reason in ERROR_CODES:
            self.invalid.labels(reason)
        self.unroutable = Counter(
            "lrpilot_unroutable", "Messages to peers that are gone or full", registry=r
        )
        self.store_errors = Counter("lrpilot_store_errors", "Failed state commits", registry=r)
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
        self.build_info = Gauge(
            "lrpilot_build_info", "lrpilot version (always 1)", ["version"], registry=r
        )
        self.build_info.labels(version).set(1)

    def watch_shards(self, owned: Callable[[], int]) -> None:
        """`lrpilot_shards_owned`, read at scrape time (PostgreSQL store only)."""
        gauge = Gauge(
            "lrpilot_shards_owned",
            "Shards this controller holds and decides for (PostgreSQL store)",
            registry=self.registry,
        )
        gauge.set_function(lambda: float(owned()))

    def watch(self, table: JobTable, clock: Callable[[], float]) -> None:
        """Render `table`'s jobs at every scrape."""
        self._jobs = JobSeries(table, clock)

    def render(self) -> bytes:
        """The whole exposition (Prometheus text format 0.0.4), as a scrape returns it."""
        body = generate_latest(self.registry)
        jobs = getattr(self, "_jobs", None)
        return body if jobs is None else body + jobs.render()

    def serve(
        self,
        port: int,
        host: str = "0.0.0.0",
        ready: Callable[[], bool] | None = None,
        pages: Callable[[str], tuple[int, str, bytes]] | None = None,
    ) -> ThreadingHTTPServer:
        """Serve `/metrics` and `/ready` from a thread of its own; `shutdown()` and
        `server_close()` it. `/ready` answers 200 while `ready()` is true, else 503 (a
        controller on PostgreSQL that owns no shard: a readiness probe keeps it out of
        the Service).

        Args:
            pages: answers every other path (the web view): (status, content type, body).
        """
        metrics = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/ready":
                    ok = ready is None or ready()
                    text = b"ready\n" if ok else b"not ready: this controller owns no shard\n"
                    self.send_response(200 if ok else 503)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    self.wfile.write(text)
                    return
                if path == "/metrics" or (path == "/" and pages is None):
                    status, kind, body = 200, CONTENT_TYPE_LATEST, metrics.render()
                elif pages is not None:
                    status, kind, body = pages(self.path)
                else:
                    self.send_error(404, "only /metrics and /ready are here")
                    return
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                if kind != CONTENT_TYPE_LATEST:  # the web view: its own files only, no frames
                    self.send_header("X-Content-Type-Options", "nosniff")
                    self.send_header("Content-Security-Policy", _PAGE_POLICY)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes are not news

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        httpd = Server((host, port), Handler)
        threading.Thread(target=httpd.serve_forever, name="lrpilot-metrics", daemon=True).start()
        return httpd


#: (name, type, help) of every per-job family, in the order they are rendered.
_JOB_FAMILIES = (
    ("lrpilot_learning_rate", "gauge", "LR in force for the job"),
    ("lrpilot_monitor_value", "gauge", "Last aggregated raw value of the monitored metric"),
    ("lrpilot_monitor_best", "gauge", "Best monitored value so far"),
    ("lrpilot_plateau_wait", "gauge", "Evaluations without improvement"),
    ("lrpilot_plateau_patience", "gauge", "Plateau patience"),
    ("lrpilot_min_lr", "gauge", "Lower bound on the job's LR"),
    (
        "lrpilot_at_min_lr",
        "gauge",
        "1 while the LR is at min_lr and the monitor has not improved since (plateau)",
    ),
    ("lrpilot_policy_info", "gauge", "Policy and phase of the job (always 1)"),
    ("lrpilot_epoch", "gauge", "Last decided epoch (step for unit: step)"),
    ("lrpilot_workers", "gauge", "Ranks with a live session"),
    ("lrpilot_lr_changes_total", "counter", "LR changes by reason"),
    ("lrpilot_reports_total", "counter", "Reports received"),
    (
        "lrpilot_late_decisions_total",
        "counter",
        "Epochs decided without every rank, or late reports",
    ),
    ("lrpilot_range_test_suggested_lr", "gauge", "LR suggested by a range test"),
    ("lrpilot_last_report_timestamp_seconds", "gauge", "Unix time of the job's last report"),
    ("lrpilot_job_finished", "gauge", "1 when every worker of the job said bye (a normal end)"),
    ("lrpilot_override_active", "gauge", "1 while an operator's pin (set-lr --for/--epochs) holds"),
)


class JobSeries:
    """The per-job series and `lrpilot_jobs`, rendered from the job table at scrape time.

    Runs in the metrics server's thread. It takes one reference to each job's immutable
    state, so a scrape shows every job as of one decision, never half of one. Job names
    are restricted to `[A-Za-z0-9._:/@-]`, so labels need no escaping and the text is
    written directly: 10,000 jobs render in a fraction of a second.
    """

    def __init__(self, table: JobTable, clock: Callable[[], float]) -> None:
        self.table = table
        self.clock = clock
        # job name -> (the JobState rendered, its report count, its live workers, its lines
        # per family, encoded): between two scrapes most jobs do not change, and their text
        # is reused as it is.
        self._cache: dict[str, tuple[JobState, int, int, tuple[bytes, ...]]] = {}

    def render(self) -> bytes:
        jobs = list(self.table.jobs.values())
        counters = self.table.counters
        now, timeout = self.clock(), self.table.worker_timeout
        out: list[list[bytes]] = [[] for _ in _JOB_FAMILIES]
        cache: dict[str, tuple[JobState, int, int, tuple[bytes, ...]]] = {}
        for job in jobs:
            c = counters.get(job.name)
            reports = -1 if c is None else c.reports
            live = len(job.sessions.live(now, timeout))  # changes with time alone
            hit = self._cache.get(job.name)
            if hit is not None and hit[0] is job and hit[1] == reports and hit[2] == live:
                lines = hit[3]
            else:
                lines = tuple(text.encode() for text in _job_lines(job, c, live))
            cache[job.name] = (job, reports, live, lines)
            for family, text in zip(out, lines, strict=True):
                if text:
                    family.append(text)
        self._cache = cache
        parts: list[bytes] = []
        for (name, kind, doc), family in zip(_JOB_FAMILIES, out, strict=True):
            base = name.removesuffix("_total") if kind == "counter" else name
            parts.append(f"# HELP {name} {doc}\n# TYPE {base} {kind}\n".encode())
            parts.extend(family)
        parts.append(
            f"# HELP lrpilot_jobs Jobs in memory\n# TYPE lrpilot_jobs gauge\n"
            f"lrpilot_jobs {_go(float(len(jobs)))}\n".encode()
        )
        return b"".join(parts)


def _job_lines(job: JobState, c: Counters | None, live: int) -> tuple[str, ...]:
    """A job's lines per family of _JOB_FAMILIES ("" where it has none)."""
    j = f'{{training_job="{job.name}"}} '
    described: dict[str, Any] = job.policy.describe(job.state)
    phase = str(described.get("phase") or "").replace("\\", "\\\\").replace('"', '\\"')
    info = (
        f'lrpilot_policy_info{{training_job="{job.name}",policy="{job.policy.type}",'
        f'phase="{phase}"}} 1.0\n'
    )
    suggested = ""
    if isinstance(described.get("suggested_lr"), float):
        suggested = f"lrpilot_range_test_suggested_lr{j}{_go(described['suggested_lr'])}\n"
    last = ""
    if job.last_report_wall:
        last = f"lrpilot_last_report_timestamp_seconds{j}{_go(job.last_report_wall)}\n"
    changes = reports = late = ""
    if c is not None:
        reports = f"lrpilot_reports_total{j}{_go(float(c.reports))}\n"
        late = f"lrpilot_late_decisions_total{j}{_go(float(c.late))}\n"
        changes = "".join(
            f'lrpilot_lr_changes_total{{training_job="{job.name}",reason="{reason}"}} '
            f"{_go(float(c.changes.get(reason, 0)))}\n"
            for reason in REASONS
        )
    return (
        f"lrpilot_learning_rate{j}{_go(job.lr)}\n",
        f"lrpilot_monitor_value{j}{_go(_num(job.value))}\n",
        f"lrpilot_monitor_best{j}{_go(_num(described.get('best')))}\n",
        f"lrpilot_plateau_wait{j}{_go(_num(described.get('wait')))}\n",
        f"lrpilot_plateau_patience{j}{_go(_num(described.get('patience')))}\n",
        f"lrpilot_min_lr{j}{_go(_num(described.get('min_lr'), 0.0))}\n",
        f"lrpilot_at_min_lr{j}{'1.0' if described.get('at_min_lr') else '0.0'}\n",
        info,
        f"lrpilot_epoch{j}{_go(_num(job.last_epoch))}\n",
        f"lrpilot_workers{j}{_go(float(live))}\n",
        changes,
        reports,
        late,
        suggested,
        last,
        f"lrpilot_job_finished{j}{'1.0' if job.sessions.finished() else '0.0'}\n",
        f"lrpilot_override_active{j}{'0.0' if job.override is None else '1.0'}\n",
    )


def _go(x: float) -> str:
    """A sample value as Prometheus writes it (Go's float formatting)."""
    if x != x:
        return "NaN"
    if x in (math.inf, -math.inf):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x))


def _num(x: Any, default: float = math.nan) -> float:
    if x is None or isinstance(x, bool):
        return default
    try:
        return float(x)
    except (TypeError, ValueError):
        return default
