"""The admin socket's requests about jobs: status, set-lr, release, history, range-test,
forget, metrics.

A request is parsed once into a typed value (`parse_request`); each kind has one
handler `(request, grant) -> reply` on `JobRequests`, which sees the job table,
the store, the clocks and a commit function, never the `Server` (so this module
imports nothing of server.py). A reply is a plain dict; a bad request raises
`ProtocolError` (answered as an `error`). Changes go through a `Batch` and the
commit function, as client messages do. The author of a `SetLr` or `Release` is the
identity the server authenticated (`auth.audit_author`), set before the handler sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import check_name
from lrpilot.client.vocabulary import LR_MESSAGE, as_lr

from .auth import Grant
from .errors import Moved
from .jobs import Batch, JobTable
from .jobstate import JobState, status_row
from .store import StateStore, StoreUnavailable, decode_metrics, rfc3339
from .transitions import Outgoing
from .units import check_seconds

if TYPE_CHECKING:
    from .pgstore import PgStore

__all__ = [
    "AdminRequest",
    "Forget",
    "History",
    "JobRequests",
    "MetricsRequest",
    "Moved",
    "RangeTestRequest",
    "Release",
    "Reload",
    "SetLr",
    "Status",
    "error",
    "metric_columns",
    "parse_request",
]


def error(code: str, message: str) -> dict[str, Any]:
    return {"t": "error", "code": code, "message": message}


# -- the typed requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """`lrpilot status`: every job the key may see."""


@dataclass(frozen=True)
class SetLr:
    """`lrpilot set-lr JOB LR [--reason] [--epochs N | --for DURATION]`."""

    job: str
    lr: float
    reason: str = ""
    author: str = "operator"  # as sent; the server records who it authenticated
    epochs: int | None = None
    seconds: float | None = None
    force: bool = False  # also for a finished job


@dataclass(frozen=True)
class Release:
    """`lrpilot release JOB`: the job's pin ends now."""

    job: str
    author: str = "operator"  # as sent; the server records who it authenticated


@dataclass(frozen=True)
class History:
    """`lrpilot history JOB [--run RUN | --all-runs] [--since S] [--tail N]`."""

    job: str
    run: int | None = None
    all_runs: bool = False
    since: float | None = None
    tail: int | None = None


@dataclass(frozen=True)
class RangeTestRequest:
    """`lrpilot range-test JOB`."""

    job: str


@dataclass(frozen=True)
class Forget:
    """`lrpilot forget JOB`."""

    job: str


@dataclass(frozen=True)
class MetricsRequest:
    """`lrpilot metrics JOB [--run RUN]` and the web view: a run's recorded metrics.

    `after`: only the points after that t; `raw`: rows undecoded (the web view decodes
    them in its own thread).
    """

    job: str
    run: int | None = None
    after: int = -1
    raw: bool = False


@dataclass(frozen=True)
class Reload:
    """`lrpilot reload` (answered by the server once the loader has read the file)."""


AdminRequest: TypeAlias = (
    Status | SetLr | Release | History | RangeTestRequest | Forget | MetricsRequest | Reload
)


def _set_lr(msg: dict[str, Any]) -> SetLr:
    name = check_name(msg.get("job"), "job")
    lr = as_lr(msg.get("lr"))
    if lr is None:
        raise ProtocolError("out_of_range", f"lr {LR_MESSAGE}, got {msg.get('lr')!r}")
    reason = str(msg.get("reason") or "")[:500]
    author = str(msg.get("author") or "operator")[:200]
    epochs, seconds = msg.get("epochs"), msg.get("seconds")
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 1 << 40
    ):
        raise ProtocolError("out_of_range", f"epochs must be an integer >= 1, got {epochs!r}")
    if seconds is not None:
        seconds = _seconds(seconds, "the duration (--for)")
        if seconds <= 0:
            raise ProtocolError(
                "out_of_range", f"the duration must be > 0 seconds, got {seconds!r}"
            )
    if epochs is not None and seconds is not None:
        raise ProtocolError("schema", "an override ends after epochs or after a duration, not both")
    return SetLr(name, lr, reason, author, epochs, seconds, bool(msg.get("force")))


def _seconds(value: Any, what: str) -> float:
    """A duration of at most 365 days (so every time derived from it is a date)."""
    try:
        return check_seconds(value, what)
    except ValueError as exc:
        raise ProtocolError("out_of_range", str(exc)) from None


def _history(msg: dict[str, Any]) -> History:
    run, since, tail = msg.get("run"), msg.get("since"), msg.get("tail")
    return History(
        check_name(msg.get("job"), "job"),
        run if isinstance(run, int) and not isinstance(run, bool) else None,
        bool(msg.get("all_runs")),
        None if since is None else _seconds(since, "since"),
        tail if isinstance(tail, int) and not isinstance(tail, bool) and tail >= 0 else None,
    )


def _metrics(msg: dict[str, Any]) -> MetricsRequest:
    run, after = msg.get("run"), msg.get("after")
    return MetricsRequest(
        check_name(msg.get("job"), "job"),
        run if isinstance(run, int) and not isinstance(run, bool) else None,
        after if isinstance(after, int) and not isinstance(after, bool) else -1,
        bool(msg.get("raw")),
    )


_PARSERS: dict[str, Callable[[dict[str, Any]], AdminRequest]] = {
    "status": lambda msg: Status(),
    "set_lr": _set_lr,
    "release": lambda msg: Release(
        check_name(msg.get("job"), "job"), str(msg.get("author") or "operator")[:200]
    ),
    "history": _history,
    "range_test": lambda msg: RangeTestRequest(check_name(msg.get("job"), "job")),
    "forget": lambda msg: Forget(check_name(msg.get("job"), "job")),
    "metrics": lambda msg: _metrics(msg),
    "reload": lambda msg: Reload(),
}


def parse_request(msg: Any) -> AdminRequest:
    """The typed request of a decoded admin message.

    Raises:
        ProtocolError: `unknown_type`, `schema` or `out_of_range`, naming what is wrong.
    """
    kind = msg.get("t") if isinstance(msg, dict) else None
    parse = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parse is None:
        raise ProtocolError("unknown_type", f"unknown request {str(kind)[:40]!r}")
    return parse(msg)


def _run_states(job: JobState | None, latest: int) -> Callable[[int], str | None]:
    """What became of each run in a history: `ended` (a later run started), `finished`
    (the job's current run, every worker said bye), `current`; None: not known (the job
    is not in memory)."""
    current = job.run if job is not None else None
    finished = job is not None and job.sessions.finished()

    def state(run: int) -> str | None:
        if run < max(latest, current or 0):
            return "ended"
        if run == current:
            return "finished" if finished else "current"
        return None

    return state


# -- the handlers -------------------------------------------------------------------------------


class JobRequests:
    """The handlers of admin requests about jobs, each `(request, grant) -> reply`.

    Args:
        table: the job table (read for status, changed through batches).
        store: the durable state (history).
        clock, wall: monotonic and Unix time.
        commit: commits a batch and returns what to send (raises when it cannot).
        send: sends the messages of a committed batch to clients.
        pg: the PostgreSQL store when controllers share state (shards, `moved`), else None.

    `grant` is the key's grant when CURVE is on, None when every caller may do everything.
    """

    def __init__(
        self,
        table: JobTable,
        store: StateStore,
        clock: Callable[[], float],
        wall: Callable[[], float],
        commit: Callable[[Batch], Outgoing],
        send: Callable[[Outgoing], None],
        pg: PgStore | None = None,
    ) -> None:
        self.pg = pg
        self.table = table
        self.store = store
        self.clock = clock
        self.wall = wall
        self.commit = commit
        self.send = send

    @staticmethod
    def allowed(job: str, grant: Grant | None) -> None:
        """An admin request about `job` from a key that may not steer it is forbidden."""
        if grant is not None and not grant.allows(job):
            raise ProtocolError("forbidden", f"this key may not use job {job}")

    def owned(self, job: str) -> None:
        """Steering a job another controller owns (PostgreSQL store) is answered `moved`
        with that controller's admin endpoint (`Admin` follows it)."""
        pg = self.pg
        if pg is None or pg.owns(job):
            return
        owner = pg.owner(job)
        if owner is None:
            raise ProtocolError("unavailable", f"job {job} changes controller now; retry")
        if owner[1].startswith("ipc://"):  # a socket file on the owner's machine, not here
            raise ProtocolError(
                "moved",
                f"job {job} is steered at the controller advertising {owner[0]}; its admin "
                f"socket {owner[1]} is local to it: run the command there",
            )
        raise Moved(job, owner[1])

    def job(self, name: str) -> JobState | None:
        """The job in memory, or (PostgreSQL store) as the database has it when another
        controller owns it; None: no such job, or its row is unreadable now."""
        job = self.table.jobs.get(name)
        pg = self.pg
        if job is not None or pg is None or pg.owns(name):
            return job
        try:
            data = pg.load_job(name)
            if data is None:
                return None
            rule = self.table.rule_for(name)
            return JobState.from_stored(name, rule, data, self.clock(), wall=self.wall())
        except (StoreUnavailable, ValueError, TypeError, KeyError, AttributeError):
            return None  # its owner quarantines a row that does not fit

    def status(self, request: Status, grant: Grant | None) -> dict[str, Any]:
        now, timeout, wall = self.clock(), self.table.worker_timeout, self.wall()
        table = self.table
        jobs = [
            status_row(j, now, timeout, wall)
            for j in table.jobs.values()
            if grant is None or grant.allows(j.name)
        ]
        if self.pg is not None:  # every controller's jobs, as the database has them
            try:
                stored = list(self.pg.load_jobs())
            except StoreUnavailable:  # this controller's own jobs still show (and it is alive)
                stored = []
            for name, data in stored:
                if name in table.jobs or (grant is not None and not grant.allows(name)):
                    continue
                if isinstance(data, ValueError):
                    continue  # its owner quarantines it
                try:
                    job = JobState.from_stored(name, table.rule_for(name), data, now, wall=wall)
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue
                jobs.append(status_row(job, now, timeout, wall))
        return {"t": "status", "jobs": jobs}

    def set_lr(self, request: SetLr, grant: Grant | None) -> dict[str, Any]:
        r = request
        self.allowed(r.job, grant)
        self.owned(r.job)
        batch = self.table.batch(self.clock(), self.wall())
        known = batch.job(r.job)
        if known is None:
            return error("unknown_job", f"no job {r.job!r}")
        if known.finished and not r.force:
            return error(
                "finished",
                f"job {r.job} has finished (every worker said bye); nothing would train at "
                "this LR. Pass --force to set it anyway (for a resume)",
            )
        job = batch.override(r.job, r.lr, r.reason, r.author, r.epochs, r.seconds)
        return self._changed(batch, job, "the override")

    def release(self, request: Release, grant: Grant | None) -> dict[str, Any]:
        """End the job's pin now: the policy's LR from the next epoch (step)."""
        self.allowed(request.job, grant)
        self.owned(request.job)
        batch = self.table.batch(self.clock(), self.wall())
        try:
            job = batch.release(request.job, request.author)
        except KeyError:
            return error("unknown_job", f"no job {request.job!r}")
        if job is None:
            return error("no_override", f"job {request.job} has no pinned LR to release")
        return self._changed(batch, job, "the release")

    def _changed(self, batch: Batch, job: JobState, what: str) -> dict[str, Any]:
        """Commit an admin change, push it, and say what is in force now."""
        try:
            self.send(self.commit(batch))
        except Exception as exc:
            return error("unavailable", f"could not store {what}: {exc}")
        row = status_row(job, self.clock(), self.table.worker_timeout, self.wall())
        return {
            "t": "ok",
            "job": job.name,
            "lr": job.lr,
            "version": job.version,
            "override": row["override"],
            "apply_from": job.next_t(),
            "unit": job.unit,
        }

    def history(self, request: History, grant: Grant | None) -> dict[str, Any]:
        """The job's LR changes, filtered by the store (run, since, tail) in SQL."""
        name = request.job
        self.allowed(name, grant)
        job = self.table.jobs.get(name)
        last_run = self.store.last_run(name)
        if last_run is None and job is None:
            return error("unknown_job", f"no job {name!r}")
        run = None
        if not request.all_runs:  # one run: the one asked for, else the current one
            run = request.run
            if run is None:
                run = job.run if job is not None else last_run
        start = None if request.since is None else rfc3339(self.wall() - request.since)
        tail = request.tail
        rows = [] if tail == 0 else self.store.history(name, tail, run, start)
        run_state = _run_states(job, last_run or 0)
        out = [{**r.to_json(), "run_state": run_state(r.run)} for r in rows]
        return {"t": "history", "job": name, "rows": out}

    def range_test(self, request: RangeTestRequest, grant: Grant | None) -> dict[str, Any]:
        name = request.job
        self.allowed(name, grant)
        self.owned(name)
        job = self.table.jobs.get(name)
        if job is None:
            return error("unknown_job", f"no job {name!r}")
        report = job.policy.range_test_report(job.state)
        if report is None:
            return error("unknown_job", f"job {name!r} has run no LR range test")
        return {"t": "range_test", "job": name, **report}

    def forget(self, request: Forget, grant: Grant | None) -> dict[str, Any]:
        name = request.job
        self.allowed(name, grant)
        self.owned(name)
        batch = self.table.batch(self.clock(), self.wall())
        if not batch.forget(name):
            return error("unknown_job", f"no job {name!r}")
        try:
            self.commit(batch)
        except Exception as exc:
            return error("unavailable", f"could not forget {name!r}: {exc}")
        return {"t": "ok", "job": name}

    def metrics(self, request: MetricsRequest, grant: Grant | None) -> dict[str, Any]:
        """The job's recorded metrics of one run (default: the current one), as columns;
        with `after`, only the points after that t (`count` says how many the run holds)."""
        name = request.job
        self.allowed(name, grant)
        store, job = self.store, self.job(name)
        try:
            runs = store.metric_runs(name)
        except StoreUnavailable as exc:
            return error("unavailable", str(exc))
        if not runs and job is None:
            return error("unknown_job", f"no job {name!r}")
        run = request.run
        if run is None:
            run = job.run if job is not None else runs[-1]
        after = request.after
        try:
            rows = store.metric_rows(name, run, after)
            count = store.metric_count(name, run) if after >= 0 else len(rows)
        except StoreUnavailable as exc:
            return error("unavailable", str(exc))
        unit = job.unit if job is not None else None
        monitor = job.policy.describe(job.state).get("monitor") if job is not None else None
        reply = {
            "t": "metrics",
            "job": name,
            "run": run,
            "runs": runs,
            "unit": unit or ("step" if any(r[0] != r[1] for r in rows) else "epoch"),
            "monitor": monitor,
            "after": after,  # only points with a later t: the reader has those before
            "count": count,
        }
        if request.raw:  # the web view decodes in its own thread, not the loop's
            reply["rows"] = rows
            return reply
        return {**reply, **metric_columns(rows)}


def metric_columns(rows: list[tuple[int, int, float, float, bytes]]) -> dict[str, Any]:
    """Stored points (`Store.metric_rows`) as columns (what charts and CSV writers want): `x`
    (epoch, or step for a step job), `epoch`, `lr` (trained), `time` (Unix), `metrics` {name:
    values, None where a point lacks the metric}."""
    decoded = [decode_metrics(r[4]) for r in rows]
    names = sorted({k for m in decoded for k in m})
    return {
        "x": [r[0] for r in rows],
        "epoch": [r[1] for r in rows],
        "lr": [r[2] for r in rows],
        "time": [r[3] for r in rows],
        "metrics": {k: [m.get(k) for m in decoded] for k in names},
    }
