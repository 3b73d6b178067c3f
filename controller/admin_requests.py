"""The admin socket's requests about jobs: status, set-lr, release, history, range-test,
forget, metrics.

One typed handler per request (`server.py` dispatches on the request's `t`); each
returns the reply as a plain dict, or raises `ProtocolError` (answered as an `error`).
Changes go through a `Batch` and the server's commit, as client messages do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import check_name
from lrpilot.client.vocabulary import LR_MESSAGE, as_lr

from .errors import Moved
from .jobstate import JobState, status_row
from .store import StoreUnavailable, decode_metrics, rfc3339
from .units import check_seconds

if TYPE_CHECKING:
    from .jobs import Batch
    from .jobstate import JobState
    from .server import Server

__all__ = ["JobRequests", "Moved", "error", "metric_columns"]


def error(code: str, message: str) -> dict[str, Any]:
    return {"t": "error", "code": code, "message": message}


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


class JobRequests:
    """Admin requests about jobs, against one server's job table and store."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def allowed(self, job: str) -> None:
        """An admin request about `job` from a key that may not steer it is forbidden."""
        grant = self.server.admin_grant
        if self.server.authorizer is not None and (grant is None or not grant.allows(job)):
            raise ProtocolError("forbidden", f"this key may not use job {job}")

    def owned(self, job: str) -> None:
        """Steering a job another controller owns (PostgreSQL store) is answered `moved`
        with that controller's admin endpoint (`Admin` follows it)."""
        pg = self.server.pg
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
        job = self.server.table.jobs.get(name)
        pg = self.server.pg
        if job is not None or pg is None or pg.owns(name):
            return job
        try:
            data = pg.load_job(name)
            if data is None:
                return None
            table = self.server.table
            return JobState.from_stored(name, table.rule_for(name), data, self.server.clock())
        except (StoreUnavailable, ValueError, TypeError, KeyError, AttributeError):
            return None  # its owner quarantines a row that does not fit

    def status(self, msg: dict[str, Any]) -> dict[str, Any]:
        now, timeout = self.server.clock(), self.server.table.worker_timeout
        grant = self.server.admin_grant if self.server.authorizer is not None else None
        table, wall = self.server.table, self.server.wall()
        jobs = [
            status_row(j, now, timeout, wall)
            for j in table.jobs.values()
            if grant is None or grant.allows(j.name)
        ]
        if self.server.pg is not None:  # every controller's jobs, as the database has them
            try:
                stored = list(self.server.pg.load_jobs())
            except StoreUnavailable:  # this controller's own jobs still show (and it is alive)
                stored = []
            for name, data in stored:
                if name in table.jobs or (grant is not None and not grant.allows(name)):
                    continue
                try:
                    job = JobState.from_stored(name, table.rule_for(name), data, now, wall)
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue  # its owner quarantines it
                jobs.append(status_row(job, now, timeout, wall))
        return {"t": "status", "jobs": jobs}

    def set_lr(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        self.owned(name)
        lr = as_lr(msg.get("lr"))
        if lr is None:
            return error("out_of_range", f"lr {LR_MESSAGE}, got {msg.get('lr')!r}")
        reason = str(msg.get("reason") or "")[:500]
        author = self.server.admin_author(msg.get("author"))
        epochs, seconds = msg.get("epochs"), msg.get("seconds")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 1 << 40
        ):
            return error("out_of_range", f"epochs must be an integer >= 1, got {epochs!r}")
        if seconds is not None:
            try:
                seconds = check_seconds(seconds, "the duration (--for)")
            except ValueError as exc:
                return error("out_of_range", str(exc))
            if seconds <= 0:
                return error("out_of_range", f"the duration must be > 0 seconds, got {seconds!r}")
        if epochs is not None and seconds is not None:
            return error("schema", "an override ends after epochs or after a duration, not both")
        batch = self.server.table.batch(self.server.clock(), self.server.wall())
        known = batch.job(name)
        if known is None:
            return error("unknown_job", f"no job {name!r}")
        if known.finished and not msg.get("force"):
            return error(
                "finished",
                f"job {name} has finished (every worker said bye); nothing would train at "
                "this LR. Pass --force to set it anyway (for a resume)",
            )
        job = batch.override(name, float(lr), reason, author, epochs, seconds)
        return self._changed(batch, job, "the override")

    def release(self, msg: dict[str, Any]) -> dict[str, Any]:
        """End the job's pin now: the policy's LR from the next epoch (step)."""
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        self.owned(name)
        batch = self.server.table.batch(self.server.clock(), self.server.wall())
        try:
            job = batch.release(name, self.server.admin_author(msg.get("author")))
        except KeyError:
            return error("unknown_job", f"no job {name!r}")
        if job is None:
            return error("no_override", f"job {name} has no pinned LR to release")
        return self._changed(batch, job, "the release")

    def _changed(self, batch: Batch, job: JobState, what: str) -> dict[str, Any]:
        """Commit an admin change, push it, and say what is in force now."""
        try:
            self.server.send(self.server.commit(batch))
        except Exception as exc:
            return error("unavailable", f"could not store {what}: {exc}")
        now, wall = self.server.clock(), self.server.wall()
        row = status_row(job, now, self.server.table.worker_timeout, wall)
        return {
            "t": "ok",
            "job": job.name,
            "lr": job.lr,
            "version": job.version,
            "override": row["override"],
            "apply_from": job.next_t(),
            "unit": job.unit,
        }

    def history(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        rows = self.server.store.history(name)
        job = self.server.table.jobs.get(name)
        if not rows and job is None:
            return error("unknown_job", f"no job {name!r}")
        run_state = _run_states(job, max((r.run for r in rows), default=0))
        if not msg.get("all_runs"):  # one run: the one asked for, else the current one
            run = msg.get("run")
            if not isinstance(run, int):
                run = job.run if job is not None else (rows[-1].run if rows else None)
            rows = [r for r in rows if r.run == run]
        since = msg.get("since")
        if since is not None:
            try:
                start = rfc3339(self.server.wall() - check_seconds(since, "since"))
            except ValueError as exc:
                return error("out_of_range", str(exc))
            rows = [r for r in rows if r.time >= start]
        tail = msg.get("tail")
        if isinstance(tail, int) and not isinstance(tail, bool) and tail >= 0:
            rows = rows[len(rows) - tail :] if tail else []
        out = [{**r.to_json(), "run_state": run_state(r.run)} for r in rows]
        return {"t": "history", "job": name, "rows": out}

    def range_test(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        self.owned(name)
        job = self.server.table.jobs.get(name)
        if job is None:
            return error("unknown_job", f"no job {name!r}")
        report = job.policy.range_test_report(job.state)
        if report is None:
            return error("unknown_job", f"job {name!r} has run no LR range test")
        return {"t": "range_test", "job": name, **report}

    def forget(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        self.owned(name)
        batch = self.server.table.batch(self.server.clock(), self.server.wall())
        if not batch.forget(name):
            return error("unknown_job", f"no job {name!r}")
        try:
            self.server.commit(batch)
        except Exception as exc:
            return error("unavailable", f"could not forget {name!r}: {exc}")
        return {"t": "ok", "job": name}

    def metrics(self, msg: dict[str, Any]) -> dict[str, Any]:
        """The job's recorded metrics of one run (default: the current one), as columns;
        with `after`, only the points after that t (`count` says how many the run holds)."""
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        store, job = self.server.store, self.job(name)
        try:
            runs = store.metric_runs(name)
        except StoreUnavailable as exc:
            return error("unavailable", str(exc))
        if not runs and job is None:
            return error("unknown_job", f"no job {name!r}")
        run = msg.get("run")
        if not isinstance(run, int) or isinstance(run, bool):
            run = job.run if job is not None else runs[-1]
        after = msg.get("after")
        if not isinstance(after, int) or isinstance(after, bool):
            after = -1
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
        if msg.get("raw"):  # the web view decodes in its own thread, not the loop's
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
