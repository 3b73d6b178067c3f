"""What a guard's snapshots cost a training step (torch): none, a synchronous copy, and a
pinned non-blocking one.

    .venv/bin/python bench/guard.py [--quick] [--no-record] [--device cuda|cpu]

One training loop (an MLP, Adam: 8 M parameters on CUDA when there is one, else 0.5 M on
the CPU) is timed in interleaved rounds, in the same run:

- no snapshots (the baseline);
- a `GuardCopy(pinned=False)` every `snapshot_every` steps (a plain synchronous copy to
  host memory), the newest two kept, as the adapters keep them;
- a `GuardCopy(pinned=True)` with the evicted copy's buffers reused: on CUDA, non-blocking
  copies into pinned memory. Pinned memory and non-blocking copies need CUDA: on a
  CPU-only machine this variant is a synchronous copy into reused buffers, named so in the
  output and in RESULTS.md ("reused buffers", with a line saying pinned was unavailable),
  and the pinned figures are left to a run on a CUDA machine.

Per variant: the fastest round's step time (µs; on a shared machine the fastest round is the
one least disturbed) and the median over rounds of its ratio to the baseline round run
right before it (paired: a load that drifts over the run cancels out), at snapshot_every
200 (the default) and 20; and, measured apart, what one snapshot takes (median of 20) and
that cost spread over snapshot_every steps. On the CPU the loop runs on one thread (a
shared 2-core machine: two threads oversubscribed make every step wait for the slower).
Appended to bench/RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from measured import context  # noqa: E402

from lrpilot.client.torch import GuardCopy  # noqa: E402


def build(device: str) -> tuple[Any, Any, Any]:
    """An MLP of about 8 M parameters on CUDA, 0.5 M on the CPU (2 shared cores)."""
    torch.manual_seed(0)
    width = 2048 if device == "cuda" else 512
    model = torch.nn.Sequential(
        torch.nn.Linear(width // 2, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width // 2),
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(64 if device == "cuda" else 16, width // 2, device=device)
    return model, opt, x


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def round_time(
    model: Any, opt: Any, x: Any, steps: int, every: int | None, mode: str, device: str
) -> float:
    """Seconds per step over `steps` steps (one device sync at the end)."""
    kept: list[GuardCopy] = []
    sync(device)
    start = time.perf_counter()
    for step in range(steps):
        if every is not None and step % every == 0:
            if mode == "sync":
                kept.append(GuardCopy(model, [opt], pinned=False))
            else:
                spare = kept[0] if len(kept) >= 2 else None
                kept.append(GuardCopy(model, [opt], pinned=True, reuse=spare))
            del kept[:-2]
        loss = model(x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = args.device
    if device == "cpu":
        torch.set_num_threads(1)
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    steps, rounds = (100, 3) if args.quick else (200 if device == "cpu" else 2000, 7)
    model, opt, x = build(device)
    params = sum(p.numel() for p in model.parameters())
    round_time(model, opt, x, 20, 10, "pinned", device)  # warm up (allocations, kernels)
    pinned = device == "cuda"
    # Without CUDA there is no pinned memory and no non-blocking copy: the second mode is
    # the synchronous copy into the evicted snapshot's buffers, and says so.
    second = "pinned non-blocking" if pinned else "sync, reused buffers"
    if not pinned:
        print(
            "pinned memory and non-blocking copies need CUDA: unavailable on this machine; "
            f"measuring '{second}' in their place (run on a CUDA machine for pinned figures)"
        )
    variants = [
        ("none", None, ""),
        ("sync, every 200", 200, "sync"),
        (f"{second}, every 200", 200, "pinned"),
        ("sync, every 20", 20, "sync"),
        (f"{second}, every 20", 20, "pinned"),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    began = time.perf_counter()
    for _ in range(rounds):
        for name, every, mode in variants:
            times[name].append(round_time(model, opt, x, steps, every, mode, device))
            ratios[name].append(times[name][-1] / times["none"][-1])  # paired with its base
    took = time.perf_counter() - began
    base = min(times["none"])
    rows = []
    for name, _, _ in variants:
        best, paired = min(times[name]), statistics.median(ratios[name])
        rows.append(
            f"| {name} | {best * 1e6:.0f} µs | {base * 1e6:.0f} µs | {best / base:.3f} | "
            f"{paired:.3f} |"
        )
        print(
            f"{name:>32}: {best * 1e6:8.0f} µs/step  ({best / base:.3f}× no snapshots; "
            f"paired median {paired:.3f}×)"
        )
    copies = []
    for mode in ("sync", "pinned"):
        label = "sync" if mode == "sync" else second
        kept: list[GuardCopy] = []
        took_each = []
        for _ in range(20):
            sync(device)
            t0 = time.perf_counter()
            spare = kept[0] if mode == "pinned" and len(kept) >= 2 else None
            kept.append(GuardCopy(model, [opt], pinned=mode == "pinned", reuse=spare))
            del kept[:-2]
            took_each.append(time.perf_counter() - t0)  # host time: what the step waits for
        one = statistics.median(took_each)
        copies.append(
            f"| one snapshot, {label} (host time) | {one * 1e6:.0f} µs | — | "
            f"{one / 200 / base:.4f} of a step at every 200, {one / 20 / base:.4f} at every 20 "
            "| — |"
        )
        print(f"one snapshot, {label}: {one * 1e6:.0f} µs")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    lines = [
        "",
        f"## {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — a guard's snapshots, step time "
        f"(bench/guard.py, {where})",
        "",
        *(f"- {c}" for c in context(load, ["torch"], "the training loop")),
        f"- run: `bench/guard.py{' --quick' if args.quick else ''}`, MLP of {params / 1e6:.1f} M "
        f"parameters + Adam state on {device}; {steps} steps × {rounds} interleaved "
        f"rounds per variant, {took:.0f} s; the fastest round of each, and the median of "
        "each round's ratio to the baseline round right before it"
        + ("; one torch thread" if device == "cpu" else "")
        + (
            "; pinned memory and non-blocking copies need CUDA: **unavailable here, not "
            "measured**; 'sync, reused buffers' (a synchronous copy into the evicted "
            "snapshot's buffers) is what the pinned path does without CUDA"
            if not pinned
            else ""
        ),
        "",
        "| snapshots | step time (fastest round) | no snapshots (same run) | ratio | "
        "paired ratio (median) |",
        "|---|---|---|---|---|",
        *rows,
        *copies,
        "",
    ]
    if not args.no_record:
        with (ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n".join(lines))


if __name__ == "__main__":
    main()
