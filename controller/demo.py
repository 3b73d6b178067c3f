"""`lrpilot demo`: a live controller driving a short real Keras training.

Starts `lrpilot serve` (the embedded default policy: Keras' ReduceLROnPlateau
defaults, or `--policy`) on free loopback ports with a throw-away state dir,
trains a small model on synthetic data whose validation loss soon plateaus,
and prints, per epoch, the losses, the LR and the controller's decision.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from typing import Any

from .server import parse_ready_line

__all__ = ["run_demo"]

JOB = "demo-keras"


def _spawn_controller(state_dir: str, policy: str | None) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        "-m",
        "lrpilot.controller.cli",
        "serve",
        "--bind",
        "tcp://127.0.0.1:0",
        "--admin-bind",
        "tcp://127.0.0.1:0",
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--state-dir",
        state_dir,
        "--log-level",
        "warning",
    ]
    if policy:
        args += ["--policy", policy]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


def _endpoints(proc: subprocess.Popen[str]) -> dict[str, str]:
    """The controller's endpoints from its ready line (it prints it once bound, or exits)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    endpoints = parse_ready_line(line)
    if endpoints is None:
        raise SystemExit(f"lrpilot demo: the controller did not start: {line!r}")
    return endpoints


def _data(n: int = 384) -> tuple[Any, Any, Any, Any]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)).astype("float32")
    w = rng.normal(size=(8, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.5 * rng.normal(size=(n, 1))).astype("float32")  # a noise floor
    split = n * 3 // 4
    return x[:split], y[:split], x[split:], y[split:]


def _choose_backend() -> None:
    """Run Keras on JAX when that is what is installed (`lrpilot[keras-jax]`, `make demo`).

    KERAS_BACKEND, when set, wins; so does TensorFlow (Keras' default) when it is installed.
    """
    if "KERAS_BACKEND" in os.environ or importlib.util.find_spec("tensorflow") is not None:
        return
    if importlib.util.find_spec("jax") is not None:
        os.environ["KERAS_BACKEND"] = "jax"


def run_demo(epochs: int = 45, policy: str | None = None) -> int:
    """Run the demo; returns the exit code."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _choose_backend()
    with tempfile.TemporaryDirectory(prefix="lrpilot-demo-") as state_dir:
        # The controller starts while Keras loads: both take seconds.
        proc = _spawn_controller(state_dir, policy)
        try:
            try:
                import keras  # noqa: F401
            except ImportError as exc:
                print(
                    f"lrpilot demo needs Keras and a backend ({exc}): "
                    "pip install 'lrpilot[keras-jax]' (Keras on JAX, CPU) or 'lrpilot[keras]'",
                    file=sys.stderr,
                )
                return 2
            return _train(_endpoints(proc), epochs, policy)
        finally:
            proc.terminate()
            proc.wait(10)


def _train(ends: dict[str, str], epochs: int, policy: str | None) -> int:
    import keras

    from lrpilot.client.keras import LRPilotCallback

    from .admin import request

    print(f"controller: {ends['bind']} (admin {ends['admin']}, metrics {ends['metrics']})")
    print(f"keras {keras.__version__} on {keras.backend.backend()}")
    print(
        f"policy: {policy or 'embedded default (Keras ReduceLROnPlateau: factor 0.1, patience 10)'}"
    )
    keras.utils.set_random_seed(0)
    x, y, vx, vy = _data()
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.02), loss="mse")

    class Show(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = logs or {}
            status = request(ends["admin"], {"t": "status"})
            row: dict[str, Any] = next((j for j in status.get("jobs", []) if j["job"] == JOB), {})
            used = logs.get("learning_rate", float("nan"))
            nxt = float(self.model.optimizer.learning_rate)
            event = ""
            if nxt != used:
                rows = request(ends["admin"], {"t": "history", "job": JOB}).get("rows", [])
                reason = rows[-1]["reason"] if rows else "?"
                p = row.get("patience")
                why = f"{reason}, wait {p}/{p}" if reason == "plateau" else reason
                verb = "reduce" if nxt < used else "set"
                event = f"{verb} {used:.3g} -> {nxt:.3g} ({why})"
            elif row.get("wait") is not None:
                event = f"wait {row['wait']}/{row['patience']}, best {row.get('best') or 0:.4f}"
            print(
                f"{epoch:>5}  {logs.get('loss', 0):>8.4f}  {logs.get('val_loss', 0):>8.4f}  "
                f"{used:>10.3g}  {event}",
                flush=True,
            )

    print(f"{'epoch':>5}  {'loss':>8}  {'val_loss':>8}  {'lr':>10}  controller")
    pilot = LRPilotCallback(job=JOB, endpoint=ends["bind"])
    model.fit(
        x,
        y,
        validation_data=(vx, vy),
        epochs=epochs,
        batch_size=32,
        verbose=0,
        callbacks=[pilot, Show()],
    )
    print()
    print("Each decision came from the controller process, exactly as Keras' own")
    print("ReduceLROnPlateau would have made it. Next:")
    print("  lrpilot serve --policy policies/per-job.yaml        # your own controller")
    print("  lrpilot status; lrpilot history JOB; lrpilot set-lr JOB 0.001 --reason '...'")
    print("  curl http://127.0.0.1:9477/metrics                   # Prometheus; Grafana: deploy/")
    return 0
