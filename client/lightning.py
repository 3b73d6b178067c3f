"""PyTorch Lightning 2.x adapter: a callback that lets the lrpilot controller set the LR.

Importing this module imports Lightning and torch; importing `lrpilot.client` does not.
It works with either distribution of Lightning 2.x: `pytorch_lightning` (the `lightning`
extra), or `lightning.pytorch` when that is the one a script imported (or the only one there).

Example:

    from lrpilot.client.lightning import LRPilotCallback
    trainer = pl.Trainer(max_epochs=50, callbacks=[LRPilotCallback(job="resnet-a")])
    trainer.fit(model, train_loader, val_loader)
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .extras import missing_extra

try:
    import torch  # the lightning extra brings it
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "lightning", __name__) from exc

from .adapter import AdapterCore
from .core import Client
from .step_means import StepMeans
from .torch import GuardCopy, StateSnapshot, follow_momentum, number, scalars, set_lr

__all__ = ["LRPilotCallback"]

logger = logging.getLogger("lrpilot.client")


def _lightning() -> Any:
    """`pytorch_lightning`, or `lightning.pytorch` if that is the one in use: a callback
    must derive from the Callback of the Trainer the script runs."""
    if "lightning.pytorch" in sys.modules and "pytorch_lightning" not in sys.modules:
        return sys.modules["lightning.pytorch"]
    try:
        return importlib.import_module("pytorch_lightning")
    except ImportError:
        pass
    try:
        return importlib.import_module("lightning.pytorch")
    except ModuleNotFoundError as exc:
        raise missing_extra(exc, "lightning", __name__) from exc


_Callback: Any = _lightning().Callback


class LRPilotCallback(_Callback):  # type: ignore[misc]
    """Lets the lrpilot controller decide the learning rate of a Lightning `Trainer`.

    Says hello when training starts, with the first optimizer's LR, the epoch reached (so a
    `fit(ckpt_path=...)` resumes the job's run) and the trainer's rank and world size.
    After every validation run (not the sanity check) it reports the scalar
    `trainer.callback_metrics` and sets the decided LR on every param group of every
    optimizer, so it applies from the next training step, as Lightning's own handling of a
    `ReduceLROnPlateau` with `"monitor": "val_loss"` does. Each validation run is one
    epoch for the controller. Pushed changes (`lrpilot set-lr`) apply at the next training
    epoch start. With `unit="step"` it reports the training loss every `report_every`
    optimizer steps without waiting and sets each decision at the first step end after it
    has arrived (as the Keras callback does): the loss is summed on its device and its mean
    over the `report_every` steps read to the host once per report, one report late, so the
    training step never waits for the device (see `lrpilot.client.step_means`). A plan
    with `cycle_momentum` (one_cycle, cyclic) also sets each param group's `momentum`
    (`betas[0]` for Adam-like optimizers), as torch's `OneCycleLR` does. The
    controller being absent or slow never stops training: the LR then stays as it is.

    LR range tests (`type: range_test`): the hello comes before the first step; when the
    test starts (`action: snapshot`) the callback keeps CPU copies of
    `pl_module.state_dict()` and every optimizer's `state_dict()`, and when it stops
    (`action: restore`, after a validation run or, with `unit="step"`, after a step) it
    loads them back and sets the suggested LR. During the test the sweep runs as a plan:
    every step is reported, streamed without waiting for answers; a job of several ranks
    waits (at most `timeout`) only before every 16th step and at the sweep's end, and the
    restore applies at the first of those, on every rank at the same step. Not restored:
    the trainer's counters (`global_step`, the epoch) and a precision plugin's gradient
    scaler.

    Args:
        job: the job name; default `LRPILOT_JOB`.
        monitor: the metric the policy watches; a validation run that does not log it is
            warned about once (log it with `self.log("val_loss", loss)`). None: no check.
        endpoint: the controller, or several comma-separated (the client follows `moved`
            and fails over); default `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`.
        timeout: the longest, in seconds, a validation end waits for the controller.
        strict: True raises `ControllerUnavailable` when the controller does not answer the
            hello within `timeout`, instead of training on at the optimizer's LR.
        unit: `"epoch"`, or `"step"` for policies with `unit: step`.
        report_every: with `unit="step"`, report every this many optimizer steps.
        snapshot_fn, restore_fn: for models too large to copy in memory: called instead of
            the copies (e.g. to write and read a checkpoint); both or neither. A range test
            calls them with no argument when it starts and ends. If they take an argument
            (`def snapshot_fn(unit=None)`) a loss-spike guard calls them too, instead of
            copying: `snapshot_fn(unit)` at every multiple of `snapshot_every`,
            `restore_fn(unit)` with the snapshot to put back. The LR is set after.

    Raises:
        ValueError: no job name, a bad argument, or (when training starts) an LR scheduler
            in `configure_optimizers`, which would overwrite the controller's LR.

    Example:

        trainer = pl.Trainer(max_epochs=50, callbacks=[LRPilotCallback(job="resnet-a")])
        trainer.fit(model, train_loader, val_loader)
    """

    _core: AdapterCore

    def __init__(
        self,
        job: str | None = None,
        monitor: str | None = "val_loss",
        endpoint: str | None = None,
        timeout: float = 1.0,
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
            framework="lightning",
            snapshot_fn=snapshot_fn,
            restore_fn=restore_fn,
        )
        self.job = self._core.job
        self.monitor = monitor
        self.unit = unit
        self._evaluations = 0  # validation runs reported: the controller's epoch
        self._restored: int | None = None  # from a checkpoint, for the next fit
        self._step = 0  # the trainer's global step last seen (unit="step")
        self._warned_monitor = False
        self._means = StepMeans()  # unit="step": the training loss, summed on its device

    @property
    def client(self) -> Client | None:
        """The lrpilot client of the running `fit`, None outside of one."""
        return self._core.client

    # -- fit -------------------------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.lr_scheduler_configs:
            names = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
            raise ValueError(
                f"LRPilotCallback sets the learning rate itself, but configure_optimizers "
                f"returned an LR scheduler ({names}) that would overwrite it: return only the "
                "optimizer; lrpilot's policy file does the scheduling"
            )
        if not trainer.optimizers:
            raise ValueError("LRPilotCallback needs an optimizer from configure_optimizers")
        start = trainer.current_epoch if self._restored is None else self._restored
        self._restored = None
        self._evaluations = start
        self._step = trainer.global_step
        self._warned_monitor = False
        self._means = StepMeans()
        lr = number(trainer.optimizers[0].param_groups[0]["lr"])
        if lr is None:
            raise ValueError("LRPilotCallback: the first optimizer's LR is not a number")
        client = self._core.connect(
            initial_lr=lr,
            start_epoch=start,
            start_step=self._step,
            rank=trainer.global_rank,
            world=trainer.world_size,
            copy=lambda: StateSnapshot(pl_module, trainer.optimizers),
            keep=lambda: GuardCopy(pl_module, trainer.optimizers),
        )
        self._apply(trainer, client.lr)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._core.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._core.close()

    def state_dict(self) -> dict[str, Any]:
        """Kept in Lightning checkpoints: the number of validation runs reported."""
        return {"evaluations": self._evaluations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        evaluations = state_dict.get("evaluations")
        if isinstance(evaluations, int) and not isinstance(evaluations, bool):
            self._restored = evaluations

    # -- epochs ----------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.client is None:
            return
        if self.unit == "epoch":
            self._apply(trainer, self._core.begin(epoch=self._evaluations))
        else:
            self._apply(trainer, self._core.begin(step=trainer.global_step))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self.client is None or trainer.sanity_checking or self.unit != "epoch":
            return
        metrics = scalars(trainer.callback_metrics)
        if self.monitor is not None and self.monitor not in metrics and not self._warned_monitor:
            self._warned_monitor = True
            logger.warning(
                "LRPilotCallback: %r is not among the validation metrics (%s); log it with "
                "self.log(%r, ...) in validation_step",
                self.monitor,
                ", ".join(sorted(metrics)) or "none",
                self.monitor,
            )
        lr = self._core.epoch_end(self._evaluations, metrics)
        self._evaluations += 1
        self._apply(trainer, lr)

    # -- steps (unit="step") ---------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """unit="step": after each optimizer step, report every `report_every` steps
        without waiting (else only look for decisions), and set the LR decided for the next
        step if one has arrived, as the Keras callback does."""
        if self.client is None or self.unit != "step":
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) or number(loss) is not None:
            self._means.add({"loss": loss})  # summed on its device: no host read here
        if trainer.global_step == self._step:
            return  # a batch that only accumulated gradients
        before, self._step = self._step, trainer.global_step
        core, means = self._core, self._means
        lr = core.step_end(
            trainer.current_epoch,
            self._step - 1,
            before,
            None if means.idle else lambda: means.close(now=core.reads_at_once),
        )
        self._apply(trainer, lr)

    # -- helpers ---------------------------------------------------------------------------

    def _apply(self, trainer: Any, lr: float) -> None:
        set_lr(trainer.optimizers, lr)
        follow_momentum(trainer.optimizers, self._core.client)
        if self._core.stop_requested:
            trainer.should_stop = True
