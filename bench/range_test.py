"""The LR range test per sweep step in torch, vs the same loop without lrpilot.

    .venv/bin/python bench/range_test.py [--quick] [--no-record]

A digits-sized MLP (64 inputs, 10 classes, batch 64, SGD, CPU, synthetic data) sweeps the
LR from 1e-6 up by a decade every 40 steps, in interleaved rounds of the same run:

- `none`: the loop without lrpilot: the same sweep computed in the loop
  (`1e-6 * 10 ** (t / 40)`), the loss read with `loss.item()` every step, as
  torch-lr-finder does;
- `lrpilot`: `LRPilotScheduler(opt, model=model, unit="step", monitor="loss")` and
  `sched.step(loss)`
  against a real `lrpilot serve` with `{type: range_test}`, as docs/range-test.md says,
  from the snapshot to the restore (the sweep stops on divergence).

The figures are the wall time per sweep step and the process's CPU time per sweep step (all
its threads: the training loop's and libzmq's I/O thread; torch runs one thread), with the
waits for the controller counted; the ratio is lrpilot's over the loop's without (issue 16's
goal: ≤ 1.1). The sweep runs as a plan: the trainer evaluates it, streams every step's
report and waits at most once, at the sweep's last planned step. Appended to
bench/RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from conftest import Controller  # noqa: E402
from measured import context  # noqa: E402

from lrpilot.client.torch import LRPilotScheduler  # noqa: E402

START, PER_DECADE = 1e-6, 40
POLICY = f"""\
version: 1
defaults:
  policy: {{type: range_test, start_lr: {START}, end_lr: 10, steps_per_decade: {PER_DECADE}}}
"""
RESULTS = ROOT / "bench" / "RESULTS.md"


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1797, 64, generator=g)
    w = torch.randn(64, 10, generator=g)
    return x, (x @ w).argmax(1)


def model_and_opt() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return m, torch.optim.SGD(m.parameters(), lr=START, momentum=0.9)


def batches(x: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    while True:
        for i in range(0, len(x) - 63, 64):
            yield x[i : i + 64], y[i : i + 64]


def sweep_with_lrpilot(endpoint: str, job: str) -> tuple[float, float, int, int]:
    """Seconds per sweep step (wall, CPU), the sweep's steps (snapshot → restore) and the
    waits for the controller during them."""
    x, y = data()
    m, opt = model_and_opt()
    sched = LRPilotScheduler(
        opt, job=job, endpoint=endpoint, model=m, unit="step", monitor="loss", timeout=2
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    steps, start, cpu = 0, None, 0.0
    waits = [0]
    try:
        for xb, yb in batches(x, y):
            loss = loss_fn(m(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step(loss)
            client = sched.client
            if start is None and client is not None and client.last_action == "snapshot":
                start, cpu = time.perf_counter(), time.process_time()
                waits = count_waits(client)
            elif start is not None:
                steps += 1
                if client is not None and client.last_action == "restore":
                    wall = (time.perf_counter() - start) / steps
                    return wall, (time.process_time() - cpu) / steps, steps, waits[0]
            if steps > 2000:
                raise RuntimeError("the sweep never ended")
    finally:
        sched.close()
    raise AssertionError("unreachable")


def count_waits(client: Any) -> list[int]:
    """A counter of the client's waits for the controller (its `_await`) from now on."""
    waits = [0]
    original = client._await

    def counted(*args: Any, **kwargs: Any) -> None:
        waits[0] += 1
        original(*args, **kwargs)

    client._await = counted
    return waits


def sweep_without(steps: int) -> tuple[float, float]:
    """Seconds per step (wall, CPU) of the same loop and sweep without lrpilot."""
    x, y = data()
    m, opt = model_and_opt()
    loss_fn = torch.nn.CrossEntropyLoss()
    start, cpu = time.perf_counter(), time.process_time()
    for t, (xb, yb) in zip(range(steps), batches(x, y), strict=False):
        for group in opt.param_groups:
            group["lr"] = 10 ** (t / PER_DECADE) * START
        loss = loss_fn(m(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    started, started_load = time.monotonic(), "/".join(f"{x:.2f}" for x in os.getloadavg())
    torch.set_num_threads(1)
    ours: list[float] = []
    base: list[float] = []
    ours_cpu: list[float] = []
    base_cpu: list[float] = []
    lengths: list[int] = []
    waited: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        c = Controller(Path(tmp) / "state", policy).start()
        try:
            for r in range(rounds):
                if r % 2:
                    wall, cpu = sweep_without(lengths[-1])
                    base.append(wall)
                    base_cpu.append(cpu)
                wall, cpu, n, waits = sweep_with_lrpilot(c.bind, f"bench-range-{r}")
                ours.append(wall)
                ours_cpu.append(cpu)
                lengths.append(n)
                waited.append(waits)
                if r % 2 == 0:
                    wall, cpu = sweep_without(n)
                    base.append(wall)
                    base_cpu.append(cpu)
        finally:
            c.stop()
    a, b = statistics.median(ours), statistics.median(base)
    ac, bc = statistics.median(ours_cpu), statistics.median(base_cpu)
    rows = [
        [
            "range test, wall per sweep step (`LRPilotScheduler(model=, unit='step', "
            "monitor='loss')`, `step(loss)`)",
            f"{a * 1e3:.3f} ms ({statistics.median(lengths):.0f} sweep steps)",
            f"{b * 1e3:.3f} ms (the same loop and sweep without lrpilot)",
            f"{a / b:.2f}",
            "≤ 1.1: " + ("met" if a / b <= 1.1 else "not met"),
        ],
        [
            "range test, CPU per sweep step (the process, every thread)",
            f"{ac * 1e3:.3f} ms ({(ac - bc) * 1e6:+.0f} µs)",
            f"{bc * 1e3:.3f} ms (the same loop and sweep without lrpilot)",
            f"{ac / bc:.2f}",
            "—",
        ],
        [
            "waits for the controller per sweep (the sweep runs as a plan)",
            f"median {statistics.median(waited):.0f}, max {max(waited)} "
            f"(of {statistics.median(lengths):.0f} steps)",
            "every step (before plans)",
            "—",
            "none per step",
        ],
    ]
    for row in rows:
        print(" | ".join(row))
    if not args.no_record:
        argv = " ".join(sys.argv[1:])
        lines = [
            *context(started_load, ["torch", "pyzmq"], "the training loop"),
            f"run: `bench/range_test.py{' ' + argv if argv else ''}`, {rounds} interleaved "
            f"rounds, {time.monotonic() - started:.0f} s; per round (ms/step): lrpilot "
            + ", ".join(f"{t * 1e3:.2f}" for t in ours)
            + "; without "
            + ", ".join(f"{t * 1e3:.2f}" for t in base),
        ]
        record(rows, lines)
    return 0


def record(rows: list[list[str]], lines: list[str]) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "",
        f"## {when} — the LR range test per sweep step (bench/range_test.py)",
        "",
        *(f"- {line}" for line in lines),
        "",
        "| figure | value | baseline (same run) | ratio | goal (issue 16) |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    with RESULTS.open("a") as out:
        out.write("\n".join(text))
    print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
