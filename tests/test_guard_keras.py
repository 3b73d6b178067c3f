"""The loss-spike guard in a real Keras `fit` against a real controller: weights corrupted
at a random step (× 50) are rolled back once, bit for bit, at LR × lr_factor; with
max_rollbacks spent, `on_exhausted: stop` sets `model.stop_training`."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Controller

keras = pytest.importorskip("keras")
import numpy as np  # noqa: E402

from lrpilot.client.keras import LRPilotCallback  # noqa: E402

Factory = Callable[..., Controller]
# A plateau that never reduces here: the guard composes with the controller's own policies.
POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: loss, unit: step, patience: 100000, compat: keras}
  guard: {spike: 3.0, window: 20, warmup: 30, snapshot_every: 25, lr_factor: 0.5,
          cooldown: 40, max_rollbacks: 2, on_exhausted: stop}
"""
EPOCHS, BATCH = 10, 8  # 24 steps an epoch


def _data() -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(192, 8)).astype("float32")
    w = rng.normal(size=(8, 1)).astype("float32")
    return x, (x @ w + 0.05 * rng.normal(size=(192, 1))).astype("float32")


class Trainer(keras.callbacks.Callback):  # type: ignore[misc]
    """Corrupts the weights at the start of step `corrupt_at`; after each step (and after
    lrpilot's callback) waits for the controller's answer, as steps of a real model would,
    records the state every later step starts from, and checks each rollback."""

    def __init__(self, pilot: LRPilotCallback, corrupt_at: int | None) -> None:
        super().__init__()
        self.pilot, self.corrupt_at = pilot, corrupt_at
        self.step = 0
        self.at_start: dict[int, list[Any]] = {}
        self.rollbacks: list[tuple[int, float, bool]] = []
        self.stopped_at: int | None = None

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self.step == self.corrupt_at:
            self.model.set_weights([w * 50.0 for w in self.model.get_weights()])

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.step += 1
        self._check()
        self.at_start[self.step] = self.model.get_weights()
        assert self.pilot._core.client is not None
        self.pilot._core.client.flush()  # the answer is there by the next boundary
        if self.model.stop_training and self.stopped_at is None:
            self.stopped_at = self.step

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self._check()  # lrpilot's callback applies decisions at epoch ends too

    def _check(self) -> None:
        """lrpilot's callback (called just before this one) restored: the weights now are
        the state the snapshot's step started from, and the LR is set."""
        core = self.pilot._core
        if len(core.rollbacks) > len(self.rollbacks):
            _asked, unit = core.rollbacks[-1]
            assert unit is not None
            now = self.model.get_weights()
            equal = all(np.array_equal(a, b) for a, b in zip(now, self.at_start[unit], strict=True))
            lr = float(self.model.optimizer.learning_rate.numpy())
            self.rollbacks.append((self.step, lr, equal))
            self.at_start[self.step] = now


class Checkpoints:
    """A user's `snapshot_fn(unit)` / `restore_fn(unit)` (for models too large to copy):
    the weights and the optimizer's variables kept by unit, every call recorded."""

    def __init__(self) -> None:
        self.model: Any = None
        self.saved: dict[int, tuple[list[Any], list[Any]]] = {}
        self.calls: list[tuple[str, int | None]] = []

    def snapshot_fn(self, unit: int | None = None) -> None:
        self.calls.append(("snapshot", unit))
        variables = [np.array(v.numpy(), copy=True) for v in self.model.optimizer.variables]
        self.saved[-1 if unit is None else unit] = (self.model.get_weights(), variables)

    def restore_fn(self, unit: int | None = None) -> None:
        self.calls.append(("restore", unit))
        weights, variables = self.saved[-1 if unit is None else unit]
        self.model.set_weights(weights)
        for variable, value in zip(self.model.optimizer.variables, variables, strict=True):
            variable.assign(value)


def _fit(
    c: Controller, job: str, corrupt_at: int | None, points: Checkpoints | None = None
) -> tuple[float, Trainer]:
    keras.utils.set_random_seed(1)
    x, y = _data()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.02, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)  # its momentum exists from step 0 on
    hooks: dict[str, Any] = {}
    if points is not None:
        points.model = model
        hooks = {"snapshot_fn": points.snapshot_fn, "restore_fn": points.restore_fn}
    pilot = LRPilotCallback(job=job, endpoint=c.bind, unit="step", **hooks)
    trainer = Trainer(pilot, corrupt_at)
    trainer.at_start[0] = model.get_weights()
    model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, verbose=0, callbacks=[pilot, trainer])
    return float(model.evaluate(x, y, verbose=0)), trainer


def test_keras_corrupted_weights_roll_back_once_bit_for_bit(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    clean, plain = _fit(c, "keras-clean", None)
    assert plain.rollbacks == []
    corrupt_at = random.Random().randint(60, 180)
    final, trainer = _fit(c, "keras-spiked", corrupt_at)
    assert len(trainer.rollbacks) == 1, (corrupt_at, trainer.rollbacks)
    _step, lr, equal = trainer.rollbacks[0]
    assert equal, "the restored weights are not the snapshot's"
    assert lr == pytest.approx(0.01, rel=1e-6)  # 0.02 × lr_factor
    assert final <= 2 * clean, (final, clean)
    assert c.metric("lrpilot_rollbacks_total", training_job="keras-spiked") == 1.0


def test_keras_users_snapshot_fn_and_restore_fn_of_a_unit_serve_the_guard(
    controller_factory: Factory,
) -> None:
    """For a model too large to copy: the guard calls `snapshot_fn(unit)` at every multiple
    of snapshot_every, from step 0, and `restore_fn(unit)` once, with the newest healthy
    snapshot's unit; no in-memory copy is made."""
    c = controller_factory(POLICY)
    corrupt_at = random.Random().randint(60, 180)
    points = Checkpoints()
    _, trainer = _fit(c, "keras-hooks", corrupt_at, points)
    snapshots = [unit for kind, unit in points.calls if kind == "snapshot"]
    assert snapshots[:4] == [0, 25, 50, 75] and all(u is not None for u in snapshots)
    restores = [unit for kind, unit in points.calls if kind == "restore"]
    assert restores == [corrupt_at // 25 * 25], (corrupt_at, points.calls)
    assert len(trainer.rollbacks) == 1
    _step, lr, equal = trainer.rollbacks[0]
    assert equal and lr == pytest.approx(0.01, rel=1e-6)
    kept = trainer.pilot._core.kept.values()
    assert all(type(k).__name__ == "_UserSnapshot" for k in kept)


def test_keras_a_spike_before_the_first_multiple_restores_the_start_of_training(
    controller_factory: Factory,
) -> None:
    """snapshot_every (100) past the warmup (30): a spike at step 35..95 names snapshot 0,
    which the callback took when training started; the weights are the initial ones."""
    # The cooldown outlasts the fit: the initial weights' loss, back after the restore, stands
    # far above the EMA of the trained steps before the spike and would be judged a spike again.
    policy = POLICY.replace("snapshot_every: 25", "snapshot_every: 100")
    c = controller_factory(policy.replace("cooldown: 40", "cooldown: 1000"))
    corrupt_at = random.Random().randint(35, 95)
    _, trainer = _fit(c, "keras-step0", corrupt_at)
    assert trainer.pilot._core.rollbacks == [(0, 0)], corrupt_at
    assert len(trainer.rollbacks) == 1
    _step, lr, equal = trainer.rollbacks[0]
    assert equal and lr == pytest.approx(0.01, rel=1e-6)


def test_keras_on_exhausted_stop_sets_stop_training(controller_factory: Factory) -> None:
    c = controller_factory(POLICY.replace("max_rollbacks: 2", "max_rollbacks: 0"))
    _, trainer = _fit(c, "keras-exhausted", 100)
    assert trainer.rollbacks == []
    assert trainer.stopped_at is not None and trainer.stopped_at <= 102
