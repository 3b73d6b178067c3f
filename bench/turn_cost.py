"""CPU per report inside the controller's loop turn (issue 18 item 7), apart from the driver.

    .venv/bin/python bench/turn_cost.py --ref main     # this tree vs `git archive main`,
                                                       # alternating; appends to RESULTS.md
    .venv/bin/python bench/turn_cost.py --no-results

bench/scale.py's reports/s on 2 shared cores mixes the controller with its driver and with the
disk's fsync per turn; this isolates the loop's own work. A controller built by
`build_server` (SQLite state in a temp dir, its real commit) and N DEALER sockets live in one
process: each round every socket sends one report (single-worker plateau jobs), then
`Server.turn()` runs until every reply is out. Figure: CPU time of the loop's thread
(`time.thread_time`, so the fsync wait is not counted) per report, median over `--repeats`
processes per variant, at N = 8 / 64 / 256 reports per turn. Baseline (same run): the
controller of `--ref`, when given; otherwise the figures stand alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measured import context, publish
from restart import overlay

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
POLICY = (
    "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 3, min_lr: 1.0e-6}\n"
)
SIZES = (8, 64, 256)


def child(n: int, rounds: int) -> float:
    """µs of loop-thread CPU per report, N reports per turn, in this process."""
    import zmq

    from lrpilot.client.protocol import Hello, Report, encode
    from lrpilot.controller.policyfile import load_text
    from lrpilot.controller.server import ServeConfig, build_server

    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lrpilot-turn-") as tmp:
        config = ServeConfig(
            bind="tcp://127.0.0.1:0",
            admin_bind="tcp://127.0.0.1:0",
            metrics_port=None,
            state_dir=tmp,
        )
        server = build_server(config, load_text(POLICY, "bench.yaml"))
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            endpoint = server.endpoints()["bind"]
            peers = []
            for i in range(n):
                sock = ctx.socket(zmq.DEALER)
                session = os.urandom(16)
                sock.setsockopt(zmq.ROUTING_ID, session)
                sock.connect(endpoint)
                peers.append((sock, session, f"job-{i}"))
            for sock, session, job in peers:
                sock.send(encode(Hello(job, 0, 1, session, 0.1, 0).to_wire()))

            def until_answered(counted: list[float]) -> None:
                got, deadline = 0, time.monotonic() + 30
                while got < n and time.monotonic() < deadline:
                    t0 = time.thread_time()
                    server.turn()
                    counted[0] += time.thread_time() - t0
                    for sock, _, _ in peers:
                        while sock.poll(0):
                            sock.recv()
                            got += 1
                    if got < n:
                        time.sleep(0.0005)
                if got < n:
                    raise SystemExit(f"{n - got} of {n} replies missing after 30 s")

            until_answered([0.0])
            spent = [0.0]
            for epoch in range(rounds):
                loss = 1.0 / (1 + epoch % 7)
                for sock, session, job in peers:
                    report = Report(job, 0, session, epoch + 1, epoch, {"val_loss": loss}, 0.1)
                    sock.send(encode(report.to_wire()))
                until_answered(spent)
            return spent[0] / (n * rounds) * 1e6
        finally:
            server.close()
            ctx.destroy(linger=0)


#: The phases of a turn a profile sums (cumulative time of these functions), in turn order.
PHASES = (
    ("receive (zmq recv)", "server.py", "_recv"),
    ("decode + reduce (`_feed`: read, validate, session, policy step)", "server.py", "_feed"),
    ("  of which the policy's decision (`transitions.decide`)", "transitions.py", "decide"),
    ("rows to write (`Batch.writes`: encode the job rows, snapshots, points)", "jobs.py", "writes"),
    (
        "commit (`Store.commit`: SQLite writes + the fsync of synchronous=FULL)",
        "store.py",
        "commit",
    ),
    ("publish (`JobTable.publish`: states in force, counters, log)", "jobs.py", "publish"),
    ("replies (`Server.send`: encode + zmq send)", "server.py", "send"),
)


def profile(n: int, rounds: int) -> list[str]:
    """Markdown rows: where a busy turn's time goes (cProfile around `Server.turn`, wall
    clock, so the fsync wait counts), the phases then the largest own times."""
    import cProfile
    import pstats

    from lrpilot.controller import server as server_module

    profiler = cProfile.Profile()
    turn = server_module.Server.turn

    def profiled(self: server_module.Server, *args: object, **kwargs: object) -> None:
        profiler.enable()
        try:
            turn(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            profiler.disable()

    server_module.Server.turn = profiled  # type: ignore[method-assign]
    try:
        child(n, rounds)
    finally:
        server_module.Server.turn = turn  # type: ignore[method-assign]
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(v[3] for k, v in stats.items() if k[2] == "turn" and k[0].endswith("server.py"))
    reports = n * rounds
    rows = [f"| whole turn | {total / reports * 1e6:.1f} µs | 100% |"]
    for label, file, name in PHASES:
        spent = sum(v[3] for k, v in stats.items() if k[2] == name and k[0].endswith(file))
        rows.append(f"| {label} | {spent / reports * 1e6:.1f} µs | {spent / total:.0%} |")
    own = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:10]
    for (file, line, name), v in own:
        where = f"{Path(file).name}:{line} {name}" if line else name
        rows.append(
            f"| own time: `{where}` ({v[1]:,} calls) | {v[2] / reports * 1e6:.1f} µs | "
            f"{v[2] / total:.0%} |"
        )
    return rows


def run_child(n: int, rounds: int, pythonpath: Path | None) -> float:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pythonpath), *filter(None, [env.get("PYTHONPATH")])]
        )
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(n), str(rounds)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return float(out.stdout.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ref", help="also measure the controller of this commit, alternating")
    parser.add_argument("--repeats", type=int, default=3, help="processes per variant and size")
    parser.add_argument("--reports", type=int, default=12_000, help="reports per process")
    parser.add_argument("--label", default="")
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument(
        "--profile",
        type=int,
        metavar="N",
        help="instead: profile turns of N reports (this tree) and record where the time goes",
    )
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(f"{child(*args.child):.3f}")
        return 0
    load = "/".join(Path("/proc/loadavg").read_text().split()[:3])

    def heading(what: str, versions: list[str]) -> list[str]:
        """A section's title (now, `what`, the label) and where it was measured."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        title = f"## {stamp} — {what}" + (f": {args.label}" if args.label else "")
        return [title, "", *(f"- {line}" for line in context(load, versions, "nothing"))]

    if args.profile:
        t_start = time.monotonic()
        rows = profile(args.profile, max(args.reports // args.profile, 5))
        seconds = time.monotonic() - t_start
        lines = heading(
            "where a busy turn's time goes (bench/turn_cost.py --profile)",
            ["pyzmq", "msgspec"],
        )
        lines += [
            f"- run: `bench/turn_cost.py {' '.join(sys.argv[1:])}`, {seconds:.0f} s; "
            f"{args.profile} reports per turn, cProfile around `Server.turn` (wall clock: "
            "the fsync wait counts; the profiler's own overhead inflates the small calls)",
            "",
            "| part of the turn | per report | share |",
            "|---|---|---|",
            *rows,
        ]
        publish(lines, RESULTS, record=not args.no_results)
        return 0
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lrpilot-turn-cost-") as tmp:
        variants: dict[str, Path | None] = {"this tree": None}
        if args.ref:
            commit, top = overlay(args.ref, Path(tmp))
            variants[f"{args.ref} ({commit[:12]})"] = top
        figures: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.repeats):
            for n in SIZES:
                for name, path in variants.items():
                    us = run_child(n, max(args.reports // n, 5), path)
                    figures.setdefault((name, n), []).append(us)
                    print(f"  {name}, {n} per turn: {us:.1f} µs", flush=True)
    seconds = time.monotonic() - t_start
    lines = heading(
        "CPU per report in a loop turn (bench/turn_cost.py)", ["pyzmq", "msgpack", "msgspec"]
    )
    lines += [f"- run: `bench/turn_cost.py {' '.join(sys.argv[1:])}`, {seconds:.0f} s", ""]
    names = list(variants)
    lines += ["| reports per turn | " + " | ".join(names) + " | ratio |"]
    lines += ["|---" * (len(names) + 2) + "|"]
    for n in SIZES:
        medians = [statistics.median(figures[(name, n)]) for name in names]
        ratio = f"{medians[0] / medians[1]:.2f}" if len(medians) > 1 else "-"
        cells = " | ".join(f"{m:.1f} µs" for m in medians)
        lines.append(f"| {n} | {cells} | {ratio} |")
    publish(lines, RESULTS, record=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
