"""Restart to `ready` with many jobs on SQLite (issue 18, "restart to ready with 10,000 jobs").

    .venv/bin/python bench/restart.py                  # appends a section to bench/RESULTS.md
    .venv/bin/python bench/restart.py --ref main       # and the same for `git archive main`,
                                                       # alternating with this tree's code
    .venv/bin/python bench/restart.py --jobs 50000 --no-results

A state dir holds `--jobs` job rows written by the controller's own code (one job made by a
hello and one report through `transitions`, its stored row written under every name, each
reported a moment ago so none is past --job-ttl). Figure: wall time from starting `lrpilot
serve` on it to its `lrpilot ready` line (Python start-up included), median of `--rounds`
starts; the count restored is read from the controller's log. Baseline (same run): the same
start on an empty state dir. With `--ref`, the controller of that commit is started on the
same state dir, alternating with this tree's, so both see the same load.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measured import context, git, publish

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
POLICY = (
    "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 3, min_lr: 1.0e-6}\n"
)
RESTORED = re.compile(r"restored (\d+) jobs")


def populate(state: Path, policy: Path, jobs: int) -> None:
    """`jobs` rows as the controller writes them (hello + one report), named apart."""
    from lrpilot.client.protocol import Hello, Report
    from lrpilot.controller import transitions
    from lrpilot.controller.policyfile import load_file
    from lrpilot.controller.store import Store, Writes, encode_row

    policies = load_file(str(policy))
    rule = policies.rule_for("job")
    env = transitions.Env(now=100.0, wall=time.time())
    session = os.urandom(16)
    job = transitions.hello(
        None, Hello("job", 0, 1, session, 0.1, 0, framework="torch"), rule, env, lambda *a: None
    ).job
    job = transitions.report(job, Report("job", 0, session, 1, 0, {"val_loss": 1.0}, 0.1), env).job
    assert job is not None
    row = encode_row(job.stored())
    store = Store(state)
    try:
        for start in range(0, jobs, 5000):
            names = range(start, min(start + 5000, jobs))
            store.commit(Writes(jobs={f"job-{i}": row for i in names}))
    finally:
        store.close()


def overlay(ref: str, into: Path) -> tuple[str, Path]:
    """The controller and client of commit `ref`, importable as `lrpilot` from the path returned."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if not commit:
        raise SystemExit(f"restart.py: --ref {ref}: not a commit of {ROOT}")
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.Popen(
        ["git", "-C", str(ROOT), "archive", commit, "controller", "client"], stdout=subprocess.PIPE
    )
    subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
    archive.wait()
    top = into / "overlay"
    (top / "lrpilot").mkdir(parents=True)
    for part in ("controller", "client"):
        (top / "lrpilot" / part).symlink_to(src / part)
    return commit, top


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_to_ready(state: Path, policy: Path, pythonpath: Path | None) -> tuple[float, float, int]:
    """Seconds (wall, and the controller's CPU) from starting `lrpilot serve` to its ready
    line, and the jobs it restored."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(pythonpath), *filter(None, [env.get("PYTHONPATH")])]
        )
    log = state.parent / f"serve-{os.getpid()}.log"
    args = [sys.executable, "-m", "lrpilot.controller.cli", "serve", "--bind", "tcp://127.0.0.1:0"]
    args += ["--admin-bind", "tcp://127.0.0.1:0", "--metrics-host", "127.0.0.1"]
    args += ["--metrics-port", "0", "--state-dir", str(state), "--policy", str(policy)]
    with open(log, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            assert proc.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            line = proc.stdout.readline() if sel.select(120) else ""
            seconds = time.perf_counter() - t0
            cpu = cpu_seconds(proc.pid)
            if not line.startswith("lrpilot ready"):
                raise SystemExit(f"no ready line in 120 s: {line!r}\n{log.read_text()[-2000:]}")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    found = RESTORED.search(log.read_text())
    return seconds, cpu, int(found.group(1)) if found else 0


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ref", help="also measure the controller of this commit, alternating")
    parser.add_argument("--label", default="")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    load = "/".join(Path("/proc/loadavg").read_text().split()[:3])
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lrpilot-restart-") as tmp_name:
        tmp = Path(tmp_name)
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY)
        full, empty = tmp / "full", tmp / "empty"
        populate(full, policy, args.jobs)
        variants: dict[str, Path | None] = {"this tree": None}
        ref_commit = ""
        if args.ref:
            ref_commit, top = overlay(args.ref, tmp / "ref")
            variants[f"{args.ref} ({ref_commit[:12]})"] = top
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        counts: dict[str, int] = {}
        empties: list[float] = []
        empty_cpus: list[float] = []
        for _ in range(args.rounds):
            wall, cpu, _count = start_to_ready(empty, policy, None)
            empties.append(wall)
            empty_cpus.append(cpu)
            for name, path in variants.items():
                wall, cpu, counts[name] = start_to_ready(full, policy, path)
                times[name].append(wall)
                cpus[name].append(cpu)
                print(
                    f"  {name}: ready in {fmt(wall)} (CPU {fmt(cpu)}), "
                    f"{counts[name]} jobs restored",
                    flush=True,
                )
        seconds = time.monotonic() - t_start
    base, base_cpu = statistics.median(empties), statistics.median(empty_cpus)
    end_load = "/".join(Path("/proc/loadavg").read_text().split()[:3])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"## {stamp} — restart to ready on SQLite (bench/restart.py)"
    if args.label:
        title += f": {args.label}"
    lines = [title, ""]
    lines += [f"- {line}" for line in context(load, ["pyzmq", "msgpack", "msgspec"], "the driver")]
    lines += [f"- load average at the end {end_load}"]
    lines += [f"- run: `bench/restart.py {' '.join(sys.argv[1:])}`, {seconds:.0f} s"]
    lines += [
        "- wall: start of `lrpilot serve` to its ready line; CPU: the controller process's "
        "user + system time at that moment (/proc), what the load of other work does not add to",
        "",
    ]
    lines += ["| figure | value (median) | baseline (same run) | ratio | goal (issue 18) |"]
    lines += ["|---|---|---|---|---|"]
    for name, values in times.items():
        goal = "< 1 s" if args.jobs == 10_000 else "-"
        for what, got, empty in (("wall", values, base), ("CPU", cpus[name], base_cpu)):
            median = statistics.median(got)
            lines.append(
                f"| start to `ready`, {args.jobs:,} jobs, {name}, {what} | {fmt(median)} "
                f"({counts[name]} restored; {', '.join(fmt(v) for v in got)}) | "
                f"{fmt(empty)} empty state dir | {median / empty:.2f} | {goal} |"
            )
    publish(lines, RESULTS, record=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
