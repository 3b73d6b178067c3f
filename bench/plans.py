"""Per-step control in torch: a plan evaluated in the trainer, vs torch's own schedulers.

    .venv/bin/python bench/plans.py [--quick] [--no-record] [--no-keras]

Against a real `lrpilot serve` with a per-step exponential schedule (`unit: step`), one
training loop (a small MLP, SGD, CPU) is timed in interleaved rounds, in the same run:

- no scheduler (the baseline every "extra per step" figure is taken against);
- torch's `LambdaLR` with the same schedule (`0.99 ** (step / 100)`);
- `LRPilotScheduler(unit="step")` with plans off (`plans: false` in the hello: every LR is
  a controller decision, one report per step, as before plans);
- the same with plans on (the client evaluates the plan; no message while it runs);
- a per-step monitor: torch's `ReduceLROnPlateau.step(loss)` every step (the reference:
  a host read per step), and the plan with `step(loss)` and `report_every=10` (the loss
  summed on its device, one host read per report, one report late).

Host reads per report are counted with a torch.Tensor subclass (every conversion of the
loss, or of a tensor computed from it, to a number or to host memory). Also counted for the
plan: the messages the client sent, and the controller's log lines for the job (one per
plan). With Keras installed, the Keras step-mode callback's extra time per batch
(bench/client_hot_path.py's figure) against no callback in the same run. The figures are
appended to bench/RESULTS.md unless --no-record. bench/gpu_step.py runs the torch loop on
CUDA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from conftest import Controller  # noqa: E402
from measured import context  # noqa: E402

from lrpilot.client.torch import LRPilotScheduler  # noqa: E402

POLICY = """\
version: 1
defaults:
  policy: {type: exponential, unit: step, decay_rate: 0.99, decay_steps: 100}
"""
RESULTS = ROOT / "bench" / "RESULTS.md"
LR0 = 0.1
REPORT_EVERY = 10  # the per-step monitor's
KINDS = ["none", "lambda", "lrpilot-noplan", "lrpilot-plan", "plateau-loss", "lrpilot-loss"]
#: Tensor methods that read a value to the host (on an accelerator: wait for the device).
READS = frozenset(
    {"item", "tolist", "numpy", "cpu", "__float__", "__int__", "__index__", "__bool__"}
)


class Counted(torch.Tensor):
    """A tensor that counts the host reads of itself and of tensors computed from it."""

    reads: ClassVar[int] = 0

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_host = name == "to" and any(
            isinstance(a, str | torch.device) for a in (*args[1:], *kwargs.values())
        )
        copied = name == "copy_" and len(args) > 1 and isinstance(args[1], Counted)
        if name in READS or to_host or copied:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs)


def make_loop(
    device: str = "cpu",
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    model.to(device)
    # A small model: the figures are the schedulers' extra time, not the step's.
    opt = torch.optim.SGD(model.parameters(), lr=LR0)
    x, y = torch.randn(64, 32, device=device), torch.randn(64, 1, device=device)

    def train_step() -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return model, opt, train_step


def scheduler(kind: str, opt: torch.optim.Optimizer, endpoint: str, name: str) -> Any:
    """The scheduler of variant `kind` and how its `step` is called: (scheduler, step)."""
    if kind == "lambda":
        lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.99 ** (s / 100))
        return lam, lambda loss: lam.step()
    if kind == "plateau-loss":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        # torch's float(metrics): a host read every step
        return plateau, lambda loss: plateau.step(loss.detach())
    if kind.startswith("lrpilot"):
        every = REPORT_EVERY if kind == "lrpilot-loss" else 1
        sched = LRPilotScheduler(
            opt, job=name, endpoint=endpoint, unit="step", timeout=2.0, report_every=every
        )
        sched._core.plans = kind != "lrpilot-noplan"  # the before/after switch
        if kind == "lrpilot-loss":
            return sched, sched.step
        return sched, lambda loss: sched.step()
    return None, lambda loss: None


def run(
    kind: str, endpoint: str, steps: int, round_no: int, device: str = "cpu"
) -> tuple[float, float, dict[str, Any]]:
    """(seconds per step of `steps` training steps with scheduler `kind`, median seconds
    inside one scheduler call, info)."""
    _, opt, train_step = make_loop(device)
    sched, call = scheduler(kind, opt, endpoint, f"bench-{kind}-{round_no}")
    for _ in range(20):  # warm up (and, for lrpilot, say hello)
        call(train_step())
    inside: list[float] = []
    clock = time.perf_counter
    start = clock()
    for _ in range(steps):
        loss = train_step()
        t0 = clock()
        call(loss)  # nothing for "none": the timer's own cost, subtracted from the others
        inside.append(clock() - t0)
    elapsed = clock() - start
    info: dict[str, Any] = {}
    if isinstance(sched, LRPilotScheduler):
        client = sched.client
        info = {"sent": client.stats["sent"], "plan": client.plan is not None, "lr": client.lr}
        sched.close()
    return elapsed / steps, statistics.median(inside), info


def tight(kind: str, endpoint: str, calls: int = 20000, rounds: int = 5) -> float:
    """Seconds per scheduler call in a tight loop (no training step between calls: the
    scheduler's own work, without the cache misses a training step leaves), best of
    `rounds`."""
    _, opt, _ = make_loop()
    sched, call = scheduler(kind, opt, endpoint, f"bench-tight-{kind}")
    call(None)  # says hello
    best = float("inf")
    clock = time.perf_counter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LambdaLR: "step() before optimizer.step()"
        for _ in range(rounds):
            start = clock()
            for _ in range(calls):
                call(None)
            best = min(best, (clock() - start) / calls)
    if isinstance(sched, LRPilotScheduler):
        sched.close()
    return best


def host_reads(kind: str, endpoint: str, steps: int) -> float:
    """Host reads of the loss per report (per step for torch's plateau) over `steps` steps,
    counted with `Counted`."""
    _, opt, train_step = make_loop()
    sched, call = scheduler(kind, opt, endpoint, f"bench-reads-{kind}")
    Counted.reads = 0
    for _ in range(steps):
        call(train_step().as_subclass(Counted))
    if isinstance(sched, LRPilotScheduler):
        sched.close()
    return Counted.reads / (steps / REPORT_EVERY if kind == "lrpilot-loss" else steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--no-keras", action="store_true", help="leave out the Keras figure")
    args = parser.parse_args()
    steps, rounds = (500, 3) if args.quick else (3000, 7)
    started, started_load = time.monotonic(), "/".join(f"{x:.2f}" for x in os.getloadavg())
    torch.set_num_threads(1)
    kinds = KINDS
    times: dict[str, list[float]] = {k: [] for k in kinds}
    calls: dict[str, list[float]] = {k: [] for k in kinds}
    infos: dict[str, dict[str, Any]] = {}
    keras: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        c = Controller(Path(tmp) / "state", policy).start()
        try:
            for r in range(rounds):
                for kind in kinds if r % 2 == 0 else reversed(kinds):
                    per_step, per_call, info = run(kind, c.bind, steps, r)
                    times[kind].append(per_step)
                    calls[kind].append(per_call)
                    if info:
                        infos[kind] = info
            reads = {k: host_reads(k, c.bind, 200) for k in ("plateau-loss", "lrpilot-loss")}
            alone = {k: tight(k, c.bind) * 1e6 for k in ("lambda", "lrpilot-plan")}
            log = c.log()
            if not args.no_keras:
                keras = keras_figures(c, args.quick)
        finally:
            c.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["none"]
    loop_extra = {k: (med[k] - base) * 1e6 for k in kinds}
    timer = statistics.median(calls["none"])
    extra = {k: (statistics.median(calls[k]) - timer) * 1e6 for k in kinds}
    plan_lines = sum(f"job bench-lrpilot-plan-{rounds - 1}: lr " in x for x in log.splitlines())
    noplan_lines = sum(f"job bench-lrpilot-noplan-{rounds - 1}: lr " in x for x in log.splitlines())
    lam = max(extra["lambda"], 1e-9)
    plateau = max(extra["plateau-loss"], 1e-9)
    met = extra["lrpilot-plan"] <= 5 and extra["lrpilot-plan"] <= extra["lambda"]
    rows = [
        [
            "training step, no scheduler (median of rounds)",
            f"{base * 1e6:.1f} µs",
            "—",
            "—",
            "—",
        ],
        [
            "torch `LambdaLR`, extra per step (median time in `step()`)",
            f"{extra['lambda']:+.1f} µs (whole loop: {loop_extra['lambda']:+.0f} µs)",
            "no scheduler",
            "—",
            "—",
        ],
        [
            "`LRPilotScheduler(unit='step')`, plans off (one decision per step), extra per step",
            f"{extra['lrpilot-noplan']:+.1f} µs (whole loop: {loop_extra['lrpilot-noplan']:+.0f} "
            f"µs); {infos['lrpilot-noplan']['sent']} messages sent, {noplan_lines} controller "
            f"log lines for {steps + 20} steps",
            f"LambdaLR {extra['lambda']:+.1f} µs",
            f"{extra['lrpilot-noplan'] / lam:.2f}",
            "issue 16 'now': +206 µs (H200)",
        ],
        [
            "`LRPilotScheduler(unit='step')`, plan, extra per step",
            f"{extra['lrpilot-plan']:+.1f} µs (whole loop: {loop_extra['lrpilot-plan']:+.0f} "
            f"µs); {infos['lrpilot-plan']['sent']} messages sent, "
            f"{plan_lines} controller log line for {steps + 20} steps",
            f"LambdaLR {extra['lambda']:+.1f} µs",
            f"{extra['lrpilot-plan'] / lam:.2f}",
            "≤ 5 µs and no slower than LambdaLR: " + ("met" if met else "not met"),
        ],
        [
            "the same two, per `step()` call in a tight loop (no training step between: "
            "the scheduler's own work; best of 5 × 20,000 calls)",
            f"plan {alone['lrpilot-plan']:.2f} µs",
            f"LambdaLR {alone['lambda']:.2f} µs",
            f"{alone['lrpilot-plan'] / alone['lambda']:.2f}",
            "≤ 5 µs and no slower than LambdaLR: "
            + ("met" if alone["lrpilot-plan"] <= min(5, alone["lambda"]) else "not met"),
        ],
        [
            "torch `ReduceLROnPlateau.step(loss)` every step, extra per step; host reads",
            f"{extra['plateau-loss']:+.1f} µs (whole loop: {loop_extra['plateau-loss']:+.0f} "
            f"µs); {reads['plateau-loss']:.2f} host reads per step",
            "no scheduler",
            "—",
            "issue 16 reference: +97 µs, 1 sync per step (H200)",
        ],
        [
            f"`LRPilotScheduler(unit='step', report_every={REPORT_EVERY})`, plan, "
            "`step(loss)` every step, extra per step; host reads per report",
            f"{extra['lrpilot-loss']:+.1f} µs (whole loop: {loop_extra['lrpilot-loss']:+.0f} "
            f"µs); {reads['lrpilot-loss']:.2f} host reads per report, 0 between reports",
            f"ReduceLROnPlateau(loss) {extra['plateau-loss']:+.1f} µs, "
            f"{reads['plateau-loss']:.2f} reads per step",
            f"{extra['lrpilot-loss'] / plateau:.2f} (to the plateau's extra)",
            "≤ 1 host read per report: "
            + ("met" if reads["lrpilot-loss"] <= 1 + REPORT_EVERY / 200 else "not met"),
        ],
        *([list(row) for row in keras]),
    ]
    for row in rows:
        print(" | ".join(row))
    if not args.no_record:
        argv = " ".join(sys.argv[1:])
        lines = [
            *context(started_load, ["torch", "pyzmq", "keras"], "the training loop"),
            f"run: `bench/plans.py{' ' + argv if argv else ''}`, {steps} steps × {rounds} "
            f"interleaved rounds per variant, {time.monotonic() - started:.0f} s; "
            f"rounds per variant (µs/step): "
            + "; ".join(f"{k} " + ", ".join(f"{t * 1e6:.0f}" for t in times[k]) for k in kinds)
            + "; extra per step = median time inside the scheduler's `step()` minus the "
            "timer's own; host reads counted with a torch.Tensor subclass over 200 steps",
        ]
        record(rows, lines)
    return 0


def keras_figures(c: Controller, quick: bool) -> list[tuple[str, str, str, str, str]]:
    """bench/client_hot_path.py's Keras per-batch rows, against the same controller."""
    try:
        import keras  # noqa: F401
    except ImportError:
        print("Keras not installed: skipped the Keras figure")
        return []
    sys.path.insert(0, str(ROOT / "bench"))
    from client_hot_path import keras_rows

    return keras_rows(c, quick=quick)


def record(rows: list[list[str]], lines: list[str]) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "",
        f"## {when} — per-step control: a plan vs torch LambdaLR, per-step monitors "
        "(bench/plans.py)",
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
