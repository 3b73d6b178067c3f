"""The admin socket's requests about jobs: status, set-lr, history, range-test, forget.

One typed handler per request (`server.py` dispatches on the request's `t`); each
returns the reply as a plain dict, or raises `ProtocolError` (answered as an `error`).
Changes go through a `Batch` and the server's commit, as client messages do.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import check_name

from .jobstate import status_row
from .store import rfc3339

if TYPE_CHECKING:
    from .server import Server

__all__ = ["JobRequests", "error"]


def error(code: str, message: str) -> dict[str, Any]:
    return {"t": "error", "code": code, "message": message}


class JobRequests:
    """Admin requests about jobs, against one server's job table and store."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def allowed(self, job: str) -> None:
        """An admin request about `job` from a key that may not steer it is forbidden."""
        grant = self.server.admin_grant
        if self.server.authorizer is not None and (grant is None or not grant.allows(job)):
            raise ProtocolError("forbidden", f"this key may not use job {job}")

    def status(self, msg: dict[str, Any]) -> dict[str, Any]:
        now, timeout = self.server.clock(), self.server.table.worker_timeout
        grant = self.server.admin_grant if self.server.authorizer is not None else None
        jobs = [
            status_row(j, now, timeout)
            for j in self.server.table.jobs.values()
            if grant is None or grant.allows(j.name)
        ]
        return {"t": "status", "jobs": jobs}

    def set_lr(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        lr = msg.get("lr")
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not (math.isfinite(lr) and 0 < lr <= 10)
        ):
            return error("out_of_range", f"lr must be finite in (0, 10], got {lr!r}")
        reason = str(msg.get("reason") or "")[:500]
        author = str(msg.get("author") or "operator")[:200]
        epochs, seconds = msg.get("epochs"), msg.get("seconds")
        if epochs is not None and (
            isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= 1 << 40
        ):
            return error("out_of_range", f"epochs must be an integer >= 1, got {epochs!r}")
        if seconds is not None and (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not (math.isfinite(seconds) and seconds > 0)
        ):
            return error("out_of_range", f"the duration must be > 0 seconds, got {seconds!r}")
        if epochs is not None and seconds is not None:
            return error("schema", "an override ends after epochs or after a duration, not both")
        batch = self.server.table.batch(self.server.clock(), self.server.wall())
        try:
            job = batch.override(name, float(lr), reason, author, epochs, seconds)
        except KeyError:
            return error("unknown_job", f"no job {name!r}")
        try:
            self.server.send(self.server.commit(batch))
        except Exception as exc:
            return error("unavailable", f"could not store the override: {exc}")
        reply = {"t": "ok", "job": name, "lr": job.lr, "version": job.version}
        row = status_row(job, self.server.clock(), self.server.table.worker_timeout)
        reply["override"] = row["override"]
        reply["apply_from"] = job.next_t()
        return reply

    def history(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
        store = self.server.store
        job = self.server.table.jobs.get(name)
        last_run = store.last_run(name)
        if last_run is None and job is None:
            return error("unknown_job", f"no job {name!r}")
        run = None
        if not msg.get("all_runs"):  # one run: the one asked for, else the current one
            run = msg.get("run")
            if not isinstance(run, int) or isinstance(run, bool):
                run = job.run if job is not None else last_run
        since = msg.get("since")
        start = None
        if isinstance(since, int | float) and not isinstance(since, bool):
            start = rfc3339(self.server.wall() - float(since))
        tail = msg.get("tail")
        limit = tail if isinstance(tail, int) and not isinstance(tail, bool) and tail >= 0 else None
        rows = [] if limit == 0 else store.history(name, limit, run, start)
        return {"t": "history", "job": name, "rows": [r.to_json() for r in rows]}

    def range_test(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = check_name(msg.get("job"), "job")
        self.allowed(name)
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
        batch = self.server.table.batch(self.server.clock(), self.server.wall())
        if not batch.forget(name):
            return error("unknown_job", f"no job {name!r}")
        try:
            self.server.commit(batch)
        except Exception as exc:
            return error("unavailable", f"could not forget {name!r}: {exc}")
        return {"t": "ok", "job": name}
