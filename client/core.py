"""The lrpilot client: reports metrics, gets the learning rate back, never breaks training.

One `Client` per training process (per rank). It speaks wire protocol v1 over a ZeroMQ
DEALER socket of its own and follows the Lazy Pirate pattern: it waits at most `timeout`
for an answer, and after one timeout stops waiting until the controller is heard from again.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import socket
import time
import weakref
from collections.abc import Mapping
from typing import Any

import zmq

from .env import curve_keys, default_endpoint, resolve_job, resolve_rank_world
from .errors import ProtocolError
from .protocol import (
    MAX_INT,
    MAX_METRICS,
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

__all__ = ["Client", "scalar_metrics", "to_scalar"]

logger = logging.getLogger("lrpilot.client")

_STATS = ("sent", "replies", "timeouts", "invalid", "errors", "hellos")

# Messages handled per drain: a peer that floods cannot hold the training loop.
_MAX_DRAIN = 1024

_SOCKET_OPTIONS = (
    (zmq.IMMEDIATE, 1),  # queue only on live connections: no connection -> zmq.Again at once
    (zmq.SNDHWM, 16),
    (zmq.LINGER, 0),  # never hold up close() or the process exit
    (zmq.MAXMSGSIZE, SOCKET_MAX_MSG_SIZE),
    (zmq.RECONNECT_IVL, 100),
    (zmq.RECONNECT_IVL_MAX, 2000),
    (zmq.HEARTBEAT_IVL, 5000),
    (zmq.HEARTBEAT_TIMEOUT, 15000),
    (zmq.HEARTBEAT_TTL, 15000),
)


def to_scalar(value: Any) -> float | None:
    """A number, numpy scalar or 0-d tensor as a float; None for anything else.

    Duck-typed so that the client needs neither numpy nor a framework: anything with an
    empty `shape` (or none) that `float()` accepts is a scalar. Booleans are not metrics.
    """
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


def _shutdown(ctx: zmq.Context[Any], sock: zmq.Socket[Any]) -> None:
    # Runs from close(), from garbage collection or at interpreter exit; never references the
    # Client itself, so an unclosed client is still collected and never holds up the exit.
    try:
        sock.close(linger=0)
        ctx.term()
    except zmq.ZMQError:  # pragma: no cover - nothing left to do about it
        pass


class Client:
    """Reports a training job's metrics to the lrpilot controller and returns the LR to use.

    Never raises into the training loop for a network problem: with the controller absent,
    slow, restarted or sending garbage, training continues with the last known LR, one
    warning is logged (logger `lrpilot.client`) per outage, and the client reconnects by
    itself. Not thread-safe: use a client from the training thread only.

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

    Raises:
        ValueError: for bad arguments, with what to change (at construction only).

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
    ) -> None:
        self.endpoint = endpoint or default_endpoint()
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
        #: Counters: messages sent, lr replies, timeouts, invalid frames, errors, hellos sent.
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
        self._unacked: Report | None = None  # the last report not answered yet
        self._rehello_seq = -1  # self._seq at the last hello sent for unknown_session
        self._hello_sent = False
        self._online = True
        self._warned: set[str] = set()
        self._closed = False

        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock: zmq.Socket[Any] = self._ctx.socket(zmq.DEALER)
        self._finalizer = weakref.finalize(self, _shutdown, self._ctx, self._sock)
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
        if self._sock.poll(_ms(deadline), zmq.POLLOUT) and self._send_hello(
            self._epoch, self._step
        ):
            self._await(None, deadline)
        else:
            self._go_offline(f"no connection within {self.timeout:g} s")
        self._apply_due()

    # -- public ----------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The latest LR in force; never blocks."""
        return self._lr

    @property
    def online(self) -> bool:
        """False after a timeout or failed send, until the controller is heard from again."""
        return self._online

    def report(
        self,
        epoch: int,
        metrics: Mapping[str, Any],
        step: int | None = None,
        wait: bool = True,
    ) -> float:
        """Reports a finished epoch (or step) and returns the LR to use from the next one.

        Waits at most `timeout` for the controller's decision, and not at all while offline
        or with `wait=False`. A report with a `step` is a mid-epoch report (`unit: step`
        policies): it returns the LR for step `step + 1` and leaves the epoch boundary alone.

        Args:
            epoch: the 0-based epoch just finished (Keras' `on_epoch_end(epoch)`).
            metrics: `{name: number}`; numpy scalars and 0-d tensors are fine, other values
                and names the protocol refuses are left out (with one warning each).
            step: the 0-based optimizer step just finished, for step-unit policies.
            wait: False sends without waiting; the decision is applied by a later call.

        Returns:
            The LR in force from epoch `epoch + 1` (or step `step + 1`).
        """
        epoch = _position(epoch, "epoch")
        step = None if step is None else _position(step, "step")
        if self._closed:
            return self._lr
        self._seq += 1
        report = Report(
            job=self.job,
            rank=self.rank,
            session=self.session,
            seq=self._seq,
            epoch=epoch,
            metrics=self._clean_metrics(metrics),
            lr=self._lr,
            step=step,
        )
        self._unacked = report
        if not self._hello_sent:  # the controller was absent at construction
            self._send_hello(epoch, self._step if step is None else step)
        if not (self._hello_sent and self._send(report.to_wire())):
            self._go_offline("is not connected")
            self._drain()
        elif self._online and wait:
            self._await(report.seq, time.monotonic() + self.timeout)
        else:
            self._drain()
        if step is None:
            self._epoch = epoch + 1
        else:
            self._epoch, self._step = epoch, step + 1
        self._apply_due()
        return self._lr

    def poll(self, epoch: int | None = None, step: int | None = None) -> float:
        """Handles what the controller pushed, without blocking; returns the LR in force.

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
            self._drain()
        self._apply_due(everything=epoch is None and step is None)
        return self._lr

    def close(self) -> None:
        """Says bye to the controller and closes the socket at once; safe to call twice."""
        if self._closed:
            return
        if self._hello_sent:
            self._send(Bye(self.job, self.rank, self.session).to_wire())
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "online" if self._online else "offline"
        return f"<lrpilot Client job={self.job!r} rank={self.rank} lr={self._lr:g} {state}>"

    # -- sending ---------------------------------------------------------------------------

    def _send(self, message: Mapping[str, Any]) -> bool:
        if self._closed:
            return False
        try:
            self._sock.send(encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:  # zmq.Again: no connection (IMMEDIATE) or the HWM is full
            return False
        self.stats["sent"] += 1
        return True

    def _send_hello(self, start_epoch: int, start_step: int) -> bool:
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
        )
        if not self._send(hello.to_wire()):
            return False
        self._hello_sent = True
        self.stats["hellos"] += 1
        return True

    # -- receiving -------------------------------------------------------------------------

    def _await(self, seq: int | None, deadline: float) -> bool:
        """Handles messages until the answer to `seq` (None: to the hello) or the deadline."""
        while (remaining := _ms(deadline)) > 0:
            if not self._sock.poll(remaining, zmq.POLLIN):
                continue
            received = self._recv_one()
            if received is None:
                continue
            message, final = received
            if message is not None and final and message.seq == seq:
                return True
        self.stats["timeouts"] += 1
        self._go_offline(f"did not answer within {self.timeout:g} s")
        return False

    def _drain(self) -> None:
        for _ in range(_MAX_DRAIN):
            if self._recv_one() is None:
                return

    def _recv_one(self) -> tuple[ServerMessage | None, bool] | None:
        """One message off the socket: None if there is none, (None, False) if invalid,
        else (message, whether it is the final answer to its seq)."""
        try:
            frames = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.ZMQError:
            return None
        if len(frames) != 1:
            self._invalid(f"a message of {len(frames)} frames, not 1")
            return None, False
        try:
            message = parse_server_message(frames[0])
        except ProtocolError as exc:
            self._invalid(str(exc))
            return None, False
        if isinstance(message, LrMessage) and message.job != self.job:
            self._invalid(f"an lr message for job {message.job!r}, not {self.job!r}")
            return None, False
        return message, self._handle(message)

    def _handle(self, message: ServerMessage) -> bool:
        if not self._online:
            self._online = True
            logger.info("reconnected to the lrpilot controller at %s", self.endpoint)
        if isinstance(message, ErrorMessage):
            self.stats["errors"] += 1
            if message.code == "unknown_session":
                return not self._rehello(message.seq)
            self._warn_once(
                f"error:{message.code}",
                "the lrpilot controller refused a message (%s: %s); keeping learning rate %g",
                message.code,
                message.message,
                self._lr,
            )
        else:
            self.stats["replies"] += 1
            self._accept(message)
        if self._unacked is not None and message.seq == self._unacked.seq:
            self._unacked = None
        return True

    def _rehello(self, seq: int | None) -> bool:
        """The controller forgot this session (it restarted): says hello again, from the epoch
        of the last unanswered report, and resends that report (same seq, so the controller
        deduplicates). Once per report sent. True if the report answered by `seq` was resent."""
        if self._rehello_seq == self._seq:
            return False
        self._rehello_seq = self._seq
        report = self._unacked
        if report is None:
            self._send_hello(self._epoch, self._step)
            return False
        start_step = self._step if report.step is None else report.step
        if not (self._send_hello(report.epoch, start_step) and self._send(report.to_wire())):
            return False
        return seq == report.seq

    def _accept(self, message: LrMessage) -> None:
        if message.run == self._run and message.version <= self._version:
            return  # an older or repeated decision
        if message.run != self._run:
            self._pending.clear()  # decisions of another run are void
        self._run, self._version = message.run, message.version
        self._received += 1
        self._pending.append((self._received, message))

    def _apply_due(self, everything: bool = False) -> None:
        due = [(n, d) for n, d in self._pending if everything or self._is_due(d)]
        if not due:
            return
        applied = {n for n, _ in due}
        self._pending = [(n, d) for n, d in self._pending if n not in applied]
        for n, decision in due:
            # A decision received before the one in force is outdated: it changes no LR
            # (e.g. a plateau step for epoch 5 after an override for epoch 3), but its
            # action still happens.
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
        for name, value in metrics.items():
            number = to_scalar(value)
            try:
                check_name(name, "metric name")
            except ProtocolError as exc:
                self._warn_once(f"metric:{name!r}", "lrpilot does not report %s", exc.message)
                continue
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
