"""The read-only web view on the metrics port: `/`, `/api/jobs`, `/api/jobs/JOB/metrics`.

The page (`controller/web/`: static HTML, CSS and JS with uPlot, a small charting library
from the npm registry, shipped with its licence) asks the two JSON endpoints every few
seconds. The HTTP server runs in its own threads; the answers are built in the controller's
loop thread, which owns the job table and the store: an HTTP thread sends the request over
an inproc socket (`WebBridge.ask`) and the loop answers it between turns (`WebBridge.drain`),
so a page never reads a job half-changed or the database inside a transaction. Nothing here
changes a job: steering stays on the admin socket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable
from importlib.resources import files
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import msgpack
import zmq

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import check_name

from .admin_requests import History, JobRequests, MetricsRequest, metric_columns
from .auth import Grant
from .jobs import JobTable
from .jobstate import status_row


class Loop(Protocol):
    """What the web view needs of the controller (a `Server`), without importing it."""

    table: JobTable
    jobs: JobRequests
    ctx: zmq.Context[zmq.Socket[bytes]]

    def clock(self) -> float: ...

    def wall(self) -> float: ...


__all__ = ["PER_PAGE", "WebBridge", "WebPages", "to_json"]

log = logging.getLogger("lrpilot.controller")

#: Jobs per page of the jobs table (a query may ask for up to MAX_PER_PAGE).
PER_PAGE = 50
MAX_PER_PAGE = 500
#: The page's files, by URL name: (file in controller/web/, content type).
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
#: Seconds an HTTP thread waits for the loop's answer.
ASK_TIMEOUT = 2.0
_WEB_GRANT = Grant("web view")  # read-only: every job, as /metrics shows them

Response = tuple[int, str, bytes]


def to_json(value: Any) -> bytes:
    """JSON with non-finite floats as null (a diverged loss is NaN; JSON has no NaN)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), separators=(",", ":")).encode()


class WebBridge:
    """The loop's side (`drain`) and the HTTP threads' side (`ask`) of one inproc socket.

    Args:
        server: the controller whose table and store answer the requests.
    """

    def __init__(self, server: Loop) -> None:
        self.server = server
        self.endpoint = f"inproc://lrpilot-web-{id(server)}"
        self.sock: zmq.Socket[bytes] = server.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "jobs": self.jobs,
            "job": self.job,
        }

    # -- in the loop thread ----------------------------------------------------------------

    def drain(self, budget: int = 20) -> None:
        """Answer the page requests waiting (a few per turn: decisions come first)."""
        for _ in range(budget):
            try:
                ident, body = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not from ask()
                continue
            try:
                msg = msgpack.unpackb(body, raw=False)
                reply = self._handlers[msg["t"]](msg)
            except ProtocolError as exc:
                reply = {"t": "error", "code": exc.code, "message": exc.message}
            except Exception as exc:  # a bug answers 500, never stops the controller
                log.exception("web view request failed")
                reply = {"t": "error", "code": "internal", "message": str(exc)}
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([ident, msgpack.packb(reply)], zmq.NOBLOCK)

    def jobs(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One page of the jobs table, by name; `q` keeps the jobs whose name contains it."""
        table = self.server.table
        q = str(msg.get("q") or "")
        names = sorted(n for n in table.jobs if q in n)
        per_page = int(msg.get("per_page") or PER_PAGE)
        pages = max(1, math.ceil(len(names) / per_page))
        page = min(max(int(msg.get("page") or 1), 1), pages)
        now, timeout, wall = self.server.clock(), table.worker_timeout, self.server.wall()
        rows = [
            status_row(table.jobs[n], now, timeout, wall)
            for n in names[(page - 1) * per_page : page * per_page]
        ]
        return {
            "t": "jobs",
            "total": len(table.jobs),
            "matched": len(names),
            "page": page,
            "pages": pages,
            "per_page": per_page,
            "jobs": rows,
        }

    def job(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One job: its status row, recorded metrics, LR changes and range test, of one run."""
        name = check_name(msg.get("job"), "job")
        requests = self.server.jobs
        run, after = msg.get("run"), msg.get("after")
        ask = MetricsRequest(
            name,
            run if isinstance(run, int) and not isinstance(run, bool) else None,
            after if isinstance(after, int) and not isinstance(after, bool) else -1,
            raw=True,
        )
        reply = requests.metrics(ask, _WEB_GRANT)
        if reply["t"] == "error":
            return reply
        job = requests.job(name)  # with PostgreSQL, also a job another controller owns
        history = requests.history(History(name, run=reply["run"]), _WEB_GRANT)
        reply["t"] = "job"
        reply["status"] = (
            None
            if job is None
            else status_row(
                job, self.server.clock(), self.server.table.worker_timeout, self.server.wall()
            )
        )
        reply["events"] = history.get("rows", [])
        reply["range_test"] = None if job is None else job.policy.range_test_report(job.state)
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)

    # -- in an HTTP thread -------------------------------------------------------------------

    def ask(self, message: dict[str, Any], timeout: float = ASK_TIMEOUT) -> dict[str, Any] | None:
        """The loop's answer to `message`, or None when it does not come within `timeout`."""
        try:
            sock = self.server.ctx.socket(zmq.DEALER)
        except zmq.ZMQError:  # the controller is stopping
            return None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            sock.send(msgpack.packb(message))
            if not sock.poll(int(timeout * 1000)):
                return None
            reply: dict[str, Any] = msgpack.unpackb(sock.recv(), raw=False)
            return reply
        except zmq.ZMQError:
            return None
        finally:
            sock.close(linger=0)


class WebPages:
    """Answers the HTTP paths of the web view (all but `/metrics`): (status, type, body).

    Args:
        ask: sends a request to the loop (`WebBridge.ask`).
    """

    def __init__(self, ask: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        self.ask = ask
        self._folder = files("lrpilot.controller") / "web"

    def __call__(self, target: str) -> Response:
        url = urlsplit(target)
        path, query = url.path, parse_qs(url.query)
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/api/jobs":
            return self._api(
                {
                    "t": "jobs",
                    "q": query.get("q", [""])[0][:200],
                    "page": _int(query.get("page", ["1"])[0], 1, 1 << 30),
                    "per_page": _int(query.get("per_page", [str(PER_PAGE)])[0], 1, MAX_PER_PAGE),
                }
            )
        if path.startswith("/api/jobs/") and path.endswith("/metrics"):
            # A job name may hold '/' (team/bert-1), escaped as %2F or not.
            name = unquote(path.removeprefix("/api/jobs/").removesuffix("/metrics"))
            message: dict[str, Any] = {"t": "job", "job": name}
            for key in ("run", "after"):  # after=T: only the points past T (a page refreshing)
                value = query.get(key, [""])[0]
                if value.isdigit() and len(value) < 20:
                    message[key] = int(value)
            return self._api(message)
        return _text(404, "not found: the web view is at /, metrics at /metrics")

    def _static(self, name: str) -> Response:
        kind = STATIC.get(name)
        if kind is None:
            return _text(404, f"no file {name!r}")
        return 200, kind, (self._folder / name).read_bytes()

    def _api(self, message: dict[str, Any]) -> Response:
        reply = self.ask(message)
        if reply is None:
            return _text(503, "the controller did not answer in time; try again")
        rows = reply.pop("rows", None)
        if rows is not None:
            reply.update(metric_columns(rows))
        if reply.get("t") == "error":
            code = 404 if reply.get("code") == "unknown_job" else 400
            if reply.get("code") == "internal":
                code = 500
            return code, "application/json", to_json(reply)
        return 200, "application/json", to_json(reply)


def _int(text: str, low: int, high: int) -> int:
    try:
        return min(max(int(text), low), high)
    except ValueError:
        return low


def _text(status: int, text: str) -> Response:
    return status, "text/plain; charset=utf-8", (text + "\n").encode()
