"""The lrpilot client: reports metrics, gets the learning rate back, never breaks training.

One `Client` per training process (per rank). It speaks wire protocol v1 over a ZeroMQ
DEALER socket of its own and follows the Lazy Pirate pattern: it waits at most `timeout`
for an answer, and after one timeout stops waiting until the controller is heard from again.

The protocol's state lives in two pure objects that tests drive without sockets or sleeps:
the `Outbox` (kept reports, send queue, generations, the `unavailable` backoff; see
`lrpilot.client.outbox`) and the `Decisions` (pending decisions applied at their boundary;
see `lrpilot.client.decisions`). This module is the thin shell around them: the socket, its
connection events, the endpoint list and the waits, all timed by one injectable clock.

Nothing is lost: every report is kept until the controller answers it; when the connection
drops, the controller answers `unknown_session` (it restarted), says `moved` (another
controller owns the job) or the client fails over to the next endpoint of its list, it says
hello from the oldest report it keeps and sends the kept reports again, in order.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import os
import socket
import struct
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import zmq

from .decisions import Decisions
from .env import curve_keys, endpoint_list, resolve_job, resolve_rank_world
from .errors import ControllerUnavailable, ProtocolError
from .link import DOWN, RETRIED, UP, Link, Sockets, shutdown
from .outbox import HOLD, MAX_KEPT, REFUSED, REPLAY, STATS, Kept, Outbox
from .protocol import (
    MAX_INT,
    MAX_METRICS,
    RETRYABLE_CODES,
    SESSION_BYTES,
    Bye,
    ErrorMessage,
    Hello,
    LrMessage,
    Report,
    ServerMessage,
    check_name,
    decode,
    echo_seq,
    encode,
    parse_server_dict,
)
from .vocabulary import LR_MESSAGE, lr_ok

__all__ = [
    "MAX_KEPT",
    "Client",
    "check_adapter_args",
    "scalar_metrics",
    "takes_unit",
    "to_scalar",
]

logger = logging.getLogger("lrpilot.client")

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
# The same while a schedule runs as a plan (no range test, no guard): the LR does not wait
# for any answer then, and each turn (a wake of libzmq's I/O thread, a poll, the replies)
# costs a busy training process 100 µs or more, so its reports go out ten times less often,
# in larger bursts; a push (`lrpilot set-lr`) is taken up within this long.
_TURN_EVERY_PLAN = 0.1
# With a plan in force and no metrics, a step sends nothing; at most this often (seconds) it
# sends a liveness report with the LR trained, so `status` shows the job alive and its LR.
LIVENESS_EVERY = 5.0
# `moved` replies followed in a row without an answer before the client backs off as after
# `unavailable` (controllers handing shards over point at each other for a moment).
_MAX_MOVES = 8


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


def takes_unit(fn: Callable[..., Any] | None) -> bool:
    """Whether a `snapshot_fn` / `restore_fn` can be called with one argument, the unit
    (`def snapshot_fn(unit=None)`): a guard then calls it with the snapshot's unit; the
    range test always calls it with none."""
    if fn is None:
        return False
    try:
        inspect.signature(fn).bind(0)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): assume it takes one
        return True
    return True


def check_adapter_args(
    unit: str,
    report_every: int = 1,
    snapshot_fn: Callable[..., None] | None = None,
    restore_fn: Callable[..., None] | None = None,
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
    if number is None or not lr_ok(number):
        raise ValueError(f"{what} {LR_MESSAGE}, got {value!r}")
    return number


class Client:
    """Reports a training job's metrics to the lrpilot controller and returns the LR to use.

    Never raises into the training loop for a network problem: with the controller absent,
    slow, restarted or sending garbage, training continues with the last known LR, one
    warning is logged (logger `lrpilot.client`) per outage, and the client reconnects by
    itself (the first try 100 ms after a connection drops, then at most every second).
    Every report is kept until the controller answers it and sent again after a reconnect
    (see the module's docstring): `unanswered` counts them, `flush()` waits for them,
    `stats` counts what happened. Not thread-safe: use a client from the training thread
    only.

    Several controllers (PostgreSQL scale-out): `endpoint` may list them, comma-separated.
    The client talks to one at a time; a `moved` reply sends it to the controller that owns
    the job, and when the current one has been unreachable (no connection, or no answer)
    for `timeout` it fails over to the next; either way it says hello there and replays its
    kept reports (`stats["moved"]`, `stats["failovers"]`).

    Timing follows the frameworks: `report(epoch=e)` returns the LR for epoch e+1, and the
    LR the constructor gets back (`c.lr`) is the one for `start_epoch`.

    Args:
        endpoint: the controller, e.g. `tcp://lrpilot:5555`, or several, comma-separated
            (`tcp://a:5555,tcp://b:5555`) or as a list; default `LRPILOT_ENDPOINT`, else
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
            `restore_unsupported`) and the job keeps its own LR. Both are called with no
            argument for a range test. A loss-spike guard's rollback calls
            `restore_fn(unit)` with the snapshot unit to put back (the newest multiple of
            `snapshot_every` all of whose earlier units were healthy), if `restore_fn`
            takes an argument (`def restore_fn(unit=None)`); a loop with this client keeps
            those snapshots itself: the state each multiple of `snapshot_every` starts
            from (the adapters do it for you).
        clock: seconds of a monotonic clock (default `time.monotonic`) for every timer of
            the client: backoff, silence, failover, the waits' deadlines. Tests pass their
            own and advance it; the waits on the socket still take real time.
        plans: True (the default) asks for schedules as plans (`lr.plan`), evaluated here at
            every boundary; False asks for one `lr` per report, as clients before plans.

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
        endpoint: str | Sequence[str] | None = None,
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
        snapshot_fn: Callable[..., None] | None = None,
        restore_fn: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        plans: bool = True,
        rollback_fn: Callable[[int], None] | None = None,
    ) -> None:
        #: The controllers to try, in order (a `moved` reply may add one).
        self.endpoints = endpoint_list(endpoint)
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
        self._keys = curve_keys()
        self._clock = clock
        self._plans = bool(plans)
        self._rollback_fn = rollback_fn
        self._reported_at = -math.inf  # clock time of the last report

        #: 16 random bytes naming this client object; also its socket's ROUTING_ID.
        self.session = os.urandom(SESSION_BYTES)
        #: Counters: see `lrpilot.client.outbox.STATS` (sent, replies, ..., moved, failovers).
        self.stats = dict.fromkeys(STATS, 0)
        #: (code, message) of every notice logged, in order (adapters print new ones).
        self.notices: list[tuple[str, str]] = []

        self._box = Outbox(self.stats)
        self._decisions = Decisions(
            initial,
            _position(start_epoch, "start_epoch"),
            _position(start_step, "start_step"),
            self.world,
        )
        self._seq = 0
        self._good_names: set[str] = set()  # metric names already checked
        # A report's wire form, filled in as each is encoded: cheaper than a Report each.
        self._report_wire = Report(self.job, self.rank, self.session, 0, 0, {}, initial).to_wire()

        self._connected = False
        self._opened_at = 0.0  # when the current link was opened (a move or failover)
        self._down_since: float | None = None  # no connection since then (None: connected)
        self._moves = 0  # `moved` followed since the last answer
        self._next_turn = 0.0  # see _TURN_EVERY
        self._online = True
        self._warned: set[str] = set()
        self._noticed: set[tuple[int, str]] = set()  # (run, code) of the notices logged
        self._ever_heard = False
        self._closed = False

        self._endpoint = self.endpoints[0]
        self._sockets = Sockets()
        self._finalizer = weakref.finalize(self, shutdown, self._sockets)
        try:
            self._open(self.endpoints[0])
        except zmq.ZMQError as exc:
            self._finalizer()
            raise ValueError(
                f"cannot connect to endpoint {self.endpoints[0]!r} ({exc}); "
                "pass endpoint='tcp://HOST:PORT' or set LRPILOT_ENDPOINT"
            ) from None

        deadline = self._deadline()
        # With IMMEDIATE the socket is writable only once a connection exists. Each endpoint
        # gets its share of the timeout; the one that connects gets the rest.
        share = self.timeout / len(self.endpoints)
        for tried in range(len(self.endpoints)):
            until = deadline if tried == len(self.endpoints) - 1 else self._deadline(share)
            if self._link.sock.poll(self._ms(min(until, deadline)), zmq.POLLOUT):
                self._connected, self._down_since = True, None
                break
            if tried < len(self.endpoints) - 1:
                self._fail_over("did not accept a connection")
        if self._connected:
            self._await(lambda: self._box.hello_answered, deadline)
        else:
            self._go_offline(f"no connection within {self.timeout:g} s")
        if self.strict and not self._box.hello_answered:
            self._finalizer()
            self._closed = True
            raise ControllerUnavailable(
                f"strict=True: the lrpilot controller at {','.join(self.endpoints)} did not "
                f"answer within {self.timeout:g} s (is `lrpilot serve` running there? "
                "LRPILOT_ENDPOINT?)"
            )
        self._apply_due()

    # -- public ----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The controller this client talks to now (the last one, once closed)."""
        return self._endpoint

    @property
    def lr(self) -> float:
        """The latest LR in force; never blocks."""
        return self._decisions.lr

    @property
    def online(self) -> bool:
        """False after a timeout or a lost connection, until the controller is heard again."""
        return self._online

    @property
    def unanswered(self) -> int:
        """The number of reports kept because the controller has not answered them yet."""
        return len(self._box)

    @property
    def stop_requested(self) -> bool:
        """True once the controller sent `action: stop` (the adapters stop training)."""
        return self._decisions.stop_requested

    @property
    def last_action(self) -> str | None:
        """The last `snapshot` / `restore` action applied, for adapters that act on it."""
        return self._decisions.last_action

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
                10 ms later (100 ms while a schedule runs as a plan) at the next call that
                does socket work (or `poll()`, `flush()`, `close()`), and its decision is
                applied by a later call.
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
        decisions = self._decisions
        if self._closed:
            return decisions.lr
        self._seq = seq = self._seq + 1
        self._reported_at = self._clock()
        start = decisions.step if step is None else step
        lr = decisions.lr if trained_lr is None else _check_lr(trained_lr, "trained_lr")
        box = self._box
        if box.keep(Kept(seq, epoch, step, self._clean_metrics(metrics), lr, start)):
            self._warn_once(
                "dropped",
                "lrpilot keeps at most %d unanswered reports; dropping the oldest "
                "(counted in Client.stats['dropped'])",
                MAX_KEPT,
            )
        if wait and self._online and not box.retry_at:
            self._await(lambda: seq not in box.kept or box.retry_at > 0, self._deadline())
        else:
            self._turn(self._clock(), force=wait)
        if step is None:
            decisions.at(epoch=epoch + 1)
        else:
            decisions.at(epoch=epoch, step=step + 1)
        self._apply_due(synced=wait)
        return decisions.lr

    def poll(self, epoch: int | None = None, step: int | None = None) -> float:
        """Handles what the controller sent and sends what is queued, without blocking;
        returns the LR in force.

        Args:
            epoch: the epoch about to start: decisions due from it on are applied.
            step: the step about to start: decisions due from it on are applied.
                With neither, every decision received is applied at once.
        """
        self._decisions.at(
            epoch=None if epoch is None else _position(epoch, "epoch"),
            step=None if step is None else _position(step, "step"),
        )
        if not self._closed:
            self._turn(self._clock(), force=True)
        self._apply_due(everything=epoch is None and step is None)
        return self._decisions.lr

    @property
    def snapshot_every(self) -> int | None:
        """A guarded job's snapshot period: the trainer copies its state at every multiple
        of it (adapters do; see `AdapterCore`), else None."""
        return self._decisions.snapshot_every

    @property
    def plan(self) -> dict[str, Any] | None:
        """The plan in force (a schedule the client evaluates itself), or None."""
        return self._decisions.plan

    @property
    def momentum(self) -> float | None:
        """The momentum a plan with `cycle_momentum` sets at the current boundary (torch
        adapters write it to each group's `momentum`, or `betas[0]` for Adam), else None."""
        return self._decisions.momentum

    def liveness_due(self) -> bool:
        """With a plan and nothing to report: whether a report is due anyway (none for
        `LIVENESS_EVERY` seconds), so the controller sees the job alive at the LR it trains."""
        return self._clock() - self._reported_at >= LIVENESS_EVERY

    def lr_at(self, step: int | None = None, epoch: int | None = None) -> float:
        """The LR for the step (or epoch) about to run, with no message and no wait.

        With a plan in force (a schedule the controller sent as a function of time) the LR
        is the plan's value there, computed here: it goes on exactly while the controller is
        down. Replies and queued reports are looked at at most every 100 ms (a range test's
        sweep, or a guarded job: 10 ms), not at every call. Without a plan this is
        `poll(epoch=epoch, step=step)`.
        """
        decisions = self._decisions
        if decisions.plan is None:
            return self.poll(epoch=epoch, step=step)
        if step is not None and (type(step) is not int or not 0 <= step <= MAX_INT):
            step = _position(step, "step")
        if epoch is not None and (type(epoch) is not int or not 0 <= epoch <= MAX_INT):
            epoch = _position(epoch, "epoch")
        decisions.at(epoch=epoch, step=step)
        now = self._clock()
        if now >= self._next_turn and not self._closed:  # _turn's own check, inlined
            self._turn(now)
        if decisions.pending:
            self._apply_due()
        return decisions.lr

    def flush(self, timeout: float | None = None) -> bool:
        """Sends what is queued and waits until every kept report is answered: at most
        `timeout` seconds (default: the client's `timeout`), also while offline (the
        controller may come back meanwhile). For the end of a run, or a test.

        Returns:
            True if no report is left unanswered.
        """
        box = self._box
        if not self._closed and box.kept:
            seconds = self.timeout if timeout is None else timeout
            self._await(lambda: not box.kept, self._deadline(seconds), patient=True)
        return not box.kept

    def close(self) -> None:
        """Gives kept reports up to `timeout` to be answered if the controller is online,
        says bye and closes the socket; safe to call twice."""
        if self._closed:
            return
        box = self._box
        if box.kept and self._online:
            self.flush()
        if not self._ever_heard:
            logger.warning(
                "lrpilot: the controller at %s was never reached; job %s trained at its own "
                "learning rate (pass strict=True to fail instead)",
                ",".join(self.endpoints),
                self.job,
            )
        elif self.stats["dropped"]:
            logger.warning(
                "lrpilot dropped %d reports of job %s unanswered (more than %d were kept); "
                "%d more were unanswered at close",
                self.stats["dropped"],
                self.job,
                MAX_KEPT,
                len(box),
            )
        elif box.kept:
            logger.info("%d lrpilot reports were unanswered at close", len(box))
        if box.hello_sent:
            self._send(encode(Bye(self.job, self.rank, self.session).to_wire()))
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "online" if self._online else "offline"
        return f"<lrpilot Client job={self.job!r} rank={self.rank} lr={self.lr:g} {state}>"

    # -- the link: one endpoint at a time --------------------------------------------------

    @property
    def _link(self) -> Link:
        link = self._sockets.link
        assert link is not None, "the client is closed"
        return link

    def _open(self, endpoint: str) -> None:
        """A new socket to `endpoint`, replacing the current one (whose pipes are dropped:
        what was in flight there is sent again after a hello here)."""
        link = Link(self._sockets.ctx, endpoint, self.session, self._keys)
        old, self._sockets.link = self._sockets.link, link
        self._endpoint = endpoint
        if old is not None:
            old.close()
        now = self._clock()
        self._connected = False
        self._opened_at, self._down_since = now, now
        self._box.lost()

    def _fail_over(self, why: str) -> None:
        """The current endpoint is unreachable: try the next one of the list."""
        endpoints = self.endpoints
        current = endpoints.index(self.endpoint) if self.endpoint in endpoints else -1
        target = endpoints[(current + 1) % len(endpoints)]
        logger.info("lrpilot controller at %s %s; trying %s", self.endpoint, why, target)
        self.stats["failovers"] += 1
        self._open(target)

    def _follow(self, message: ErrorMessage) -> None:
        """`moved`: the job lives on the controller at `message.endpoint`."""
        target = message.endpoint
        box = self._box
        if box.retry_at:
            return  # backing off already: the answer to another message of the same try
        if target is None or target == self.endpoint or self._moves >= _MAX_MOVES:
            # Pointed back here, or controllers handing a shard over point at each other:
            # wait as after `unavailable`, then try again.
            self._moves = 0
            box.lost()  # hello again after the backoff: this controller took none
            box.hold(self._clock())
            return
        try:
            self._open(target)
        except zmq.ZMQError as exc:
            self._invalid(f"moved to an endpoint that does not connect: {target!r} ({exc})")
            return
        self._moves += 1
        self.stats["moved"] += 1
        if target not in self.endpoints:
            self.endpoints.append(target)
        logger.info("lrpilot: job %s is served by the controller at %s", self.job, target)

    # -- one turn: connection events, replies, the send queue ------------------------------

    def _turn(self, now: float, force: bool = False) -> None:
        """Everything that can be done without blocking, at most every _TURN_EVERY unless
        forced: replies, connection events, the send queue, the silence check, failover."""
        if not force:
            if now < self._next_turn:
                return
            self._next_turn = now + self._turn_every()
        box = self._box
        box.tick(now)
        # One poll for both sockets (a call into libzmq costs microseconds in a busy process).
        # Connection events come before sending: a lost connection rewinds the queue before
        # anything goes out on the next one, which libzmq opens RECONNECT_IVL later at best.
        link = self._link
        for sock, _ in zmq.zmq_poll(link.looked_at, 0):
            if self._sockets.link is not link:
                break  # replaced by a `moved` while draining: its events are stale
            if sock is link.monitor:
                self._watch(link)
            else:
                self._drain(link)
        if self._sockets.link is not link:
            return  # moved: the new link gets its turn next time
        if box.wants_to_send():
            if self._connected:
                self._flush(now, _FLUSH_BATCH)  # stops at a full send buffer: backpressure
            elif now - self._opened_at >= self.timeout:
                self._go_offline("is not connected")
        down = self._down_since
        if len(self.endpoints) > 1 and down is not None and now - down >= self.timeout:
            self._go_offline("is not connected")
            self._fail_over(f"had no connection for {self.timeout:g} s")
            return
        if box.silent_for(now) > self.timeout and self._online:
            self._timed_out()

    def _turn_every(self) -> float:
        """Seconds between the turns of calls that do not wait (see `_TURN_EVERY_PLAN`)."""
        decisions = self._decisions
        plan = decisions.plan
        if plan is None or plan["kind"] == "range_test" or decisions.snapshot_every is not None:
            return _TURN_EVERY
        return _TURN_EVERY_PLAN

    def _items(self) -> list[tuple[zmq.Socket[Any], int]]:
        link = self._link
        out = zmq.POLLOUT if self._box.wants_to_send() and self._connected else 0
        return [(link.sock, zmq.POLLIN | out), (link.monitor, zmq.POLLIN)]

    def _await(self, settled: Callable[[], bool], deadline: float, patient: bool = False) -> None:
        """Turns until `settled()`, the client goes offline, the controller asks for a retry
        or the deadline passes (then one timeout is counted and the client goes offline).
        `patient`: waits out retries and outages too, until the deadline."""
        box = self._box
        while True:
            self._turn(self._clock(), force=True)
            if settled():
                return
            if not patient and (box.retry_at or not self._online):
                return
            wake = deadline
            if box.retry_at:
                wake = min(wake, box.retry_at)
            if self._down_since is not None and len(self.endpoints) > 1:
                wake = min(wake, self._down_since + self.timeout)
            if (remaining := self._ms(wake)) <= 0 and wake >= deadline:
                break
            zmq.zmq_poll(self._items(), remaining)  # a reply, room to send, or the monitor
        if self._online and not box.retry_at:  # else the silence is no news
            self._timed_out()

    def _timed_out(self) -> None:
        """The controller did not answer within `timeout`: stop waiting for it (Lazy
        Pirate) and, with several endpoints, try the next one."""
        why = f"did not answer within {self.timeout:g} s"
        self.stats["timeouts"] += 1
        self._go_offline(why)
        if len(self.endpoints) > 1:
            self._fail_over(why)

    def _deadline(self, seconds: float | None = None) -> float:
        return self._clock() + (self.timeout if seconds is None else seconds)

    def _ms(self, deadline: float) -> int:
        """Milliseconds left until `deadline` (a clock value), rounded up; >= 0."""
        left = deadline - self._clock()
        return max(0, int(left * 1000) + 1) if left > 0 else 0

    # -- sending ---------------------------------------------------------------------------

    def _send(self, frame: bytes) -> bool:
        try:
            self._link.sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:  # zmq.Again: no connection (IMMEDIATE) or the HWM is full
            return False
        self.stats["sent"] += 1
        return True

    def _flush(self, now: float, budget: int) -> None:
        """Sends the hello if one is due, then up to `budget` queued reports, in order."""
        box = self._box
        if box.need_hello and not self._send_hello(now):
            return
        burst = box.burst(budget)
        for kept in burst:
            if not kept.frame:
                kept.frame = self._encode(kept)
        # Back to back: libzmq's I/O thread then wakes once for the burst, not once a report.
        sent = 0
        send, noblock = self._link.sock.send, zmq.NOBLOCK
        try:
            for kept in burst:
                send(kept.frame, noblock)
                sent += 1
        except zmq.ZMQError:  # zmq.Again: the send buffer is full, or the connection is gone
            if self._connected:
                self.stats["backpressure"] += 1
        self.stats["sent"] += sent
        box.went(sent, now)

    def _encode(self, kept: Kept) -> bytes:
        wire = self._report_wire
        wire["seq"], wire["epoch"], wire["step"] = kept.seq, kept.epoch, kept.step
        wire["metrics"], wire["lr"] = kept.metrics, kept.lr
        return encode(wire)

    def _send_hello(self, now: float) -> bool:
        """Hello from the oldest kept report (a replay starts there), else from where
        training is."""
        decisions = self._decisions
        start_epoch, start_step = self._box.hello_start(decisions.epoch, decisions.step)
        hello = Hello(
            job=self.job,
            rank=self.rank,
            world=self.world,
            session=self.session,
            lr=decisions.lr,
            start_epoch=start_epoch,
            start_step=start_step,
            framework=self.framework,
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            directions=self.directions,
            restore=self._restore_fn is not None,
            plans=self._plans,
        )
        if not self._send(encode(hello.to_wire())):
            return False
        self._box.hello_went(now, self._seq)
        self.stats["hellos"] += 1
        return True

    # -- receiving -------------------------------------------------------------------------

    def _watch(self, link: Link) -> None:
        """Connection events from the socket's monitor."""
        for _ in range(_MAX_DRAIN):
            try:
                frames = link.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            (event,) = struct.unpack_from("=H", frames[0])  # uint16 event, uint32 value
            if event == UP:
                self._connected, self._down_since = True, None
            elif event == RETRIED:
                self.stats["retries"] += 1
            elif event == DOWN:
                # What was in the pipe is gone: resend it after a hello on the next connection.
                self._connected = False
                self._down_since = self._clock()
                self._box.lost()
                self._go_offline("closed the connection")

    def _drain(self, link: Link) -> None:
        sock, noblock = link.sock, zmq.NOBLOCK
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
                found = decode(frame)
                decisions = self._decisions
                seq = echo_seq(found, self.job, decisions.run, decisions.version)
                if seq is not None:  # the common reply: it answers a report, nothing more
                    self._heard()
                    self._answered(seq)
                    continue
                message = parse_server_dict(found)
            except ProtocolError as exc:
                self._invalid(str(exc))
                continue
            if isinstance(message, LrMessage) and message.job != self.job:
                self._invalid(f"an lr message for job {message.job!r}, not {self.job!r}")
                continue
            self._handle(message)
            if self._sockets.link is not link:
                return  # moved: the rest of this socket's messages are stale

    def _heard(self) -> None:
        """The controller answered: it is there."""
        self._box.heard()
        self._ever_heard = True
        if not self._online:
            self._online = True
            logger.info("reconnected to the lrpilot controller at %s", self.endpoint)

    def _answered(self, seq: int | None) -> None:
        """An `lr` answered report `seq` (None: the hello, or a push) where the client sends."""
        self.stats["replies"] += 1
        self._moves = 0
        self._box.answered(seq)

    def _handle(self, message: ServerMessage) -> None:
        box = self._box
        self._heard()
        if isinstance(message, LrMessage):
            if message.notices:
                self._notice(message)
            self._answered(message.seq)
            self._decisions.accept(message)
            return
        self.stats["errors"] += 1
        if message.code == "moved":
            self._follow(message)
            return
        retryable = message.code in RETRYABLE_CODES
        outcome = box.on_error(message.code, message.seq, retryable, self._clock())
        if outcome == HOLD and message.seq is not None:
            self._warn_once(
                f"error:{message.code}",
                "the lrpilot controller cannot decide now (%s: %s); reports are kept and "
                "sent again",
                message.code,
                message.message,
            )
        elif outcome == REFUSED:
            self._refused(message)
        elif outcome == REPLAY:
            pass  # the hello and the replay go out at the next turn

    def _notice(self, message: LrMessage) -> None:
        """Controller notices: each code logged once per run, in this training process
        (`override` once per pin: each pin says its own LR and end)."""
        for code, text in message.notices:
            key = (message.run, code if code != "override" else f"{code}:{text}")
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
            self.lr,
        )

    def _apply_due(self, everything: bool = False, synced: bool = False) -> None:
        decisions = self._decisions
        for decision in decisions.due(everything, synced):
            # A restore puts the weights back before the LR changes; an outdated decision
            # (received before the one in force) changes no LR, but its action still happens.
            guard_unit = (decision.message.detail or {}).get("snapshot_unit")
            if decision.action == "snapshot" and self._snapshot_fn is not None:
                self._snapshot_fn()
            elif decision.action == "restore" and guard_unit is not None:
                # A guard's rollback: the trainer's own snapshot of that unit goes back.
                self.stats["rollbacks"] += 1
                if self._rollback_fn is not None:
                    self._rollback_fn(guard_unit)
                elif takes_unit(self._restore_fn):
                    assert self._restore_fn is not None
                    self._restore_fn(guard_unit)
                else:
                    self._warn_once(
                        "rollback",
                        "lrpilot: the guard of job %s rolls back to the snapshot of unit %d, "
                        "but this client has no restore_fn(unit) to call; training goes on "
                        "from the weights as they are, at the lowered LR",
                        self.job,
                        guard_unit,
                    )
            elif decision.action == "restore" and self._restore_fn is not None:
                self._restore_fn()
            decisions.settle(decision)

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
            self.lr,
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
