"""The daemon's cost per report against the job's world size (issue 20, "sealed commit").

    .venv/bin/python bench/report_cost.py                 # appends a section to bench/RESULTS.md
    .venv/bin/python bench/report_cost.py --ref main      # the controller of `git archive main`
    .venv/bin/python bench/report_cost.py --no-results    # print only

One job of world W: every rank says hello, then every rank reports each epoch; each report
runs the daemon's pure transition (`transitions.report`: session bookkeeping, aggregation,
and the decision once the epoch is complete) on the job as the previous report left it, as a
loop turn does. No sockets, no commit: this is the part that grows with the world. Figure:
mean µs per report at world 256 and 4096. Baseline (same run): world 8. A per-report cost
independent of the world size has ratio ~1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measured import context, git, publish

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2}
  aggregate_timeout: 600
"""


def per_report_us(world: int, epochs: int) -> float:
    """Mean µs per report for one job of `world` ranks over `epochs` epochs."""
    from lrpilot.client.protocol import Hello, Report
    from lrpilot.controller import transitions
    from lrpilot.controller.policyfile import load_text

    rule = load_text(POLICY, "bench.yaml").rule_for("job")
    env = transitions.Env(now=100.0, wall=1.7e9)
    sessions = [os.urandom(16) for _ in range(world)]
    job = None
    for rank, s in enumerate(sessions):
        step = transitions.hello(
            job, Hello("job", rank, world, s, 0.1, 0), rule, env, lambda *a: None
        )
        job = step.job
    reports = [
        [
            Report("job", r, s, e + 1, e, {"val_loss": 1.0 / (e + 1)}, 0.1)
            for r, s in enumerate(sessions)
        ]
        for e in range(epochs)
    ]
    t0 = time.perf_counter()
    for epoch in reports:
        for r in epoch:
            job = transitions.report(job, r, env).job
    elapsed = time.perf_counter() - t0
    assert job is not None and job.last_epoch == epochs - 1
    return elapsed / (world * epochs) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", help="measure the controller of this commit (git archive)")
    parser.add_argument("--label", default="")
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    load = "/".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory(prefix="lrpilot-report-cost-") as tmp:
        commit = None
        if args.ref:
            from scale import use_ref

            commit = use_ref(args.ref, Path(tmp))
        t_start = time.monotonic()
        # Each world gets about the same number of reports (~8k), best of `rounds` rounds.
        figures = {}
        for world in (8, 256, 4096):  # 8: the baseline
            epochs = max(2, 8192 // world)
            figures[world] = min(per_report_us(world, epochs) for _ in range(args.rounds))
            print(f"world {world:>5}: {figures[world]:8.2f} µs per report")
        seconds = time.monotonic() - t_start
    code = commit or git("rev-parse", "HEAD")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"## {stamp} — cost per report against the world size (bench/report_cost.py)"
    if args.label:
        title += f": {args.label}"
    lines = [title, ""]
    lines += [f"- {line}" for line in context(load, ["msgpack"], "this benchmark")]
    lines[-2] = f"- code measured: commit {code[:12]}" + (" (via --ref)" if commit else "")
    lines += [f"- run: `bench/report_cost.py {' '.join(sys.argv[1:])}`, {seconds:.0f} s", ""]
    lines += ["| figure | value | baseline (same run) | ratio | goal (issue 20) |"]
    lines += ["|---|---|---|---|---|"]
    for world in (256, 4096):
        lines.append(
            f"| µs per report, one job of world {world} | {figures[world]:.2f} µs | "
            f"{figures[8]:.2f} µs at world 8 | {figures[world] / figures[8]:.2f} | "
            "independent of the world size |"
        )
    publish(lines, RESULTS, record=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
