"""Scale-out on PostgreSQL (issue 18): every figure next to a baseline measured in the same run.

    .venv/bin/python bench/scale_out.py            # appends a dated section to bench/RESULTS.md
    .venv/bin/python bench/scale_out.py --quick    # short windows; prints only

A PostgreSQL cluster of its own (tests/pgcluster.py: initdb in a temp dir, fsync on, as
SQLite's synchronous=FULL), removed at the end. Clients are raw DEALER sockets speaking the
wire protocol, all driven by this one process through one zmq.Poller (so on a 2-core machine
the driver competes with the controllers and the database for the cores: the table says so).

1. Throughput: 64 single-worker jobs, one socket each, one report in flight each, for a
   window; figure: completed reports/s. (a) one controller on PostgreSQL vs the same on
   SQLite (--state-dir); (b) two controllers on PostgreSQL vs one on PostgreSQL; for
   information, one on a PostgreSQL with fsync off (what the WAL flush costs). Each socket
   talks to the controller that owns its job (found by following `moved` at hello). Every
   configuration runs for the whole benchmark; the windows alternate between them, 3 rounds,
   and the median is shown.
2. Failover (3 times; the slowest is shown): two controllers, the 64 jobs reporting; kill -9
   of one; each of its jobs then resends (hello + the unanswered report) to the survivor
   every 50 ms. Figure: kill -> the survivor's first LR, slowest and median over those jobs;
   then every job's audit rows are checked: one strictly increasing version sequence per run
   (nothing decided twice), and every report sent was answered (nothing lost). Baseline: the
   same clients' median report round trip before the kill.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from pgcluster import PgCluster  # noqa: E402

from lrpilot.client.protocol import (  # noqa: E402
    SESSION_BYTES,
    ErrorMessage,
    Hello,
    LrMessage,
    Report,
    encode,
    parse_server_message,
)
from lrpilot.controller.server import parse_ready_line  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
JOBS = 64


class Serve:
    """A `lrpilot serve` process on loopback ports."""

    def __init__(self, *extra: str) -> None:
        args = [
            sys.executable,
            "-m",
            "lrpilot.controller.cli",
            "serve",
            "--bind",
            "tcp://127.0.0.1:0",
            "--admin-bind",
            "tcp://127.0.0.1:0",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            "--log-level",
            "warning",
            *extra,
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        fields = parse_ready_line(self.proc.stdout.readline())
        assert fields is not None, "controller did not start"
        self.bind, self.metrics = fields["bind"], fields["metrics"]

    def shards(self) -> float:
        import urllib.request

        with urllib.request.urlopen(self.metrics, timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("lrpilot_shards_owned "):
                    return float(line.split()[1])
        return -1.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def wait_shards(controllers: list[Serve], timeout: float = 30.0) -> None:
    share = 64 / len(controllers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.shards() == share for c in controllers):
            return
        time.sleep(0.05)
    raise RuntimeError("shards not split evenly in time")


@dataclass
class Peer:
    job: str
    socks: dict[str, zmq.Socket[bytes]]
    session: bytes
    at: str = ""
    seq: int = 0
    epoch: int = 0
    sent_at: float = 0.0
    pending: bool = False
    sent: int = 0
    answered: int = 0
    rtts: list[float] = field(default_factory=list)


def make_peers(ctx: zmq.Context[Any], endpoints: list[str], prefix: str) -> list[Peer]:
    peers = []
    for i in range(JOBS):
        session = os.urandom(SESSION_BYTES)
        socks = {}
        for e in endpoints:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.ROUTING_ID, session)
            s.connect(e)
            socks[e] = s
        peers.append(Peer(f"{prefix}-{i}", socks, session, endpoints[0]))
    return peers


def hello(p: Peer, timeout: float = 10.0) -> None:
    """Hello at the owner of the job (following `moved`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = p.socks[p.at]
        sock.send(encode(Hello(p.job, 0, 1, p.session, 0.1, p.epoch).to_wire()))
        if not sock.poll(2000):
            continue
        reply = parse_server_message(sock.recv())
        if isinstance(reply, LrMessage):
            return
        if isinstance(reply, ErrorMessage) and reply.code == "moved" and reply.endpoint:
            p.at = reply.endpoint
        else:
            time.sleep(0.05)
    raise RuntimeError(f"{p.job}: no hello answer")


def send_report(p: Peer) -> None:
    p.seq += 1
    r = Report(p.job, 0, p.session, p.seq, p.epoch, {"val_loss": 1.0 / (1 + p.epoch)}, 0.1)
    p.socks[p.at].send(encode(r.to_wire()))
    p.sent_at, p.pending = time.perf_counter(), True
    p.sent += 1


def closed_loop(peers: list[Peer], seconds: float) -> float:
    """Reports/s with one report in flight per peer over `seconds` (after 1 s of warm-up)."""
    poller = zmq.Poller()
    owner: dict[Any, Peer] = {}
    for p in peers:
        poller.register(p.socks[p.at], zmq.POLLIN)
        owner[p.socks[p.at]] = p
        if not p.pending:
            send_report(p)
    start = time.perf_counter()
    warm, end = start + 1.0, start + 1.0 + seconds
    counted = 0
    while (now := time.perf_counter()) < end:
        for sock, _ in poller.poll(100):
            p = owner[sock]
            reply = parse_server_message(sock.recv())
            if isinstance(reply, LrMessage) and reply.seq == p.seq:
                t = time.perf_counter()
                p.rtts.append(t - p.sent_at)
                p.answered += 1
                p.pending = False
                if t >= warm:
                    counted += 1
                p.epoch += 1
                send_report(p)
    drain(peers)
    return counted / (now - warm)


def drain(peers: list[Peer], timeout: float = 10.0) -> None:
    """Collect the replies still in flight (so every report sent is accounted for)."""
    deadline = time.monotonic() + timeout
    for p in peers:
        while p.pending and time.monotonic() < deadline:
            sock = p.socks[p.at]
            if not sock.poll(200):
                continue
            reply = parse_server_message(sock.recv())
            if isinstance(reply, LrMessage) and reply.seq == p.seq:
                p.pending = False
                p.answered += 1
                p.epoch += 1


def failover(pg: PgCluster, dsn: str, seconds: float) -> dict[str, Any]:
    import psycopg

    a = Serve("--store", dsn)
    wait_shards([a])
    b = Serve("--store", dsn)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        wait_shards([a, b])
        peers = make_peers(ctx, [a.bind, b.bind], "failover")
        for p in peers:
            hello(p)
        closed_loop(peers, seconds)
        rtt = statistics.median(t for p in peers for t in p.rtts)
        orphans = [p for p in peers if p.at == a.bind]
        for p in orphans:  # one report each in flight when the controller dies
            send_report(p)
        a.kill()
        killed = time.perf_counter()
        first: dict[str, float] = {}
        deadline = killed + 30
        next_try = killed
        while len(first) < len(orphans) and time.perf_counter() < deadline:
            if time.perf_counter() >= next_try:
                next_try += 0.05
                for p in orphans:
                    if p.job in first:
                        continue
                    h = Hello(p.job, 0, 1, p.session, 0.1, p.epoch)
                    r = Report(
                        p.job, 0, p.session, p.seq, p.epoch, {"val_loss": 1.0 / (1 + p.epoch)}, 0.1
                    )
                    p.socks[b.bind].send(encode(h.to_wire()))
                    p.socks[b.bind].send(encode(r.to_wire()))
            for p in orphans:
                sock = p.socks[b.bind]
                while p.job not in first and sock.poll(0):
                    reply = parse_server_message(sock.recv())
                    if isinstance(reply, LrMessage) and reply.seq == p.seq:
                        first[p.job] = time.perf_counter() - killed
                        p.answered += 1
                        p.pending = False
            time.sleep(0.002)
        gaps = sorted(first.values())
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT job, run, version FROM audit ORDER BY id").fetchall()
        seqs: dict[tuple[str, int], list[int]] = {}
        for job, run, version in rows:
            seqs.setdefault((job, run), []).append(version)
        duplicated = sum(len(v) - len(set(v)) for v in seqs.values())
        unordered = sum(v != sorted(v) for v in seqs.values())
        lost = sum(p.sent - p.answered for p in peers)
        return {
            "orphans": len(orphans),
            "answered": len(first),
            "max": gaps[-1] if gaps else float("nan"),
            "median": statistics.median(gaps) if gaps else float("nan"),
            "rtt": rtt,
            "duplicated": duplicated + unordered,
            "lost": lost,
            "audit_rows": len(rows),
        }
    finally:
        ctx.destroy(linger=0)
        a.kill()
        b.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one short round; print only")
    ap.add_argument("--results", type=Path, default=None, help="append to this file")
    ap.add_argument("--rounds", type=int, default=3, help="windows per configuration")
    args = ap.parse_args()
    seconds = 1.5 if args.quick else 4.0
    rounds = 1 if args.quick else max(args.rounds, 1)
    started = time.monotonic()
    load0 = os.getloadavg()
    cores = os.cpu_count() or 1
    import tempfile

    ctx: zmq.Context[Any] = zmq.Context()
    servers: list[Serve] = []
    try:
        with (
            PgCluster(fsync=True) as pg,
            PgCluster(fsync=False) as nosync,
            tempfile.TemporaryDirectory() as tmp,
        ):
            # Every configuration runs at once, idle but for its turn: the windows of
            # each round alternate, so the load of the machine falls on all alike.
            sqlite = Serve("--state-dir", f"{tmp}/state")
            one = Serve("--store", pg.create_db("one"))
            dsn2 = pg.create_db("two")
            a = Serve("--store", dsn2)
            servers += [sqlite, one, a]
            wait_shards([a])
            b = Serve("--store", dsn2)
            plain = Serve("--store", nosync.create_db("nosync"))
            servers += [b, plain]
            wait_shards([one])
            wait_shards([a, b])
            wait_shards([plain])
            configs = {
                "sqlite": [sqlite.bind],
                "pg1": [one.bind],
                "pg2": [a.bind, b.bind],
                "nosync": [plain.bind],
            }
            peers = {name: make_peers(ctx, eps, name) for name, eps in configs.items()}
            for group in peers.values():
                for p in group:
                    hello(p)
            rates: dict[str, list[float]] = {name: [] for name in configs}
            for _ in range(rounds):
                for name, group in peers.items():
                    rates[name].append(closed_loop(group, seconds))
            for server in servers:
                server.kill()
            fos = [
                failover(pg, pg.create_db(f"failover{i}"), min(seconds, 2.0)) for i in range(rounds)
            ]
    finally:
        ctx.destroy(linger=0)
        for server in servers:
            server.kill()
    r_sqlite, r_pg1, r_pg2, r_nosync = (
        statistics.median(rates[n]) for n in ("sqlite", "pg1", "pg2", "nosync")
    )
    fo = max(fos, key=lambda f: f["max"])
    fo["lost"] = sum(f["lost"] for f in fos)
    fo["duplicated"] = sum(f["duplicated"] for f in fos)
    fo["audit_rows"] = sum(f["audit_rows"] for f in fos)
    fo["median"] = statistics.median(f["median"] for f in fos)
    load1 = os.getloadavg()
    elapsed = time.monotonic() - started

    note = (
        f"on {cores} cores the driver competes: it, both controllers and PostgreSQL share "
        "them, so a second controller gets no core of its own"
        if cores <= 4
        else f"{cores} cores"
    )
    rows = [
        (
            "reports/s, 1 controller on PostgreSQL vs on SQLite (64 jobs, one in flight each)",
            f"{r_pg1:,.0f}/s",
            f"SQLite {r_sqlite:,.0f}/s",
            r_pg1 / r_sqlite,
            "≥ 0.7×",
        ),
        (
            "reports/s, 2 controllers on PostgreSQL vs 1 (same load)",
            f"{r_pg2:,.0f}/s",
            f"1 controller {r_pg1:,.0f}/s",
            r_pg2 / r_pg1,
            f"≥ 1.6× ({note})",
        ),
        (
            "reports/s, 1 controller on PostgreSQL with fsync off (what the WAL flush costs; "
            "not a setting to run with)",
            f"{r_nosync:,.0f}/s",
            f"SQLite {r_sqlite:,.0f}/s",
            r_nosync / r_sqlite,
            "-",
        ),
        (
            f"failover: kill -9 → the survivor's first LR for each of its {fo['orphans']} jobs "
            f"(slowest of {rounds} kills)",
            f"slowest {fo['max']:.2f} s, median {fo['median']:.2f} s ({fo['answered']} answered)",
            f"report round trip before {fo['rtt'] * 1000:.2f} ms",
            fo["max"] / fo["rtt"],
            "< 3 s",
        ),
        (
            "failover: decisions lost / duplicated (audit: one version sequence per run)",
            f"{fo['lost']} lost, {fo['duplicated']} duplicated ({fo['audit_rows']} audit rows)",
            "0 / 0",
            None,
            "none",
        ),
    ]

    def verdict(goal: str, value: float | None, i: int) -> str:
        if i == 0:
            return "met" if r_pg1 / r_sqlite >= 0.7 else "NOT met"
        if i == 1:
            return "met" if r_pg2 / r_pg1 >= 1.6 else "NOT met"
        if i == 2:
            return "for information"
        if i == 3:
            return "met" if fo["max"] < 3 else "NOT met"
        return "met" if fo["lost"] == 0 and fo["duplicated"] == 0 else "NOT met"

    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout.strip()
    import psycopg

    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — scale-out on PostgreSQL "
        "(bench/scale_out.py)",
        "",
        f"- machine: {cores} cores ({platform.processor() or platform.machine()}), "
        f"{platform.system()} {platform.release()}",
        f"- versions: Python {platform.python_version()}, PostgreSQL "
        f"{pg.bin.parent.name} (fsync on), psycopg {psycopg.__version__}, pyzmq {zmq.__version__}",
        f"- code measured: commit {commit}",
        f"- load average at the start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at the end "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} (other work shares the machine)",
        f"- run: `bench/scale_out.py {' '.join(sys.argv[1:])}`, {elapsed:.0f} s; "
        f"median of {rounds} windows of {seconds:g} s each, the configurations alternating",
        "- reports/s per window: "
        + "; ".join(f"{n} " + ", ".join(f"{r:,.0f}" for r in v) for n, v in rates.items()),
        "",
        "| figure | value | baseline (same run) | ratio | goal (issue 18) |",
        "|---|---|---|---|---|",
    ]
    for i, (name, value, base, ratio, goal) in enumerate(rows):
        shown = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(f"| {name} | {value} | {base} | {shown} | {goal}: {verdict(goal, ratio, i)} |")
    lines += [
        "",
        "One driver process for every socket; each socket talks to the controller that owns "
        "its job. Failover: the dead controller's jobs resend hello + report to the survivor "
        "every 50 ms; the survivor answers `moved`/`unavailable` until its next heartbeat "
        "(0.5 s) takes the shards.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    target = args.results or (None if args.quick else RESULTS)
    if target is not None:
        with open(target, "a", encoding="utf-8") as fh:
            fh.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
