"""lrpilot at scale (issue 8): every figure next to a baseline measured in the same run.

    .venv/bin/python bench/scale.py              # full run, < 10 min on 2 cores; appends a dated
                                                 # section to bench/RESULTS.md
    .venv/bin/python bench/scale.py --quick      # smoke run with small counts; prints only
    .venv/bin/python bench/scale.py --ref HEAD --label "before the daemon-core rework"
                                                 # the controller and CLI of `git archive REF`

The client hot path (`Client.report` in step mode, the Keras per-batch cost) is measured by
bench/client_hot_path.py, not here. Clients are raw DEALER sockets speaking the wire protocol of
`lrpilot.client.protocol` (ROUTING_ID = session, 16 random bytes), all driven by this one
process through one zmq.Poller, so the server under test (controller or echo) and the driver
each have one core of this 2-core machine.

1. Throughput: N = 8 / 64 / 512 DEALER sockets, each its own single-worker job (world=1, so
   every report is decided at once), each with exactly one request in flight (hello; then
   report, wait for its reply, next report). Figure: completed reports/s through
   `lrpilot serve`. Baseline: the same driver against a raw pyzmq ROUTER in its own process
   that unpacks each msgpack frame and packs an `lr`-shaped reply. Ratio = serve / echo.
2. Paced latency: (a) 100 jobs x 10 ranks, one socket per rank (world=10: the controller
   aggregates the ten reports of an epoch, then answers every rank) at one epoch per second,
   the jobs spread evenly over the second; (b) 1000 single-worker jobs, one socket each, at 10
   reports/s each. A socket never has two reports in flight: when a reply is late the next
   report leaves as soon as it arrives. Figure: report -> reply p50/p99 as each rank sees it
   (from its own send) and the completed rate. Baseline: the same pattern against the echo.
3. One client at scale: one more job reports back to back (one in flight) while 10k idle jobs
   are present (each created by hello + one report from its own short-lived socket); then the
   same while another process scrapes /metrics in a loop. Baseline: the same two with 100
   jobs present.
4. /metrics scrape wall time and size at 10k and 50k jobs (serve --max-jobs 60000).
   Baseline: the same scrape at 100 jobs.
5. Controller RSS (VmRSS of the `serve` process) at 10k and 50k jobs. Baseline: the same
   controller before its first job.
6. Restart: SIGTERM (its duration and exit code are shown too), start again on the same state
   dir, time from process start to the `lrpilot ready` line; the restored count is read from
   `lrpilot_jobs`. Baseline: the same with an empty state dir (median of 3).
7. `lrpilot status --json` at 10k (50k) jobs and `lrpilot history JOB --json` of a job with
   many LR changes (operator `set_lr` overrides sent to the admin socket): wall time of the real
   CLI subprocess, Python start-up included. Baseline: the same commands at 100 jobs / 10
   changes. A non-zero exit is recorded as "fails" with its message.

The 50k stage runs only when the time left in --budget allows it (projected from the 10k
stage); otherwise it is skipped and RESULTS.md says so. Every loop is bounded by a count and a
deadline. --quick uses 500 / 1500 jobs and ~1.5 s windows, and writes RESULTS.md only when
--results is given.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgpack
import zmq
from measured import git

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
POLICY = (
    "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 3, min_lr: 1.0e-6}\n"
)
LRPILOT = [sys.executable, "-m", "lrpilot.controller.cli"]
SESSION_BYTES = 16
MAX_SOCKETS = 8192
now = time.perf_counter


# -- processes of our own: the echo and the scraper (spawned, so no zmq state is forked) -------


def echo_server(ports: Any) -> None:
    """A raw ROUTER that answers each msgpack frame with an `lr`-shaped reply: the baseline."""
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1000)
    ports.put(sock.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        if not sock.poll(1000):
            continue
        for _ in range(1000):
            try:
                ident, frame = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = msgpack.unpackb(frame, raw=False)
            report = msg.get("t") == "report"
            reply = {
                "t": "lr",
                "job": msg.get("job"),
                "lr": 0.1,
                "version": 1,
                "run": 1,
                "seq": msg.get("seq") if report else None,
                "apply_from_epoch": msg["epoch"] + 1 if report else msg.get("start_epoch", 0),
                "apply_from_step": None,
                "reason": "unchanged",
            }
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart([ident, msgpack.packb(reply, use_bin_type=True)], zmq.NOBLOCK)


def scrape_loop(url: str, stop: Any, started: Any, out: Any, seconds: float) -> None:
    """GET /metrics back to back until told to stop (or `seconds` pass); puts (s, bytes) pairs."""
    import urllib.request

    started.set()
    scrapes = []
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end and len(scrapes) < 10_000:
        t0 = now()
        with urllib.request.urlopen(url, timeout=300) as resp:
            size = len(resp.read())
        scrapes.append((now() - t0, size))
    out.put(scrapes)


@contextlib.contextmanager
def echo_process() -> Iterator[str]:
    """The echo server in its own (spawned) process; yields its endpoint."""
    spawn = mp.get_context("spawn")
    ports = spawn.Queue()
    proc = spawn.Process(target=echo_server, args=(ports,), daemon=True)
    proc.start()
    try:
        yield f"tcp://127.0.0.1:{ports.get(timeout=30)}"
    finally:
        proc.terminate()
        proc.join(10)


# -- measurement helpers -------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, -(-len(s) * q // 100) - 1))]


def fmt_s(seconds: float) -> str:
    if seconds != seconds:  # NaN: nothing measured
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}" if b and a == a and b == b else "-"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def loss(epoch: int) -> float:
    """A validation loss that plateaus every few epochs: mostly `unchanged`, some reductions."""
    return 1.0 + (epoch % 7) * 0.01


def context() -> zmq.Context[Any]:
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
    return ctx


class Peer:
    """One client socket: a rank of a job, its session, at most one report in flight."""

    __slots__ = (
        "busy",
        "due",
        "epoch",
        "index",
        "job",
        "lr",
        "rank",
        "sent",
        "seq",
        "sock",
        "tmpl",
        "world",
    )

    def __init__(
        self, ctx: zmq.Context[Any], endpoint: str, job: str, rank: int = 0, world: int = 1
    ) -> None:
        from lrpilot.client.protocol import Report

        session = os.urandom(SESSION_BYTES)
        self.job, self.rank, self.world = job, rank, world
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, session)
        self.sock.connect(endpoint)
        self.seq = self.epoch = self.index = 0
        self.lr, self.sent, self.due, self.busy = 0.1, 0.0, 0.0, False
        # The wire dict of a Report, reused: only seq, epoch, metrics and lr change per send.
        self.tmpl = Report(job, rank, session, 0, 0, {"val_loss": 1.0}, 0.1).to_wire()

    def send_hello(self) -> None:
        from lrpilot.client.protocol import Hello, encode

        h = Hello(self.job, self.rank, self.world, self.tmpl["session"], self.lr, self.epoch)
        self.sock.send(encode(h.to_wire()))
        self.sent, self.busy = now(), True

    def send_report(self) -> None:
        from lrpilot.client.protocol import encode

        self.seq += 1
        t = self.tmpl
        t["seq"], t["epoch"], t["lr"] = self.seq, self.epoch, self.lr
        t["metrics"] = {"val_loss": loss(self.epoch)}
        self.sock.send(encode(t))
        self.epoch += 1
        self.sent, self.busy = now(), True

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass
class Run:
    """What a driver loop saw: completed replies in the window, their latencies, the errors."""

    done: int = 0
    seconds: float = 0.0
    lat: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    stalled: int = 0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def p(self, q: float) -> float:
        return pct(self.lat, q) if self.lat else float("nan")

    def problems(self) -> str:
        parts = [f"{n} x {code}" for code, n in sorted(self.errors.items())]
        if self.stalled:
            parts.append(f"{self.stalled} reports unanswered after > 1 s")
        return ", ".join(parts)


def say_hello(peers: Sequence[Peer], timeout: float = 60.0) -> Counter[str]:
    """Every peer sends hello; waits (bounded) for every answer. Returns the error codes seen."""
    from lrpilot.client.errors import ProtocolError
    from lrpilot.client.protocol import LrMessage, parse_server_message

    errors: Counter[str] = Counter()
    poller = zmq.Poller()
    by = {p.sock: p for p in peers}
    for p in peers:
        poller.register(p.sock, zmq.POLLIN)
        p.send_hello()
    end = now() + timeout
    waiting = len(peers)
    while waiting and now() < end:
        for sock, _ in poller.poll(100):
            p = by[sock]
            try:
                msg = parse_server_message(sock.recv())
            except ProtocolError as exc:
                errors[f"invalid reply ({exc.code})"] += 1
            else:
                if isinstance(msg, LrMessage):
                    p.lr = msg.lr
                else:
                    errors[msg.code] += 1
            if p.busy:
                p.busy = False
                waiting -= 1
    if waiting:
        errors["hello unanswered"] += waiting
    return errors


def _answer(p: Peer, frame: bytes, run: Run, counting: bool, t: float) -> bool:
    """Account one frame; True when it answers the peer's report in flight (not a push)."""
    from lrpilot.client.protocol import decode

    msg = decode(frame)
    if not p.busy or msg.get("seq") != p.seq:
        return False  # a push, or a late duplicate
    p.busy = False
    if msg["t"] == "lr":
        p.lr = msg["lr"] or p.lr
    else:
        run.errors[str(msg.get("code"))] += 1
    if counting:
        run.done += 1
        run.lat.append(t - p.sent)
    return True


def closed_loop(peers: Sequence[Peer], warmup: float, window: float, max_reports: int) -> Run:
    """Each peer: report, wait for its reply, report again; counts replies inside the window."""
    run = Run()
    poller = zmq.Poller()
    by = {p.sock: p for p in peers}
    for p in peers:
        poller.register(p.sock, zmq.POLLIN)
    for p in peers:
        p.send_report()
    start = now() + warmup
    end = start + window
    t = now()
    while t < end and run.done < max_reports:
        for sock, _ in poller.poll(100):
            p = by[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                t = now()
                if _answer(p, frame, run, t >= start, t):
                    p.send_report()
        t = now()
    run.seconds = min(t, end) - start
    run.stalled = sum(1 for p in peers if p.busy and t - p.sent > 1.0)
    return run


def paced(
    peers: Sequence[Peer],
    period: float,
    offset: Callable[[int], float],
    warmup: float,
    window: float,
    grace: float = 5.0,
) -> Run:
    """Each peer reports every `period` s from offset(i), never two reports in flight.

    Reports sent inside the window are counted; after it, nothing new is sent and the loop
    waits (at most `grace` s) for their replies, so slow answers are not cut off.
    """
    run = Run()
    poller = zmq.Poller()
    by = {p.sock: p for p in peers}
    t0 = now()
    heap: list[tuple[float, int]] = []
    for i, p in enumerate(peers):
        poller.register(p.sock, zmq.POLLIN)
        p.index, p.due = i, t0 + offset(i)
        heap.append((p.due, i))
    heapq.heapify(heap)
    start = t0 + warmup
    end = start + window
    counted = 0  # reports sent inside the window, still unanswered

    def send(p: Peer, t: float) -> None:
        nonlocal counted
        p.send_report()
        counted += start <= p.sent < end
        p.due = max(p.due + period, t)  # behind schedule: the next one waits for this reply only

    t = now()
    while t < end or (counted and t < end + grace):
        timeout = 100 if not heap else min(100, max(0, math.ceil((heap[0][0] - t) * 1000)))
        for sock, _ in poller.poll(timeout):
            p = by[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                t = now()
                in_window = start <= p.sent < end
                if _answer(p, frame, run, in_window, t):
                    counted -= in_window
                    if t >= end:
                        continue
                    if p.due <= t:
                        send(p, t)
                    else:
                        heapq.heappush(heap, (p.due, p.index))
        t = now()
        while heap and heap[0][0] <= t and t < end:
            send(peers[heapq.heappop(heap)[1]], t)
    run.seconds = window
    run.stalled = counted
    return run


def populate(ctx: zmq.Context[Any], endpoint: str, names: Sequence[str], deadline: float) -> Run:
    """Create jobs: for each name a short-lived socket says hello and reports epoch 0.

    Up to 200 jobs are in creation at once. Run.done counts jobs created; Run.seconds the time.
    """
    from lrpilot.client.protocol import decode

    run = Run()
    poller = zmq.Poller()
    active: dict[Any, Peer] = {}
    todo = iter(names)
    t0 = now()
    exhausted = False

    def finish(p: Peer) -> None:
        poller.unregister(p.sock)
        del active[p.sock]
        p.close()

    while (active or not exhausted) and now() < deadline:
        while not exhausted and len(active) < 200:
            name = next(todo, None)
            if name is None:
                exhausted = True
                break
            p = Peer(ctx, endpoint, name)
            active[p.sock] = p
            poller.register(p.sock, zmq.POLLIN)
            p.send_hello()
        for sock, _ in poller.poll(100):
            p = active[sock]
            msg = decode(sock.recv())
            if msg.get("t") != "lr":
                run.errors[str(msg.get("code"))] += 1
                finish(p)
            elif p.seq == 0:
                p.lr = msg["lr"]
                p.send_report()
            else:
                run.done += 1
                finish(p)
        t = now()
        for p in [p for p in active.values() if t - p.sent > 10.0]:
            run.errors["timeout"] += 1
            finish(p)
    for p in list(active.values()):
        run.errors["not finished by the deadline"] += 1
        finish(p)
    run.seconds = now() - t0
    return run


def one_client(ctx: zmq.Context[Any], endpoint: str, job: str, window: float, n: int) -> Run:
    """One job reporting back to back (one in flight) for `window` s or `n` reports."""
    p = Peer(ctx, endpoint, job)
    try:
        errors = say_hello([p])
        run = closed_loop([p], 0.2, window, n)
        run.errors.update(errors)
        return run
    finally:
        p.close()


def scrape(url: str) -> tuple[float, int, float | None]:
    """One GET /metrics: seconds, bytes and the value of lrpilot_jobs (None if absent)."""
    import urllib.request

    t0 = now()
    with urllib.request.urlopen(url, timeout=300) as resp:
        body = resp.read()
    seconds = now() - t0
    m = re.search(rb"^lrpilot_jobs (\S+)$", body, re.M)
    return seconds, len(body), float(m.group(1)) if m else None


def during_scrapes(
    ctx: zmq.Context[Any], c: Any, job: str, window: float, n: int
) -> tuple[Run, list[tuple[float, int]]]:
    """`one_client` while another process scrapes /metrics back to back."""
    spawn = mp.get_context("spawn")
    stop, started, out = spawn.Event(), spawn.Event(), spawn.Queue()
    proc = spawn.Process(target=scrape_loop, args=(c.metrics, stop, started, out, window + 600))
    proc.start()
    try:
        started.wait(30)
        time.sleep(0.05)  # the first GET is on its way
        run = one_client(ctx, c.bind, job, window, n)
        stop.set()
        scrapes: list[tuple[float, int]] = out.get(timeout=600)
    finally:
        stop.set()
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
    return run, scrapes


@dataclass
class Cli:
    """One run of the real `lrpilot` CLI."""

    seconds: float
    code: int
    out: str
    err: str

    def result(self, what: Callable[[str], str]) -> str:
        if self.code != 0:
            first = (self.err.strip().splitlines() or ["(no message)"])[-1][:120]
            return f"fails (exit {self.code}: {first})"
        return f"{fmt_s(self.seconds)} ({what(self.out)})"


def cli(*args: str, timeout: float = 300) -> Cli:
    t0 = now()
    try:
        r = subprocess.run([*LRPILOT, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Cli(now() - t0, -1, "", f"no answer within {timeout:g} s")
    return Cli(now() - t0, r.returncode, r.stdout, r.stderr)


def json_len(text: str) -> str:
    import json

    return f"{len(json.loads(text))} rows, {len(text) / 1e6:.2f} MB"


def set_lr_changes(admin: str, job: str, n: int, deadline: float) -> Run:
    """`n` operator overrides of `job` through the admin socket (50 in flight): LR changes."""
    run = Run()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(admin)
    sent = 0
    t0 = now()
    try:
        while run.done + sum(run.errors.values()) < n and now() < deadline:
            while sent < n and sent - run.done - sum(run.errors.values()) < 50:
                lr = 0.01 if sent % 2 else 0.02  # alternating: every override is a change
                sock.send(msgpack.packb({"t": "set_lr", "job": job, "lr": lr, "reason": "bench"}))
                sent += 1
            if sock.poll(1000):
                reply = msgpack.unpackb(sock.recv(), raw=False)
                if reply.get("t") == "ok":
                    run.done += 1
                else:
                    run.errors[str(reply.get("code"))] += 1
    finally:
        sock.close(linger=0)
        ctx.term()
    run.seconds = now() - t0
    return run


# -- the figures ---------------------------------------------------------------------------------


@dataclass
class Settings:
    quick: bool
    budget: float
    started: float = field(default_factory=time.monotonic)

    @property
    def warmup(self) -> float:
        return 0.3 if self.quick else 1.0

    @property
    def window(self) -> float:
        return 1.5 if self.quick else 6.0

    @property
    def paced_window(self) -> float:
        return 2.0 if self.quick else 12.0

    @property
    def big(self) -> int:
        return 500 if self.quick else 10_000

    @property
    def huge(self) -> int:
        return 1500 if self.quick else 50_000

    @property
    def changes(self) -> int:
        return 100 if self.quick else 2000

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)


Row = tuple[str, str, str, str, str]  # figure, value, baseline, ratio, goal


class Bench:
    """Runs the figures in order; keeps the rows for the table and the notes."""

    def __init__(self, s: Settings, tmp: Path) -> None:
        from conftest import Controller

        self.s, self.tmp = s, tmp
        self.Controller = Controller
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.policy = tmp / "policy.yaml"
        self.policy.write_text(POLICY)
        self.ctx = context()
        self.n_controllers = 0

    def row(self, *cells: str) -> None:
        assert len(cells) == 5
        self.rows.append(cells)  # type: ignore[arg-type]
        print(f"  {cells[0]}: {cells[1]}   baseline: {cells[2]}   ratio: {cells[3]}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    @contextlib.contextmanager
    def controller(self, *extra: str) -> Iterator[Any]:
        self.n_controllers += 1
        state = self.tmp / f"state-{self.n_controllers}"
        c = self.Controller(state, self.policy, *extra).start(timeout=60)
        try:
            yield c
        finally:
            c.stop(30)

    def peers(self, endpoint: str, jobs: int, world: int = 1, prefix: str = "job") -> list[Peer]:
        tag = os.urandom(3).hex()
        return [
            Peer(self.ctx, endpoint, f"{prefix}-{tag}-{j}", rank, world)
            for j in range(jobs)
            for rank in range(world)
        ]

    def _drive(self, endpoint: str, jobs: int, world: int, how: Callable[[list[Peer]], Run]) -> Run:
        peers = self.peers(endpoint, jobs, world)
        try:
            errors = say_hello(peers)
            run = how(peers)
            run.errors.update({f"hello: {k}": v for k, v in errors.items()})
            return run
        finally:
            for p in peers:
                p.close()

    def check(self, what: str, run: Run) -> None:
        if run.problems():
            self.note(f"{what}: {run.problems()}")

    # 1 ------------------------------------------------------------------------------------------
    def throughput(self, echo: str) -> None:
        print("1. reports/s, one request in flight per socket, each socket its own job", flush=True)
        s = self.s
        for n in (8, 64, 512):

            def loop(peers: list[Peer]) -> Run:
                return closed_loop(peers, s.warmup, s.window, 2_000_000)

            base = self._drive(echo, n, 1, loop)
            self.check(f"echo, {n} sockets", base)
            with self.controller() as c:
                run = self._drive(c.bind, n, 1, loop)
            self.check(f"serve, {n} sockets", run)
            self.row(
                f"reports/s, {n} sockets (1 in flight each)",
                f"{run.rate:,.0f}/s (p50 {fmt_s(run.p(50))}, p99 {fmt_s(run.p(99))})",
                f"echo {base.rate:,.0f}/s (p50 {fmt_s(base.p(50))}, p99 {fmt_s(base.p(99))})",
                ratio(run.rate, base.rate),
                ">= 0.5",
            )

    # 2 ------------------------------------------------------------------------------------------
    def paced_latency(self, echo: str) -> None:
        print("2. report -> reply latency at a paced load", flush=True)
        s = self.s
        cases = [
            ("100 jobs x 10 ranks, 1 epoch/s", 100, 10, 1.0, "< 5 ms"),
            ("1000 jobs x 1 rank, 10 reports/s", 1000, 1, 0.1, "< 20 ms"),
        ]
        for label, jobs, world, period, goal in cases:

            def loop(peers: list[Peer], jobs: int = jobs, world: int = world, p: float = period):
                return paced(peers, p, lambda i: (i // world) * p / jobs, s.warmup, s.paced_window)

            base = self._drive(echo, jobs, world, loop)
            self.check(f"echo, {label}", base)
            with self.controller() as c:
                run = self._drive(c.bind, jobs, world, loop)
            self.check(f"serve, {label}", run)
            offered = jobs * world / period
            self.row(
                f"p99 report -> reply, {label}",
                f"p99 {fmt_s(run.p(99))}, p50 {fmt_s(run.p(50))}; "
                f"{run.rate:,.0f} of {offered:,.0f} reports/s",
                f"echo p99 {fmt_s(base.p(99))}, p50 {fmt_s(base.p(50))}; {base.rate:,.0f}/s",
                ratio(run.p(99), base.p(99)),
                goal,
            )

    # 3-7 ----------------------------------------------------------------------------------------
    def at_scale(self) -> None:
        s = self.s
        big, huge = s.big, s.huge
        state = self.tmp / "state-scale"
        c = self.Controller(state, self.policy, "--max-jobs", "60000")
        try:
            self._at_scale(c, big, huge)
        finally:
            if c.proc is not None and c.proc.poll() is None:
                c.stop(60)

    def _restart(self, c: Any) -> tuple[float, int, float]:
        t0 = now()
        code = c.stop(60)
        stopped = now() - t0
        t0 = now()
        c.start(timeout=300)
        return stopped, code, now() - t0

    def _at_scale(self, c: Any, big: int, huge: int) -> None:
        s = self.s
        print("6. baseline: start to `lrpilot ready` on an empty state dir", flush=True)
        t0 = now()
        c.start(timeout=60)
        empty_starts = [now() - t0]
        for _ in range(2):
            empty_starts.append(self._restart(c)[2])
        empty_ready = statistics.median(empty_starts)
        empty_rss = rss_mb(c.proc.pid)
        print(f"  empty: ready in {fmt_s(empty_ready)}, RSS {empty_rss:.0f} MB", flush=True)

        n_small = 100
        print(f"3-7. baselines at {n_small} jobs", flush=True)
        hist_job = "bench-history"
        made = populate(
            self.ctx, c.bind, [hist_job, *(f"idle-{i}" for i in range(n_small - 1))], now() + 120
        )
        self.check("creating the first jobs", made)
        few = set_lr_changes(c.admin, hist_job, 10, now() + 60)
        self.check("10 set_lr changes", few)
        small_client = one_client(self.ctx, c.bind, "probe-small", s.window, 20_000)
        small_during, small_scrapes = during_scrapes(self.ctx, c, "probe-small-2", s.window, 20_000)
        small_scrape = [scrape(c.metrics) for _ in range(3)]
        small_status = cli("status", "--json", "--admin", c.admin)
        small_history = cli("history", hist_job, "--json", "--admin", c.admin)
        startup = cli("--version")
        print(f"  CLI start-up (lrpilot --version): {fmt_s(startup.seconds)}", flush=True)

        print(f"3-7. at {big:,} jobs", flush=True)
        names = [f"idle-{i}" for i in range(n_small - 1, big - 1)]
        made = populate(self.ctx, c.bind, names, now() + max(60.0, s.left() - 120))
        self.check(f"creating {len(names):,} jobs", made)
        rate_big = made.done / made.seconds
        print(f"  created {made.done:,} jobs in {made.seconds:.1f} s ({rate_big:,.0f}/s)")
        rss_big = rss_mb(c.proc.pid)
        client_big = one_client(self.ctx, c.bind, "probe-big", s.window, 20_000)
        self.check(f"one client at {big:,} jobs", client_big)
        during_big, scrapes_big = during_scrapes(
            self.ctx, c, "probe-big-2", max(s.window, 10.0 if not s.quick else 0), 20_000
        )
        self.check(f"one client during scrapes at {big:,} jobs", during_big)
        scrape_big = [scrape(c.metrics) for _ in range(3 if not s.quick else 2)]
        status_big = cli("status", "--json", "--admin", c.admin)
        changes = set_lr_changes(c.admin, hist_job, s.changes - 10, now() + 60)
        self.check(f"{s.changes} set_lr changes", changes)
        print(f"  {changes.done} overrides in {changes.seconds:.1f} s", flush=True)
        history_many = cli("history", hist_job, "--json", "--admin", c.admin)

        jobs_label = f"{big:,} jobs"
        self.row(
            f"one client p50 / p99 at {jobs_label}",
            f"{fmt_s(client_big.p(50))} / {fmt_s(client_big.p(99))} ({client_big.done} reports)",
            f"{fmt_s(small_client.p(50))} / {fmt_s(small_client.p(99))} at {n_small} jobs",
            ratio(client_big.p(99), small_client.p(99)),
            "p99 < 2 ms",
        )
        self.row(
            f"one client p50 / p99 / max during a /metrics loop, {jobs_label}",
            f"{fmt_s(during_big.p(50))} / {fmt_s(during_big.p(99))} / {fmt_s(during_big.p(100))}"
            f" ({during_big.done} reports, {len(scrapes_big)} scrapes)",
            f"{fmt_s(small_during.p(50))} / {fmt_s(small_during.p(99))} / "
            f"{fmt_s(small_during.p(100))} at {n_small} jobs ({len(small_scrapes)} scrapes)",
            ratio(during_big.p(99), small_during.p(99)),
            "p99 < 10 ms",
        )
        self._scrape_row(jobs_label, scrape_big, small_scrape, n_small, "< 1 s")
        self.row(
            f"controller RSS, {jobs_label}",
            f"{rss_big:,.0f} MB",
            f"{empty_rss:,.0f} MB empty",
            ratio(rss_big, empty_rss),
            "< 300 MB",
        )
        self.row(
            f"`lrpilot status --json`, {jobs_label}",
            status_big.result(json_len),
            small_status.result(json_len) + f" at {n_small} jobs",
            ratio(status_big.seconds, small_status.seconds) if status_big.code == 0 else "-",
            "works",
        )
        self.row(
            f"`lrpilot history JOB --json`, {s.changes:,} changes",
            history_many.result(json_len),
            small_history.result(json_len),
            ratio(history_many.seconds, small_history.seconds) if history_many.code == 0 else "-",
            "works",
        )

        print(f"6. restart with {big:,} jobs", flush=True)
        stopped, code, ready_big = self._restart(c)
        restored = scrape(c.metrics)[2]
        self.row(
            f"restart to `ready`, {jobs_label}",
            f"{fmt_s(ready_big)} ({restored:.0f} jobs restored; SIGTERM took "
            f"{fmt_s(stopped)}, exit {code})"
            if restored is not None
            else f"{fmt_s(ready_big)} (lrpilot_jobs absent)",
            f"{fmt_s(empty_ready)} empty state dir",
            ratio(ready_big, empty_ready),
            "< 1 s",
        )

        # 50k: only when the projection fits the time left.
        more = huge - big
        projected = (
            1.5 * more / max(rate_big, 1.0)
            + 6 * statistics.median(t for t, _, _ in scrape_big) * huge / big
            + 6 * ready_big * huge / big
            + 2 * status_big.seconds * huge / big
        )
        if projected > s.left():
            self.note(
                f"{huge:,}-job stage skipped: projected {projected:.0f} s > {s.left():.0f} s left"
                " in the budget (--budget)"
            )
            return
        print(f"4-7. at {huge:,} jobs (projected {projected:.0f} s)", flush=True)
        names = [f"idle-{i}" for i in range(big - 1, huge - 1)]
        made = populate(self.ctx, c.bind, names, now() + max(60.0, s.left() - 60))
        self.check(f"creating {len(names):,} more jobs", made)
        print(f"  created {made.done:,} jobs in {made.seconds:.1f} s", flush=True)
        rss_huge = rss_mb(c.proc.pid)
        huge_label = f"{huge:,} jobs"
        scrape_huge = [scrape(c.metrics)]
        self._scrape_row(huge_label, scrape_huge, small_scrape, n_small, "-")
        self.row(
            f"controller RSS, {huge_label}",
            f"{rss_huge:,.0f} MB",
            f"{empty_rss:,.0f} MB empty",
            ratio(rss_huge, empty_rss),
            "< 1 GB",
        )
        status_huge = cli("status", "--json", "--admin", c.admin)
        self.row(
            f"`lrpilot status --json`, {huge_label}",
            status_huge.result(json_len),
            small_status.result(json_len) + f" at {n_small} jobs",
            ratio(status_huge.seconds, small_status.seconds) if status_huge.code == 0 else "-",
            "works",
        )
        stopped, code, ready_huge = self._restart(c)
        restored = scrape(c.metrics)[2]
        self.row(
            f"restart to `ready`, {huge_label}",
            f"{fmt_s(ready_huge)} ({restored or 0:.0f} jobs restored; SIGTERM took "
            f"{fmt_s(stopped)}, exit {code})",
            f"{fmt_s(empty_ready)} empty state dir",
            ratio(ready_huge, empty_ready),
            "-",
        )

    def _scrape_row(
        self,
        label: str,
        scrapes: list[tuple[float, int, float | None]],
        small: list[tuple[float, int, float | None]],
        n_small: int,
        goal: str,
    ) -> None:
        t = statistics.median(x[0] for x in scrapes)
        t0 = statistics.median(x[0] for x in small)
        self.row(
            f"`/metrics` scrape, {label}",
            f"{fmt_s(t)}, {scrapes[-1][1] / 1e6:.1f} MB (median of {len(scrapes)})",
            f"{fmt_s(t0)}, {small[-1][1] / 1e6:.2f} MB at {n_small} jobs",
            ratio(t, t0),
            goal,
        )


# -- context: versions, machine, the code measured; RESULTS.md ----------------------------------


def use_ref(ref: str, into: Path) -> str:
    """Run the controller, the CLI and the protocol of commit `ref` (a `git archive` of it)."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"scale.py: --ref {ref}: not a commit of {ROOT}")
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(ROOT), "archive", commit, "controller", "client"], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
    archive.wait()
    overlay = into / "overlay"
    (overlay / "lrpilot").mkdir(parents=True)
    for part in ("controller", "client"):
        (overlay / "lrpilot" / part).symlink_to(src / part)
    # Children (serve, the CLI) and this process import lrpilot.controller/client from there.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(overlay), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    sys.path.insert(0, str(overlay))
    return commit


def describe(ref_commit: str | None) -> list[str]:
    import lrpilot.controller

    mem = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    if ref_commit:
        code = f"commit {ref_commit[:12]} (a `git archive` of it, via --ref)"
    else:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "controller", "client")
        code = f"commit {head[:12]}" + (
            " + uncommitted changes in controller/ or client/" if dirty else ""
        )
    return [
        f"machine: {os.cpu_count()} cores, {mem / 1024 / 1024:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"versions: Python {platform.python_version()}, pyzmq {zmq.__version__} "
        f"(libzmq {zmq.zmq_version()}), msgpack {'.'.join(map(str, msgpack.version))}, "
        f"lrpilot {lrpilot.controller.__version__}",
        f"code measured: {code}"
        + ("" if ref_commit else f", imported from {Path(lrpilot.controller.__file__).parent}"),
    ]


def render(title: str, context_lines: list[str], bench: Bench, seconds: float) -> str:
    out = [f"## {title}", ""]
    out += [f"- {line}" for line in context_lines]
    command = shlex.join(["bench/scale.py", *sys.argv[1:]])
    out += [f"- run: `{command}`, {seconds:.0f} s", ""]
    out += ["| figure | value | baseline (same run) | ratio | goal (issue 8) |"]
    out += ["|---|---|---|---|---|"]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in bench.rows]
    if bench.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in bench.notes]
    out += [
        "",
        "Clients: figure 1 and 2b one socket per single-worker job; 2a one socket per rank of "
        "100 jobs of world 10; 3 one probe job reporting back to back, the idle jobs created "
        "by short-lived sockets (hello + one report). One driver process for every socket; "
        "echo = raw pyzmq ROUTER msgpack unpack/pack in its own process.",
        "",
    ]
    return "\n".join(out)


def append_results(path: Path, section: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write("# Benchmark results\n\nSections are appended by the scripts in bench/.\n\n")
        f.write(section + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small counts, ~1.5 s windows")
    parser.add_argument("--ref", help="measure the controller/CLI of this commit (git archive)")
    parser.add_argument("--label", default="", help="words for the RESULTS.md section title")
    parser.add_argument(
        "--results", type=Path, help=f"append here (default {RESULTS} unless --quick)"
    )
    parser.add_argument("--no-results", action="store_true", help="print only")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument(
        "--only", default="1,2,3", help="figure groups: 1 throughput, 2 paced, 3 = figures 3-7"
    )
    args = parser.parse_args()
    results = None if args.no_results else args.results or (None if args.quick else RESULTS)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 16384:  # 1000 client connections on each side, and their zmq mailboxes
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))

    t_start = time.monotonic()
    start_load = "/".join(Path("/proc/loadavg").read_text().split()[:3])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory(prefix="lrpilot-scale-") as tmp_name:
        tmp = Path(tmp_name)
        ref_commit = use_ref(args.ref, tmp / "ref") if args.ref else None
        sys.path.insert(0, str(ROOT / "tests"))
        context_lines = describe(ref_commit)
        for line in context_lines:
            print(line)
        bench = Bench(Settings(args.quick, args.budget if not args.quick else 120.0), tmp)
        groups = set(args.only.split(","))
        try:
            if groups & {"1", "2"}:
                with echo_process() as echo:
                    if "1" in groups:
                        bench.throughput(echo)
                    if "2" in groups:
                        bench.paced_latency(echo)
            if "3" in groups:
                bench.at_scale()
        except Exception as exc:  # keep what was measured; say what broke
            bench.note(f"run stopped early: {type(exc).__name__}: {exc}")
            raise
        finally:
            bench.ctx.destroy(linger=0)
            elapsed = time.monotonic() - t_start
            title = f"{stamp} — scale (bench/scale.py)"
            if args.label:
                title += f": {args.label}"
            commit = ref_commit or git("rev-parse", "HEAD")
            title += f", commit {commit[:12]}"
            load = Path("/proc/loadavg").read_text().split()[:3]
            context_lines.append(
                f"load average (1/5/15 min) at the start {start_load}, at the end {'/'.join(load)}"
                " (other work on the machine shares its 2 cores)"
            )
            section = render(title, context_lines, bench, elapsed)
            print()
            print(section)
            if results is not None and bench.rows:
                append_results(results, section)
                print(f"appended to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
