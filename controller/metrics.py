"""Prometheus metrics of the controller, on their own registry (names fixed by DESIGN.md).

Controller-wide metrics are ordinary prometheus_client objects. Per-job series
come from `JobCollector`, a prometheus_client `Collector` registered on the same
registry: it reads the job table at scrape time (no per-report gauge updates),
so a report costs nothing here and a scrape reads one consistent state per job.
`generate_latest(metrics.registry)` renders everything through prometheus_client;
the /metrics endpoint renders the same samples faster, reusing each unchanged
job's lines from the previous scrape (values formatted by `floatToGoString`).
The per-job label is `training_job`: Prometheus owns `job` and `instance` as
target labels and would rename ours to `exported_job`.
"""

from __future__ import annotations

import functools
import math
import socket
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lrpilot.client.vocabulary import ERROR_CODES, REASONS

from .jobstate import momentum

if TYPE_CHECKING:
    from .jobs import Counters, JobTable
    from .jobstate import JobState

__all__ = ["JobCollector", "Metrics"]

#: prometheus_client's own sample formatting (Go's float text); most values (0.0, an LR, an
#: epoch) repeat across jobs, so the text of the last few thousand is kept.
_go = cast(Callable[[float], str], functools.lru_cache(maxsize=4096)(floatToGoString))

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
        # The controller-wide metrics alone, for the /metrics fast path (see `render`).
        self._core = CollectorRegistry(auto_describe=True)
        r = self._core
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
        for metric in (
            self.invalid,
            self.unroutable,
            self.store_errors,
            self.reloads,
            self.last_reload_success,
            self.last_reload_timestamp,
            self.decision_seconds,
            self.build_info,
        ):
            self.registry.register(metric)
        self.jobs: JobCollector | None = None

    def watch_shards(self, owned: Callable[[], int]) -> None:
        """`lrpilot_shards_owned`, read at scrape time (PostgreSQL store only)."""
        gauge = Gauge(
            "lrpilot_shards_owned",
            "Shards this controller holds and decides for (PostgreSQL store)",
            registry=self._core,
        )
        gauge.set_function(lambda: float(owned()))
        self.registry.register(gauge)

    def watch(self, table: JobTable, clock: Callable[[], float]) -> None:
        """Register the per-job series of `table`'s jobs (read at every scrape)."""
        self.jobs = JobCollector(table, clock)
        self.registry.register(self.jobs)

    def render(self) -> bytes:
        """The whole exposition (Prometheus text format 0.0.4), as a scrape returns it:
        the samples of `generate_latest(self.registry)`, each unchanged job's lines reused."""
        body = generate_latest(self._core)
        return body if self.jobs is None else body + self.jobs.exposition()

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


#: (name, type, help, extra labels) of every per-job family, in the order they are rendered.
_JOB_FAMILIES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("lrpilot_learning_rate", "gauge", "LR in force for the job", ()),
    ("lrpilot_monitor_value", "gauge", "Last aggregated raw value of the monitored metric", ()),
    ("lrpilot_monitor_best", "gauge", "Best monitored value so far", ()),
    ("lrpilot_plateau_wait", "gauge", "Evaluations without improvement", ()),
    ("lrpilot_plateau_patience", "gauge", "Plateau patience", ()),
    ("lrpilot_min_lr", "gauge", "Lower bound on the job's LR", ()),
    (
        "lrpilot_at_min_lr",
        "gauge",
        "1 while the LR is at min_lr and the monitor has not improved since (plateau)",
        (),
    ),
    ("lrpilot_policy_info", "gauge", "Policy and phase of the job (always 1)", ("policy", "phase")),
    ("lrpilot_epoch", "gauge", "Last decided epoch (step for unit: step)", ()),
    ("lrpilot_workers", "gauge", "Ranks with a live session", ()),
    ("lrpilot_lr_changes_total", "counter", "LR changes by reason", ("reason",)),
    ("lrpilot_reports_total", "counter", "Reports received", ()),
    (
        "lrpilot_late_decisions_total",
        "counter",
        "Epochs decided without every rank, or late reports",
        (),
    ),
    ("lrpilot_range_test_suggested_lr", "gauge", "LR suggested by a range test", ()),
    (
        "lrpilot_momentum",
        "gauge",
        "Momentum (Adam: beta1) a cycle_momentum plan sets for the next epoch or step",
        (),
    ),
    ("lrpilot_last_report_timestamp_seconds", "gauge", "Unix time of the job's last report", ()),
    (
        "lrpilot_job_finished",
        "gauge",
        "1 when every worker of the job said bye (a normal end)",
        (),
    ),
    (
        "lrpilot_override_active",
        "gauge",
        "1 while an operator's pin (set-lr --for/--epochs) holds",
        (),
    ),
    ("lrpilot_rollbacks_total", "counter", "Loss-spike rollbacks by the job's guard", ()),
)

#: One job's samples, per family of _JOB_FAMILIES: (extra label values, value).
Samples = tuple[list[tuple[tuple[str, ...], float]], ...]


class JobCollector(Collector):
    """The per-job series and `lrpilot_jobs`, read from the job table at scrape time.

    Runs in the metrics server's thread. It takes one reference to each job's immutable
    state, so a scrape shows every job as of one decision, never half of one. `collect()`
    yields prometheus_client families; `exposition()` writes the same samples as text,
    reusing a job's lines while the job, its report count and its live workers are
    unchanged (job names are restricted to `[A-Za-z0-9._:/@-]`, so they need no escaping):
    10,000 jobs render in a fraction of a second.
    """

    def __init__(self, table: JobTable, clock: Callable[[], float]) -> None:
        self.table = table
        self.clock = clock
        # job name -> (the JobState rendered, its report count, its live workers, its lines
        # per family, encoded): between two scrapes most jobs do not change.
        self._cache: dict[str, tuple[JobState, int, int, tuple[bytes, ...]]] = {}

    def _jobs(self) -> Iterable[tuple[JobState, Counters | None, int]]:
        jobs = list(self.table.jobs.values())
        counters = self.table.counters
        now, timeout = self.clock(), self.table.worker_timeout
        for job in jobs:
            yield job, counters.get(job.name), len(job.sessions.live(now, timeout))

    def collect(self) -> Iterable[Metric]:
        families: list[GaugeMetricFamily | CounterMetricFamily] = []
        for name, kind, doc, labels in _JOB_FAMILIES:
            if kind == "counter":
                families.append(
                    CounterMetricFamily(
                        name.removesuffix("_total"), doc, labels=["training_job", *labels]
                    )
                )
            else:
                families.append(GaugeMetricFamily(name, doc, labels=["training_job", *labels]))
        count = 0
        for job, c, live in self._jobs():
            count += 1
            for family, samples in zip(families, _job_samples(job, c, live), strict=True):
                for extra, value in samples:
                    family.add_metric([job.name, *extra], value)
        yield from families
        yield GaugeMetricFamily("lrpilot_jobs", "Jobs in memory", value=float(count))

    def exposition(self) -> bytes:
        """The samples of `collect()` in the text format, unchanged jobs' lines reused."""
        out: list[list[bytes]] = [[] for _ in _JOB_FAMILIES]
        cache: dict[str, tuple[JobState, int, int, tuple[bytes, ...]]] = {}
        for job, c, live in self._jobs():
            reports = -1 if c is None else c.reports
            hit = self._cache.get(job.name)
            if hit is not None and hit[0] is job and hit[1] == reports and hit[2] == live:
                lines = hit[3]
            else:
                lines = _job_lines(job, _job_samples(job, c, live))
            cache[job.name] = (job, reports, live, lines)
            for family, text in zip(out, lines, strict=True):
                if text:
                    family.append(text)
        self._cache = cache
        parts: list[bytes] = []
        for (name, kind, doc, _labels), family in zip(_JOB_FAMILIES, out, strict=True):
            base = name.removesuffix("_total") if kind == "counter" else name
            parts.append(f"# HELP {name} {doc}\n# TYPE {base} {kind}\n".encode())
            parts.extend(family)
        parts.append(
            f"# HELP lrpilot_jobs Jobs in memory\n# TYPE lrpilot_jobs gauge\n"
            f"lrpilot_jobs {_go(len(cache))}\n".encode()
        )
        return b"".join(parts)


def _job_lines(job: JobState, samples: Samples) -> tuple[bytes, ...]:
    """A job's text lines per family of _JOB_FAMILIES (b"" where it has none)."""
    j = f'{{training_job="{job.name}"'
    lines = []
    for (name, _kind, _doc, labels), family in zip(_JOB_FAMILIES, samples, strict=True):
        if not family:
            lines.append(b"")
        elif not labels:
            ((_, value),) = family
            lines.append(f"{name}{j}}} {_go(value)}\n".encode())
        else:
            text = "".join(f"{name}{j}{_pairs(labels, x)}}} {_go(v)}\n" for x, v in family)
            lines.append(text.encode())
    return tuple(lines)


@functools.lru_cache(maxsize=1024)
def _pairs(labels: tuple[str, ...], values: tuple[str, ...]) -> str:
    """`,name="value"` for each extra label (values escaped as the text format wants)."""
    return "".join(f',{k}="{_escape(v)}"' for k, v in zip(labels, values, strict=True))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _job_samples(job: JobState, c: Counters | None, live: int) -> Samples:
    """A job's samples per family of _JOB_FAMILIES: what both renderings show."""
    described: dict[str, Any] = job.policy.describe(job.state)
    phase = str(described.get("phase") or "")
    suggested = described.get("suggested_lr")
    none: list[tuple[tuple[str, ...], float]] = []
    return (
        [((), job.lr)],
        [((), _num(job.value))],
        [((), _num(described.get("best")))],
        [((), _num(described.get("wait")))],
        [((), _num(described.get("patience")))],
        [((), _num(described.get("min_lr"), 0.0))],
        [((), 1.0 if described.get("at_min_lr") else 0.0)],
        [((job.policy.type, phase), 1.0)],
        [((), _num(job.last_epoch))],
        [((), float(live))],
        none if c is None else [((r,), float(c.changes.get(r, 0))) for r in REASONS],
        none if c is None else [((), float(c.reports))],
        none if c is None else [((), float(c.late))],
        [((), suggested)] if isinstance(suggested, float) else none,
        none if (mom := momentum(job)) is None else [((), mom)],
        [((), job.last_report_wall)] if job.last_report_wall else none,
        [((), 1.0 if job.sessions.finished() else 0.0)],
        [((), 0.0 if job.override is None else 1.0)],
        [((), float(job.rollbacks))],
    )


def _num(x: Any, default: float = math.nan) -> float:
    if x is None or isinstance(x, bool):
        return default
    try:
        return float(x)
    except (TypeError, ValueError):
        return default
