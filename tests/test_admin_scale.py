"""`lrpilot status` and `lrpilot history` at scale: replies far beyond the 64 KiB wire limit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import zmq
from conftest import Controller, run_cli

from lrpilot.client.protocol import Hello, LrMessage, Report, encode, parse_server_message

Factory = Callable[..., Controller]


def _drive(endpoint: str, messages: list[tuple[bytes, bytes]], window: int = 200) -> int:
    """Send (session, frame) pairs, one DEALER per session, at most `window` unanswered;
    a socket closes once its session has nothing more to send and is answered. Returns
    the number of `lr` answers (every message must be answered)."""
    ctx = zmq.Context()
    remaining: dict[bytes, int] = {}
    for session, _ in messages:
        remaining[session] = remaining.get(session, 0) + 1
    socks: dict[bytes, zmq.Socket[bytes]] = {}
    poller = zmq.Poller()
    lrs = unanswered = 0

    def collect(timeout_ms: int) -> None:
        nonlocal lrs, unanswered
        events = poller.poll(timeout_ms)
        assert events, "the controller stopped answering"
        for sock, _ in events:
            lrs += isinstance(parse_server_message(sock.recv()), LrMessage)
            unanswered -= 1
            session = sock.getsockopt(zmq.ROUTING_ID)
            remaining[session] -= 1
            if remaining[session] == 0:
                poller.unregister(sock)
                sock.close(linger=0)
                del socks[session]

    try:
        for session, frame in messages:
            sock = socks.get(session)
            if sock is None:
                sock = socks[session] = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.ROUTING_ID, session)
                sock.connect(endpoint)
                poller.register(sock, zmq.POLLIN)
            sock.send(frame)
            unanswered += 1
            while unanswered >= window:
                collect(10_000)
        while unanswered:
            collect(10_000)
    finally:
        for sock in socks.values():
            sock.close(linger=0)
        ctx.term()
    return lrs


def test_status_lists_5000_jobs(controller_factory: Factory) -> None:
    c = controller_factory(None, "--max-jobs", "6000")
    sessions = [os.urandom(16) for _ in range(5000)]
    hellos = [
        (s, encode(Hello(f"scale-{i:05d}", 0, 1, s, 0.1, 0).to_wire()))
        for i, s in enumerate(sessions)
    ]
    assert _drive(c.bind, hellos) == 5000
    out = run_cli("status", "--json", "--admin", c.admin)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert sorted(r["job"] for r in rows) == [f"scale-{i:05d}" for i in range(5000)]
    assert c.metric("lrpilot_jobs") == 5000
    table = run_cli("status", "--admin", c.admin)
    assert table.returncode == 0 and len(table.stdout.splitlines()) == 5001  # header + rows


def test_history_returns_every_change_of_a_long_run(controller_factory: Factory) -> None:
    # A formula of `lr` is decided per report (a schedule would be one plan, one audit row).
    policy = "version: 1\ndefaults:\n  policy: {type: formula, lr: 'lr * 0.9999'}\n"
    c = controller_factory(policy)
    s = os.urandom(16)
    n = 3000  # every epoch changes the LR: 3000 audit rows, three times 0.1's cap of 1000
    messages = [(s, encode(Hello("long-run", 0, 1, s, 0.1, 0).to_wire()))]
    messages += [
        (s, encode(Report("long-run", 0, s, e + 1, e, {"loss": 1.0}, 0.1).to_wire()))
        for e in range(n)
    ]
    assert _drive(c.bind, messages, window=1) == n + 1
    out = run_cli("history", "long-run", "--json", "--admin", c.admin)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == n + 1 and rows[0]["reason"] == "initial"
    assert [r["epoch"] for r in rows[1:]] == list(range(1, n + 1))
    assert all(r["reason"] == "schedule" for r in rows[1:])
