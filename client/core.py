"""The lrpilot client: reports metrics, gets the learning rate back, never breaks training.

One `Client` per training process (per rank). It speaks wire protocol v1 over a ZeroMQ
DEALER socket of its own and follows the Lazy Pirate pattern: it waits at most `timeout`
for an answer, and after one timeout stops waiting until the controller is heard from again.

Nothing is lost: every report is kept until the controller answers it with an `lr`, or with
an `error` that sending it again cannot fix; at most `MAX_KEPT` reports, the oldest dropped
first (counted in `stats["dropped"]`). Kept reports that have not gone out yet form the send
queue: a burst that fills the socket's send buffer waits there, in order, and goes out on
later calls, so a full buffer is backpressure, not an outage. When the connection drops, or
the controller answers `unknown_session` (it restarted), the client says hello from the
oldest report it keeps and sends the kept reports again, in order; the controller answers a
seq it has already decided with the LR in force. `error{code: "unavailable"}` (the controller
could not commit) keeps the report and resends after 1 s, doubling up to 30 s.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import operator
import os
import socket
import struct
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from .env import curve_keys, default_endpoint, resolve_job, resolve_rank_world
from .errors import ControllerUnavailable, ProtocolError
from .protocol import (
    MAX_INT,
    MAX_METRICS,
    RETRYABLE_CODES,
    SESSION_BYTES,
    SOCKET_MAX_MSG_SIZE,
    Bye,
    ErrorMessage,
    Hello,
    LrMessage,
    Report,
    ServerMessage,
    check_name,
    encode,
    parse_server_message,
)

__all__ = ["MAX_KEPT", "Client", "check_adapter_args", "scalar_metrics", "to_scalar"]

logger = logging.getLogger("lrpilot.client")

#: The most reports a client keeps unanswered; beyond it the oldest is dropped (and counted).
MAX_KEPT = 10_000

_STATS = (
    "sent",  # messages that went out, resends and hellos included
    "replies",  # lr messages received
    "timeouts",  # times the controller did not answer within `timeout`
    "invalid",  # frames that were not a valid message for this job
    "errors",  # error messages received
    "hellos",  # hellos sent
    "backpressure",  # sends refused by a full socket buffer while connected (the reports wait)
    "resent",  # reports sent again (after a reconnect, unknown_session or unavailable)
    "dropped",  # reports given up unanswered: the oldest, when MAX_KEPT were kept
)

# Messages handled per drain: a peer that floods cannot hold the training loop.
_MAX_DRAIN = 1024
# Reports sent per turn from the queue: a backlog drains over several calls, none slow.
_FLUSH_BATCH = 1000
# `report(wait=False)` does its socket work (replies, connection events, sends) at most once
# per this many seconds; other calls always do. Waking libzmq's I/O thread for a send costs a
# busy training process tens of microseconds, so a loop faster than this sends its reports in
# bursts, one wake each; a report waits at most this long, and a slower loop sends each one at
# once.
_TURN_EVERY = 10e-3
# Backoff of resends after `unavailable`, in seconds.
_RETRY_FIRST = 1.0
_RETRY_MAX = 30.0

_SOCKET_OPTIONS = (
    (zmq.IMMEDIATE, 1),  # queue only on live connections: no connection -> zmq.Again at once
    # Small enough that little sits in a pipe a disconnect can discard (those reports are kept
    # and resent anyway), large enough for the reports of a few milliseconds.
    (zmq.SNDHWM, 1000),
    # Room for a reply to every kept report, so the controller never has to drop one.
    (zmq.RCVHWM, 2 * MAX_KEPT),
    (zmq.LINGER, 0),  # never hold up close() or the process exit
    (zmq.MAXMSGSIZE, SOCKET_MAX_MSG_SIZE),
    (zmq.RECONNECT_IVL, 100),
    (zmq.RECONNECT_IVL_MAX, 2000),
    (zmq.HEARTBEAT_IVL, 5000),
    (zmq.HEARTBEAT_TIMEOUT, 15000),
    (zmq.HEARTBEAT_TTL, 15000),
)
# Connection changes, read from the socket's monitor.
_UP, _DOWN = zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_DISCONNECTED


def to_scalar(value: Any) -> float | None:
    """A number, numpy scalar or 0-d tensor as a float; None for anything else.

    Duck-typed so that the client needs neither numpy nor a framework: anything with an
    empty `shape` (or none) that `float()` accepts is a scalar. Booleans are not metrics.
    """
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, bool | str | bytes) or type(value).__name__ == "bool_":
        return None
    shape = getattr(value, "shape", ())
    try:
        if tuple(shape) != ():
            return None
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def scalar_metrics(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The scalar entries of a logs mapping (Keras `logs`, a dict of tensors...) as floats."""
    out: dict[str, float] = {}
    for name, value in (logs or {}).items():
        number = to_scalar(value)
        if isinstance(name, str) and number is not None:
            out[name] = number
    return out


def check_adapter_args(
    unit: str,
    report_every: int = 1,
    snapshot_fn: Callable[[], None] | None = None,
    restore_fn: Callable[[], None] | None = None,
) -> None:
    """The arguments every framework adapter shares, checked at construction.

    Raises:
        ValueError: naming the bad argument and what it takes.
    """
    if unit not in ("epoch", "step"):
        raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}")
    if isinstance(report_every, bool) or not isinstance(report_every, int) or report_every < 1:
        raise ValueError(f"report_every must be an integer >= 1, got {report_every!r}")
    if (snapshot_fn is None) != (restore_fn is None):
        raise ValueError("snapshot_fn and restore_fn go together (the range test needs both)")


def _position(value: Any, what: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None
    if not 0 <= number <= MAX_INT:
        raise ValueError(f"{what} must be in 0..2**40, got {number}")
    return number


def _check_lr(value: Any, what: str) -> float:
    number = to_scalar(value)
    if number is None or not 0 < number <= 10:
        raise ValueError(f"{what} must be a finite number in (0, 10], got {value!r}")
    return number


def _shutdown(ctx: zmq.Context[Any], sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
    # Runs from close(), from garbage collection or at interpreter exit; never references the
    # Client itself, so an unclosed client is still collected and never holds up the exit.
    with contextlib.suppress(zmq.ZMQError):  # the socket is going anyway
        sock.disable_monitor()
    try:
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()
    except zmq.ZMQError:  # pragma: no cover - nothing left to do about it
        pass


class _Kept:
    """A report kept until it is answered: what it says, and where a replay of it starts."""

    __slots__ = ("done", "epoch", "frame", "gen", "lr", "metrics", "seq", "start_step", "step")

    def __init__(
        self,
        seq: int,
        epoch: int,
        step: int | None,
        metrics: dict[str, float],
        lr: float,
        start_step: int,
    ) -> None:
        self.seq = seq
        self.epoch = epoch
        self.step = step
        self.metrics = metrics
        self.lr = lr
        self.start_step = start_step  # a hello that replays this report starts at this step
        self.frame = b""  # encoded when first sent: a burst is encoded together, warm
        self.gen = -1  # the send generation it last went out in; -1: not sent yet
        self.done = False  # answered or dropped; skipped where it still sits in a queue


class Client:
    """Reports a training job's metrics to the lrpilot controller and returns the LR to use.

    Never raises into the training loop for a network problem: with the controller absent,
    slow, restarted or sending garbage, training continues with the last known LR, one
    warning is logged (logger `lrpilot.client`) per outage, and the client reconnects by
    itself. Every report is kept until the controller answers it and sent again after a
    reconnect (see the module's docstring): `unanswered` counts them, `flush()` waits for
    them, `stats` counts what happened. Not thread-safe: use a client from the training
    thread only.

    Timing follows the frameworks: `report(epoch=e)` returns the LR for epoch e+1, and the
    LR the constructor gets back (`c.lr`) is the one for `start_epoch`.

    Args:
        endpoint: the controller, e.g. `tcp://lrpilot:5555`; default `LRPILOT_ENDPOINT`, else
            `tcp://127.0.0.1:5555`.
        job: the training job's name (1-128 of `[A-Za-z0-9._:/@-]`); default `LRPILOT_JOB`.
        initial_lr: the LR the job starts with (the optimizer's); 0.001 is Keras' default.
        start_epoch: the first epoch this process runs (0-based; > 0 resumes the job's run).
        timeout: the longest, in seconds, any call waits for the controller.
        rank: this worker's rank; default from `TF_CONFIG`, `RANK`, `OMPI_COMM_WORLD_RANK`,
            `SLURM_PROCID`, else 0.
        world: the number of workers; default from the same sources, else 1.
        start_step: the first optimizer step this process runs (0-based).
        framework: told to the controller for its status (`keras`, `torch`, `python`).
        directions: `{metric: "min"|"max"}` for metrics whose direction a policy with
            `mode: auto` cannot guess from the name.
        strict: True raises `ControllerUnavailable` when the hello gets no answer within
            `timeout`, for those who would rather not train without the controller.
        snapshot_fn, restore_fn: for LR range tests: called (in this thread, at the boundary
            the controller names) to keep a copy of the model's and optimizer's state and to
            put it back; the restore runs before the suggested LR applies. Without them a
            policy that starts with a range test is refused at hello (notice
            `restore_unsupported`) and the job keeps its own LR.

    Raises:
        ValueError: for bad arguments, with what to change (at construction only).
        ControllerUnavailable: `strict=True` and no controller answered.

    Example:

        from lrpilot.client import Client
        with Client(job="resnet-a", initial_lr=0.1) as c:
            for epoch in range(100):
                set_lr(c.poll(epoch=epoch))
                val_loss = train_one_epoch()
                c.report(epoch, {"val_loss": val_loss})
    """

    def __init__(
        self,
        endpoint: str | None = None,
        job: str | None = None,
        initial_lr: float = 0.001,
        start_epoch: int = 0,
        timeout: float = 1.0,
        *,
        rank: int | None = None,
        world: int | None = None,
        start_step: int = 0,
        framework: str = "python",
        directions: Mapping[str, str] | None = None,
        strict: bool = False,
        snapshot_fn: Callable[[], None] | None = None,
        restore_fn: Callable[[], None] | None = None,
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
        self.strict = bool(strict)
        check_adapter_args("epoch", 1, snapshot_fn, restore_fn)
        self._snapshot_fn, self._restore_fn = snapshot_fn, restore_fn
        self.job = resolve_job(job)
        self.rank, self.world = resolve_rank_world(rank, world)
        seconds = to_scalar(timeout)
        if seconds is None or not 0 < seconds < math.inf:
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        self.timeout = seconds
        initial = _check_lr(initial_lr, "initial_lr")
        self.framework = str(framework)[:64]
        self.directions = dict(directions or {})
        for name, direction in self.directions.items():
            if direction not in ("min", "max"):
                raise ValueError(f"directions[{name!r}] must be 'min' or 'max', got {direction!r}")
            try:
                check_name(name, "metric name")
            except ProtocolError as exc:
                raise ValueError(f"directions: {exc.message}") from None
        keys = curve_keys()

        #: 16 random bytes naming this client object; also its socket's ROUTING_ID.
        self.session = os.urandom(SESSION_BYTES)
        #: Counters: see `_STATS` (sent, replies, ..., backpressure, resent, dropped).
        self.stats = dict.fromkeys(_STATS, 0)
        #: True once the controller sent `action: stop` (the Keras callback stops training).
        self.stop_requested = False
        #: The last `snapshot` / `restore` action applied, for adapters that act on it.
        self.last_action: str | None = None

        self._lr = initial
        self._run: int | None = None
        self._version = -1
        # Accepted decisions not yet applied, numbered in the order received.
        self._pending: list[tuple[int, LrMessage]] = []
        self._received = 0  # decisions accepted so far
        self._applied = 0  # the number of the decision in force
        # Where training is: the next epoch / step to run. Pendings apply at these boundaries.
        self._epoch = _position(start_epoch, "start_epoch")
        self._step = _position(start_step, "start_step")
        self._seq = 0
        self._good_names: set[str] = set()  # metric names already checked
        # A report's wire form, filled in as each is encoded: cheaper than a Report each.
        self._report_wire = Report(self.job, self.rank, self.session, 0, 0, {}, initial).to_wire()

        # The reports kept until answered, by seq; each sits in one of the two queues, in seq
        # order: waiting to go out, or sent in the current generation. A generation ends when
        # what was sent may be lost (disconnect, unknown_session, unavailable): its unanswered
        # reports go back to the front of the send queue, and answers to its sends are stale.
        self._kept: dict[int, _Kept] = {}
        self._unsent: deque[_Kept] = deque()
        self._inflight: deque[_Kept] = deque()
        self._gen = 0
        self._need_hello = True  # say hello before the next report
        self._hello_sent = False  # ever: then close() says bye
        self._hello_answered = False
        self._rehello_seq = 0  # the newest seq when the last hello went out
        self._retry_at = 0.0  # > 0: after `unavailable`, nothing is sent until then
        self._backoff = _RETRY_FIRST
        self._silent_since: float | None = None  # the first send since last heard from
        self._connected = False
        self._next_turn = 0.0  # see _TURN_EVERY
        self._online = True
        self._warned: set[str] = set()
        self._noticed: set[tuple[int, str]] = set()  # (run, code) of the notices logged
        self._ever_heard = False
        #: (code, message) of every notice logged, in order (adapters print new ones).
        self.notices: list[tuple[str, str]] = []
        self._closed = False

        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        self._monitor: zmq.Socket[Any] = self._sock.get_monitor_socket(_UP | _DOWN)
        self._monitor.linger = 0
        self._finalizer = weakref.finalize(self, _shutdown, self._ctx, self._sock, self._monitor)
        self._looked_at = [(self._sock, zmq.POLLIN), (self._monitor, zmq.POLLIN)]
        try:
            self._sock.setsockopt(zmq.ROUTING_ID, self.session)
            for option, value in _SOCKET_OPTIONS:
                self._sock.setsockopt(option, value)
            if keys is not None:
                self._sock.curve_serverkey = keys.server_public
                self._sock.curve_publickey = keys.public
                self._sock.curve_secretkey = keys.secret
            self._sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            self._finalizer()
            raise ValueError(
                f"cannot connect to endpoint {self.endpoint!r} ({exc}); "
                "pass endpoint='tcp://HOST:PORT' or set LRPILOT_ENDPOINT"
            ) from None

        deadline = time.monotonic() + self.timeout
        # With IMMEDIATE the socket is writable only once a connection exists.
        if self._sock.poll(_ms(deadline), zmq.POLLOUT):
            self._connected = True
            self._await(lambda: self._hello_answered, deadline)
        else:
            self._go_offline(f"no connection within {self.timeout:g} s")
        if self.strict and not self._hello_answered:
            self._finalizer()
            self._closed = True
            raise ControllerUnavailable(
                f"strict=True: the lrpilot controller at {self.endpoint} did not answer within "
                f"{self.timeout:g} s (is `lrpilot serve` running there? LRPILOT_ENDPOINT?)"
            )
        self._apply_due()

    # -- public ----------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The latest LR in force; never blocks."""
        return self._lr

    @property
    def online(self) -> bool:
        """False after a timeout or a lost connection, until the controller is heard again."""
        return self._online

    @property
    def unanswered(self) -> int:
        """The number of reports kept because the controller has not answered them yet."""
        return len(self._kept)

    def report(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        step: int | None = None,
        wait: bool = True,
        trained_lr: float | None = None,
    ) -> float:
        """Reports a finished epoch (or step) and returns the LR to use from the next one.

        Waits at most `timeout` for the controller's decision, and not at all while offline
        or with `wait=False`. A report with a `step` is a mid-epoch report (`unit: step`
        policies): it returns the LR for step `step + 1` and leaves the epoch boundary alone.
        The report is kept until answered; what cannot go out now goes out on a later call.

        Args:
            epoch: the 0-based epoch just finished (Keras' `on_epoch_end(epoch)`).
            metrics: `{name: number}`; numpy scalars and 0-d tensors are fine, other values
                and names the protocol refuses are left out (with one warning each).
            step: the 0-based optimizer step just finished, for step-unit policies.
            wait: False returns at once: the report goes out in a burst with others at most
                10 ms later (at the next call that does socket work, or `poll()`, `flush()`,
                `close()`), and its decision is applied by a later call.
            trained_lr: the LR this epoch (step) trained at, when it is not the client's
                LR in force (an adapter whose hello came after the step); the controller's
                LR range test takes only losses trained at its own LRs.

        Returns:
            The LR in force from epoch `epoch + 1` (or step `step + 1`).
        """
        if type(epoch) is not int or not 0 <= epoch <= MAX_INT:  # the check inlined: hot path
            epoch = _position(epoch, "epoch")
        if step is not None and (type(step) is not int or not 0 <= step <= MAX_INT):
            step = _position(step, "step")
        if self._closed:
            return self._lr
        self._seq = seq = self._seq + 1
        start = self._step if step is None else step
        lr = self._lr if trained_lr is None else _check_lr(trained_lr, "trained_lr")
        kept = _Kept(seq, epoch, step, self._clean_metrics(metrics), lr, start)
        self._kept[seq] = kept
        self._unsent.append(kept)
        if len(self._kept) > MAX_KEPT:
            self._drop_oldest()
        if wait and self._online and not self._retry_at:
            self._await(lambda: seq not in self._kept or self._retry_at > 0, self._deadline())
        else:
            self._turn(time.monotonic(), force=wait)
        if step is None:
            self._epoch = epoch + 1
        else:
            self._epoch, self._step = epoch, step + 1
        self._apply_due()
        return self._lr

    def poll(self, epoch: int | None = None, step: int | None = None) -> float:
        """Handles what the controller sent and sends what is queued, without blocking;
        returns the LR in force.

        Args:
            epoch: the epoch about to start: decisions due from it on are applied.
            step: the step about to start: decisions due from it on are applied.
                With neither, every decision received is applied at once.
        """
        if epoch is not None:
            self._epoch = _position(epoch, "epoch")
        if step is not None:
            self._step = _position(step, "step")
        if not self._closed:
            self._turn(time.monotonic(), force=True)
        self._apply_due(everything=epoch is None and step is None)
        return self._lr

    def flush(self, timeout: float | None = None) -> bool:
        """Sends what is queued and waits until every kept report is answered: at most
        `timeout` seconds (default: the client's `timeout`), also while offline (the
        controller may come back meanwhile). For the end of a run, or a test.

        Returns:
            True if no report is left unanswered.
        """
        if not self._closed and self._kept:
            seconds = self.timeout if timeout is None else timeout
            self._await(lambda: not self._kept, self._deadline(seconds), patient=True)
        return not self._kept

    def close(self) -> None:
        """Gives kept reports up to `timeout` to be answered if the controller is online,
        says bye and closes the socket; safe to call twice."""
        if self._closed:
            return
        if self._kept and self._online:
            self.flush()
        if not self._ever_heard:
            logger.warning(
                "lrpilot: the controller at %s was never reached; job %s trained at its own "
                "learning rate (pass strict=True to fail instead)",
                self.endpoint,
                self.job,
            )
        elif self.stats["dropped"]:
            logger.warning(
                "lrpilot dropped %d reports of job %s unanswered (more than %d were kept); "
                "%d more were unanswered at close",
                self.stats["dropped"],
                self.job,
                MAX_KEPT,
                len(self._kept),
            )
        elif self._kept:
            logger.info("%d lrpilot reports were unanswered at close", len(self._kept))
        if self._hello_sent:
            self._send(encode(Bye(self.job, self.rank, self.session).to_wire()))
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "online" if self._online else "offline"
        return f"<lrpilot Client job={self.job!r} rank={self.rank} lr={self._lr:g} {state}>"

    # -- one turn: connection events, replies, the send queue ------------------------------

    def _turn(self, now: float, force: bool = False) -> None:
        """Everything that can be done without blocking, at most every _TURN_EVERY unless
        forced: replies, connection events, the send queue, the silence check."""
        if not force:
            if now < self._next_turn:
                return
            self._next_turn = now + _TURN_EVERY
        if self._retry_at and now >= self._retry_at:
            self._retry_at = 0.0
            self._rewind()
        # One poll for both sockets (a call into libzmq costs microseconds in a busy process).
        # Connection events come before sending: a lost connection rewinds the queue before
        # anything goes out on the next one, which libzmq opens RECONNECT_IVL later at best.
        for sock, _ in zmq.zmq_poll(self._looked_at, 0):
            if sock is self._monitor:
                self._watch()
            else:
                self._drain()
        if (self._unsent or self._need_hello) and not self._retry_at:
            if self._connected:
                self._flush(_FLUSH_BATCH)  # stops at a full send buffer: backpressure
            else:
                self._go_offline("is not connected")
        if (
            self._silent_since is not None
            and self._online
            and now - self._silent_since > self.timeout
        ):
            self.stats["timeouts"] += 1
            self._go_offline(f"did not answer within {self.timeout:g} s")

    def _items(self) -> list[tuple[zmq.Socket[Any], int]]:
        out = zmq.POLLOUT if (self._unsent or self._need_hello) and not self._retry_at else 0
        return [(self._sock, zmq.POLLIN | out), (self._monitor, zmq.POLLIN)]

    def _await(self, settled: Callable[[], bool], deadline: float, patient: bool = False) -> None:
        """Turns until `settled()`, the client goes offline, the controller asks for a retry
        or the deadline passes (then one timeout is counted and the client goes offline).
        `patient`: waits out retries and outages too, until the deadline."""
        while True:
            self._turn(time.monotonic(), force=True)
            if settled():
                return
            if not patient and (self._retry_at or not self._online):
                return
            wake = min(deadline, self._retry_at) if self._retry_at else deadline
            if (remaining := _ms(wake)) <= 0 and wake >= deadline:
                break
            zmq.zmq_poll(self._items(), remaining)  # a reply, room to send, or the monitor
        if self._online and not self._retry_at:  # else the silence is no news
            self.stats["timeouts"] += 1
            self._go_offline(f"did not answer within {self.timeout:g} s")

    def _deadline(self, seconds: float | None = None) -> float:
        return time.monotonic() + (self.timeout if seconds is None else seconds)

    # -- sending ---------------------------------------------------------------------------

    def _send(self, frame: bytes) -> bool:
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:  # zmq.Again: no connection (IMMEDIATE) or the HWM is full
            return False
        self.stats["sent"] += 1
        if self._silent_since is None:
            self._silent_since = time.monotonic()
        return True

    def _flush(self, budget: int) -> None:
        """Sends the hello if one is due, then up to `budget` queued reports, in order."""
        if self._need_hello and not self._send_hello():
            return
        queue = self._unsent
        while queue and queue[0].done:
            queue.popleft()
        burst = [kept for kept in itertools.islice(queue, budget) if not kept.done]
        for kept in burst:
            if not kept.frame:
                kept.frame = self._encode(kept)
        # Back to back: libzmq's I/O thread then wakes once for the burst, not once a report.
        sent = 0
        send, noblock = self._sock.send, zmq.NOBLOCK
        try:
            for kept in burst:
                send(kept.frame, noblock)
                sent += 1
        except zmq.ZMQError:  # zmq.Again: the send buffer is full, or the connection is gone
            if self._connected:
                self.stats["backpressure"] += 1
        if not sent:
            return
        self.stats["sent"] += sent
        if self._silent_since is None:
            self._silent_since = time.monotonic()
        gen, inflight = self._gen, self._inflight
        while sent:
            kept = queue.popleft()
            if kept.done:
                continue
            if kept.gen >= 0:
                self.stats["resent"] += 1
            kept.gen = gen
            inflight.append(kept)
            sent -= 1

    def _encode(self, kept: _Kept) -> bytes:
        wire = self._report_wire
        wire["seq"], wire["epoch"], wire["step"] = kept.seq, kept.epoch, kept.step
        wire["metrics"], wire["lr"] = kept.metrics, kept.lr
        return encode(wire)

    def _send_hello(self) -> bool:
        """Hello from the oldest kept report (a replay starts there), else from where
        training is."""
        start_epoch, start_step = self._epoch, self._step
        for queue in (self._inflight, self._unsent):
            oldest = next((k for k in queue if not k.done), None)
            if oldest is not None:
                start_epoch, start_step = oldest.epoch, oldest.start_step
                break
        hello = Hello(
            job=self.job,
            rank=self.rank,
            world=self.world,
            session=self.session,
            lr=self._lr,
            start_epoch=start_epoch,
            start_step=start_step,
            framework=self.framework,
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            directions=self.directions,
            restore=self._restore_fn is not None,
        )
        if not self._send(encode(hello.to_wire())):
            return False
        self._need_hello = False
        self._hello_sent = True
        self._hello_answered = False
        self._rehello_seq = self._seq
        self.stats["hellos"] += 1
        return True

    def _rewind(self) -> None:
        """What is in flight may be lost: a new generation resends it, oldest first."""
        self._gen += 1
        live = [k for k in self._inflight if not k.done]
        self._inflight.clear()
        self._unsent.extendleft(reversed(live))

    def _answered(self, seq: int) -> None:
        kept = self._kept.pop(seq, None)
        if kept is None:
            return
        kept.done = True
        inflight = self._inflight
        while inflight and inflight[0].done:
            inflight.popleft()
        if len(inflight) > 2 * len(self._kept) + 64:  # answered out of order behind a laggard
            self._inflight = deque(k for k in inflight if not k.done)

    def _drop_oldest(self) -> None:
        for queue in (self._inflight, self._unsent):
            while queue:
                kept = queue.popleft()
                if not kept.done:
                    kept.done = True
                    del self._kept[kept.seq]
                    self.stats["dropped"] += 1
                    self._warn_once(
                        "dropped",
                        "lrpilot keeps at most %d unanswered reports; dropping the oldest "
                        "(counted in Client.stats['dropped'])",
                        MAX_KEPT,
                    )
                    return

    def _hold(self) -> None:
        """`unavailable`: send nothing until the backoff has passed, then resend it all."""
        if not self._retry_at:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, _RETRY_MAX)

    # -- receiving -------------------------------------------------------------------------

    def _watch(self) -> None:
        """Connection events from the socket's monitor."""
        for _ in range(_MAX_DRAIN):
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            (event,) = struct.unpack_from("=H", frames[0])  # uint16 event, uint32 value
            if event == _UP:
                self._connected = True
            elif event == _DOWN:
                # What was in the pipe is gone: resend it after a hello on the next connection.
                self._connected = False
                self._need_hello = True
                self._rewind()
                self._go_offline("closed the connection")

    def _drain(self) -> None:
        sock, noblock = self._sock, zmq.NOBLOCK
        for _ in range(_MAX_DRAIN):
            try:
                frame = sock.recv(noblock)
            except zmq.ZMQError:
                return
            if sock.getsockopt(zmq.RCVMORE):
                rest = sock.recv_multipart(noblock)
                self._invalid(f"a message of {1 + len(rest)} frames, not 1")
                continue
            try:
                message = parse_server_message(frame)
            except ProtocolError as exc:
                self._invalid(str(exc))
                continue
            if isinstance(message, LrMessage) and message.job != self.job:
                self._invalid(f"an lr message for job {message.job!r}, not {self.job!r}")
                continue
            self._handle(message)

    def _handle(self, message: ServerMessage) -> None:
        self._silent_since = None
        self._ever_heard = True
        if not self._online:
            self._online = True
            logger.info("reconnected to the lrpilot controller at %s", self.endpoint)
        if isinstance(message, LrMessage):
            self.stats["replies"] += 1
            if message.notices:
                self._notice(message)
            if message.seq is None:
                self._hello_answered = True  # or a push: either way the controller knows us
            else:
                self._answered(message.seq)
                self._backoff = _RETRY_FIRST
            self._accept(message)
            return
        self.stats["errors"] += 1
        retry = message.code in RETRYABLE_CODES
        if message.seq is None:  # the hello was refused
            self._hello_answered = True
            if retry:
                self._need_hello, self._rehello_seq = True, 0
                self._hold()
            else:
                self._refused(message)
            return
        kept = self._kept.get(message.seq)
        if kept is None or kept.gen < self._gen:
            return  # answered already, or sent again since
        if retry:
            self._warn_once(
                f"error:{message.code}",
                "the lrpilot controller cannot decide now (%s: %s); reports are kept and "
                "sent again",
                message.code,
                message.message,
            )
            self._hold()
        elif message.code == "unknown_session" and kept.seq > self._rehello_seq:
            # The controller forgot this session (it restarted): hello from the oldest kept
            # report, then everything kept again. A report kept at that hello and refused
            # again is given up, so a controller that forgets every time cannot loop us.
            self._need_hello = True
            self._rewind()
        else:
            self._refused(message)
            self._answered(kept.seq)

    def _notice(self, message: LrMessage) -> None:
        """Controller notices: each code logged once per run, in this training process."""
        for code, text in message.notices:
            key = (message.run, code)
            if key in self._noticed:
                continue
            self._noticed.add(key)
            self.notices.append((code, text))
            logger.warning("lrpilot controller, job %s: %s (%s)", self.job, text, code)

    def _refused(self, message: ErrorMessage) -> None:
        self._warn_once(
            f"error:{message.code}",
            "the lrpilot controller refused a message (%s: %s); keeping learning rate %g",
            message.code,
            message.message,
            self._lr,
        )

    def _accept(self, message: LrMessage) -> None:
        if message.run == self._run and message.version <= self._version:
            return  # an older or repeated decision
        if message.run != self._run:
            self._pending.clear()  # decisions of another run are void
        self._run, self._version = message.run, message.version
        self._received += 1
        self._pending.append((self._received, message))

    def _apply_due(self, everything: bool = False) -> None:
        if not self._pending:
            return
        due = [(n, d) for n, d in self._pending if everything or self._is_due(d)]
        if not due:
            return
        applied = {n for n, _ in due}
        self._pending = [(n, d) for n, d in self._pending if n not in applied]
        for n, decision in due:
            # A decision received before the one in force is outdated: it changes no LR
            # (e.g. a plateau step for epoch 5 after an override for epoch 3), but its
            # action still happens. A restore puts the weights back before the LR changes.
            if decision.action == "snapshot" and self._snapshot_fn is not None:
                self._snapshot_fn()
            elif decision.action == "restore" and self._restore_fn is not None:
                self._restore_fn()
            if n > self._applied:
                self._lr, self._applied = decision.lr, n
            if decision.action == "stop":
                self.stop_requested = True
            elif decision.action is not None:
                self.last_action = decision.action

    def _is_due(self, decision: LrMessage) -> bool:
        if decision.apply_from_epoch is not None:
            return decision.apply_from_epoch <= self._epoch
        return decision.apply_from_step is not None and decision.apply_from_step <= self._step

    # -- warnings --------------------------------------------------------------------------

    def _go_offline(self, why: str) -> None:
        if not self._online:
            return
        self._online = False
        logger.warning(
            "lrpilot controller at %s %s; training continues with learning rate %g and the "
            "client reconnects by itself",
            self.endpoint,
            why,
            self._lr,
        )

    def _invalid(self, why: str) -> None:
        self.stats["invalid"] += 1
        self._warn_once(
            "invalid",
            "ignoring an invalid message from %s (%s); further ones are only counted",
            self.endpoint,
            why,
        )

    def _warn_once(self, key: str, text: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(text, *args)

    def _clean_metrics(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        clean: dict[str, float] = {}
        good = self._good_names
        for name, value in metrics.items():
            if name not in good:
                try:
                    check_name(name, "metric name")
                except ProtocolError as exc:
                    self._warn_once(f"metric:{name!r}", "lrpilot does not report %s", exc.message)
                    continue
                good.add(name)
            number = to_scalar(value)
            if number is None:
                self._warn_once(
                    f"metric:{name!r}", "lrpilot does not report %s: not a number", name
                )
            elif len(clean) >= MAX_METRICS:
                self._warn_once("metrics", "lrpilot reports at most %d metrics", MAX_METRICS)
                break
            else:
                clean[name] = number
        return clean


def _ms(deadline: float) -> int:
    """Milliseconds left until `deadline` (a time.monotonic() value), rounded up; >= 0."""
    left = deadline - time.monotonic()
    return max(0, int(left * 1000) + 1) if left > 0 else 0
