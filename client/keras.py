"""Keras 3 adapter: a callback that lets the lrpilot controller set the learning rate.

Importing this module imports Keras; `lrpilot.client` itself never does.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from .extras import missing_extra

try:
    import keras
    import numpy as np
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "keras", __name__) from exc

from .adapter import AdapterCore
from .core import Client, scalar_metrics, to_scalar

__all__ = ["LRPilotCallback"]

logger = logging.getLogger("lrpilot.client")

_FIX = (
    "compile with a float learning rate, e.g. keras.optimizers.Adam(learning_rate=1e-3); "
    "lrpilot's policy file does the scheduling"
)


def _current_lr(optimizer: Any) -> float:
    value = to_scalar(keras.ops.convert_to_numpy(optimizer.learning_rate))
    if value is None:  # pragma: no cover - a float-LR optimizer always has a scalar LR
        raise ValueError(f"the optimizer's learning rate is not a number; {_FIX}")
    return value


def _assigner(variable: Any) -> Callable[[float], None] | None:
    """A cheap `variable.assign(value)` for a float, or None where there is none.

    On TensorFlow a Keras variable's `assign` goes through several layers of Python (about
    70 µs; the optimizer's `learning_rate` setter about 110 µs): at every step of a per-step
    schedule that is most of what the callback costs. One `AssignVariableOp` on the
    variable's handle does the same write in about 15 µs. Only for a plain resource variable:
    a distributed one (a `MirroredVariable`) keeps a copy per replica, and other backends
    assign their own way (None: the caller assigns as Keras does).
    """
    if keras.backend.backend() != "tensorflow" or not isinstance(variable, keras.Variable):
        return None
    import tensorflow as tf

    try:  # no public name: a TensorFlow that moves it gets Keras' own assign
        from tensorflow.python.ops.resource_variable_ops import ResourceVariable
    except ImportError:  # pragma: no cover - TensorFlow 2.21 has it
        return None
    value: Any = getattr(variable, "value", None)
    if type(value) is not ResourceVariable:
        return None
    handle, dtype = value.handle, value.dtype
    assign_op, constant = tf.raw_ops.AssignVariableOp, tf.constant

    def assign(number: float) -> None:
        assign_op(resource=handle, value=constant(number, dtype=dtype))

    return assign


def _iterations(optimizer: Any) -> int:
    """The optimizer's step count (a device read)."""
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def _loss_tracker(model: Any) -> Any:
    """The compiled model's `Mean` named "loss" (what batch-end logs read), or None."""
    for metric in getattr(model, "metrics", None) or []:
        if getattr(metric, "name", None) == "loss" and hasattr(metric, "count"):
            return metric
    return None


def _tracked(tracker: Any) -> tuple[float, float]:
    """The loss tracker's (total, count): sums over the batches of the epoch so far."""
    total = keras.ops.convert_to_numpy(tracker.total)
    return float(total), float(keras.ops.convert_to_numpy(tracker.count))


def _momentum_name(optimizer: Any) -> str | None:
    """The optimizer attribute a plan's momentum goes to, as torch's OneCycleLR picks it:
    `beta_1` (Adam, AdamW, Nadam, ...), else `momentum` (SGD, RMSprop); None for neither."""
    for name in ("beta_1", "momentum"):
        if isinstance(getattr(optimizer, name, None), float | int | keras.Variable):
            return name
    return None


class _MomentumVariable(keras.Variable):  # type: ignore[misc]
    """The variable behind a plan's momentum. SGD asks `momentum != 0` (are its momentum
    slots in use) while it is traced; the answer stays yes, as it was when it was built
    with a momentum > 0 (a momentum of 0 through the slots is plain SGD anyway)."""

    def __ne__(self, other: object) -> Any:
        if isinstance(other, int | float) and other == 0:
            return True
        return super().__ne__(other)


class _Momentum:
    """A plan's momentum (`cycle_momentum`) on a Keras optimizer, for one `fit`.

    Keras 3 keeps `beta_1` / `momentum` as Python floats, which the compiled train step
    bakes in as constants: a float set later changes nothing. While a plan sets the
    momentum, the attribute is a (non-trainable, untracked) variable that the train step
    reads at every step; `get_config()` still gives its value as a float (a model saved
    mid-fit loads), and `close()` puts the float back at the end of the fit. The variable
    is not one of `optimizer.variables`: checkpoints keep their layout.
    """

    __slots__ = ("_assign", "last", "name", "optimizer", "variable")

    def __init__(self, optimizer: Any, name: str) -> None:
        self.optimizer, self.name = optimizer, name
        value = getattr(optimizer, name)
        if isinstance(value, keras.Variable):  # left by a fit that did not end
            value = float(keras.ops.convert_to_numpy(value))
        #: The value last set (read without a device round trip).
        self.last = float(value)
        self.variable = _MomentumVariable(self.last, trainable=False, name=name)
        self._assign = _assigner(self.variable) or self.variable.assign
        # Untracked: `optimizer.variables` (checkpoints, the range test's copy) unchanged.
        object.__setattr__(optimizer, name, self.variable)
        config = type(optimizer).get_config

        def get_config() -> dict[str, Any]:
            found: dict[str, Any] = config(optimizer)
            found[name] = self.last
            return found

        object.__setattr__(optimizer, "get_config", get_config)

    def set(self, momentum: float) -> None:
        if momentum != self.last:
            self._assign(momentum)
            self.last = momentum

    def close(self) -> None:
        """The attribute becomes a float again (the last value set)."""
        object.__setattr__(self.optimizer, self.name, self.last)
        self.optimizer.__dict__.pop("get_config", None)


class _Snapshot:
    """The model's weights and the optimizer's variables, copied to host memory, and the
    optimizer's momentum (`beta_1` or `momentum`), which is no variable of it."""

    __slots__ = ("model", "momentum", "variables", "weights")

    def __init__(self, model: Any) -> None:
        self.model = model
        optimizer = model.optimizer
        if not model.built:
            raise ValueError(
                "LRPilotCallback: an LR range test starts, but the model has no weights yet to "
                "keep: build it before fit (a keras.Input first, or model.build(input_shape))"
            )
        if not optimizer.built:
            # Its slots (momentum, Adam's moments) are made at the first step otherwise, and
            # could not be put back as they were; Keras builds them on the same variables.
            strategy = getattr(model, "distribute_strategy", None)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                optimizer.build(model.trainable_variables)
        self.weights: list[Any] = model.get_weights()
        # Every optimizer variable (its step count and learning rate too): put back exactly.
        self.variables = [(v, np.array(v.numpy(), copy=True)) for v in optimizer.variables]
        name = _momentum_name(optimizer)
        self.momentum: tuple[str, float] | None = None
        if name is not None:
            self.momentum = (name, float(keras.ops.convert_to_numpy(getattr(optimizer, name))))

    def restore(self) -> None:
        self.model.set_weights(self.weights)
        for variable, value in self.variables:
            variable.assign(value)
        if self.momentum is not None:
            name, momentum = self.momentum
            current = getattr(self.model.optimizer, name)
            if isinstance(current, keras.Variable):  # a plan's momentum (see `_Momentum`)
                current.assign(momentum)
            else:
                setattr(self.model.optimizer, name, momentum)


def _flatten(nested: Any) -> list[Any]:
    if isinstance(nested, dict):
        return [x for value in nested.values() for x in _flatten(value)]
    if isinstance(nested, list | tuple):
        return [x for value in nested for x in _flatten(value)]
    return [] if nested is None else [nested]


def _compiled_metrics(model: Any) -> list[Any]:
    """The compiled metric objects; before the first batch builds them, made from the
    identifiers given to `compile` as Keras will (`get_metric` in its compile_utils)."""
    found: list[Any] = []
    compiled = getattr(model, "_compile_metrics", None)
    if compiled is None or getattr(compiled, "built", True):
        for metric in getattr(model, "metrics", []):
            inner = getattr(metric, "metrics", None)  # CompileMetrics / MetricsList hold more
            found.extend(inner if isinstance(inner, list) else [metric])
        return found
    identifiers = _flatten(getattr(compiled, "_user_metrics", None))
    identifiers += _flatten(getattr(compiled, "_user_weighted_metrics", None))
    for identifier in identifiers:
        try:
            if isinstance(identifier, str) and identifier.lower() in ("accuracy", "acc"):
                metric = keras.metrics.Accuracy(name=identifier)
            else:
                metric = keras.metrics.get(identifier)
                if not isinstance(metric, keras.metrics.Metric):
                    name = identifier if isinstance(identifier, str) else metric.__name__
                    metric = keras.metrics.MeanMetricWrapper(metric, name=name)
                elif isinstance(identifier, str):
                    metric.name = identifier
        except (ValueError, TypeError, AttributeError):
            continue  # a direction is a hint; the policy can still say `mode: min|max`
        found.append(metric)
    return found


def _directions(model: Any) -> dict[str, str]:
    """`{metric: "min"|"max"}` for the compiled metrics, under their name and `val_` name."""
    found = {"loss": "min", "val_loss": "min"}
    for metric in _compiled_metrics(model):
        direction = {"up": "max", "down": "min"}.get(getattr(metric, "_direction", None) or "")
        name = getattr(metric, "name", None)
        if direction and isinstance(name, str):
            found.setdefault(name, direction)
            found.setdefault(f"val_{name}", direction)
    return found


class LRPilotCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Lets the lrpilot controller decide the learning rate of `model.fit`.

    Says hello at the first epoch it sees (so `fit(initial_epoch=...)` resumes the job's
    run) with the optimizer's LR and the direction of each compiled metric, reports every
    scalar log at the end of each epoch, and sets the decided LR so that it applies from the
    next epoch, as Keras' `ReduceLROnPlateau` does. Pushed changes (e.g. `lrpilot set-lr`)
    apply at the next epoch begin. Writes `logs["learning_rate"]`. A plan with
    `cycle_momentum` (one_cycle, cyclic) also sets the optimizer's `beta_1` (Adam family)
    or `momentum` (SGD with a momentum > 0, RMSprop) at every step; during the `fit` the
    attribute is a variable that the compiled train step reads, a float again after it.
    The controller being absent or slow never stops training: the LR then stays as it is.

    LR range tests (`type: range_test` in the policy): when the test starts (`action:
    snapshot`) the callback copies `model.get_weights()` and the values of every optimizer
    variable (the optimizer is built first if no step has made its slots yet); when it
    stops (`action: restore`, at an epoch or, with `unit="step"`, a step boundary, also in
    mid-epoch) it puts them back exactly, `optimizer.iterations` and the learning-rate
    variable included, then sets the suggested LR. The steps it tells the controller keep
    counting on: the job's step count is not reset. During the test the sweep runs as a
    plan: every step is reported, streamed without waiting for answers; a job of several
    ranks waits (at most `timeout`) only before every 16th step and at the sweep's end,
    and the restore applies at the first of those, on every rank at the same step.
    Keras' batch-end logs hold the mean loss of the epoch so far; during the test the
    callback reports each step's own loss instead (from the loss tracker's sums), as a
    range test needs it.

    Args:
        job: the job name; default `LRPILOT_JOB`.
        endpoint: the controller, or several comma-separated (the client follows `moved`
            and fails over); default `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`.
        timeout: the longest, in seconds, an epoch end waits for the controller.
        verbose: 1 prints each LR change, like Keras' own LR callbacks, and the controller's
            notices (they are logged at WARNING on `lrpilot.client` whatever the verbosity).
        unit: `"epoch"`, or `"step"` for policies with `unit: step`: then it reports every
            `report_every` optimizer steps without waiting and applies decisions from the
            next step. It counts the steps itself (`optimizer.iterations` is read once, at
            the start of `fit`) and assigns the optimizer's LR only when it changes.
        report_every: with `unit="step"`, report every this many steps.
        strict: True makes `fit` fail (`ControllerUnavailable`) when the controller does not
            answer at the first epoch, instead of training on at the optimizer's LR.
        snapshot_fn, restore_fn: for models too large to copy in memory: called instead of
            the copy (e.g. to write and read a checkpoint) when a range test starts and
            ends; both or neither. The callback still sets the LR after `restore_fn`. If
            they take an argument (`def snapshot_fn(unit=None)`) a loss-spike guard calls
            them too, instead of copying: `snapshot_fn(unit)` at every multiple of
            `snapshot_every`, `restore_fn(unit)` with the snapshot to put back.

    Raises:
        ValueError: no job name, a bad argument, or (at `fit`) an optimizer built on a
            `LearningRateSchedule` or a MultiOptimizer, or a range test that starts before
            the model has weights.

    Example:

        model.compile(optimizer=keras.optimizers.Adam(learning_rate=1e-3), loss="mse")
        model.fit(x, y, epochs=50, callbacks=[LRPilotCallback(job="resnet-a")])
    """

    def __init__(
        self,
        job: str | None = None,
        endpoint: str | None = None,
        timeout: float = 1.0,
        verbose: int = 0,
        unit: str = "epoch",
        report_every: int = 1,
        strict: bool = False,
        snapshot_fn: Callable[..., None] | None = None,
        restore_fn: Callable[..., None] | None = None,
    ) -> None:
        super().__init__()
        self._core = AdapterCore(
            job=job,
            endpoint=endpoint,
            timeout=timeout,
            strict=strict,
            unit=unit,
            report_every=report_every,
            framework="keras",
            snapshot_fn=snapshot_fn,
            restore_fn=restore_fn,
        )
        self.job = self._core.job
        self.verbose = verbose
        self.unit = unit
        self._notices_shown = 0
        self._epoch = 0
        self._lr = 0.0  # the LR last set on (or read from) the optimizer
        # With unit="step" the callback counts optimizer steps itself: `optimizer.iterations`
        # is read once, at the hello (each read converts a variable, a device round trip).
        self._step = 0  # the next step to run
        self._epoch_start = 0  # the step the current epoch started at
        # Steps a restore took off `optimizer.iterations`: the job's step count goes on.
        self._steps_restored = 0
        self._iterations_before = 0  # `optimizer.iterations` right before a restore
        # During a test with unit="step": the loss tracker and its sums at the last report.
        self._tracker: Any = None
        self._sums = (0.0, 0.0)
        self._momentum: _Momentum | None = None  # while a plan sets the momentum
        self._assign_lr: Callable[[float], None] | None = None  # see `_assigner`, per fit
        self._warned_momentum = False
        if unit == "step":
            # Keras dispatches batch ends asynchronously unless a callback overrides them;
            # only step mode needs them, so only step mode has them.
            self.on_train_batch_end = self._on_step_end

    @property
    def client(self) -> Client | None:
        """The lrpilot client of the running `fit`, None outside of one."""
        return self._core.client

    # -- fit -------------------------------------------------------------------------------

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        optimizer = self.model.optimizer
        if optimizer is None:
            raise ValueError("LRPilotCallback needs a compiled model: call model.compile first")
        if hasattr(optimizer, "optimizers"):
            raise ValueError(f"LRPilotCallback cannot drive a MultiOptimizer; {_FIX}")
        schedule = getattr(optimizer, "_learning_rate", None)
        if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                f"LRPilotCallback cannot set the LR of an optimizer built on "
                f"{type(schedule).__name__}; {_FIX}"
            )
        if callable(schedule) and not hasattr(schedule, "assign"):
            raise ValueError(f"LRPilotCallback cannot set a callable learning rate; {_FIX}")
        self._assign_lr = _assigner(schedule)

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        self._core.close()
        if self._momentum is not None:
            self._momentum.close()
            self._momentum = None

    # -- epochs ----------------------------------------------------------------------------

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._epoch = epoch
        optimizer = self.model.optimizer
        if self.client is None or self.unit == "epoch":
            self._step = _iterations(optimizer) + self._steps_restored
        if self.client is None:  # the first epoch of this fit: hello from here
            self._lr = _current_lr(optimizer)
            self._core.connect(
                initial_lr=self._lr,
                start_epoch=epoch,
                start_step=self._step,
                directions=_directions(self.model),
                copy=lambda: _Snapshot(self.model),
                after_snapshot=self._track_loss,
                before_restore=self._count_iterations,
                after_restore=self._restored,
            )
            # The start is a boundary: a guard's snapshot of it (unit 0 in a new run).
            lr = self._core.begin(epoch=epoch, step=self._step)
            self._follow_momentum()
        else:
            lr = self._core.begin(epoch=epoch, step=self._step)
            self._follow_momentum()
        self._epoch_start = self._step
        self._sums = (0.0, 0.0)  # fit resets its metrics right before each epoch begin
        self._set_lr(epoch, lr, "setting")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self.client is None:
            return
        used = _current_lr(self.model.optimizer)
        if self.unit == "epoch":
            metrics = {k: v for k, v in scalar_metrics(logs).items() if k != "learning_rate"}
            new_lr = self._core.epoch_end(epoch, metrics)
        else:
            new_lr = self._core.begin(step=self._step)
        if logs is not None:
            logs["learning_rate"] = used
        self._set_lr(epoch, new_lr, "reducing" if new_lr < used else "raising")
        self._follow_momentum()
        if self.verbose > 0 and len(self.client.notices) > self._notices_shown:
            for code, text in self.client.notices[self._notices_shown :]:
                print(f"\nEpoch {epoch + 1}: LRPilotCallback: {text} ({code})")
            self._notices_shown = len(self.client.notices)
        if self._core.stop_requested:
            self.model.stop_training = True

    # -- steps (unit="step") ---------------------------------------------------------------

    def _on_step_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """`on_train_batch_end` in step mode: report every `report_every` steps, and set the
        LR decided for the next step, if it changed. `batch` is the epoch's last batch done
        (with `steps_per_execution` > 1 Keras calls this once per execution)."""
        client = self.client
        if client is None:
            return
        step = self._epoch_start + batch  # the update just made, 0-based
        before, self._step = self._step, step + 1

        def metrics() -> dict[str, float]:
            found = scalar_metrics(logs)
            if client.snapshot_every is not None and self._tracker is None:
                self._track_loss()  # a guard judges each report's own loss
            if (self._core.testing or client.snapshot_every) and self._tracker is not None:
                self._own_loss(found)
            return found

        lr = self._core.step_end(self._epoch, step, before, metrics)
        if lr != self._lr:
            self._set_lr(self._epoch, lr, "setting", quiet=True)
        if client.momentum is not None:
            self._follow_momentum()
        if client.stop_requested:
            self.model.stop_training = True

    # -- range tests -----------------------------------------------------------------------

    def _track_loss(self) -> None:
        """A range test starts: with unit="step", report each step's own loss from here."""
        if self.unit == "step":
            self._tracker = _loss_tracker(self.model)
            if self._tracker is not None:
                self._sums = _tracked(self._tracker)

    def _own_loss(self, metrics: dict[str, float]) -> None:
        """`metrics["loss"]` of the batches since the last report, not of the epoch so far."""
        total, count = sums = _tracked(self._tracker)
        before_total, before_count = self._sums
        if count < before_count:  # reset in a way this callback did not see
            before_total = before_count = 0.0
        self._sums = sums
        if count > before_count and "loss" in metrics:
            metrics["loss"] = (total - before_total) / (count - before_count)

    def _count_iterations(self) -> None:
        self._tracker = None
        self._iterations_before = _iterations(self.model.optimizer)

    def _restored(self) -> None:
        """After a restore: the steps it took back keep counting for the job, and the
        optimizer's learning-rate variable went back too, so the next LR is set even if it
        equals the one this callback set last."""
        self._steps_restored += self._iterations_before - _iterations(self.model.optimizer)
        self._lr = math.nan
        if self._momentum is not None:  # the copy's momentum is back in the variable
            self._momentum.last = math.nan

    # -- helpers ---------------------------------------------------------------------------

    def _follow_momentum(self) -> None:
        """Sets the momentum of the plan in force (`cycle_momentum`): `beta_1` or
        `momentum` of the optimizer, from the step it decides for on."""
        client = self.client
        momentum = None if client is None else client.momentum
        if momentum is None:
            return
        held = self._momentum
        if held is None:
            optimizer = self.model.optimizer
            name = _momentum_name(optimizer)
            if name is None or (name == "momentum" and not getattr(optimizer, name)):
                if not self._warned_momentum:
                    self._warned_momentum = True
                    logger.warning(
                        "LRPilotCallback: the policy cycles momentum, but %s has no beta_1 "
                        "and no momentum > 0 to set; compile with e.g. "
                        "keras.optimizers.SGD(momentum=0.9) or Adam",
                        type(optimizer).__name__,
                    )
                return
            held = self._momentum = _Momentum(optimizer, name)
            # A train step compiled already (by an earlier step or fit) holds the float:
            # a new one reads the variable (fit calls `model.train_function` at each step;
            # before the first step this costs nothing, the first call traces anyway).
            self.model.make_train_function(force=True)
        held.set(momentum)

    def _set_lr(self, epoch: int, lr: float, verb: str, quiet: bool = False) -> None:
        if lr == self._lr:
            return
        if self._assign_lr is not None:
            self._assign_lr(lr)
        else:
            self.model.optimizer.learning_rate = lr
        self._lr = lr
        if self.verbose > 0 and not quiet:
            print(f"\nEpoch {epoch + 1}: LRPilotCallback {verb} learning rate to {lr}.")
