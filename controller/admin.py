"""The controller's admin API: what `lrpilot status|set-lr|release|reload|history|forget|
range-test` do, as plain Python calls returning plain dicts and lists.

Example (a notebook next to a running controller):

    from lrpilot.controller.admin import Admin
    admin = Admin("ipc:///var/lib/lrpilot/admin.sock")
    for job in admin.status():
        print(job["job"], job["epoch"], job["lr"])
    admin.set_lr("bert-base-1", 3e-5, reason="loss spike", epochs=2)
    changes = admin.history("bert-base-1")
"""

from __future__ import annotations

import getpass
import os
import socket
from typing import Any

import msgpack
import zmq

from lrpilot.client.protocol import encode

from .errors import AdminError, BadEndpoint, Forbidden, NoAnswer, UnknownJob
from .units import parse_duration

__all__ = [
    "DEFAULT_ADMIN",
    "Admin",
    "AdminError",
    "BadEndpoint",
    "Forbidden",
    "NoAnswer",
    "UnknownJob",
    "check_endpoint",
    "default_admin",
    "request",
]

DEFAULT_ADMIN = "tcp://127.0.0.1:5556"
_SCHEMES = ("tcp://", "ipc://", "inproc://")


def default_admin() -> str:
    return os.environ.get("LRPILOT_ADMIN") or DEFAULT_ADMIN


def check_endpoint(endpoint: str) -> str:
    """The endpoint if ZeroMQ can use it; else BadEndpoint naming the fix."""
    if endpoint.startswith(_SCHEMES):
        return endpoint
    if "://" not in endpoint:
        raise BadEndpoint(
            f"admin endpoint {endpoint!r} has no scheme; did you mean tcp://{endpoint}? "
            "(or ipc:///path/to/admin.sock)"
        )
    raise BadEndpoint(f"admin endpoint {endpoint!r}: use tcp://HOST:PORT or ipc:///PATH")


def request(endpoint: str, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """Send one admin request and wait at most `timeout` seconds for its answer; a `moved`
    answer (the job is another controller's, PostgreSQL store) is followed once.

    Raises:
        BadEndpoint: the endpoint has no usable scheme.
        NoAnswer: nothing answered in time (no controller, or a wrong endpoint).
        ValueError: LRPILOT_CURVE_* is set up wrong.
    """
    from lrpilot.client.env import curve_keys

    check_endpoint(endpoint)
    keys = curve_keys()  # LRPILOT_CURVE_*: the admin socket needs an authorized key
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            sock.curve_serverkey = keys.server_public
            sock.curve_publickey = keys.public
            sock.curve_secretkey = keys.secret
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise BadEndpoint(f"cannot use admin endpoint {endpoint!r}: {exc}") from None
        sock.send(encode(message))
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise NoAnswer(f"no controller answered at {endpoint} within {timeout:g} s")
        reply = decode_reply(endpoint, sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()
    owner = reply.get("endpoint")
    if reply.get("code") == "moved" and isinstance(owner, str) and not message.get("_moved"):
        return request(owner, {**message, "_moved": True}, timeout)
    return reply


def decode_reply(endpoint: str, frame: bytes) -> dict[str, Any]:
    """An admin reply, of any size: the status of 50,000 jobs, a history of 100,000 changes
    (the client socket's 64 KiB limit protects the controller, not the operator).

    Raises:
        NoAnswer: the reply is not an admin reply.
    """
    try:
        reply = msgpack.unpackb(frame, raw=False)
    except Exception as exc:  # msgpack raises several types for corrupt input
        raise NoAnswer(f"garbled answer from {endpoint}: {type(exc).__name__}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("t"), str):
        raise NoAnswer(f"garbled answer from {endpoint}: not an admin reply")
    return reply


def author() -> str:
    """Who the caller says it is (user@host). The controller records it only as
    `claimed:user@host`, where it cannot authenticate the caller (see docs/security.md)."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name (a container with an unnamed uid)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class Admin:
    """A running controller's admin socket, as Python calls.

    Args:
        endpoint: the admin endpoint; default `LRPILOT_ADMIN`, else tcp://127.0.0.1:5556.
        timeout: seconds to wait for each answer.

    Raises (from every call):
        NoAnswer: no controller answered in time.
        UnknownJob, Forbidden, AdminError: the controller refused the request.

    Example:

        admin = Admin()
        admin.set_lr("resnet-a", 0.01, reason="spike", expires="2h")
    """

    def __init__(self, endpoint: str | None = None, timeout: float = 2.0) -> None:
        self.endpoint = check_endpoint(endpoint or default_admin())
        self.timeout = timeout

    def _ask(self, message: dict[str, Any], expect: str) -> dict[str, Any]:
        reply = request(self.endpoint, message, self.timeout)
        if reply.get("t") == "error":
            code, text = str(reply.get("code")), str(reply.get("message"))
            kind = {"unknown_job": UnknownJob, "forbidden": Forbidden}.get(code, AdminError)
            raise kind(code, text)
        if reply.get("t") != expect:
            raise NoAnswer(f"{self.endpoint} answered {reply.get('t')!r}, not {expect!r}")
        return reply

    def status(self) -> list[dict[str, Any]]:
        """Every live job: job, workers, epoch, lr, monitor, value, best, wait, patience,
        policy, phase, last_report_age_s, run, version, override."""
        jobs: list[dict[str, Any]] = self._ask({"t": "status"}, "status")["jobs"]
        return jobs

    def set_lr(
        self,
        job: str,
        lr: float,
        reason: str | None = None,
        expires: str | float | None = None,
        epochs: int | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Set the job's LR from its next epoch (step); audited with `reason` and the
        caller's identity as the controller authenticated it (see docs/security.md).

        Without `expires`/`epochs` it is a new base the policy goes on from; with one of
        them the LR is pinned: it holds exactly until the end, then the policy's LR applies.

        Args:
            expires: a duration (`"2h"`, seconds; at most 365 days) the pin holds.
            epochs: or the number of epochs (steps for `unit: step`) trained at the pin.
            force: set it even though the job has finished (every worker said bye).

        Returns:
            `{job, lr, version, apply_from, unit, override}`; `override` is the pin as
            `status` shows it (None without one).

        Raises:
            ValueError: `expires` is not a duration of at most 365 days.
        """
        message: dict[str, Any] = {
            "t": "set_lr",
            "job": job,
            "lr": lr,
            "reason": reason or "",
            "author": author(),
        }
        if expires is not None:
            message["seconds"] = parse_duration(expires)
        if epochs is not None:
            message["epochs"] = epochs
        if force:
            message["force"] = True
        return self._ask(message, "ok")

    def release(self, job: str) -> dict[str, Any]:
        """End the job's pin now: the policy's LR from its next epoch (step).

        Raises:
            AdminError: code `no_override` when no pin holds.
        """
        return self._ask({"t": "release", "job": job, "author": author()}, "ok")

    def history(
        self,
        job: str,
        run: int | None = None,
        all_runs: bool = False,
        since: str | float | None = None,
        tail: int | None = None,
    ) -> list[dict[str, Any]]:
        """The job's LR changes, oldest first (default: the current run). Each row also
        says what became of its run: `run_state` `current`, `finished` (every worker said
        bye), `ended` (a later run started), or None (the job is not in memory)."""
        message: dict[str, Any] = {"t": "history", "job": job, "all_runs": all_runs}
        if run is not None:
            message["run"] = run
        if since is not None:
            message["since"] = parse_duration(since)
        if tail is not None:
            message["tail"] = tail
        rows: list[dict[str, Any]] = self._ask(message, "history")["rows"]
        return rows

    def reload(self) -> dict[str, Any]:
        """Re-read the policy file now; `{"ok": bool, "changed": bool, "errors": [...]}`."""
        return self._ask({"t": "reload"}, "reload")

    def forget(self, job: str) -> None:
        """Drop the job's state (memory, metrics, disk)."""
        self._ask({"t": "forget", "job": job}, "ok")

    def range_test(self, job: str) -> dict[str, Any]:
        """The job's last LR range test: points, suggestions, why it stopped."""
        return self._ask({"t": "range_test", "job": job}, "range_test")

    def metrics(self, job: str, run: int | None = None) -> dict[str, Any]:
        """The job's recorded metrics (default: the current run) as columns: `x` (epoch, or
        step for `unit: step`), `epoch`, `lr` (the LR trained), `time`, `metrics` {name:
        values}, with `run`, `runs`, `unit` and `monitor`."""
        message: dict[str, Any] = {"t": "metrics", "job": job}
        if run is not None:
            message["run"] = run
        return self._ask(message, "metrics")
