"""What recording metrics adds to a turn's commit, on PostgreSQL beside SQLite.

    .venv/bin/python bench/pg_metrics.py [--turns 400] [--no-record]

One store of each kind (PostgreSQL: tests/pgcluster.py, fsync on; SQLite: synchronous=FULL),
the same turns: 64 jobs' rows each, alternately with one recorded point per job (what a
turn of 64 decided epochs writes) and without. Figures: the median commit time of each,
and what the points add, PostgreSQL's beside SQLite's measured in the same run (the first
50 turns of each kind are left out: PostgreSQL prepares its statement after 5).

The figures are appended to bench/RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from measured import context  # noqa: E402
from pgcluster import PgCluster  # noqa: E402

from lrpilot.controller import pgstore as pgstore_module  # noqa: E402
from lrpilot.controller.pgstore import PgStore  # noqa: E402
from lrpilot.controller.store import MetricPoint, Store, Writes, encode_row  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
JOBS = [f"job-{i}" for i in range(64)]
WARMUP = 50


class TextParams:
    """A PgStore whose commit sends its arrays as text parameters (`%s`), as before they
    went in binary (`%b`): the same statement otherwise, on its own database."""

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.statements = {
            name: getattr(pgstore_module, name).replace("%b", "%s")
            for name in ("_COMMIT", "_COMMIT_THIN")
        }

    def commit(self, w: Writes) -> None:
        saved = {name: getattr(pgstore_module, name) for name in self.statements}
        try:
            for name, text in self.statements.items():
                setattr(pgstore_module, name, text)
            self.store.commit(w)
        finally:
            for name, text in saved.items():
                setattr(pgstore_module, name, text)


def measure(stores: dict[str, Any], turns: int) -> dict[tuple[str, bool], float]:
    """Median seconds per commit by (store, with points), the kinds interleaved."""
    row = encode_row({"lr": 0.1, "best": 0.5, "seqs": {str(i): i for i in range(8)}})
    times: dict[tuple[str, bool], list[float]] = {(s, p): [] for s in stores for p in (1, 0)}
    for t in range(turns):
        for name, store in stores.items():
            for points in (True, False):
                w = Writes(jobs=dict.fromkeys(JOBS, row))
                if points:
                    w.metrics = [
                        MetricPoint(j, 1, t, t, 0.1, 1.7e9 + t, {"val_loss": 0.5, "acc": 0.9})
                        for j in JOBS
                    ]
                start = time.perf_counter()
                store.commit(w)
                times[(name, points)].append(time.perf_counter() - start)
    return {k: statistics.median(v[WARMUP:]) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=400)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    with PgCluster(fsync=True) as pg, tempfile.TemporaryDirectory() as state:
        pgstore = PgStore(pg.create_db(f"bench_{uuid.uuid4().hex[:8]}"))
        pgtext = PgStore(pg.create_db(f"bench_{uuid.uuid4().hex[:8]}"))
        sqlite = Store(state)
        try:
            for store in (pgstore, pgtext):
                store.register("tcp://bench:1", "tcp://bench:2")
                assert len(store.tick()[0]) == store.shards
            stores = {"PostgreSQL": pgstore, "SQLite": sqlite, "text": TextParams(pgtext)}
            m = measure(stores, args.turns)
        finally:
            pgstore.close()
            pgtext.close()
            sqlite.close()
    added = {s: m[(s, True)] - m[(s, False)] for s in ("PostgreSQL", "SQLite")}
    lines = [
        f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — recorded metrics on "
        "PostgreSQL: the commit (bench/pg_metrics.py)",
        "",
        *(f"- {x}" for x in context(load, ["psycopg"], "the benchmark")),
        f"- run: `bench/pg_metrics.py --turns {args.turns}`; 64 jobs' rows per turn, medians",
        "",
        "| figure | PostgreSQL (fsync on) | SQLite (baseline, same run) | ratio |",
        "|---|---|---|---|",
        *(
            f"| commit, {what} | {m[('PostgreSQL', p)] * 1e3:.2f} ms | "
            f"{m[('SQLite', p)] * 1e3:.2f} ms | {m[('PostgreSQL', p)] / m[('SQLite', p)]:.2f} |"
            for what, p in (("64 rows + 64 recorded points", True), ("64 rows, no points", False))
        ),
        f"| what the 64 points add | {added['PostgreSQL'] * 1e3:.2f} ms | "
        f"{added['SQLite'] * 1e3:.2f} ms | {added['PostgreSQL'] / added['SQLite']:.2f} |",
        "",
        "| figure | PostgreSQL, arrays as binary parameters | the same as text parameters "
        "(before; same run) | ratio |",
        "|---|---|---|---|",
        *(
            f"| commit, {what} | {m[('PostgreSQL', p)] * 1e3:.2f} ms | "
            f"{m[('text', p)] * 1e3:.2f} ms | {m[('PostgreSQL', p)] / m[('text', p)]:.2f} |"
            for what, p in (("64 rows + 64 recorded points", True), ("64 rows, no points", False))
        ),
        "",
    ]
    print("\n".join(lines))
    if not args.no_record:
        with RESULTS.open("a") as out:
            out.write("\n" + "\n".join(lines))
        print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
