"""What recorded metrics and the web view cost, beside baselines measured in the same run.

    .venv/bin/python bench/web_view.py [--no-record]

Figures: the group commit of a turn of 256 decisions with their metric points (vs the same
turn without them), a long step run's recording thinned at 10,000 points (vs the first
10,000 points), `/api/jobs` at 1,000 jobs and `/api/jobs/JOB/metrics` of a 10,000-point run
and its refresh (`after=T`)
(vs a `/metrics` scrape of the same controller). Appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Controller, Wire  # noqa: E402
from measured import context  # noqa: E402

from lrpilot.controller.store import MetricPoint, Store, Writes, encode_row  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
TURN = 256


def _turn(i: int, with_points: bool) -> Writes:
    row = encode_row({"lr": 0.1, "state": {"best": 0.5, "wait": 1}, "version": i, "pad": "x" * 200})
    w = Writes()
    for j in range(TURN):
        job = f"job-{j:04d}"
        w.jobs[job] = row
        w.snapshots.append((job, 1, i, row))
        w.prune.append((job, 1, i - 200))
        if with_points:
            metrics = {"loss": 1.0 / (i + 1), "val_loss": 1.1 / (i + 1), "accuracy": 0.5}
            w.metrics.append(MetricPoint(job, 1, i, i, 0.1, 1.7e9 + i, metrics))
    return w


def commit_ms(folder: Path, with_points: bool, turns: int = 40) -> float:
    store = Store(folder)
    try:
        times = []
        for i in range(turns):
            w = _turn(i, with_points)
            t0 = time.perf_counter()
            store.commit(w)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    finally:
        store.close()


def thinning_ms(folder: Path) -> tuple[float, float, int]:
    """Per-turn commit of 100 step points: the first 10,000 points vs the next 30,000."""
    store = Store(folder)
    try:
        first, later = [], []
        for start in range(0, 40_000, 100):
            w = Writes(
                metrics=[
                    MetricPoint("long", 1, t, 0, 0.1, 1.7e9 + t, {"loss": 1.0})
                    for t in range(start, start + 100)
                ]
            )
            t0 = time.perf_counter()
            store.commit(w)
            (first if start < 10_000 else later).append(time.perf_counter() - t0)
        kept = len(store.metrics("long", 1))
        return statistics.median(first) * 1e3, statistics.median(later) * 1e3, kept
    finally:
        store.close()


def fetch_ms(url: str, times: int = 7) -> tuple[float, int]:
    took, size = [], 0
    for _ in range(times):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as resp:
            size = len(resp.read())
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1e3, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    began = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = commit_ms(Path(tmp) / "a", False)
        with_points = commit_ms(Path(tmp) / "b", True)
        rows.append(
            (
                f"group commit of {TURN} decisions with their metric points (median of 40 turns)",
                f"{with_points:.2f} ms",
                f"{base:.2f} ms without points",
                f"{with_points / base:.2f}",
            )
        )
        first, later, kept = thinning_ms(Path(tmp) / "c")
        rows.append(
            (
                "commit of 100 step points, points 10,000-40,000 of a run (thinned)",
                f"{later:.2f} ms ({kept} points kept of 40,000)",
                f"{first:.2f} ms for the first 10,000",
                f"{later / first:.2f}",
            )
        )
        state = Path(tmp) / "state"
        store = Store(state)  # a finished 10,000-step run, recorded
        for start in range(0, 10_000, 1000):
            store.commit(
                Writes(
                    metrics=[
                        MetricPoint(
                            "long", 1, t, t // 500, 0.1, 1.7e9 + t, {"loss": 1.0, "acc": 0.5}
                        )
                        for t in range(start, start + 1000)
                    ]
                )
            )
        store.close()
        c = Controller(state).start()
        try:
            w = Wire(c.bind, "job")
            try:
                for i in range(1000):
                    w.job = f"job-{i:04d}"
                    w.hello(lr=0.01)
                    w.report(0, {"val_loss": 1.0}, lr=0.01)
            finally:
                w.close()
            scrape, scrape_size = fetch_ms(c.metrics)
            root = c.metrics.removesuffix("metrics")
            jobs, jobs_size = fetch_ms(root + "api/jobs")
            filtered, _ = fetch_ms(root + "api/jobs?q=job-09&page=2")
            points, points_size = fetch_ms(root + "api/jobs/long/metrics")
            tail, tail_size = fetch_ms(root + "api/jobs/long/metrics?run=1&after=9990")
        finally:
            c.stop()
    baseline = f"/metrics scrape {scrape:.1f} ms, {scrape_size / 1e3:.0f} kB"
    rows.append(
        (
            "`/api/jobs` at 1,000 jobs, page 1 of 20 (median of 7)",
            f"{jobs:.1f} ms, {jobs_size / 1e3:.0f} kB; filtered page {filtered:.1f} ms",
            baseline,
            f"{jobs / scrape:.2f}",
        )
    )
    rows.append(
        (
            "`/api/jobs/JOB/metrics`, a 10,000-point run (median of 7)",
            f"{points:.1f} ms, {points_size / 1e3:.0f} kB",
            baseline,
            f"{points / scrape:.2f}",
        )
    )
    rows.append(
        (
            "`/api/jobs/JOB/metrics?after=T`, its last 9 points (a page refreshing; median of 7)",
            f"{tail:.1f} ms, {tail_size / 1e3:.1f} kB",
            baseline,
            f"{tail / scrape:.2f}",
        )
    )
    lines = [
        "",
        f"## {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC — recorded metrics and the web "
        "view (bench/web_view.py)",
        "",
        *(f"- {line}" for line in context(load, ["pyzmq", "msgpack"], "the benchmark")),
        f"- run: `bench/web_view.py`, {time.time() - began:.0f} s",
        "",
        "| figure | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows),
        "",
    ]
    print("\n".join(lines))
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n".join(lines))
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
