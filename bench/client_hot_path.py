"""The client's hot path: `Client.report` in step mode, and the Keras step-mode callback.

    .venv/bin/python bench/client_hot_path.py [--quick] [--no-record]

Against a real `lrpilot serve` with a `unit: step` policy, each figure next to a baseline
measured in the same run:

- `Client.report(epoch, metrics, step=s, wait=False)` per call (median and p99) in a tight
  loop, vs a raw msgpack pack + NOBLOCK send of the same report on a bare DEALER;
- reports dropped at 1 report/ms: what the controller counted (`lrpilot_reports_total`) vs
  what was reported, and the client's own `stats["dropped"]`; the same for the tight loop;
- the Keras per-batch cost of `LRPilotCallback(unit="step")` vs the same fit without a
  callback, and vs a callback whose `on_train_batch_end` does nothing (Keras' own price for
  a synchronous batch hook), plus the time spent inside the callback's batch hook.

The figures are appended to bench/RESULTS.md (date, machine, versions) unless --no-record.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from conftest import Controller  # noqa: E402
from measured import context, cpu_seconds  # noqa: E402

from lrpilot.client import Client  # noqa: E402
from lrpilot.client.protocol import Hello, encode  # noqa: E402

POLICY = "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 500, unit: step}\n"
RESULTS = ROOT / "bench" / "RESULTS.md"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def raw_pack_send(endpoint: str, job: str, n: int) -> list[float]:
    """Per-call µs of packing a report and sending it NOBLOCK on a DEALER that said hello."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    session = os.urandom(16)
    sock.setsockopt(zmq.ROUTING_ID, session)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)  # never Again: the figure is the cost of pack + send
    sock.connect(endpoint)
    sock.send(encode(Hello(job, 0, 1, session, 0.1, 0).to_wire()))
    sock.poll(5000)
    times = []
    clock, packb, noblock = time.perf_counter_ns, msgpack.packb, zmq.NOBLOCK
    for s in range(n):
        t0 = clock()
        message = {
            "t": "report",
            "job": job,
            "rank": 0,
            "session": session,
            "seq": s + 1,
            "epoch": 0,
            "step": s,
            "metrics": {"loss": 1.0 / (s + 1)},
            "lr": 0.1,
        }
        sock.send(packb(message, use_bin_type=True), noblock)
        times.append((clock() - t0) / 1000)
    sock.close(0)
    ctx.term()
    return times


def client_reports(endpoint: str, job: str, n: int) -> tuple[list[float], Client]:
    """Per-call µs of `Client.report` in step mode, tight loop; the client, still open."""
    client = Client(endpoint, job=job, initial_lr=0.1, rank=0, world=1)
    times = []
    clock, report = time.perf_counter_ns, client.report
    for s in range(n):
        t0 = clock()
        report(0, {"loss": 1.0 / (s + 1)}, step=s, wait=False)
        times.append((clock() - t0) / 1000)
    return times, client


def paced_reports(endpoint: str, job: str, n: int) -> Client:
    """One report per millisecond, as a fast training loop would send them."""
    client = Client(endpoint, job=job, initial_lr=0.1, rank=0, world=1)
    start = time.perf_counter()
    for s in range(n):
        due = start + s / 1000
        while (left := due - time.perf_counter()) > 0:
            if left > 3e-4:
                time.sleep(left - 2e-4)
        client.report(0, {"loss": 1.0 / (s + 1)}, step=s, wait=False)
    return client


def reached(c: Controller, job: str, expected: int, client: Client) -> float:
    """The controller's count of decided reports of `job`, once the client is answered."""
    client.flush(timeout=60)
    deadline = time.monotonic() + 30
    while True:
        count = float(c.metric("lrpilot_reports_total", training_job=job))
        if count >= expected or time.monotonic() > deadline:
            return count
        client.poll()


# A peer that answers every message as the controller would for POLICY (the schedule as a
# plan, repeated in every reply), at the least CPU cost: with it, what the callback adds is
# the client's own cost, not the controller's sharing the cores.
STAND_IN = """
import msgpack, zmq
sock = zmq.Context().socket(zmq.ROUTER)
print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
plans = {}
while True:
    identity, frame = sock.recv_multipart()
    m = msgpack.unpackb(frame, raw=False)
    if m["t"] == "bye":
        continue
    report = m["t"] == "report"
    if not report and m.get("plans"):
        plans[m["job"]] = {"kind": "step", "params": {"factor": 0.5, "step_size": 500},
                           "unit": "step", "from": 0, "until": None, "lr0": m["lr"],
                           "scale": 1.0}
    reply = {
        "t": "lr", "job": m["job"], "lr": m["lr"], "version": 1, "run": 1,
        "seq": m["seq"] if report else None, "apply_from_epoch": None,
        "apply_from_step": m["step"] + 1 if report else m["start_step"],
        "reason": "unchanged" if report else "initial"}
    if m["job"] in plans:
        reply["plan"] = plans[m["job"]]
    sock.send_multipart([identity, msgpack.packb(reply, use_bin_type=True)])
"""

#: Batches of each fit left out of its per-batch time: the hello and the first turns.
WARM_BATCHES = 32


def keras_per_batch(
    c: Controller, epochs: int, rounds: int, report_every: int = 1
) -> dict[str, float]:
    """µs per batch of the same fit: no callback, an empty batch hook, LRPilotCallback against
    the controller and against a minimal stand-in (reporting every `report_every` steps).

    A batch's time is the steady state's: from the begin of batch `WARM_BATCHES` to the
    begin of the last, as a callback with only `on_train_batch_begin` (which every variant
    has, and which leaves Keras' asynchronous batch ends alone) sees it. What a fit costs
    besides (the hello and its answer, the close) is `per_fit`: the whole fit's time less
    its batches at the steady rate."""
    import keras
    import numpy as np

    from lrpilot.client.keras import LRPilotCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 8)).astype("float32")
    y = rng.normal(size=(2048, 1)).astype("float32")
    batch_size = 8
    batches = epochs * len(x) // batch_size

    class EmptyHook(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: object = None) -> None:
            pass

    class Timed(LRPilotCallback):  # type: ignore[misc]
        spent = 0.0
        calls = 0

        def _on_step_end(self, batch: int, logs: Any = None) -> None:
            t0 = time.perf_counter()
            super()._on_step_end(batch, logs)
            Timed.spent += time.perf_counter() - t0
            Timed.calls += 1

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    model.fit(x, y, epochs=1, batch_size=batch_size, verbose=0)  # trace outside the timing

    class Clock(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.begins: list[float] = []

        def on_train_batch_begin(self, batch: int, logs: object = None) -> None:
            self.begins.append(time.perf_counter())

    fixed: dict[str, list[float]] = {}

    def fit(callbacks: list[Any], name: str) -> float:
        model.optimizer.learning_rate = 0.01
        clock = Clock()
        t0 = time.perf_counter()
        model.fit(
            x, y, epochs=epochs, batch_size=batch_size, verbose=0, callbacks=[*callbacks, clock]
        )
        whole = time.perf_counter() - t0
        begins = clock.begins[WARM_BATCHES:]
        per_batch = (begins[-1] - begins[0]) / (len(begins) - 1)
        fixed.setdefault(name, []).append((whole - per_batch * batches) * 1e3)
        return per_batch * 1e6

    assert c.proc is not None
    pid = c.proc.pid
    stand_in = subprocess.Popen([sys.executable, "-c", STAND_IN], stdout=subprocess.PIPE, text=True)
    assert stand_in.stdout is not None
    stand_in_endpoint = f"tcp://127.0.0.1:{int(stand_in.stdout.readline())}"
    names = ("none", "empty", "pilot", "stand_in", "controller", "stand_in_cpu")
    runs: dict[str, list[float]] = {name: [] for name in names}

    def variant(name: str, i: int) -> None:
        if name == "none":
            runs[name].append(fit([], name))
        elif name == "empty":
            runs[name].append(fit([EmptyHook()], name))
        elif name == "pilot":
            before = cpu_seconds(pid)
            pilot = Timed(
                job=f"bench-keras-{report_every}-{i}",
                endpoint=c.bind,
                unit="step",
                report_every=report_every,
            )
            runs[name].append(fit([pilot], name))
            runs["controller"].append((cpu_seconds(pid) - before) / batches * 1e6)
        else:
            alone = LRPilotCallback(
                job=f"bench-{i}", endpoint=stand_in_endpoint, unit="step", report_every=report_every
            )
            before = cpu_seconds(stand_in.pid)
            runs[name].append(fit([alone], name))
            runs["stand_in_cpu"].append((cpu_seconds(stand_in.pid) - before) / batches * 1e6)

    order = ["none", "empty", "pilot", "stand_in"]
    try:
        # Short fits, interleaved, in a rotating order: the load of a shared machine drifts
        # over seconds, and so hits every variant alike.
        for i in range(rounds):
            for name in order[i % 4 :] + order[: i % 4]:
                variant(name, i)
    finally:
        stand_in.kill()
        stand_in.wait()
    out = {name: statistics.median(values) for name, values in runs.items()}

    def extra(name: str, base: str) -> float:
        # From the differences within each round: robust to a load that changes between them.
        return statistics.median(a - b for a, b in zip(runs[name], runs[base], strict=True))

    out["extra"], out["own"] = extra("pilot", "none"), extra("pilot", "empty")
    # ms a fit costs beyond its batches (the hello, the close), over the same without.
    out["per_fit"] = statistics.median(fixed["pilot"]) - statistics.median(fixed["none"])
    out["per_fit_alone"] = statistics.median(fixed["stand_in"]) - statistics.median(fixed["none"])
    out["alone"] = extra("stand_in", "none")
    out["inside"] = Timed.spent / max(1, Timed.calls) * 1e6
    Timed.spent, Timed.calls = 0.0, 0
    out["batches"] = batches
    return out


HOT_PATH_VERSIONS = ("pyzmq", "msgpack", "keras", "tensorflow", "tensorflow-cpu", "lrpilot")

Row = tuple[str, str, str, str, str]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer reports and batches")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    n = 2000 if args.quick else 5000
    paced = 2000 if args.quick else 5000
    started = time.monotonic()
    started_load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    rows: list[Row] = []

    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        c = Controller(Path(tmp) / "state", policy).start()
        try:
            rows += tight_loop(c, n)
            rows += one_per_millisecond(c, paced)
            rows += controller_cpu_by_cadence(c, 2000 if args.quick else 4000)
            try:
                import keras  # noqa: F401
            except ImportError:
                print("Keras not installed: skipped the callback figure")
            else:
                rows += keras_rows(c, quick=args.quick)
        finally:
            c.stop()

    for row in rows:
        print(" | ".join(row))
    if not args.no_record:
        argv = " ".join(sys.argv[1:])
        run = f"run: `bench/client_hot_path.py{' ' + argv if argv else ''}`"
        record(
            rows,
            [
                *context(started_load, HOT_PATH_VERSIONS, "the client"),
                f"{run}, {time.monotonic() - started:.0f} s",
            ],
        )
    return 0


def tight_loop(c: Controller, n: int) -> list[Row]:
    raw: list[float] = []
    ours: list[float] = []
    decided = dropped = 0.0
    for i in range(3):  # interleaved with the baseline
        raw += raw_pack_send(c.bind, f"bench-raw-{i}", n)
        times, client = client_reports(c.bind, f"bench-tight-{i}", n)
        ours += times
        decided += reached(c, f"bench-tight-{i}", n, client)
        dropped += client.stats["dropped"]
        client.close()
    med, raw_med = statistics.median(ours), statistics.median(raw)
    p99, raw_p99 = percentile(ours, 0.99), percentile(raw, 0.99)
    mean, raw_mean = statistics.mean(ours), statistics.mean(raw)
    return [
        (
            f"`Client.report(..., step=s, wait=False)` per call, tight loop of 3 × {n}",
            f"median {med:.2f} µs, p99 {p99:.2f} µs, mean {mean:.2f} µs",
            f"raw msgpack pack + NOBLOCK send: median {raw_med:.2f} µs, p99 {raw_p99:.2f} µs, "
            f"mean {raw_mean:.2f} µs",
            f"{med / raw_med:.2f} (mean {mean / raw_mean:.2f})",
            "≤ 10 µs median: " + ("met" if med <= 10 else "NOT met"),
        ),
        (
            "reports of that tight loop decided by the controller",
            f"{int(decided)} (client `dropped` {int(dropped)})",
            f"{3 * n} reported",
            f"{decided / (3 * n):.3f}",
            "none lost: " + ("met" if decided == 3 * n and not dropped else "NOT met"),
        ),
    ]


def controller_cpu_by_cadence(c: Controller, n: int) -> list[Row]:
    """The controller's CPU per report of a client reporting every millisecond while a
    schedule runs as a plan: its bursts every 100 ms (what the client does) against every
    10 ms (what it did, and still does during a sweep or under a guard), interleaved."""
    import lrpilot.client.core as core

    assert c.proc is not None
    cadence = core._TURN_EVERY_PLAN
    cpu: dict[float, list[float]] = {0.1: [], 0.01: []}
    try:
        for i in range(3):
            for every in (0.01, 0.1):
                core._TURN_EVERY_PLAN = every
                client = Client(c.bind, job=f"bench-cadence-{every}-{i}", initial_lr=0.1)
                deadline = time.monotonic() + 10
                while client.plan is None and time.monotonic() < deadline:
                    client.poll(step=0)
                    time.sleep(0.01)
                before = cpu_seconds(c.proc.pid)
                start = time.perf_counter()
                for s in range(n):
                    while time.perf_counter() < start + s / 1000:
                        pass
                    client.report(0, {"loss": 1.0}, step=s, wait=False)
                client.flush(timeout=30)
                cpu[every].append((cpu_seconds(c.proc.pid) - before) / n * 1e6)
                client.close()
    finally:
        core._TURN_EVERY_PLAN = cadence
    slow, fast = statistics.median(cpu[0.1]), statistics.median(cpu[0.01])
    return [
        (
            f"the controller's CPU per report at 1 report/ms with a schedule's plan, the "
            f"client's bursts every 100 ms (3 × {n} reports)",
            f"{slow:.0f} µs",
            f"bursts every 10 ms: {fast:.0f} µs",
            f"{slow / fast:.2f}",
            "—",
        )
    ]


def one_per_millisecond(c: Controller, paced: int) -> list[Row]:
    client = paced_reports(c.bind, "bench-paced", paced)
    decided = int(reached(c, "bench-paced", paced, client))
    stats = dict(client.stats)
    client.close()
    lost = paced - decided
    return [
        (
            f"reports dropped at 1 report/ms ({paced} reports)",
            f"{lost} (controller decided {decided}; client `dropped` {stats['dropped']}, "
            f"`backpressure` {stats['backpressure']}, `timeouts` {stats['timeouts']})",
            f"{paced} reported",
            f"{decided / paced:.3f}",
            "0 dropped: " + ("met" if lost == 0 and stats["dropped"] == 0 else "NOT met"),
        )
    ]


def keras_rows(c: Controller, quick: bool) -> list[Row]:
    rows: list[Row] = []
    for every in (1, 10):
        k = keras_per_batch(c, 1, 4 if quick else 16, report_every=every)
        setting = "unit='step'" if every == 1 else f"unit='step', report_every={every}"
        goal = "≤ 30 µs: " if every == 1 else "(default is 1) ≤ 30 µs: "
        rows += [
            (
                f"Keras `LRPilotCallback({setting})` against a minimal stand-in controller in "
                "its own process (the client's own cost), extra per batch in a fit's steady "
                "state",
                f"{k['alone']:+.1f} µs ({k['stand_in']:.0f} µs/batch); the stand-in's own CPU "
                f"{k['stand_in_cpu']:.0f} µs/batch on the same cores; once per fit (hello, "
                f"close) {k['per_fit_alone']:+.1f} ms",
                f"no callback {k['none']:.0f} µs/batch",
                f"{k['stand_in'] / k['none']:.3f}",
                goal + ("met" if k["alone"] <= 30 else "NOT met"),
            ),
            (
                f"Keras `LRPilotCallback({setting})`, extra per batch in a fit's steady state "
                f"({int(k['batches'])} batches a fit, the first {WARM_BATCHES} left out; median "
                "of the per-round differences)",
                f"{k['extra']:+.1f} µs ({k['pilot']:.0f} µs/batch); inside its batch hook "
                f"{k['inside']:.1f} µs; {k['own']:+.1f} µs over an empty batch hook; the "
                f"controller's own CPU {k['controller']:.0f} µs/batch on the same cores (its "
                f"per-fit work included); once per fit (hello, close) {k['per_fit']:+.1f} ms",
                f"no callback {k['none']:.0f} µs/batch; an empty `on_train_batch_end` "
                f"{k['empty']:.0f} µs/batch",
                f"{k['pilot'] / k['none']:.3f}",
                goal + ("met" if k["extra"] <= 30 else "NOT met"),
            ),
        ]
    return rows


def record(rows: list[Row], lines: list[str]) -> None:
    """Appends one section to bench/RESULTS.md."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "",
        f"## {when} — client hot path (bench/client_hot_path.py)",
        "",
        *(f"- {line}" for line in lines),
        "",
        "| figure | value | baseline (same run) | ratio | goal (issue 8) |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
    ]
    if not RESULTS.exists():
        text[0:1] = [
            "# Benchmark results",
            "",
            "Sections are appended by the scripts in bench/.",
            "",
        ]
    with RESULTS.open("a") as out:
        out.write("\n".join(text))
    print(f"appended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
