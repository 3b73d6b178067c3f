"""A real Keras `fit` whose LR is decided by a real `lrpilot serve` process.

Parity: the same seeded model and data trained twice, once with Keras' own
ReduceLROnPlateau and once with LRPilotCallback against the controller, get
identical LRs at every epoch. Fail-open: no controller, a controller killed
mid-fit, a controller started mid-fit.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Controller

keras = pytest.importorskip("keras")
from lrpilot.client.keras import LRPilotCallback  # noqa: E402

Factory = Callable[..., Controller]

PARAMS = {"factor": 0.5, "patience": 2, "min_delta": 1e-3, "cooldown": 1, "min_lr": 2e-4}
POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2, min_delta: 1.0e-3,
           cooldown: 1, min_lr: 2.0e-4}
"""


def _data() -> tuple[Any, ...]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    w = rng.normal(size=(8, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.5 * rng.normal(size=(256, 1))).astype("float32")
    return x[:192], y[:192], x[192:], y[192:]


class LrLog(keras.callbacks.Callback):  # type: ignore[misc]
    """The LR the optimizer actually used in each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.lrs.append(float(self.model.optimizer.learning_rate.numpy()))


def _fit(callback: Any, epochs: int = 24, initial_epoch: int = 0, lr: float = 0.02) -> list[float]:
    keras.utils.set_random_seed(1)
    x, y, vx, vy = _data()
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="mse")
    log = LrLog()
    model.fit(
        x,
        y,
        validation_data=(vx, vy),
        epochs=epochs,
        batch_size=32,
        verbose=0,
        callbacks=[callback, log],
        initial_epoch=initial_epoch,
    )
    return log.lrs


def test_keras_fit_gets_exactly_keras_reduce_lr_on_plateau_lrs(controller_factory: Factory) -> None:
    expected = _fit(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **PARAMS))
    assert len(set(expected)) >= 2, "the seeded run must reduce at least once"
    c = controller_factory(POLICY)
    got = _fit(LRPilotCallback(job="parity", endpoint=c.bind))
    assert got == expected
    assert (
        c.metric("lrpilot_lr_changes_total", training_job="parity", reason="plateau")
        == len(set(expected)) - 1
    )


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def test_fit_without_a_controller_completes_with_the_lr_unchanged() -> None:
    t0 = time.monotonic()
    baseline = _fit(keras.callbacks.Callback(), epochs=10)
    plain = time.monotonic() - t0
    t0 = time.monotonic()
    lrs = _fit(LRPilotCallback(job="alone", endpoint=f"tcp://127.0.0.1:{_free_port()}"), epochs=10)
    with_pilot = time.monotonic() - t0
    assert lrs == baseline == [pytest.approx(0.02)] * 10
    assert with_pilot - plain < 5.0, (plain, with_pilot)


def test_controller_killed_mid_fit_then_started_again(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    endpoint = c.bind

    class Chaos(keras.callbacks.Callback):  # type: ignore[misc]
        restarted: Controller | None = None

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch == 5:
                c.kill()  # SIGKILL mid-fit
            if epoch == 9:
                # Same port, same state dir: the client reconnects by itself.
                Chaos.restarted = controller_factory(
                    POLICY, "--bind", endpoint, state_dir=c.state_dir
                )

    keras.utils.set_random_seed(1)
    x, y, vx, vy = _data()
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.02), loss="mse")
    log = LrLog()
    pilot = LRPilotCallback(job="chaos2", endpoint=endpoint, timeout=0.5)
    hist = model.fit(
        x,
        y,
        validation_data=(vx, vy),
        epochs=30,
        batch_size=32,
        verbose=0,
        callbacks=[pilot, Chaos(), log],
    )
    assert len(hist.history["loss"]) == 30  # fit completed
    assert Chaos.restarted is not None
    restarted = Chaos.restarted
    # After the restart the controller heard from the job again and decided its epochs.
    assert restarted.metric("lrpilot_reports_total", training_job="chaos2") >= 10
    assert restarted.metric("lrpilot_epoch", training_job="chaos2") == 29


def test_lrpilot_demo_shows_live_reductions() -> None:
    from conftest import run_cli

    out = run_cli("demo", timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    epochs = [ln for ln in lines if ln[:5].strip().isdigit()]
    assert len(epochs) == 45
    reductions = [ln for ln in epochs if "reduce" in ln and "(plateau, wait 10/10)" in ln]
    assert len(reductions) >= 1, out.stdout
    assert "lrpilot status" in out.stdout  # where to look next


def test_fit_without_validation_data_warns_in_the_training_output(
    controller_factory: Factory,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Keras' own callback warns when its monitor is missing; so does lrpilot, in the trainer."""
    c = controller_factory(POLICY)  # monitors val_loss
    keras.utils.set_random_seed(1)
    x, y, _, _ = _data()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    cb = LRPilotCallback(job="no-validation", endpoint=c.bind, verbose=1)
    model.fit(x, y, epochs=3, batch_size=64, verbose=0, callbacks=[cb])  # no validation_data
    printed = capsys.readouterr().out
    assert printed.count("(monitor_missing)") == 1 and "val_loss" in printed
    logged = [r.getMessage() for r in caplog.records if "(monitor_missing)" in r.getMessage()]
    assert len(logged) == 1


def test_strict_fit_fails_without_a_controller() -> None:
    from lrpilot.client import ControllerUnavailable

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(ControllerUnavailable):
        _fit(LRPilotCallback(job="strict", endpoint=endpoint, timeout=0.3, strict=True), epochs=2)
