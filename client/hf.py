"""Hugging Face `transformers.Trainer` adapter: a callback that lets the lrpilot controller
set the learning rate.

Importing this module imports transformers and torch; importing `lrpilot.client` does not.

Example:

    from lrpilot.client.hf import LRPilotTrainerCallback
    args = TrainingArguments("out", eval_strategy="epoch", lr_scheduler_type="constant")
    Trainer(model, args, train_dataset=train, eval_dataset=val,
            callbacks=[LRPilotTrainerCallback(job="bert-a")]).train()
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from .extras import missing_extra

try:
    import torch
    import transformers
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "hf", __name__) from exc

from .adapter import AdapterCore
from .core import Client
from .torch import GuardCopy, StateSnapshot, follow_momentum, number, scalars, set_lr

__all__ = ["LRPilotTrainerCallback"]

logger = logging.getLogger("lrpilot.client")

# Logged values that are not metrics of the model.
_NOT_METRICS = frozenset({"epoch", "learning_rate", "total_flos", "step"})


def _name(value: Any) -> str:
    """An enum's value (`SchedulerType.CONSTANT` -> "constant"), else the string."""
    return str(getattr(value, "value", value))


def _is_constant(scheduler: Any) -> bool:
    """A LambdaLR whose factors are all 1 (what `lr_scheduler_type="constant"` makes)."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or not lambdas:
        return False
    try:
        return all(f(0) == 1 and f(1) == 1 and f(10**6) == 1 for f in lambdas)
    except Exception:  # a lambda that cannot be probed is not the constant one
        return False


class LRPilotTrainerCallback(transformers.TrainerCallback):  # type: ignore[misc]
    """Lets the lrpilot controller decide the learning rate of a `transformers.Trainer`.

    Says hello when training starts, with the optimizer's LR, the epoch and step reached
    (so `train(resume_from_checkpoint=...)` resumes the job's run) and the process's rank
    and world size. With `unit="epoch"` it reports the metrics of every evaluation
    (`eval_loss`, ...) and sets the decided LR, which the optimizer uses from the next
    training step on; each evaluation is one epoch for the controller (with
    `eval_strategy="epoch"`, exactly the trainer's epochs). With `unit="step"` (policies
    with `unit: step`) it reports the training loss at every log, i.e. every
    `logging_steps` optimizer steps, and the LR decided applies from the next step. A plan
    with `cycle_momentum` (one_cycle, cyclic) also sets each param group's `betas[0]`
    (`momentum` for SGD-like optimizers), as torch's `OneCycleLR` does.

    The Trainer's own scheduler would overwrite the LR at every step: training needs
    `lr_scheduler_type="constant"` (warm-up and decay belong in the lrpilot policy), and
    the callback keeps that scheduler's base LR equal to the controller's, so the trainer's
    logged `learning_rate` is the LR the optimizer used. An evaluation before any
    training step (`eval_on_start`) is not reported. The controller being absent or slow
    never stops training: the LR then stays as it is.

    LR range tests (`type: range_test`; per step they need `unit="step"` and
    `logging_steps=1`, the sweep taking one LR per report): the hello comes before the
    first step; when the test starts (`action: snapshot`) the callback keeps CPU copies of
    `model.state_dict()` and the optimizer's `state_dict()`, and when it stops (`action:
    restore`, at the log or evaluation whose report ended it) it loads them back and sets
    the suggested LR, on the optimizer and as the constant scheduler's base LR. Not
    restored: the trainer's state (`global_step`, the epoch, its RNGs) and an AMP scaler.

    Args:
        job: the job name; default `LRPILOT_JOB`.
        endpoint: the controller, or several comma-separated (the client follows `moved`
            and fails over); default `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`.
        timeout: the longest, in seconds, an evaluation (or a log) waits for the controller.
        strict: True raises `ControllerUnavailable` when the controller does not answer the
            hello within `timeout`, instead of training on at the optimizer's LR.
        unit: `"epoch"`, or `"step"` for policies with `unit: step`.
        snapshot_fn, restore_fn: for models too large to copy in memory: called instead of
            the copies (e.g. to write and read a checkpoint); both or neither. A range test
            calls them with no argument when it starts and ends. If they take an argument
            (`def snapshot_fn(unit=None)`) a loss-spike guard calls them too, instead of
            copying: `snapshot_fn(unit)` at every multiple of `snapshot_every`,
            `restore_fn(unit)` with the snapshot to put back. The LR is set after.

    Raises:
        ValueError: no job name, a bad argument, or (when training starts) an LR scheduler
            other than the constant one.

    Example:

        args = TrainingArguments("out", eval_strategy="epoch", lr_scheduler_type="constant")
        trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                          callbacks=[LRPilotTrainerCallback(job="bert-a")])
        trainer.train()
    """

    def __init__(
        self,
        job: str | None = None,
        endpoint: str | None = None,
        timeout: float = 1.0,
        unit: str = "epoch",
        strict: bool = False,
        snapshot_fn: Callable[..., None] | None = None,
        restore_fn: Callable[..., None] | None = None,
    ) -> None:
        self._core = AdapterCore(
            job=job,
            endpoint=endpoint,
            timeout=timeout,
            strict=strict,
            unit=unit,
            report_every=1,
            framework="hf",
            snapshot_fn=snapshot_fn,
            restore_fn=restore_fn,
        )
        self.job = self._core.job
        self.unit = unit
        self._optimizer: Any = None
        self._scheduler: Any = None
        self._lr = 0.0  # the LR set on the optimizer
        self._next_eval = 0  # the controller's epoch of the next evaluation
        self._trained_at = 0  # the global step of the last report (or of the start)

    @property
    def client(self) -> Client | None:
        """The lrpilot client of the running `train()`, None outside of one."""
        return self._core.client

    # -- training --------------------------------------------------------------------------

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        kind = _name(args.lr_scheduler_type)
        scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
        if kind != "constant":
            raise ValueError(
                f"LRPilotTrainerCallback sets the learning rate itself, but "
                f'lr_scheduler_type="{kind}" would overwrite it at every step: pass '
                'TrainingArguments(..., lr_scheduler_type="constant"); warm-up and decay '
                "go in the lrpilot policy file"
            )
        if scheduler is not None and not _is_constant(scheduler):
            raise ValueError(
                f"LRPilotTrainerCallback sets the learning rate itself, but the Trainer was "
                f"given a {type(scheduler).__name__} that would overwrite it: pass "
                'optimizers=(optimizer, None) and lr_scheduler_type="constant"'
            )
        if optimizer is None or not optimizer.param_groups:
            raise ValueError("LRPilotTrainerCallback needs the Trainer's optimizer")
        self._optimizer, self._scheduler = optimizer, scheduler
        lr = number(optimizer.param_groups[0]["lr"])
        if lr is None:
            raise ValueError("LRPilotTrainerCallback: the optimizer's LR is not a number")
        self._lr = lr
        self._next_eval = self._upcoming(args, state)
        self._trained_at = state.global_step
        directions = {}
        best = args.metric_for_best_model
        if best and args.greater_is_better is not None:
            name = best if best.startswith("eval_") else f"eval_{best}"
            directions[name] = "max" if args.greater_is_better else "min"
        client = self._core.connect(
            initial_lr=lr,
            start_epoch=math.floor(state.epoch or 0) if self.unit == "step" else self._next_eval,
            start_step=state.global_step,
            rank=args.process_index,
            world=args.world_size,
            directions=directions,
            copy=None if model is None else (lambda: StateSnapshot(model, [optimizer])),
            keep=None if model is None else (lambda: GuardCopy(model, [optimizer])),
        )
        self._apply(client.lr, control)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._core.close()
        self._optimizer = self._scheduler = None

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.client is not None and self.unit == "epoch":
            self._apply(self._core.begin(epoch=self._next_eval), control)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.client is None:
            return
        if self.unit == "step":
            self._apply(self._core.begin(step=state.global_step), control)
        elif self._optimizer.param_groups[0]["lr"] != self._lr:
            self._apply(self._lr, control)  # something else set it: undo that

    # -- reports ---------------------------------------------------------------------------

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> None:
        if self.client is None or self.unit != "epoch" or state.global_step == self._trained_at:
            return  # not training, step mode, or no training step since the last report
        index = max(self._current(args, state), self._next_eval)
        report = {k: v for k, v in scalars(metrics).items() if k not in _NOT_METRICS}
        if "eval_loss" in report:
            # Also under Keras' name, so a policy on `val_loss` (the embedded default's
            # monitor) works with the Trainer as it does with Keras and Lightning.
            report.setdefault("val_loss", report["eval_loss"])
        lr = self._core.epoch_end(index, report)
        self._next_eval, self._trained_at = index + 1, state.global_step
        self._apply(lr, control)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.client is None or self.unit != "step" or "loss" not in (logs or {}):
            return  # only the training logs (eval logs have eval_loss, the summary train_loss)
        if state.global_step == self._trained_at:
            return
        report = {k: v for k, v in scalars(logs).items() if k not in _NOT_METRICS}
        epoch = math.floor(state.epoch or 0)
        # A log comes every logging_steps steps: waiting for its decision costs little, and
        # the next step then runs with it.
        done, before = state.global_step - 1, self._trained_at
        lr = self._core.step_end(epoch, done, min(before, done), lambda: report, wait=True)
        self._trained_at = state.global_step
        self._apply(lr, control)

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _upcoming(args: Any, state: Any) -> int:
        """The controller's epoch of the next evaluation, where training (re)starts."""
        strategy = _name(args.eval_strategy)
        if strategy == "steps" and state.eval_steps:
            return int(state.global_step // state.eval_steps)
        return math.floor(state.epoch or 0)

    @staticmethod
    def _current(args: Any, state: Any) -> int:
        """The controller's epoch of the evaluation running now."""
        strategy = _name(args.eval_strategy)
        if strategy == "steps" and state.eval_steps:
            return int(state.global_step // state.eval_steps) - 1
        return math.ceil(state.epoch or 0) - 1

    def _apply(self, lr: float, control: Any) -> None:
        optimizer = self._optimizer
        if set_lr([optimizer], lr) or self._core.restored:
            self._core.restored = False
            lrs = [number(group["lr"]) or 0.0 for group in optimizer.param_groups]
            scheduler = self._scheduler
            if scheduler is not None:
                # The constant scheduler multiplies its base LRs by 1 at every step; with the
                # controller's LRs as base it writes them back unchanged, and its
                # get_last_lr() (the trainer's logged learning_rate) tells the truth.
                scheduler.base_lrs = list(lrs)
                scheduler._last_lr = list(lrs)
        follow_momentum([optimizer], self._core.client)
        self._lr = lr
        if self._core.stop_requested:
            control.should_training_stop = True
