"""lrpilot benchmarks: each figure is printed next to a baseline measured in the same run.

    make bench            # or: .venv/bin/python bench/run.py [--quick]

Figures: decisions per second through a real controller (vs a bare ZeroMQ
round trip), policy-engine steps per second (vs a no-op call), the time a
Keras epoch gains from LRPilotCallback (vs the same fit without it), the
latency from a policy-file edit to the pushed LR, and the controller's CPU use
while idle (the cost of watching the policy file).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from conftest import Controller, Wire  # noqa: E402
from measured import cpu_seconds  # noqa: E402

POLICY = (
    "version: 1\ndefaults:\n  policy: {type: plateau, factor: 0.5, patience: 3, min_delta: 0.0}\n"
)


def bare_zmq_round_trips(n: int) -> float:
    """Round trips per second of a DEALER to a ROUTER echo thread: the transport's ceiling."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            if router.poll(100):
                router.send_multipart(router.recv_multipart())

    t = threading.Thread(target=echo)
    t.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    payload = b"x" * 120
    t0 = time.perf_counter()
    for _ in range(n):
        dealer.send(payload)
        dealer.recv()
    rate = n / (time.perf_counter() - t0)
    stop.set()
    t.join()
    dealer.close(0)
    router.close(0)
    ctx.term()
    return rate


def controller_decisions(c: Controller, n: int) -> float:
    w = Wire(c.bind, "bench-decisions")
    w.hello()
    t0 = time.perf_counter()
    for e in range(n):
        w.report(e, {"val_loss": 1.0 + (e % 7) * 0.01})
    rate = n / (time.perf_counter() - t0)
    w.close()
    return rate


def engine_steps(n: int) -> tuple[float, float]:
    from lrpilot.controller.policies import Plateau

    policy = Plateau(patience=3, factor=0.5)
    state = policy.start(0.1, 0)
    t0 = time.perf_counter()
    for e in range(n):
        state, _ = policy.step(state, e, {"val_loss": 1.0 + (e % 7) * 0.01}, {})
    engine = n / (time.perf_counter() - t0)

    def noop(s: object, e: int, m: dict[str, float], d: dict[str, str]) -> tuple[object, None]:
        return s, None

    t0 = time.perf_counter()
    s: object = None
    for e in range(n):
        s, _ = noop(s, e, {"val_loss": 1.0}, {})
    return engine, n / (time.perf_counter() - t0)


def keras_epoch_overhead(c: Controller, epochs: int) -> tuple[float, float, float]:
    import keras
    import numpy as np

    from lrpilot.client.keras import LRPilotCallback

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    y = rng.normal(size=(512, 1)).astype("float32")

    def fit(callbacks: list[object]) -> float:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
        model.fit(x, y, epochs=1, verbose=0)  # compile and warm up outside the timing
        t0 = time.perf_counter()
        model.fit(x, y, validation_split=0.25, epochs=epochs, verbose=0, callbacks=callbacks)
        return (time.perf_counter() - t0) / epochs

    class Timed(LRPilotCallback):  # type: ignore[misc]
        """The callback's own time: what it adds to every epoch, without fit's noise."""

        spent = 0.0

        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            t0 = time.perf_counter()
            super().on_epoch_begin(epoch, logs)
            Timed.spent += time.perf_counter() - t0

        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            t0 = time.perf_counter()
            super().on_epoch_end(epoch, logs)
            Timed.spent += time.perf_counter() - t0

    # Interleaved and repeated: TensorFlow's first fits pay one-off tracing costs.
    plain, with_pilot = [], []
    for i in range(3):
        plain.append(fit([]))
        with_pilot.append(fit([Timed(job=f"bench-keras-{i}", endpoint=c.bind)]))
    return min(plain), min(with_pilot), Timed.spent / (3 * epochs)


def reload_latency(c: Controller, edits: int) -> list[float]:
    assert c.policy is not None
    w = Wire(c.bind, "bench-reload")
    w.hello(lr=0.1)
    w.report(0, {"val_loss": 1.0})
    out = []
    for i in range(edits):
        floor = 0.2 + i * 0.01
        text = POLICY.replace("min_delta: 0.0}", f"min_delta: 0.0, min_lr: {floor}}}")
        t0 = time.perf_counter()
        c.policy.write_text(text)
        w.recv(timeout=5)
        out.append(time.perf_counter() - t0)
    w.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n = 500 if args.quick else 3000
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        c = Controller(Path(tmp) / "state", policy).start()
        try:
            bare = bare_zmq_round_trips(n)
            dps = controller_decisions(c, n)
            print(
                f"decisions/s through lrpilot serve: {dps:8.0f}   bare zmq round trips/s: "
                f"{bare:8.0f}   ratio {dps / bare:.2f}"
            )
            eng, noop = engine_steps(n * 10)
            print(
                f"plateau engine steps/s:             {eng:8.0f}   no-op calls/s:          "
                f"{noop:8.0f}   ratio {eng / noop:.2f}"
            )
            assert c.proc is not None
            before = cpu_seconds(c.proc.pid)
            idle = 3.0 if args.quick else 10.0
            time.sleep(idle)
            used = cpu_seconds(c.proc.pid) - before
            print(
                f"controller CPU while idle (policy watch, 200 ms): {100 * used / idle:.2f}% of one"
                f" core over {idle:.0f} s"
            )
            lat = reload_latency(c, 5 if args.quick else 15)
            lat.sort()
            median = lat[len(lat) // 2] * 1000
            print(
                f"policy edit -> LR pushed to the client: median {median:.0f} ms,"
                f" max {lat[-1] * 1000:.0f} ms over {len(lat)} edits (watch interval 200 ms)"
            )
            try:
                plain, pilot, own = keras_epoch_overhead(c, 10 if args.quick else 30)
                print(
                    f"Keras epoch with LRPilotCallback: {pilot * 1000:7.1f} ms   without: "
                    f"{plain * 1000:7.1f} ms   ratio {pilot / plain:.2f}; time inside the "
                    f"callback {own * 1000:.2f} ms/epoch ({100 * own / plain:.1f}% of an epoch)"
                )
            except ImportError:
                print("Keras not installed: skipped the callback overhead")
        finally:
            c.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
