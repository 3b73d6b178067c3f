"""The controller daemon: one thread, one zmq Poller loop over the client and admin sockets.

Each loop turn: drain every client message waiting (up to a budget), decode
and validate it (`lrpilot.client.protocol`), feed it to one `Batch`
(jobs.py), add the deadlines that came due, commit the whole turn in one
transaction, and only then send the replies, with NOBLOCK (unroutable or full
peers are counted, never waited for). A failed commit answers every message
of the turn `unavailable` and changes nothing. Between turns it watches the
policy file. Prometheus metrics are served from prometheus_client's own
thread; per-job series are read from the job table at scrape time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import zmq

from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import (
    SOCKET_MAX_MSG_SIZE,
    ClientMessage,
    ErrorMessage,
    Hello,
    Report,
    decode,
    encode,
    parse_client_dict,
    read_report,
)

from . import __version__
from .admin_requests import (
    Forget,
    History,
    JobRequests,
    MetricsRequest,
    RangeTestRequest,
    Release,
    Reload,
    SetLr,
    Status,
    error,
    parse_request,
)
from .auth import Authorizer, Grant, audit_author, peer_uid
from .errors import BindError, Moved, StateDirError, StoreUnavailable
from .jobs import Batch, JobTable
from .metrics import Metrics
from .policyfile import PolicySet, load_default
from .reload import Loaded, PolicyLoader, quiet_gc
from .store import StateStore, Store
from .transitions import Outgoing
from .web import WebBridge, WebPages

if TYPE_CHECKING:
    from .pgstore import PgStore

__all__ = [
    "BindError",
    "ServeConfig",
    "Server",
    "Sockets",
    "build_server",
    "parse_ready_line",
    "serve",
]

log = logging.getLogger("lrpilot.controller")

#: The loop wakes at least this often with nothing to do (signals are seen within it).
IDLE_WAKE = 0.2
_DEFERRED: dict[str, Any] = {"t": "deferred"}  # an admin reply that comes later
SWITCH_INTERVAL = 0.0005
#: Admin requests are small; replies (status of 50k jobs, long histories) are not limited.
ADMIN_MAX_REQUEST = 1 << 20


def _bind(sock: zmq.Socket[bytes], endpoint: str, flag: str) -> None:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise BindError(f"cannot bind {endpoint} ({flag}): {exc}") from None


@dataclass(frozen=True)
class ServeConfig:
    """Everything `lrpilot serve` was told; see DESIGN.md's command table for the defaults."""

    policy: str | None = None
    bind: str = "tcp://0.0.0.0:5555"
    admin_bind: str = "tcp://127.0.0.1:5556"
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9477
    state_dir: str = "./lrpilot-state"
    job_ttl: float = 86400.0
    max_jobs: int = 10000
    worker_timeout: float = 600.0
    curve_secret_key: str | None = None
    curve_authorized_dir: str | None = None
    #: postgresql://… : state in PostgreSQL, shared with other controllers (else state_dir).
    store: str | None = None
    #: The client endpoint other controllers send this one's clients to (default: bound).
    advertise: str | None = None

    def store_name(self) -> str:
        """Where the state is, for log lines."""
        return "the --store database" if self.store else f"{self.state_dir}/state.db"


class _LogLimiter:
    """At most `rate` invalid-message log lines per second; the counter still counts all."""

    def __init__(self, rate: int = 20) -> None:
        self.rate, self.window, self.count, self.dropped = rate, 0.0, 0, 0

    def allow(self, now: float) -> bool:
        if now - self.window >= 1.0:
            if self.dropped:
                log.warning("%d more invalid messages not logged", self.dropped)
            self.window, self.count, self.dropped = now, 0, 0
        self.count += 1
        if self.count > self.rate:
            self.dropped += 1
            return False
        return True


class Sockets:
    """The bound sockets of one controller: clients, admin, the loop's wake-up, /metrics.

    `Sockets.bind(config, metrics)` does the binding (and CURVE set-up); `close()` closes
    every socket with linger 0 and stops the metrics server.
    """

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.clients: zmq.Socket[bytes] | None = None
        self.admin: zmq.Socket[bytes] | None = None
        self.wakeup: zmq.Socket[bytes] | None = None
        self.wake_endpoint = f"inproc://lrpilot-wake-{id(self)}"
        self.http: Any = None
        self.auth: Any = None
        #: The grants of the authorized keys when CURVE is on, else None.
        self.authorizer: Authorizer | None = None

    @classmethod
    def bind(
        cls,
        config: ServeConfig,
        metrics: Metrics,
        ready: Callable[[], bool] | None = None,
        pages: WebPages | None = None,
    ) -> Sockets:
        """Bind every endpoint of `config`; on failure nothing stays open. `ready` answers
        the metrics port's `/ready` (default: always ready); `pages` the web view's paths.

        Raises:
            BindError: an endpoint or port that cannot be bound, named with its flag.
        """
        self = cls()
        try:
            self.clients = self._client_socket(config)
            self.admin = self.ctx.socket(zmq.ROUTER)
            self.admin.setsockopt(zmq.LINGER, 0)
            if self.authorizer is not None:  # the admin socket needs an authorized key too
                _curve_server(self.admin, config)
            self.admin.setsockopt(zmq.MAXMSGSIZE, ADMIN_MAX_REQUEST)
            self._bind_admin(config.admin_bind)
            self.wakeup = self.ctx.socket(zmq.PULL)
            self.wakeup.bind(self.wake_endpoint)
            if config.metrics_port is not None:
                host, port = config.metrics_host, config.metrics_port
                try:
                    self.http = metrics.serve(port, host, ready=ready, pages=pages)
                except OSError as exc:
                    raise BindError(
                        f"cannot serve metrics on {host}:{port} (--metrics-port): "
                        f"{exc.strerror or exc}"
                    ) from None
        except Exception:
            self.close()
            raise
        return self

    def _client_socket(self, config: ServeConfig) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, SOCKET_MAX_MSG_SIZE)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 5000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 15000)
        sock.setsockopt(zmq.HEARTBEAT_TTL, 15000)
        if config.curve_secret_key:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=config.curve_authorized_dir)
            self.authorizer = Authorizer(config.curve_authorized_dir or ".")
            _curve_server(sock, config)
        try:
            _bind(sock, config.bind, "--bind")
        except BindError:
            sock.close(linger=0)
            raise
        return sock

    def _bind_admin(self, endpoint: str) -> None:
        """Bind the admin socket; an ipc:// socket file is created mode 0600 (only this user
        can steer jobs); loopback TCP is open to every local user, and the log says so."""
        assert self.admin is not None
        if endpoint.startswith("ipc://"):
            old = os.umask(0o077)
            try:
                _bind(self.admin, endpoint, "--admin-bind")
            finally:
                os.umask(old)
            os.chmod(endpoint.removeprefix("ipc://"), 0o600)
            return
        _bind(self.admin, endpoint, "--admin-bind")
        if self.authorizer is None:
            log.warning(
                "admin socket %s: any local user can steer jobs; on a shared machine use "
                "--admin-bind ipc://PATH (created mode 0600) or CURVE",
                endpoint,
            )

    def waker(self) -> Callable[[], None]:
        """Wakes the loop from another thread (its socket is created in that thread)."""
        local = threading.local()
        ctx, endpoint = self.ctx, self.wake_endpoint

        def wake() -> None:
            sock = getattr(local, "sock", None)
            if sock is None:
                sock = local.sock = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
            with contextlib.suppress(zmq.ZMQError):
                sock.send(b"", zmq.NOBLOCK)

        return wake

    def close(self) -> None:
        for sock in (self.clients, self.admin, self.wakeup):
            if sock is not None:
                sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.ctx.term()


def _curve_server(sock: zmq.Socket[bytes], config: ServeConfig) -> None:
    from zmq.auth import load_certificate

    assert config.curve_secret_key is not None
    public, secret = load_certificate(config.curve_secret_key)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def build_server(
    config: ServeConfig,
    policies: PolicySet | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    store: StateStore | None = None,
) -> Server:
    """Assemble a controller: open the store, restore its jobs, bind the sockets, start
    the policy file's loader; the `Server` it returns does no I/O until `run()`.

    Args:
        config: the validated settings.
        policies: the policy set in force (default: the embedded default).
        clock, wall: monotonic and Unix time (tests pass a clock they move).
        store: a SQLite store the caller opened on `config.state_dir` (default: opened
            here; ignored with `config.store`, whose PostgreSQL store is always opened here).

    Raises:
        BindError: an endpoint or port cannot be bound.
        StateDirLocked, StoreCorrupt: the state dir cannot be used.
        StoreUnavailable: the --store database cannot be reached.
        ImportError: --store without the `postgres` extra (psycopg).
    """
    policies = policies or load_default()
    metrics = Metrics(version=__version__)
    metrics.last_reload_timestamp.set(wall())
    pg: PgStore | None = None
    if config.store:
        from .pgstore import PgStore

        store = pg = PgStore(config.store, clock=clock)
        metrics.watch_shards(lambda: len(pg.owned) if pg is not None else 0)
    elif store is None:
        store = Store(config.state_dir)
    try:
        table = JobTable(
            policies,
            store,
            max_jobs=config.max_jobs,
            worker_timeout=config.worker_timeout,
            job_ttl=config.job_ttl,
            owns=pg.owns if pg is not None else None,
        )
        metrics.watch(table, clock)
        ready = None if pg is None else (lambda: bool(pg.owned))
        bridge: list[WebBridge] = []  # the web view's pages ask the loop, once it exists
        pages = WebPages(lambda message: bridge[0].ask(message) if bridge else None)
        sockets = Sockets.bind(config, metrics, ready, pages)
    except BaseException:
        store.close()
        raise
    if pg is None:
        with quiet_gc():
            count = table.restore(store.load_jobs(), clock(), wall())
        if count:
            log.info("restored %d jobs from %s", count, config.state_dir)
    loader = None
    if config.policy:
        loader = PolicyLoader(config.policy, policies.digest, clock, sockets.waker())
    server = Server(config, store, table, metrics, sockets, clock, wall, loader, pg)
    server.web = WebBridge(server)
    bridge.append(server.web)
    if pg is not None:  # the jobs of the shards it takes are restored by the tick
        pg.register(*server.advertised())
        server.tick_shards()
    return server


class Server:
    """A bound controller; `run()` serves until `stop()` (or SIGTERM/SIGINT).

    Built by `build_server(config)`; the constructor only wires what it is given.

    Args:
        config: the validated settings.
        store: durable state; table: the jobs in memory; metrics: the registry's metrics.
        sockets: the bound sockets.
        clock, wall: monotonic and Unix time.
        loader: the policy file's loader thread (None: no --policy, no reloads).
        pg: the PostgreSQL store when state is shared (shards, `moved`), else None.
    """

    def __init__(
        self,
        config: ServeConfig,
        store: StateStore,
        table: JobTable,
        metrics: Metrics,
        sockets: Sockets,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        loader: PolicyLoader | None = None,
        pg: PgStore | None = None,
    ) -> None:
        self.config = config
        self.pg = pg
        self._next_tick = 0.0
        self.clock = clock
        self.wall = wall
        self.metrics = metrics
        self.store = store
        self.table = table
        self.sockets = sockets
        self.loader = loader
        assert sockets.clients is not None and sockets.admin is not None
        assert sockets.wakeup is not None
        self.ctx = sockets.ctx
        self.sock = sockets.clients
        self.admin = sockets.admin
        self._wakeup = sockets.wakeup
        self.authorizer = sockets.authorizer
        self.jobs = JobRequests(table, store, clock, wall, self.commit, self.send, pg)
        self._waiting_admin: dict[int, list[bytes]] = {}  # reload requests awaiting the loader
        self._stopping = False
        self._reload_requested = False
        self._admin_token = 0
        self._limiter = _LogLimiter()
        self._reload_failing = False  # the last reload was rejected: a valid file says so
        #: The web view's requests, answered in the loop (`build_server` sets it).
        self.web: WebBridge | None = None

    def reload_keys(self) -> None:
        """Re-read the authorized dir: for new handshakes (ZAP) and for every next message."""
        if self.authorizer is not None and self.sockets.auth is not None:
            self.sockets.auth.configure_curve(domain="*", location=self.config.curve_authorized_dir)
            self.authorizer.reload()

    # -- endpoints ----------------------------------------------------------------

    def endpoints(self) -> dict[str, str]:
        bind = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        admin = self.admin.getsockopt_string(zmq.LAST_ENDPOINT)
        out = {"bind": bind, "admin": admin}
        if self.sockets.http is not None:
            host = self.config.metrics_host
            out["metrics"] = f"http://{host}:{self.sockets.http.server_port}/metrics"
        return out

    def advertised(self) -> tuple[str, str]:
        """The client and admin endpoints that `moved` names: --advertise, else the bound
        ones with a wildcard address replaced by this host's name."""
        e = self.endpoints()
        host = socket.gethostname()
        bind = e["bind"].replace("0.0.0.0", host).replace("[::]", host)
        admin = e["admin"].replace("0.0.0.0", host).replace("[::]", host)
        return self.config.advertise or bind, admin

    def tick_shards(self) -> None:
        """Heartbeat and rebalance (PostgreSQL): drop the jobs of shards given up, restore
        those of shards taken. Runs between turns, when every decision is committed."""
        assert self.pg is not None
        gained, lost = self.pg.tick()
        self._next_tick = self.clock() + self.pg.heartbeat
        if lost:
            for name in [n for n in self.table.jobs if self.pg.shard(n) in lost]:
                self.table.drop(name)
            log.info("gave up %d shards; %d owned", len(lost), len(self.pg.owned))
        if gained:
            try:
                with quiet_gc():
                    rows = self.pg.load_shards(gained)
                    count = self.table.restore(rows, self.clock(), self.wall())
            except StoreUnavailable as exc:  # loaded one by one as their clients come
                log.error("cannot restore the jobs of the shards taken: %s", exc)
                count = len(self.table.jobs)
            log.info(
                "took %d shards; %d owned, %d jobs in memory",
                len(gained),
                len(self.pg.owned),
                count,
            )

    def ready_line(self) -> str:
        """`lrpilot ready bind=... admin=... metrics=...`: the one stdout line once bound."""
        e = self.endpoints()
        metrics = e.get("metrics", "off")
        return f"lrpilot ready bind={e['bind']} admin={e['admin']} metrics={metrics}"

    # -- the loop -------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())

    def stop(self) -> None:
        self._stopping = True

    def request_reload(self) -> None:
        self._reload_requested = True

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.admin, zmq.POLLIN)
        poller.register(self._wakeup, zmq.POLLIN)
        assert self.web is not None
        poller.register(self.web.sock, zmq.POLLIN)
        while not self._stopping:
            now = self.clock()
            wake = min(now + IDLE_WAKE, self.table.deadlines.next() or math.inf)
            if self.table.rebinding:  # jobs to rebind after a reload: a turn at once
                wake = now
            if self.pg is not None:
                wake = min(wake, self._next_tick)
            events = dict(poller.poll(max(0, math.ceil((wake - now) * 1000))))
            self.turn(drain=self.sock in events)
            if self.pg is not None and self.clock() >= self._next_tick:
                self.tick_shards()
            if self.admin in events:
                self._drain_admin()
            if self.web.sock in events:
                self.web.drain()
            if self._wakeup in events:
                with contextlib.suppress(zmq.Again):
                    while self._wakeup.recv(zmq.NOBLOCK) is not None:
                        pass
            if self._reload_requested:
                self._reload_requested = False
                self.reload_keys()
                if self.loader is not None:
                    self.loader.request("signal")
            self.apply_loaded()

    def turn(self, drain: bool = True, budget: int = 256) -> None:
        """One group commit: decide every message waiting and every deadline due, commit
        once, then reply (or answer every message `unavailable` if the commit failed)."""
        now = self.clock()
        batch = self.table.batch(now, self.wall())
        received: list[tuple[bytes, int | None]] = []  # every message fed to the batch
        errors: Outgoing = []
        for _ in range(budget if drain else 0):
            try:
                frames, user = self._recv(self.sock)
            except zmq.Again:
                break
            self._feed(frames, batch, received, errors, user)
        due = self.table.deadlines.due(now)  # popped only once the turn is committed
        batch.expire(due)
        batch.rebind()
        if batch.steps or batch.touched or batch.quarantine:
            try:
                self.store.commit(batch.writes())
            except Exception as exc:
                self._store_failed(exc)
                text = "the controller cannot store its state now; resend later"
                errors += [(i, ErrorMessage("unavailable", text, seq)) for i, seq in received]
                self.send(errors)
                return
        self.table.deadlines.pop_due(now)
        out = self.table.publish(batch)
        self.table.expire_idle(due, now)
        for step in batch.steps:
            for code in step.invalid:
                self.metrics.invalid.labels(code).inc()
        self.send(errors)
        self.send(out)
        if batch.steps:
            elapsed = max(self.clock() - now, 0.0)
            for step in batch.steps:
                if step.snapshot is not None:
                    self.metrics.decision_seconds.observe(elapsed)

    def _recv(self, sock: zmq.Socket[bytes]) -> tuple[list[bytes], str | None]:
        """One message and, with CURVE on, the User-Id (z85 public key) it came with."""
        if self.authorizer is None:
            return sock.recv_multipart(zmq.NOBLOCK), None
        parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        try:
            user = parts[-1].get("User-Id")
        except zmq.ZMQError:
            user = None
        return [p.bytes for p in parts], None if user is None else str(user)

    def _feed(
        self,
        frames: list[bytes],
        batch: Batch,
        received: list[tuple[bytes, int | None]],
        errors: Outgoing,
        user: str | None = None,
    ) -> None:
        ident = frames[0]
        seq = None
        try:
            if len(frames) != 2:
                raise ProtocolError(
                    "schema", f"expected one frame after the routing id, got {len(frames) - 1}"
                )
            message: ClientMessage
            report = read_report(frames[1])  # the common case, compiled (msgspec)
            if report is not None:
                message, seq = report, report.seq
            else:  # anything else, and every bad frame, is read and answered the long way
                raw = decode(frames[1])
                if isinstance(raw.get("seq"), int) and not isinstance(raw.get("seq"), bool):
                    seq = raw["seq"] if 0 <= raw["seq"] < 1 << 63 else None  # echoed in an error
                message = parse_client_dict(raw)
            if message.session != ident:
                raise ProtocolError("schema", "session must equal the socket's routing id")
            if self.authorizer is not None:
                grant = self.authorizer.grant(user)
                if grant is None or not grant.allows(message.job):
                    who = "a key no longer authorized" if grant is None else f"key {grant.name}"
                    raise ProtocolError("forbidden", f"{who} may not use job {message.job}")
            if self.pg is not None and not self.pg.owns(message.job):
                errors.append(self._elsewhere(ident, message.job, seq))
                return
            if isinstance(message, Hello):
                batch.hello(message)
            elif isinstance(message, Report):
                batch.report(message)
            else:
                batch.bye(message)
        except ProtocolError as exc:
            self._invalid(ident, exc, seq, errors)
            return
        except StoreUnavailable as exc:  # a job's row could not be read: the client resends
            self._store_failed(exc)
            text = "the controller cannot read its state now; resend later"
            errors.append((ident, ErrorMessage("unavailable", text, seq)))
            return
        except Exception:  # a bug must not stop the controller; the client resends
            log.exception("could not process a message from %s", ident.hex()[:12])
            return
        received.append((ident, seq))

    def _elsewhere(self, ident: bytes, job: str, seq: int | None) -> tuple[bytes, ErrorMessage]:
        """The answer for a job of a shard another controller owns: `moved` to its endpoint,
        or `unavailable` while nobody owns it (a hand-over: the client resends)."""
        assert self.pg is not None
        owner = self.pg.owner(job)
        if owner is None or owner[0] == self.pg.endpoint:
            text = f"job {job} changes controller now; resend later"
            return ident, ErrorMessage("unavailable", text, seq)
        text = f"job {job} is decided by the controller at {owner[0]}"
        return ident, ErrorMessage("moved", text, seq, endpoint=owner[0])

    def _store_failed(self, exc: BaseException) -> None:
        self.metrics.store_errors.inc()
        if self.pg is not None and not self.pg.owned:
            self._next_tick = 0.0  # the session is gone: drop its jobs and reconnect now
        if self._limiter.allow(self.clock()):
            log.error(
                "cannot commit state to %s (%s: %s); answering unavailable, retrying next turn",
                self.config.store_name(),
                type(exc).__name__,
                exc,
            )

    def commit(self, batch: Batch) -> Outgoing:
        """Commit an admin batch; raises on failure (the table is unchanged)."""
        try:
            self.store.commit(batch.writes())
        except Exception as exc:
            self._store_failed(exc)
            raise
        return self.table.publish(batch)

    def _invalid(self, ident: bytes, exc: ProtocolError, seq: int | None, errors: Outgoing) -> None:
        self.metrics.invalid.labels(exc.code).inc()
        if self._limiter.allow(self.clock()):
            log.warning("invalid message from %s: %s", ident.hex()[:12], exc)
        errors.append((ident, ErrorMessage(exc.code, exc.message, seq)))

    def send(self, out: Outgoing) -> None:
        send = self.sock.send_multipart
        for ident, message in out:
            try:
                send([ident, encode(message.to_wire())], zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                self.metrics.unroutable.inc()

    # -- admin --------------------------------------------------------------------------

    def _drain_admin(self, budget: int = 100) -> None:
        for _ in range(budget):
            try:
                parts = self.admin.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [p.bytes for p in parts]
            user: str | None = None
            uid: int | None = None  # an ipc:// peer's uid, where the OS tells
            with contextlib.suppress(zmq.ZMQError):
                if self.authorizer is not None:
                    user = str(parts[-1].get("User-Id"))
                uid = peer_uid(str(parts[-1].get("Peer-Address")))
            try:
                grant = None
                if self.authorizer is not None:
                    grant = self.authorizer.grant(user)
                    if grant is None:
                        raise ProtocolError("forbidden", "this key is no longer authorized")
                reply = self._admin(frames[-1], grant, uid)
            except Moved as exc:
                reply = {**error(exc.code, exc.message), "endpoint": exc.endpoint}
            except ProtocolError as exc:
                reply = error(exc.code, exc.message)
            except StoreUnavailable as exc:
                reply = error("unavailable", str(exc))
            except Exception as exc:
                log.exception("admin request failed")
                reply = {"t": "error", "code": "internal", "message": f"controller error: {exc}"}
            if reply is _DEFERRED:  # a reload: answered when the loader has read the file
                self._waiting_admin[self._admin_token] = frames[:-1]
                continue
            with contextlib.suppress(zmq.ZMQError):
                self.admin.send_multipart([*frames[:-1], encode(reply)], zmq.NOBLOCK)

    def _admin(self, frame: bytes, grant: Grant | None, uid: int | None) -> dict[str, Any]:
        """One admin request: decoded, typed, handled as `(request, grant) -> reply`. A change
        is audited under the identity the controller checked (`auth.audit_author`: the CURVE
        key's name, an ipc:// peer's user (`uid`), else `claimed:` what the caller sent)."""
        request = parse_request(decode(frame, limit=ADMIN_MAX_REQUEST))
        if isinstance(request, SetLr | Release):
            request = dataclasses.replace(request, author=audit_author(grant, uid, request.author))
        jobs = self.jobs
        match request:
            case Status():
                return jobs.status(request, grant)
            case SetLr():
                return jobs.set_lr(request, grant)
            case Release():
                return jobs.release(request, grant)
            case History():
                return jobs.history(request, grant)
            case RangeTestRequest():
                return jobs.range_test(request, grant)
            case Forget():
                return jobs.forget(request, grant)
            case MetricsRequest():
                return jobs.metrics(request, grant)
            case Reload():
                return self._reload_request(grant)
        raise AssertionError(f"unhandled request {request!r}")  # pragma: no cover

    # -- reload -----------------------------------------------------------------------

    def _reload_request(self, grant: Grant | None) -> dict[str, Any]:
        if self.authorizer is not None and (grant is None or not grant.unrestricted):
            raise ProtocolError("forbidden", "reload needs a key without a jobs restriction")
        self.reload_keys()
        if self.loader is None:
            return {
                "t": "reload",
                "ok": False,
                "errors": [
                    "no policy file: serve runs the embedded default (start it with --policy)"
                ],
            }
        self._admin_token += 1
        self.loader.request("admin", self._admin_token)
        return _DEFERRED

    def apply_loaded(self) -> None:
        """Swap in what the loader read and validated (or record why it could not)."""
        if self.loader is None:
            return
        for loaded in self.loader.results():
            reply = self._apply(loaded)
            frames = self._waiting_admin.pop(loaded.token, None) if loaded.token else None
            if frames is not None:
                with contextlib.suppress(zmq.ZMQError):
                    self.admin.send_multipart([*frames, encode(reply)], zmq.NOBLOCK)

    def _apply(self, loaded: Loaded) -> dict[str, Any]:
        """Validate-then-swap: the new set replaces the old in one commit, or nothing does."""
        assert self.loader is not None
        new, source = loaded.policies, loaded.source
        if new is None:
            return self._reload_failed(loaded.errors)
        self.loader.accept(new.digest)
        self.metrics.last_reload_success.set(1)  # also when an edit reverts to the file in force
        was_failing, self._reload_failing = self._reload_failing, False
        if new.digest == self.table.policies.digest:
            if was_failing:  # the gauge goes back to 1: the log says why
                log.info(
                    "policy file %s is valid again (%s); the policy in force is unchanged",
                    self.config.policy,
                    source,
                )
            elif source != "watch":  # an operator asked: say it was heard
                log.info("policy file %s unchanged (%s)", self.config.policy, source)
            return {"t": "reload", "ok": True, "changed": False, "errors": []}
        # Each job takes its new rule at its next decision, or within a few loop turns
        # (Batch.rebind): nothing here is O(jobs).
        self.table.swap_policies(new)
        self.reload_keys()
        self.metrics.reloads.labels("success").inc()
        self.metrics.last_reload_timestamp.set(self.wall())
        for warning in new.warnings:
            log.warning("%s", warning)
        log.info(
            "policy reloaded from %s (%s); %d jobs re-evaluated at their next decision",
            self.config.policy,
            source,
            len(self.table.jobs),
        )
        return {"t": "reload", "ok": True, "changed": True, "errors": []}

    def _reload_failed(self, errors: list[str]) -> dict[str, Any]:
        self._reload_failing = True
        self.metrics.reloads.labels("error").inc()
        self.metrics.last_reload_success.set(0)
        for line in errors:
            log.error("policy reload rejected, old policy kept: %s", line)
        return {"t": "reload", "ok": False, "errors": errors}

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Close sockets with linger 0, stop the metrics server, release the state dir."""
        if self.loader is not None:
            self.loader.close()
        if self.web is not None:
            self.web.close()
        self.sockets.close()
        self.store.close()


def parse_ready_line(line: str) -> dict[str, str] | None:
    """The endpoints in a `lrpilot ready ...` line (for tools that start a controller)."""
    if not line.startswith("lrpilot ready "):
        return None
    return dict(part.split("=", 1) for part in line.split()[2:] if "=" in part)


def serve(config: ServeConfig, policies: PolicySet | None = None) -> int:
    """Run a controller until SIGTERM/SIGINT; returns the process exit code."""

    policies = policies or load_default()
    # A scrape renders in the metrics thread; hand the GIL back to the loop often, so a
    # scrape delays a decision by a fraction of a millisecond, not 5 ms per switch.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        server = build_server(config, policies)
    except (StateDirError, StoreUnavailable) as exc:
        log.error("lrpilot serve: %s", exc)
        return 1
    except BindError as exc:
        log.error("lrpilot serve: %s", exc)
        return 1
    except zmq.ZMQError as exc:
        log.error("lrpilot serve: cannot bind: %s", exc)
        return 1
    except OSError as exc:
        log.error("lrpilot serve: cannot start: %s", exc)
        return 1
    except ImportError as exc:  # --store without the extra
        log.error("lrpilot serve: %s; pip install 'lrpilot[postgres]' for --store", exc)
        return 2
    server.install_signal_handlers()
    print(server.ready_line(), flush=True)
    if "metrics" in (endpoints := server.endpoints()):
        log.info("web view (read-only): %s", endpoints["metrics"].removesuffix("metrics"))
    try:
        server.run()
    finally:
        server.close()
        log.info("controller stopped; state flushed to %s", config.store_name())
    return 0
