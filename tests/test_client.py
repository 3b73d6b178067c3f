"""The client against a scripted controller: a real ROUTER socket that answers, or misbehaves.

`ScriptedPeer` is also used by the Keras and torch adapter tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth
from conftest import Clock, Controller, run_cli

from lrpilot.client import Client
from lrpilot.client.core import MAX_KEPT
from lrpilot.client.env import curve_keys, default_endpoint, resolve_job, resolve_rank_world
from lrpilot.client.errors import ProtocolError
from lrpilot.client.protocol import (
    ClientMessage,
    ErrorMessage,
    Hello,
    LrMessage,
    Report,
    encode,
    parse_client_message,
)

SLACK = 0.5  # seconds allowed on top of a timeout for scheduling noise

Out = bytes | Mapping[str, Any] | list[bytes] | tuple[float, Any]
Handler = Callable[[bytes, ClientMessage], list[Out]]


class ScriptedPeer:
    """A controller stand-in on tcp://127.0.0.1:RANDOM, served by a thread.

    By default it answers like the controller: hello → the current LR from the start epoch;
    report → `decide(report)` (None: unchanged) from epoch+1 (step+1), seq echoed. Set
    `handler` to misbehave; it returns the frames to send back (a dict is msgpack-encoded,
    a list of bytes is one multipart message), `(delay, frame)` pairs are sent late.
    """

    def __init__(
        self, lr: float = 0.1, curve_secret: bytes | None = None, endpoint: str | None = None
    ) -> None:
        self.lr = lr
        self.version = 1
        self.run = 1
        self.job = "job-a"
        self.decide: Callable[[Report], float | None] = lambda report: None
        self.handler: Handler = self.answer
        self.messages: list[ClientMessage] = []
        self.identities: list[bytes] = []
        self._cond = threading.Condition()
        self._outbox: queue.Queue[tuple[bytes | None, Out]] = queue.Queue()
        self._later: list[tuple[float, bytes, Out]] = []
        self._stop = threading.Event()
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.sock: zmq.Socket[Any] = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        if curve_secret is not None:
            self.sock.curve_server = True
            self.sock.curve_secretkey = curve_secret
        if endpoint is None:
            endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            self.sock.bind(endpoint)
        self.endpoint = endpoint
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # -- what the controller would say -----------------------------------------------------

    def lr_message(
        self,
        seq: int | None = None,
        epoch: int | None = None,
        step: int | None = None,
        *,
        lr: float | None = None,
        version: int | None = None,
        run: int | None = None,
        reason: str = "unchanged",
        action: str | None = None,
    ) -> dict[str, Any]:
        return LrMessage(
            job=self.job,
            lr=self.lr if lr is None else lr,
            version=self.version if version is None else version,
            run=self.run if run is None else run,
            reason=reason,
            seq=seq,
            apply_from_epoch=epoch,
            apply_from_step=step,
            action=action,
        ).to_wire()

    def answer(self, identity: bytes, message: ClientMessage) -> list[Out]:
        if isinstance(message, Hello):
            return [self.lr_message(None, message.start_epoch, reason="initial")]
        if isinstance(message, Report):
            new = self.decide(message)
            reason = "unchanged"
            if new is not None and new != self.lr:
                self.lr, self.version, reason = new, self.version + 1, "plateau"
            if message.step is None:
                return [self.lr_message(message.seq, message.epoch + 1, reason=reason)]
            return [self.lr_message(message.seq, None, message.step + 1, reason=reason)]
        return []

    # -- test side -------------------------------------------------------------------------

    def push(self, frame: Out, identity: bytes | None = None) -> None:
        """Sends `frame` to `identity` (default: the last client heard from)."""
        self._outbox.put((identity, frame))

    def arrived(
        self, predicate: Callable[[list[ClientMessage]], bool], timeout: float = 10.0
    ) -> bool:
        """Waits until the messages received so far satisfy `predicate`; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def wait_for(
        self, predicate: Callable[[list[ClientMessage]], bool], timeout: float = 10.0
    ) -> list[ClientMessage]:
        assert self.arrived(predicate, timeout), self.messages
        with self._cond:
            return list(self.messages)

    def of_type(self, kind: type[Any]) -> list[Any]:
        with self._cond:
            return [m for m in self.messages if isinstance(m, kind)]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(5)
        self.sock.close(linger=0)
        self.ctx.term()

    # -- the thread ------------------------------------------------------------------------

    def _send(self, identity: bytes, frame: Out) -> None:
        if isinstance(frame, tuple):
            delay, late = frame
            self._later.append((time.monotonic() + delay, identity, late))
            return
        if isinstance(frame, list):
            parts = frame
        elif isinstance(frame, bytes):
            parts = [frame]
        else:
            parts = [encode(frame)]
        with contextlib.suppress(zmq.ZMQError):  # unroutable: the client is gone
            self.sock.send_multipart([identity, *parts], zmq.NOBLOCK)

    def _serve(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for item in [x for x in self._later if x[0] <= now]:
                self._later.remove(item)
                self._send(item[1], item[2])
            while not self._outbox.empty():
                identity, frame = self._outbox.get()
                target = identity or (self.identities[-1] if self.identities else None)
                if target is not None:
                    self._send(target, frame)
            if not self.sock.poll(5, zmq.POLLIN):
                continue
            identity, *frames = self.sock.recv_multipart()
            try:
                message = parse_client_message(frames[-1])
            except ProtocolError:
                continue
            with self._cond:
                self.messages.append(message)
                self.identities.append(identity)
                self._cond.notify_all()
            for out in self.handler(identity, message):
                self._send(identity, out)


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer()
    yield p
    p.close()


@pytest.fixture
def make_client() -> Iterator[Callable[..., Client]]:
    """make_client(endpoint, **kwargs) -> a Client with job-a, rank 0 of 1; closed afterwards."""
    clients: list[Client] = []

    def _make(endpoint: str, **kwargs: Any) -> Client:
        kwargs.setdefault("job", "job-a")
        kwargs.setdefault("rank", 0)
        kwargs.setdefault("world", 1)
        kwargs.setdefault("initial_lr", 0.1)
        kwargs.setdefault("timeout", 1.0)
        c = Client(endpoint, **kwargs)
        clients.append(c)
        return c

    yield _make
    for c in clients:
        c.close()


def free_endpoint() -> str:
    """An endpoint on which nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Retries a non-blocking check (e.g. `c.poll()`) until it holds, briefly pausing between."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        threading.Event().wait(0.005)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lrpilot.client" and r.levelno >= logging.WARNING
    ]


# -- the normal conversation ------------------------------------------------------------------


def test_hello_carries_who_and_where_and_its_reply_is_the_start_lr(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    peer.lr = 0.05  # e.g. a policy's initial_lr imposed at hello
    c = make_client(
        peer.endpoint, start_epoch=2, start_step=200, directions={"val_auc": "max"}, world=2
    )
    assert c.lr == 0.05
    (hello,) = peer.of_type(Hello)
    assert (hello.job, hello.rank, hello.world, hello.lr) == ("job-a", 0, 2, 0.1)
    assert (hello.start_epoch, hello.start_step, hello.framework) == (2, 200, "python")
    assert hello.session == c.session and len(c.session) == 16
    assert peer.identities[0] == c.session  # the socket's ROUTING_ID
    assert hello.directions == {"val_auc": "max"} and hello.pid > 0 and hello.host
    assert c.online and c.stats["hellos"] == 1
    assert make_client(peer.endpoint).session != c.session


def test_report_returns_the_lr_decided_for_the_next_epoch(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    peer.decide = lambda r: 0.05 if r.epoch == 1 else None
    c = make_client(peer.endpoint)
    assert c.report(0, {"val_loss": 0.9, "acc": 0.5}) == 0.1
    assert c.report(1, {"val_loss": 0.9}) == 0.05
    assert c.lr == 0.05
    assert c.report(2, {"val_loss": 0.8}) == 0.05
    reports = peer.of_type(Report)
    assert [(r.seq, r.epoch, r.lr) for r in reports] == [(1, 0, 0.1), (2, 1, 0.1), (3, 2, 0.05)]
    assert reports[0].metrics == {"val_loss": 0.9, "acc": 0.5} and reports[0].step is None
    assert c.stats["sent"] == 4 and c.stats["replies"] == 4 and c.stats["timeouts"] == 0


def test_metrics_that_are_not_scalars_or_bad_names_are_left_out(
    peer: ScriptedPeer, make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    c = make_client(peer.endpoint)
    c.report(0, {"loss": 1, "vec": [1.0, 2.0], "bad name": 1.0, "txt": "x", "nan": float("nan")})
    c.report(1, {"loss": 1, "vec": [1.0, 2.0]})
    first, second = peer.of_type(Report)
    assert set(first.metrics) == {"loss", "nan"} and set(second.metrics) == {"loss"}
    assert len(warnings_of(caplog)) == 3  # once per left-out metric


# -- silence, slowness, absence ------------------------------------------------------------


def test_silence_costs_one_timeout_then_the_client_stops_waiting(
    peer: ScriptedPeer, make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    c = make_client(peer.endpoint, timeout=0.3)
    peer.handler = lambda identity, message: []  # the controller hangs

    start = time.monotonic()
    assert c.report(0, {"loss": 1.0}) == 0.1
    assert 0.25 <= time.monotonic() - start < 0.3 + SLACK
    assert not c.online and c.stats["timeouts"] == 1

    start = time.monotonic()
    for epoch in range(1, 6):  # Lazy Pirate: sent, not waited for
        assert c.report(epoch, {"loss": 1.0}) == 0.1
    assert time.monotonic() - start < 0.2
    peer.wait_for(lambda ms: len([m for m in ms if isinstance(m, Report)]) == 6)
    assert len(warnings_of(caplog)) == 1

    # The controller answers again: the client is back online and waits for replies again.
    peer.decide = lambda r: 0.02
    peer.handler = peer.answer
    caplog.set_level(logging.INFO, logger="lrpilot.client")
    c.report(6, {"loss": 1.0})
    until(lambda: c.poll() is not None and c.online)
    assert any("reconnected" in r.getMessage() for r in caplog.records)
    assert c.lr == 0.02
    assert c.report(7, {"loss": 1.0}) == 0.02
    assert c.stats["timeouts"] == 1 and len(warnings_of(caplog)) == 1


def test_a_slow_reply_is_applied_once_it_arrives(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint, timeout=0.2)
    peer.decide = lambda r: 0.01

    def slow(identity: bytes, message: ClientMessage) -> list[Out]:
        return [(0.5, frame) for frame in peer.answer(identity, message)]

    peer.handler = slow
    start = time.monotonic()
    assert c.report(0, {"loss": 1.0}) == 0.1  # not decided within the timeout
    assert time.monotonic() - start < 0.2 + SLACK
    until(lambda: c.poll(epoch=1) == 0.01)  # the late decision for epoch 1 still applies
    assert c.online


def test_an_absent_controller_costs_at_most_one_timeout(
    make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    start = time.monotonic()
    c = make_client(free_endpoint(), timeout=1.0)
    lrs = [c.report(epoch, {"val_loss": 1.0 / (epoch + 1)}) for epoch in range(50)]
    lrs += [c.poll(epoch=50), c.poll()]
    c.close()
    assert time.monotonic() - start < 5.0
    assert set(lrs) == {0.1} and c.lr == 0.1
    _outage, summary = warnings_of(caplog)  # one for the outage, one summary line at close
    assert "never reached" in summary and "strict=True" in summary
    assert c.stats["hellos"] == 0 and c.stats["timeouts"] == 0


def test_strict_refuses_to_train_without_the_controller(make_client: Callable[..., Client]) -> None:
    from lrpilot.client import ControllerUnavailable

    start = time.monotonic()
    with pytest.raises(ControllerUnavailable, match=r"did not answer within 0\.3 s"):
        make_client(free_endpoint(), timeout=0.3, strict=True)
    assert time.monotonic() - start < 3.0


def test_notices_are_logged_once_per_code_in_the_training_process(
    controller_factory: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    c = controller_factory(PLATEAU)  # monitors val_loss
    with Client(c.bind, job="no-val", initial_lr=0.1, rank=0, world=1, strict=True) as client:
        for epoch in range(4):  # a fit without validation data reports only `loss`
            client.report(epoch, {"loss": 1.0})
    notices = [r.getMessage() for r in caplog.records if "(monitor_missing)" in r.getMessage()]
    assert len(notices) == 1 and "val_loss" in notices[0]
    assert client.notices == [("monitor_missing", client.notices[0][1])]


def test_a_controller_started_later_gets_a_hello_before_the_first_report(
    make_client: Callable[..., Client],
) -> None:
    endpoint = free_endpoint()
    c = make_client(endpoint, timeout=0.2)
    assert not c.online
    late = ScriptedPeer(lr=0.1, endpoint=endpoint)  # the controller comes up
    try:
        late.decide = lambda r: 0.03
        epoch = 0
        deadline = time.monotonic() + 10
        while not late.arrived(lambda ms: bool(ms), timeout=0.05):
            assert time.monotonic() < deadline
            c.report(epoch, {"loss": 1.0})
            epoch += 1
        hello, report = late.wait_for(lambda ms: len(ms) >= 2)[:2]
        assert isinstance(hello, Hello) and isinstance(report, Report)
        assert hello.start_epoch == report.epoch  # it starts where training is
        until(lambda: c.poll(epoch=epoch) == 0.03)
    finally:
        late.close()


# -- what a broken or restarted controller sends ---------------------------------------------


def _lr_with(**changes: Any) -> dict[str, Any]:
    """A valid `lr` push with some fields broken."""
    good = LrMessage("job-a", 0.5, version=9, run=1, reason="plateau", apply_from_epoch=1)
    return {**good.to_wire(), **changes}


GARBAGE: list[Out] = [
    b"\xc1 not msgpack",
    msgpack.packb([1, 2, 3]),
    {"t": "lr"},
    {"t": "hello", "v": 1},
    {"t": 7},
    _lr_with(lr="fast"),
    _lr_with(lr=1e9),
    _lr_with(job="other"),
    _lr_with(apply_from_step=3),  # both boundaries
    _lr_with(reason="vibes"),
    {"t": "error", "code": "no-such-code", "message": "", "seq": 1},
    [b"two", b"frames"],
    b"\x00" * 70_000,
]


def test_garbage_is_counted_and_ignored_never_raised(
    peer: ScriptedPeer, make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    c = make_client(peer.endpoint, timeout=0.5)
    peer.decide = lambda r: 0.04
    peer.handler = lambda identity, message: [*GARBAGE, *peer.answer(identity, message)]
    assert c.report(0, {"loss": 1.0}) == 0.04  # the valid reply behind the garbage counts
    assert c.stats["timeouts"] == 0  # it ended the wait, not the timeout
    assert c.stats["invalid"] == len(GARBAGE)
    assert c.online and len(warnings_of(caplog)) == 1

    peer.handler = lambda identity, message: GARBAGE  # nothing but garbage
    assert c.report(1, {"loss": 1.0}) == 0.04
    until(lambda: c.poll(epoch=2) == 0.04 and c.stats["invalid"] == 2 * len(GARBAGE))
    assert not c.online and c.stats["timeouts"] == 1


def test_unknown_session_makes_the_client_say_hello_and_resend_the_report(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint)
    c.report(0, {"loss": 1.0})
    forgotten = {"yes": True}
    peer.decide = lambda r: 0.07

    def restarted(identity: bytes, message: ClientMessage) -> list[Out]:
        if isinstance(message, Report) and forgotten.pop("yes", False):
            return [ErrorMessage("unknown_session", "who?", message.seq).to_wire()]
        return peer.answer(identity, message)

    peer.handler = restarted
    assert c.report(1, {"loss": 0.5}) == 0.07
    kinds = [(type(m).__name__, getattr(m, "seq", None)) for m in peer.messages]
    assert kinds == [("Hello", None), ("Report", 1), ("Report", 2), ("Hello", None), ("Report", 2)]
    rehello = peer.of_type(Hello)[1]
    assert rehello.start_epoch == 1 and rehello.session == c.session
    assert peer.of_type(Report)[1] == peer.of_type(Report)[2]  # resent as it was
    assert c.stats["hellos"] == 2 and c.stats["errors"] == 1 and c.online


def test_unknown_session_is_answered_once_per_report(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint, timeout=0.5)

    def amnesiac(identity: bytes, message: ClientMessage) -> list[Out]:
        if isinstance(message, Report):
            return [ErrorMessage("unknown_session", "who?", message.seq).to_wire()]
        return peer.answer(identity, message)

    peer.handler = amnesiac
    assert c.report(0, {"loss": 1.0}) == 0.1
    assert c.stats["timeouts"] == 0  # the second refusal answers the report: no wait
    assert len(peer.wait_for(lambda ms: len(ms) == 4)) == 4  # hello, report, hello, report


def test_other_errors_keep_the_lr_and_warn_once_per_code(
    peer: ScriptedPeer, make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    c = make_client(peer.endpoint)
    peer.handler = lambda identity, message: [
        ErrorMessage("mode_unresolved", "which way is up?", getattr(message, "seq", None)).to_wire()
    ]
    for epoch in range(3):
        assert c.report(epoch, {"score": 1.0}) == 0.1
    assert c.stats["timeouts"] == 0  # an error is an answer: nothing waits for the timeout
    assert c.stats["errors"] == 3 and c.online
    assert len([w for w in warnings_of(caplog) if "mode_unresolved" in w]) == 1


# -- the send queue: bursts, backpressure, nothing lost ----------------------------------------

STEP_POLICY = (
    "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 1000, unit: step}\n"
)


def client_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lrpilot.client"]


def test_a_tight_loop_of_step_reports_all_reach_the_controller(
    controller_factory: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lrpilot.client")
    c = controller_factory(STEP_POLICY)
    client = Client(c.bind, job="tight", initial_lr=0.1, rank=0, world=1, timeout=5.0)
    try:
        for step in range(5000):  # far faster than the controller decides
            client.report(0, {"loss": 1.0 / (step + 1)}, step=step, wait=False)
        assert client.flush(timeout=60)
        assert client.unanswered == 0 and client.stats["dropped"] == 0
        assert client.stats["replies"] >= 5001  # the hello's, and one per report
        assert c.metric("lrpilot_reports_total", training_job="tight") == 5000
        assert client.poll() == pytest.approx(0.1 * 0.5**5)  # decided at step 4999, for 5000
    finally:
        client.close()
    assert client_records(caplog) == []  # no offline / online flapping, nothing to report


def _lr_reply(seq: int | None, step: int | None) -> bytes:
    epoch = 0 if step is None else None
    message = LrMessage("job-a", 0.1, 1, 1, "unchanged", seq, epoch, step)
    return encode(message.to_wire())


def test_a_full_send_buffer_is_backpressure_and_the_reports_wait_in_order(
    make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lrpilot.client")
    ctx: zmq.Context[Any] = zmq.Context()
    stuck = ctx.socket(zmq.ROUTER)  # a controller that stops reading: stuck, not gone
    stuck.linger = 0
    stuck.rcvhwm = 1
    stuck.rcvbuf = 4096
    endpoint = f"tcp://127.0.0.1:{stuck.bind_to_random_port('tcp://127.0.0.1')}"
    try:

        def answer_the_hello() -> None:
            if stuck.poll(10_000):
                identity, _ = stuck.recv_multipart()
                stuck.send_multipart([identity, _lr_reply(None, None)])

        hello = threading.Thread(target=answer_the_hello)
        hello.start()
        c = make_client(endpoint, timeout=60)
        hello.join(10)
        assert c.online
        metrics = {f"m{i:03}": float(i) for i in range(200)}  # about 2.8 kB a report
        n = 6000
        for step in range(n):
            c.report(0, metrics, step=step, wait=False)
        c.poll()
        assert c.stats["backpressure"] > 0  # the buffers are full: reports wait in the queue
        assert c.online and c.stats["dropped"] == 0 and c.unanswered == n
        assert client_records(caplog) == []  # a full buffer is no outage

        seqs: list[int] = []
        deadline = time.monotonic() + 60
        while len(seqs) < n and time.monotonic() < deadline:  # read again, answer each report
            c.poll()  # the client sends what waited as room frees up
            while stuck.poll(10):
                identity, frame = stuck.recv_multipart()
                report = parse_client_message(frame)
                assert isinstance(report, Report)
                seqs.append(report.seq)
                stuck.send_multipart([identity, _lr_reply(report.seq, report.step)])
        assert seqs == list(range(1, n + 1))  # every report once, in order
        assert c.flush(timeout=10)
        assert c.stats["resent"] == 0 and client_records(caplog) == []
    finally:
        stuck.close(linger=0)
        ctx.term()


def test_beyond_max_kept_the_oldest_are_dropped_and_a_reconnect_replays_the_rest(
    make_client: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    silent = ScriptedPeer()  # says hello, then never answers a report
    silent.handler = lambda identity, m: [] if isinstance(m, Report) else silent.answer(identity, m)
    endpoint = silent.endpoint
    try:
        c = make_client(endpoint, timeout=60)
        extra, last = 50, MAX_KEPT + 50 - 1
        for step in range(MAX_KEPT + extra):
            c.report(0, {"loss": 1.0}, step=step, wait=False)
        assert c.stats["dropped"] == extra and c.unanswered == MAX_KEPT
        assert len([w for w in warnings_of(caplog) if "dropping the oldest" in w]) == 1
        sent_all = lambda ms: isinstance(ms[-1], Report) and ms[-1].step == last  # noqa: E731
        until(lambda: c.poll() > 0 and silent.arrived(sent_all, timeout=0.01))
    finally:
        silent.close()  # the controller goes away...
    until(lambda: c.poll() > 0 and not c.online)
    again = ScriptedPeer(endpoint=endpoint)  # ... and comes back
    try:
        assert c.flush(timeout=30)  # waits for the reconnection and the answers
        hello, *reports = again.messages
        assert isinstance(hello, Hello) and (hello.start_epoch, hello.start_step) == (0, extra)
        assert [r.step for r in reports] == list(range(extra, MAX_KEPT + extra))  # in order
        assert c.stats["resent"] == MAX_KEPT and c.stats["hellos"] == 2
        assert c.stats["dropped"] == extra and c.online
    finally:
        again.close()


def test_unavailable_keeps_reports_and_resends_them_after_1_then_2_seconds(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    clock = Clock()  # the client's timers run on it: the backoff is driven, not slept
    c = make_client(peer.endpoint, clock=clock)
    arrivals: list[int] = []
    refusals = [3]  # the disk is full for three deliveries

    def full_disk(identity: bytes, message: ClientMessage) -> list[Out]:
        if isinstance(message, Report):
            arrivals.append(message.seq)
            if refusals[0] > 0:
                refusals[0] -= 1
                return [ErrorMessage("unavailable", "disk full", message.seq).to_wire()]
        return peer.answer(identity, message)

    def held_for(seconds: float) -> None:
        """Nothing goes out until `seconds` have passed on the clock, then everything."""
        sent = c.stats["sent"]
        clock.t += seconds - 0.001
        c.poll()
        assert c.stats["sent"] == sent  # still held (a send is counted when it is made)
        clock.t += 0.001
        c.poll()
        assert c.stats["sent"] > sent

    peer.handler = full_disk
    peer.decide = lambda r: 0.05 if r.epoch == 1 else None
    assert c.report(0, {"loss": 1.0}) == 0.1  # answered `unavailable`: no wait for a timeout
    assert c.report(1, {"loss": 0.9}) == 0.1  # held back behind report 1 until the retry
    assert c.unanswered == 2 and c.online and arrivals == [1]
    held_for(1.0)
    until(lambda: c.poll() is not None and c.stats["errors"] == 3)  # 1 and 2 refused again
    held_for(2.0)
    until(lambda: c.poll() is not None and c.unanswered == 0)
    assert arrivals == [1, 1, 2, 1, 2]  # always in order
    assert c.poll(epoch=2) == 0.05
    assert c.stats["errors"] == 3 and c.stats["resent"] == 3 and c.stats["timeouts"] == 0


def test_unknown_session_replays_every_kept_report_from_the_oldest_once(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint)
    state = {"restarted": False, "forgotten": False}

    def restarts_at_report_3(identity: bytes, message: ClientMessage) -> list[Out]:
        if isinstance(message, Hello):
            state["forgotten"] = False
        elif isinstance(message, Report):
            if message.seq == 3 and not state["restarted"]:
                state["restarted"] = state["forgotten"] = True
            if state["forgotten"]:
                return [ErrorMessage("unknown_session", "who?", message.seq).to_wire()]
        return peer.answer(identity, message)

    peer.handler = restarts_at_report_3
    for step in range(5):
        c.report(0, {"loss": 1.0}, step=10 + step, wait=False)
    assert c.flush(timeout=5)
    kinds = [(type(m).__name__, getattr(m, "seq", None)) for m in peer.messages]
    # Reports 4 and 5 may or may not have gone out before the refusal of 3 came back (sends
    # are bunched); either way the hello is followed by 3, 4, 5, each exactly once more.
    second = kinds.index(("Hello", None), 1)
    assert kinds[:4] == [("Hello", None), ("Report", 1), ("Report", 2), ("Report", 3)]
    assert kinds[4:second] in ([], [("Report", 4)], [("Report", 4), ("Report", 5)])
    assert kinds[second + 1 :] == [("Report", 3), ("Report", 4), ("Report", 5)]
    assert peer.of_type(Hello)[1].start_step == 12  # from report 3, the oldest kept
    assert c.stats["hellos"] == 2 and c.stats["resent"] == 1 + (second - 4) and c.online


PLATEAU = (
    "version: 1\ndefaults:\n"
    "  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.0}\n"
)
LOSSES = [1.0, 0.9, 0.95, 0.97, 0.8, 0.85, 0.9, 0.7, 0.75, 0.8]


def _lr_changes(c: Controller, job: str) -> list[tuple[int, float, str]]:
    out = run_cli("history", job, "--json", "--admin", c.admin)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    return [(r["epoch"], r["new_lr"], r["reason"]) for r in rows if r["reason"] != "initial"]


def test_reports_made_while_the_controller_was_down_are_decided_after_its_restart(
    controller_factory: Callable[..., Controller], caplog: pytest.LogCaptureFixture
) -> None:
    c = controller_factory(PLATEAU)
    kept = Client(c.bind, job="kept", initial_lr=0.1, rank=0, world=1, timeout=1.0)
    reference: Client | None = None
    try:
        for epoch in range(4):
            kept.report(epoch, {"val_loss": LOSSES[epoch]})
        c.kill()  # kill -9
        for epoch in range(4, 7):  # training goes on; these reports wait in the client
            assert kept.report(epoch, {"val_loss": LOSSES[epoch]}) == kept.lr
        assert kept.unanswered == 3 and not kept.online
        restarted = controller_factory(PLATEAU, "--bind", c.bind, state_dir=c.state_dir)
        assert kept.flush(timeout=30)  # reconnects, says hello, resends them in order
        for epoch in range(7, 10):
            kept.report(epoch, {"val_loss": LOSSES[epoch]})
        reference = Client(restarted.bind, job="reference", initial_lr=0.1, rank=0, world=1)
        for epoch in range(10):
            reference.report(epoch, {"val_loss": LOSSES[epoch]})
        changes = _lr_changes(restarted, "kept")
        assert len(changes) >= 2 and changes == _lr_changes(restarted, "reference")
        assert kept.poll(epoch=10) == reference.poll(epoch=10)
        assert restarted.metric("lrpilot_epoch", training_job="kept") == 9
    finally:
        kept.close()
        if reference is not None:
            reference.close()
    assert len(warnings_of(caplog)) == 1  # one outage, one warning


# -- decisions, versions, boundaries ------------------------------------------------------------


def test_a_push_applies_at_its_epoch_boundary(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint)
    override = peer.lr_message(None, 3, lr=0.02, version=2, reason="override")
    # The push travels ahead of the reply on the same connection, so it has arrived by then.
    peer.handler = lambda identity, message: [override, *peer.answer(identity, message)]
    assert c.report(1, {"loss": 1.0}) == 0.1
    assert c.lr == 0.1
    assert c.poll(epoch=2) == 0.1
    assert c.poll(epoch=3) == 0.02 and c.lr == 0.02


def test_a_step_push_applies_at_its_step_and_poll_without_a_boundary_applies_all(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint)
    first = peer.lr_message(None, None, 10, lr=0.03, version=2, reason="schedule")
    second = peer.lr_message(None, None, 20, lr=0.01, version=3, reason="schedule")
    peer.handler = lambda identity, message: [first, second, *peer.answer(identity, message)]
    assert c.report(0, {"loss": 1.0}, step=4, wait=True) == 0.1
    assert c.poll(step=9) == 0.1
    assert c.poll(step=10) == 0.03
    assert c.poll() == 0.01  # no boundary given: everything received applies


def test_an_older_version_is_ignored_and_a_new_run_is_not(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    peer.version = 5
    c = make_client(peer.endpoint)
    stale = peer.lr_message(None, 0, lr=0.9, version=4, reason="plateau")
    again = peer.lr_message(None, 0, lr=0.8, version=5, reason="plateau")
    peer.handler = lambda identity, message: [stale, again, *peer.answer(identity, message)]
    assert c.report(0, {"loss": 1.0}) == 0.1
    assert c.poll(epoch=5) == 0.1
    # The controller started a new run (e.g. its state was forgotten): versions restart.
    peer.handler = lambda identity, message: [
        peer.lr_message(getattr(message, "seq", None), 6, lr=0.6, version=1, run=2)
    ]
    assert c.report(5, {"loss": 1.0}) == 0.6


def test_a_newer_decision_replaces_pending_ones_at_or_after_its_boundary(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint)
    later = peer.lr_message(None, 5, lr=0.5, version=2, reason="plateau")
    sooner = peer.lr_message(None, 3, lr=0.3, version=3, reason="override")
    peer.handler = lambda identity, message: [later, sooner, *peer.answer(identity, message)]
    c.report(0, {"loss": 1.0})
    assert c.poll(epoch=3) == 0.3
    assert c.poll(epoch=6) == 0.3  # the older decision for epoch 5 is outdated


def test_actions_stop_and_snapshot(peer: ScriptedPeer, make_client: Callable[..., Client]) -> None:
    c = make_client(peer.endpoint)
    peer.handler = lambda identity, message: [
        peer.lr_message(None, 1, lr=0.2, version=2, reason="range_test", action="snapshot"),
        peer.lr_message(1, 1, lr=0.2, version=3, reason="plateau", action="stop"),
    ]
    assert not c.stop_requested and c.last_action is None
    c.report(0, {"loss": 1.0})
    assert c.stop_requested and c.last_action == "snapshot"


# -- closing and exiting ---------------------------------------------------------------------


def test_close_is_fast_and_idempotent_even_with_the_peer_gone(
    peer: ScriptedPeer, make_client: Callable[..., Client]
) -> None:
    c = make_client(peer.endpoint, timeout=0.2)
    c.report(0, {"loss": 1.0})
    peer.close()
    for epoch in range(1, 20):
        c.report(epoch, {"loss": 1.0})  # queued for a peer that is gone
    start = time.monotonic()
    c.close()
    c.close()
    assert time.monotonic() - start < 1.0
    assert c.report(20, {"loss": 1.0}) == c.lr and c.poll() == c.lr  # closed: no socket use


def test_close_says_bye(peer: ScriptedPeer) -> None:
    with Client(peer.endpoint, job="job-a", initial_lr=0.1, rank=0, world=1) as c:
        c.report(0, {"loss": 1.0})
    bye = peer.wait_for(lambda ms: type(ms[-1]).__name__ == "Bye")[-1]
    assert bye.session == c.session  # type: ignore[union-attr]


SCRIPT = """
import sys
from lrpilot.client import Client
c = Client(sys.argv[1], job="exit-test", initial_lr=0.1, timeout=0.5)
for epoch in range(5):
    c.report(epoch, {"loss": 1.0})
print("done", flush=True)
"""


@pytest.mark.parametrize("listening", [False, True], ids=["absent", "silent"])
def test_a_process_with_an_unclosed_client_exits_promptly(listening: bool) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts connections, never answers
    silent.linger = 0
    try:
        if listening:
            endpoint = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
        else:
            endpoint = free_endpoint()
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, endpoint],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "done"
        assert time.monotonic() - start < 10
        assert out.stderr.count("lrpilot controller at") == 1  # one warning for the outage
    finally:
        silent.close(linger=0)
        ctx.term()


def test_the_client_package_imports_neither_frameworks_nor_zmq_until_asked() -> None:
    # The adapters import their framework (the torch scheduler subclasses torch's); the core
    # and the package never do.
    code = (
        "import sys, lrpilot.client, lrpilot.client.protocol\n"
        "assert 'zmq' not in sys.modules, 'zmq'\n"
        "from lrpilot.client import Client\n"
        "import lrpilot.client.env\n"
        "bad = {'keras', 'tensorflow', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr


# -- arguments and the environment --------------------------------------------------------------


def test_bad_arguments_raise_at_construction_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LRPILOT_JOB", raising=False)
    with pytest.raises(ValueError, match=r"job=.*LRPILOT_JOB"):
        Client("tcp://127.0.0.1:1", initial_lr=0.1)
    with pytest.raises(ValueError, match="job"):
        Client("tcp://127.0.0.1:1", job="has spaces", initial_lr=0.1)
    with pytest.raises(ValueError, match="initial_lr"):
        Client("tcp://127.0.0.1:1", job="j", initial_lr=0.0)
    with pytest.raises(ValueError, match="timeout"):
        Client("tcp://127.0.0.1:1", job="j", timeout=0)
    with pytest.raises(ValueError, match="endpoint"):
        Client("nonsense", job="j", initial_lr=0.1)
    with pytest.raises(ValueError, match="directions"):
        Client("tcp://127.0.0.1:1", job="j", directions={"acc": "up"})


def test_job_and_endpoint_come_from_the_environment(
    peer: ScriptedPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LRPILOT_ENDPOINT", peer.endpoint)
    monkeypatch.setenv("LRPILOT_JOB", "job-a")
    for var in ("TF_CONFIG", "RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    with Client(initial_lr=0.1) as c:
        assert (c.endpoint, c.job, c.rank, c.world) == (peer.endpoint, "job-a", 0, 1)
        assert c.online
    assert default_endpoint({}) == "tcp://127.0.0.1:5555"
    assert resolve_job(None, {"LRPILOT_JOB": "x"}) == "x" and resolve_job("y", {}) == "y"


def _tf_config(kind: str, index: int, chiefs: int = 1, workers: int = 3) -> dict[str, str]:
    import json

    cluster = {"chief": ["c:1"] * chiefs, "worker": ["w:1"] * workers, "ps": ["p:1"]}
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}})}


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, (0, 1)),
        (_tf_config("chief", 0), (0, 4)),
        (_tf_config("worker", 0), (1, 4)),
        (_tf_config("worker", 2), (3, 4)),
        (_tf_config("worker", 2, chiefs=0), (2, 3)),
        ({"TF_CONFIG": "{}", "RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),
        ({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (3, 8)),
        ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4"}, (2, 4)),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6"}, (5, 6)),
        ({"RANK": "1"}, (0, 1)),  # half a pair is not a launcher
    ],
)
def test_rank_and_world_from_launchers(environ: dict[str, str], expected: tuple[int, int]) -> None:
    assert resolve_rank_world(environ=environ) == expected


def test_rank_and_world_arguments_win_and_are_checked() -> None:
    assert resolve_rank_world(2, 4, environ={"RANK": "0", "WORLD_SIZE": "1"}) == (2, 4)
    assert resolve_rank_world(None, 4, environ={}) == (0, 4)
    with pytest.raises(ValueError, match="rank"):
        resolve_rank_world(3, 2, environ={})
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        resolve_rank_world(environ={"RANK": "0", "WORLD_SIZE": "many"})
    with pytest.raises(ValueError, match="TF_CONFIG"):
        resolve_rank_world(environ={"TF_CONFIG": "{not json"})
    with pytest.raises(ValueError, match="does not train"):
        resolve_rank_world(environ=_tf_config("ps", 0))


def test_curve_keys_need_both_files(tmp_path: Path) -> None:
    assert curve_keys({}) is None
    with pytest.raises(ValueError, match="LRPILOT_CURVE_SECRET_KEY"):
        curve_keys({"LRPILOT_CURVE_SERVER_KEY": str(tmp_path / "server.key")})
    with pytest.raises(ValueError, match="certificate"):
        curve_keys(
            {
                "LRPILOT_CURVE_SERVER_KEY": str(tmp_path / "missing.key"),
                "LRPILOT_CURVE_SECRET_KEY": str(tmp_path / "missing.key_secret"),
            }
        )


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_encrypted_conversation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, server_secret = zmq.auth.load_certificate(
        zmq.auth.create_certificates(tmp_path, "server")[1]
    )
    _, client_secret_file = zmq.auth.create_certificates(tmp_path, "client")
    monkeypatch.setenv("LRPILOT_CURVE_SERVER_KEY", str(tmp_path / "server.key"))
    monkeypatch.setenv("LRPILOT_CURVE_SECRET_KEY", str(client_secret_file))
    assert server_secret is not None
    secure = ScriptedPeer(lr=0.2, curve_secret=server_secret)
    try:
        with Client(secure.endpoint, job="job-a", initial_lr=0.1, rank=0, world=1) as c:
            assert c.lr == 0.2 and c.online
        monkeypatch.delenv("LRPILOT_CURVE_SERVER_KEY")
        monkeypatch.delenv("LRPILOT_CURVE_SECRET_KEY")
        with Client(secure.endpoint, job="job-a", initial_lr=0.1, timeout=0.3) as plain:
            assert plain.lr == 0.1 and not plain.online  # no keys, no conversation
    finally:
        secure.close()


# -- a scripted LR range test (used by the adapters' tests) -----------------------------


def range_test_handler(
    peer: ScriptedPeer, stop_after: int, suggested: float, *, steps_only: bool = False
) -> Any:
    """Answers like a controller running a per-step range test: the hello reply starts it
    (`action: snapshot`, LR 1e-4), every report raises the LR by 10**0.25 from the next step,
    and the report of step `stop_after` ends it (`action: restore` with `suggested`).
    `steps_only`: every report must carry a step (a per-step adapter)."""
    version = iter(range(2, 10_000))

    def handler(identity: bytes, message: Any) -> list[Any]:
        if isinstance(message, Hello):
            return [
                peer.lr_message(
                    None, None, message.start_step, lr=1e-4, version=next(version),
                    reason="range_test", action="snapshot",
                )
            ]  # fmt: skip
        if isinstance(message, Report):
            assert not steps_only or message.step is not None
            step = message.step if message.step is not None else message.epoch
            done = step >= stop_after
            lr = suggested if done else 1e-4 * 10 ** ((step + 1) / 4)
            if message.step is None:
                where: dict[str, Any] = {"epoch": message.epoch + 1}
            else:
                where = {"step": message.step + 1}
            return [
                peer.lr_message(
                    message.seq, lr=lr, version=next(version), reason="range_test",
                    action="restore" if step == stop_after else None, **where,
                )
            ]  # fmt: skip
        return []

    return handler
