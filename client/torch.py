"""PyTorch adapter: a scheduler that lets the lrpilot controller set the learning rate.

Used like `torch.optim.lr_scheduler.ReduceLROnPlateau`, and is one (a subclass), so trainers
that treat plateau schedulers specially accept it: Lightning's `"monitor"` in
`configure_optimizers`, the HF Trainer's "step after evaluation". Importing this module
imports torch; importing `lrpilot.client` does not.

Example:

    from lrpilot.client.torch import LRPilotScheduler
    sched = LRPilotScheduler(optimizer, job="resnet-a")
    for epoch in range(100):
        train(...)
        sched.step(validate(...))
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .extras import missing_extra

try:
    import torch
    from torch.optim.lr_scheduler import ReduceLROnPlateau
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "torch", __name__) from exc

from .adapter import AdapterCore
from .core import Client, check_adapter_args, to_scalar
from .step_means import StepMeans
from .vocabulary import lr_ok

__all__ = [
    "GuardCopy",
    "LRPilotScheduler",
    "StateSnapshot",
    "cpu_copy",
    "follow_momentum",
    "number",
    "restore_snapshot",
    "scalars",
    "set_lr",
    "set_momentum",
]

logger = logging.getLogger("lrpilot.client")

# What a range test keeps in this process: never pickled.
_SNAPSHOT = frozenset({"_snapshot", "_first_step", "_first_step_hook"})
# Attributes that describe this process's connection or hold the model, not the scheduler's
# progress: never in a state_dict().
_NOT_SAVED = frozenset(
    {
        "_core",
        "endpoint",
        "timeout",
        "model",
        "snapshot_fn",
        "restore_fn",
        "_kept",
        "_means",
        *_SNAPSHOT,
    }
)


def number(value: Any) -> float | None:
    """A metric as a float: a number, a numpy scalar, a 0-d or one-element tensor or array
    (as torch's `float(metrics)` takes them); None for anything else."""
    if isinstance(value, torch.Tensor):
        value = value.detach()  # e.g. the loss itself, passed straight from the training step
    found = to_scalar(value)
    if found is not None:
        return found
    size = getattr(value, "numel", None)
    count = size() if callable(size) else getattr(value, "size", None)
    if count == 1 and callable(getattr(value, "item", None)):
        return to_scalar(value.item())
    return None


def scalars(metrics: Mapping[str, Any] | None) -> dict[str, float]:
    """The entries of `metrics` that are numbers (see `number`), as floats."""
    out: dict[str, float] = {}
    for name, value in (metrics or {}).items():
        found = number(value)
        if isinstance(name, str) and found is not None:
            out[name] = found
    return out


def _group_lr(group: Mapping[str, Any]) -> float:
    value = group["lr"]
    if type(value) is float:  # the common case, first: this runs at every step
        return value
    value = number(value)
    if value is None:
        raise ValueError(f"a param group's lr is not a number: {group['lr']!r}")
    return value


def cpu_copy(value: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to the CPU (detached), so that
    training on cannot change it and it takes no accelerator memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return type(value)((k, cpu_copy(v)) for k, v in value.items())  # type: ignore[call-arg]
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(v) for v in value)
    return copy.deepcopy(value)


class StateSnapshot:
    """The `state_dict()` of a model and of its optimizers, copied to the CPU; `restore()`
    loads them back once (`load_state_dict` moves every tensor back where it lives; an
    optimizer on the CPU keeps the copy's tensors as its own, so drop the snapshot then).

    Args:
        model: a `torch.nn.Module` (a DDP wrapper is fine).
        optimizers: the optimizers training it.
    """

    __slots__ = ("model", "model_state", "optimizer_states", "optimizers")

    def __init__(self, model: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.model = model
        self.optimizers = list(optimizers)
        self.model_state = cpu_copy(model.state_dict())
        self.optimizer_states = [cpu_copy(o.state_dict()) for o in self.optimizers]

    def restore(self) -> None:
        self.model.load_state_dict(self.model_state)
        for optimizer, state in zip(self.optimizers, self.optimizer_states, strict=True):
            optimizer.load_state_dict(state)


def host_copy(value: Any, pinned: bool) -> Any:
    """A deep copy of a state dict in host memory: a CUDA tensor goes to pinned memory with a
    non-blocking copy (queued on its stream: the step is not held up, and the next step's
    writes come after it), a CPU tensor is cloned."""
    if isinstance(value, torch.Tensor):
        if value.is_cuda and pinned:
            out = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
            out.copy_(value.detach(), non_blocking=True)
            return out
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return type(value)((k, host_copy(v, pinned)) for k, v in value.items())  # type: ignore[call-arg]
    if isinstance(value, list | tuple):
        return type(value)(host_copy(v, pinned) for v in value)
    return copy.deepcopy(value)


class GuardCopy:
    """A guard's snapshot: the model's and optimizers' state in host memory, taken by the
    trainer at every multiple of `snapshot_every`, restorable more than once.

    Where CUDA holds the tensors the copies go to pinned memory without blocking (an event
    marks their end; a restore waits for it), so taking a snapshot does not wait for the
    device; `reuse`, a snapshot no longer kept, lends its buffers (pinned memory is slow to
    allocate). `pinned=False` copies synchronously (the baseline in bench/guard.py).

    Args:
        model: a `torch.nn.Module` (a DDP wrapper is fine).
        optimizers: the optimizers training it.
        pinned: pinned memory and non-blocking copies for CUDA tensors.
        reuse: an older GuardCopy of the same model whose buffers this one may take.
    """

    __slots__ = ("done", "model", "model_state", "optimizer_states", "optimizers")

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: Iterable[torch.optim.Optimizer],
        pinned: bool = True,
        reuse: GuardCopy | None = None,
    ) -> None:
        self.model = model
        self.optimizers = list(optimizers)
        self.model_state: dict[str, Any]
        self.optimizer_states: list[dict[str, Any]]
        pinned = pinned and torch.cuda.is_available()
        state = {
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
        }
        copied = None
        if reuse is not None:
            copied = _refill(
                {"model": reuse.model_state, "optimizers": reuse.optimizer_states}, state
            )
        if copied is None:
            copied = host_copy(state, pinned)
        self.model_state, self.optimizer_states = copied["model"], copied["optimizers"]
        self.done: Any = None
        if pinned:
            self.done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.done.record()

    def restore(self) -> None:
        if self.done is not None:
            self.done.synchronize()
        self.model.load_state_dict(self.model_state)
        for optimizer, state in zip(self.optimizers, self.optimizer_states, strict=True):
            # A copy: an optimizer may keep the tensors it is given as its own state, and
            # this snapshot may be restored again.
            optimizer.load_state_dict(cpu_copy(state))


def _refill(old: Any, new: Any) -> Any:
    """`new` copied into `old`'s host buffers (non-blocking from CUDA), or None when their
    shapes differ (then a fresh copy is made)."""
    if isinstance(new, torch.Tensor):
        if not isinstance(old, torch.Tensor) or old.shape != new.shape or old.dtype != new.dtype:
            return None
        old.copy_(new.detach(), non_blocking=new.is_cuda and old.is_pinned())
        return old
    if isinstance(new, Mapping):
        if not isinstance(old, Mapping) or old.keys() != new.keys():
            return None
        out = {}
        for k, v in new.items():
            got = _refill(old[k], v)
            if got is None and isinstance(v, torch.Tensor | Mapping | list | tuple):
                return None
            out[k] = got if got is not None else copy.deepcopy(v)
        return type(new)(out) if type(new) is not dict else out  # type: ignore[call-arg]
    if isinstance(new, list | tuple):
        if not isinstance(old, list | tuple) or len(old) != len(new):
            return None
        items = []
        for o, v in zip(old, new, strict=True):
            got = _refill(o, v)
            if got is None and isinstance(v, torch.Tensor | Mapping | list | tuple):
                return None
            items.append(got if got is not None else copy.deepcopy(v))
        return type(new)(items)
    return None


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> bool:
    """Gives the job LR `lr` to every param group of `optimizers`.

    The first group of the first optimizer gets `lr` exactly; every other group keeps its
    ratio to it (it is scaled by lr / old_lr), so layer-wise LRs keep their shape.

    Returns:
        False when the LR was `lr` already (nothing changed).
    """
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    if not groups:
        return False
    old_lr = _group_lr(groups[0])
    if lr == old_lr:
        return False
    for i, group in enumerate(groups):
        new = lr if i == 0 or old_lr == 0 else _group_lr(group) * (lr / old_lr)
        if isinstance(group["lr"], torch.Tensor):  # a tensor LR (capturable optimizers)
            group["lr"].fill_(new)
        else:
            group["lr"] = new
    return True


def set_momentum(groups: Iterable[dict[str, Any]], momentum: float) -> None:
    """A plan's `cycle_momentum` (one_cycle, cyclic): each group's `momentum`, or `betas[0]`
    for Adam-like optimizers, as torch's OneCycleLR and CyclicLR set them."""
    for group in groups:
        if "betas" in group:
            group["betas"] = (momentum, *group["betas"][1:])
        elif "momentum" in group:
            group["momentum"] = momentum


def follow_momentum(optimizers: Iterable[torch.optim.Optimizer], client: Client | None) -> None:
    """Sets the momentum of the client's plan (`cycle_momentum`) on every param group of
    `optimizers`, if the plan in force sets one (see `set_momentum`); else nothing."""
    momentum = None if client is None else client.momentum
    if momentum is not None:
        set_momentum([g for optimizer in optimizers for g in optimizer.param_groups], momentum)


def restore_snapshot(snapshot: StateSnapshot | None, job: str) -> bool:
    """`action: restore` in a callback: load the copy back; without one (the callback joined
    after the test began) warn that training goes on from the weights as they are."""
    if snapshot is None:
        logger.warning(
            "lrpilot: the range test of job %s ended, but this callback kept no copy of the "
            "state from its start (it joined later); training goes on from the weights as "
            "they are",
            job,
        )
        return False
    snapshot.restore()
    return True


class _InertHook:
    """What a `_BeforeFirstStep` hook becomes when its optimizer is pickled or copied."""

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        return None


class _BeforeFirstStep:
    """An optimizer step pre-hook that tells the scheduler once that training starts.

    It holds the scheduler weakly (the optimizer does not keep it alive) and pickles as an
    inert hook (a pickled optimizer does not drag the scheduler along). It does nothing
    once it has fired; the scheduler removes it later, outside `optimizer.step()` (torch
    iterates over the hooks while it calls them).
    """

    def __init__(self, scheduler: LRPilotScheduler) -> None:
        self._scheduler = weakref.ref(scheduler)
        self.fired = False

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.fired:
            return
        self.fired = True
        scheduler = self._scheduler()
        if scheduler is not None:
            scheduler._before_first_step()

    def __reduce__(self) -> tuple[type[_InertHook], tuple[()]]:
        return _InertHook, ()


class LRPilotScheduler(ReduceLROnPlateau):
    """Reports each epoch's metrics to the lrpilot controller and sets the LR it decides.

    A subclass of torch's `ReduceLROnPlateau`: `step(metrics)` after validation, the n-th
    call (0-based) reports epoch n and the LR it sets applies from epoch n+1, as torch's.
    The controller's policy decides; this class's own plateau fields (`factor`, `patience`,
    `best`...) are torch's defaults and unused. Every param group is scaled by the same
    ratio new_lr / old_lr of group 0, so groups keep their relative LRs. With
    `unit="step"`, `step()` is called after every optimizer step (like `OneCycleLR`),
    reports every `report_every` steps without waiting, and sets each decision at the first
    `step()` after it has arrived (the decision on step s usually from step s+2). Give it
    the loss tensor itself: it is summed on its device and its mean over the
    `report_every` steps read to the host once per report, one report late, with a
    non-blocking copy (`lrpilot.client.step_means`), so no step waits for the device. The hello
    waits for the first `step()`, `load_state_dict()` or use of `client` (so that a resume
    says hello from its checkpoint); touch `client` to get a policy's `initial_lr` before
    the first epoch. The controller being absent or slow never stops training: the LR then
    stays.

    LR range tests (`type: range_test` in the policy) need `model=`: the scheduler then
    keeps CPU copies of `model.state_dict()` and `optimizer.state_dict()` from right before
    the first optimizer step (the hello comes only with the first `step()`, after that
    optimizer step, so the state from before any training is copied before it is asked
    for; weights loaded between construction and the first step are in it). When the hello
    reply says a range test starts (`action: snapshot`) the copy is kept; else it is dropped
    there. When the test stops (`action: restore`) both state dicts are loaded back and the
    suggested LR is set on the param groups. During the test the sweep runs as a plan:
    every step is reported, streamed without waiting for answers; a job of several ranks
    waits (at most `timeout`) only before every 16th step and at the sweep's end, and the
    restore applies at the first of those, on every rank at the same step. Touch `client`
    before the first optimizer step to have the sweep's first LR from step 0 on. Without
    `model` (or `snapshot_fn`/`restore_fn`) the hello says the process cannot restore: the
    controller then runs no range test for it, answers with notice `restore_unsupported`
    (logged once) and the LR stays the optimizer's.

    `torch.save(scheduler)` works (the connection is made again, at the epoch reached,
    after `torch.load`), and so does a checkpoint of `state_dict()`, which holds torch's
    keys (`last_epoch`, `_last_lr`, ...) and lrpilot's (`epoch`, `last_lr`, `job`).
    Neither holds a range test's in-memory copy: `state_dict()` leaves out `model` and the
    hooks, and pickling keeps `model` and the hooks (the model pickles with the optimizer
    that trains it; hooks must be picklable functions) but not the copy, so a scheduler
    unpickled in the middle of a range test cannot restore the copy (with `snapshot_fn`/
    `restore_fn` it can: what they saved is theirs). Not thread-safe: call it from the
    training loop.

    Args:
        optimizer: a torch optimizer; group 0's LR is the job's LR.
        job: the job name; default `LRPILOT_JOB`.
        monitor: the metric name a number passed to `step()` is reported under; default
            `val_loss`, and `loss` with `unit="step"` (the training loss of each step).
        endpoint: the controller, or several comma-separated (the client follows `moved`
            and fails over); default `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`.
        timeout: the longest, in seconds, a `step()` waits for the controller.
        strict: True raises `ControllerUnavailable` when the controller does not answer the
            hello within `timeout`, instead of training on at the optimizer's LR.
        unit: `"epoch"`, or `"step"` for policies with `unit: step`.
        report_every: with `unit="step"`, report every this many optimizer steps.
        model: the `torch.nn.Module` that `optimizer` trains; lets a range test restore it.
        snapshot_fn, restore_fn: instead of the in-memory copy, for models too large to
            copy (e.g. write and read a checkpoint): `snapshot_fn()` is called where the
            copy would be made (before the first optimizer step, or when a later range
            test starts), `restore_fn()` when the test stops; both or neither. The
            scheduler sets the suggested LR after `restore_fn`. If they take an argument
            (`def snapshot_fn(unit=None)`) a loss-spike guard calls them too, instead of
            copying the state: `snapshot_fn(step)` at every multiple of `snapshot_every`,
            `restore_fn(step)` with the snapshot to put back (one of the newest two).

    Raises:
        ValueError: no job name, a bad argument, or an LR that is not a number.
        TypeError: `optimizer` is not a torch optimizer, or `model` not a torch module.

    Example:

        sched = LRPilotScheduler(torch.optim.SGD(model.parameters(), lr=0.1), job="resnet-a")
        for epoch in range(100):
            train(...)
            sched.step(validate(...))
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        job: str | None = None,
        monitor: str | None = None,
        endpoint: str | None = None,
        timeout: float = 1.0,
        *,
        unit: str = "epoch",
        report_every: int = 1,
        strict: bool = False,
        model: torch.nn.Module | None = None,
        snapshot_fn: Callable[..., None] | None = None,
        restore_fn: Callable[..., None] | None = None,
    ) -> None:
        check_adapter_args(unit, report_every, snapshot_fn, restore_fn)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"LRPilotScheduler needs a torch optimizer, got {type(optimizer).__name__}"
            )
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not optimizer.param_groups:
            raise ValueError("LRPilotScheduler needs an optimizer with param groups")
        super().__init__(optimizer)
        # The user's snapshot_fn / restore_fn stay here: the copy is taken before the first
        # optimizer step, before the controller has said whether a range test runs.
        self._core = AdapterCore(
            job=job,
            endpoint=endpoint,
            timeout=timeout,
            strict=strict,
            unit=unit,
            report_every=report_every,
            framework="torch",
        )
        self.job = self._core.job
        self.monitor = monitor if monitor is not None else "loss" if unit == "step" else "val_loss"
        self.endpoint = endpoint
        self.timeout = timeout
        self.strict = bool(strict)
        self.unit = unit
        self.report_every = report_every
        #: The number of `step()` calls so far (torch's meaning): with unit="epoch" the
        #: epoch the next `step()` reports, with unit="step" the next optimizer step.
        self.last_epoch = 0
        #: With unit="step": the epoch the steps belong to (for `lrpilot status`).
        self.epoch_in_progress = 0
        #: The module a range test restores (None: this scheduler cannot restore).
        self.model = model
        self.snapshot_fn, self.restore_fn = snapshot_fn, restore_fn
        self._snapshot: StateSnapshot | None = None  # the in-memory copy
        self._kept = False  # a copy is held (in memory, or made by snapshot_fn)
        self._first_step: _BeforeFirstStep | None = None
        self._first_step_hook: Any = None  # its handle
        #: unit="step": each step's metrics summed on their device, read once per report.
        self._means = StepMeans()
        if self._can_restore():
            self._first_step = _BeforeFirstStep(self)
            self._first_step_hook = optimizer.register_step_pre_hook(self._first_step)

    # The hello waits for the first step() or load_state_dict(): a resume must say hello
    # with its start epoch, or the controller would start a new run of the job.
    @property
    def _client(self) -> Client | None:
        return self._core.client

    @property
    def _testing(self) -> bool:
        """A range test runs: from its snapshot to its restore."""
        return self._core.testing

    @property
    def client(self) -> Client:
        """The lrpilot client (its `stats`, `online`, `stop_requested`); says hello if needed."""
        client = self._core.client
        if client is None:
            client = self._connect(self._lr0())
            self._set_lr(client.lr)
            self._settle()
        return client

    # torch's own ReduceLROnPlateau.step differs from LRScheduler.step the same way.
    def step(self, metrics: Any = None, epoch: int | None = None) -> None:  # type: ignore[override]
        """Reports the epoch (or step) just finished and sets the LR for the next one.

        Args:
            metrics: the monitored value (a number, numpy scalar, 0-d or one-element
                tensor), reported under `monitor`, or a mapping of metric names to values.
                Optional with `unit="step"` (a schedule needs none); there, tensors are
                summed on their device and reported as the mean over a report's steps,
                one report late (never read at the step they are given).
            epoch: with `unit="epoch"`, the 0-based epoch just finished (torch's deprecated
                argument, read as `for epoch in range(n)` code means it); default: the
                number of earlier `step()` calls. With `unit="step"`, the epoch in progress.
        """
        if self.unit == "step":
            self._step_end(metrics, epoch)
            return
        report = self._metrics(metrics)
        if epoch is not None:
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
            if self._client is None:
                self.last_epoch = epoch  # the first call says hello from there
        done = self.last_epoch if epoch is None else epoch
        trained = self._trained_lr()
        lr = self.client.report(done, report, trained_lr=trained)
        self.last_epoch = done + 1
        self._set_lr(lr)
        self._settle()

    def get_last_lr(self) -> list[float]:  # type: ignore[override]  # floats only
        """The LR of each param group, as torch schedulers return it."""
        return [_group_lr(group) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs: torch's keys (`last_epoch`, `_last_lr`, ...) and
        lrpilot's (`epoch`, `last_lr`, `job`, `unit`); no connection details."""
        state = {k: v for k, v in super().state_dict().items() if k not in _NOT_SAVED}
        lrs = self.get_last_lr()
        state.update(_last_lr=lrs, epoch=self.last_epoch, last_lr=lrs)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resumes from a checkpoint: the next `step()` reports the saved epoch count.

        Takes this class's `state_dict()` and torch's `ReduceLROnPlateau` one (its
        `last_epoch` and `_last_lr`). Says hello again with that start epoch, so the
        controller resumes the job's run (and restores its policy state if the checkpoint
        is older than its last epoch). Load the optimizer's state first: the LR the
        controller answers is set on it.
        """
        epoch = state_dict.get("epoch", state_dict.get("last_epoch"))
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(
                f"state_dict['epoch'] (or torch's 'last_epoch') must be an integer >= 0, "
                f"got {epoch!r}"
            )
        if state_dict.get("job", self.job) != self.job:
            logger.warning(
                "loading the lrpilot state of job %r into job %r", state_dict["job"], self.job
            )
        saved = state_dict.get("last_lr") or state_dict.get("_last_lr") or []
        lr = number(saved[0]) if saved else None
        self._core.close()
        self.last_epoch = epoch
        in_progress = state_dict.get("epoch_in_progress")
        if isinstance(in_progress, int) and not isinstance(in_progress, bool):
            self.epoch_in_progress = in_progress
        client = self._connect(lr if lr is not None and lr_ok(lr) else self._lr0())
        self._set_lr(client.lr)
        self._settle()

    def close(self) -> None:
        """Says bye to the controller and closes the socket; safe to call twice."""
        self._core.close()
        if not self._testing:
            self._release()

    def __enter__(self) -> LRPilotScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # A socket does not pickle: `torch.save(scheduler)` keeps everything else but the
        # range test's in-memory copy (a second model in every checkpoint).
        state = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_core", "_means") and k not in _SNAPSHOT
        }
        state["_testing"] = self._core.testing
        if state.get("snapshot_fn") is None:
            state["_kept"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, default in (("model", None), ("snapshot_fn", None), ("restore_fn", None)):
            state.setdefault(name, default)  # pickled by an lrpilot without range tests
        state.setdefault("_kept", False)
        testing = bool(state.pop("_testing", False))
        state.pop("_client", None)  # pickled by an lrpilot before the adapter core
        self.__dict__.update(state)
        # No client: the next use says hello from `last_epoch`, and the run resumes.
        self._core = AdapterCore(
            job=self.job,
            endpoint=self.endpoint,
            timeout=self.timeout,
            strict=state.get("strict", False),
            unit=self.unit,
            report_every=self.report_every,
            framework="torch",
        )
        self._core.testing = testing
        if testing and self._kept:  # snapshot_fn saved the state: restore_fn puts it back
            self._core.snapshot = _PutBack(self)
        self._snapshot = None
        self._first_step = self._first_step_hook = None
        self._means = StepMeans()

    # -- helpers ---------------------------------------------------------------------------

    def _step_end(self, metrics: Any, epoch: int | None) -> None:
        """unit="step": `step()` after optimizer step `last_epoch` (0-based). The metrics
        are summed where they live and read at reports only (see `StepMeans`). The path
        of a step with a plan and nothing to report runs at every optimizer step: it looks
        nothing up twice and writes the param group only when the LR changes."""
        if epoch is not None:
            self.epoch_in_progress = epoch
        core = self._core
        trained = None
        if core.client is None:
            trained = self._lr0()  # the step trained at the optimizer's LR, before the hello
            self.client  # noqa: B018 - says hello
        done = self.last_epoch
        self.last_epoch = done + 1
        means = self._means
        if type(metrics) is torch.Tensor and metrics.numel() == 1:
            means.add_tensor(self.monitor, metrics)  # the loss itself: the per-step path
        elif metrics is not None:
            means.add(self._step_metrics(metrics))
        if means.idle:  # nothing added, nothing waiting: the per-step path
            lr = core.step_end(self.epoch_in_progress, done, done, None, trained_lr=trained)
        else:
            lr = core.step_end(
                self.epoch_in_progress,
                done,
                done,
                lambda: means.close(now=core.reads_at_once),
                trained_lr=trained,
            )
        self._set_lr(lr)
        if self._first_step is not None or self._kept:
            self._settle()

    def _step_metrics(self, metrics: Any) -> dict[str, Any]:
        """unit="step": the metrics of one step, tensors kept as they are (summed on their
        device, never read here), other values as numbers."""
        if isinstance(metrics, Mapping):
            return {k: v if isinstance(v, torch.Tensor) else number(v) for k, v in metrics.items()}
        if isinstance(metrics, torch.Tensor) and metrics.numel() == 1:
            return {self.monitor: metrics}
        value = number(metrics)
        if value is None:
            raise ValueError(
                "step() takes a number or a mapping of metrics (a 0-d or one-element tensor "
                f"is a number), got {type(metrics).__name__}"
            )
        return {self.monitor: value}

    def _metrics(self, metrics: Any) -> dict[str, float]:
        if isinstance(metrics, Mapping):
            return scalars(metrics)
        value = number(metrics)
        if value is None:
            raise ValueError(
                "step() takes a number or a mapping of metrics (a 0-d or one-element tensor "
                f"is a number), got {type(metrics).__name__}"
            )
        return {self.monitor: value}

    def _connect(self, initial_lr: float) -> Client:
        step_unit = self.unit == "step"
        fns = (self.snapshot_fn, self.restore_fn)
        return self._core.connect(
            initial_lr=initial_lr,
            start_epoch=self.epoch_in_progress if step_unit else self.last_epoch,
            start_step=self.last_epoch if step_unit else 0,
            copy=self._keep if self._can_restore() else None,
            keep=self._guard_copy if getattr(self, "model", None) is not None else None,
            unit_fns=(fns[0], fns[1]) if fns[0] and fns[1] else None,
        )

    def _guard_copy(self) -> GuardCopy:
        """A guard's snapshot (at every multiple of `snapshot_every`, through the core); the
        buffers of one the core no longer keeps are reused."""
        assert self.model is not None
        kept = [k for k in self._core.kept.values() if isinstance(k, GuardCopy)]
        spare = None if len(kept) < 2 else kept[0]
        return GuardCopy(self.model, [self.optimizer], reuse=spare)

    # -- range tests -----------------------------------------------------------------------

    def _can_restore(self) -> bool:
        hooks = getattr(self, "snapshot_fn", None) is not None
        return hooks or getattr(self, "model", None) is not None

    def _take(self) -> None:
        if self.snapshot_fn is not None:
            self.snapshot_fn()
        else:
            assert self.model is not None
            self._snapshot = StateSnapshot(self.model, [self.optimizer])
        self._kept = True

    def _before_first_step(self) -> None:
        """The first optimizer step is about to run: copy the state from before any
        training, unless the controller has said already whether a range test runs."""
        decided = self._client is not None and self._client.stats["replies"] > 0
        if not self._kept and not decided:
            self._take()

    def _keep(self) -> _PutBack:
        """`action: snapshot` (through the adapter core): a range test starts from the state
        kept."""
        if not self._kept:  # asked before the first step, or a later test: the state now
            self._take()
        self._unhook()
        return _PutBack(self)

    def _restore(self) -> None:
        """`action: restore` (through the adapter core): the state from before the test goes
        back; the suggested LR is set on the param groups right after (`_set_lr`)."""
        if not self._kept:
            logger.warning(
                "lrpilot: the range test of job %s ended, but this scheduler kept no copy of "
                "the state from its start (unpickled or loaded since); training goes on from "
                "the weights as they are",
                self.job,
            )
            return
        if self.restore_fn is not None:
            self.restore_fn()
        else:
            assert self._snapshot is not None
            self._snapshot.restore()
        self._release()
        self._last_lr = [*self.get_last_lr()]

    def _settle(self) -> None:
        """After each call into the client: removes the first-step hook once it has fired,
        and drops the copy once the controller has answered and no range test runs."""
        if self._first_step is not None and self._first_step.fired:
            self._unhook()
        if self._kept and not self._testing:
            client = self._client
            if client is not None and client.stats["replies"] > 0:
                self._release()

    def _release(self) -> None:
        self._snapshot = None
        self._kept = False
        self._unhook()

    def _unhook(self) -> None:
        """Removes the first-step hook (never from inside `optimizer.step()`)."""
        handle = getattr(self, "_first_step_hook", None)
        if handle is not None:
            handle.remove()
        self._first_step = self._first_step_hook = None

    def _lr0(self) -> float:
        return _group_lr(self.optimizer.param_groups[0])

    def _trained_lr(self) -> float | None:
        """The LR of the step (epoch) this `step()` reports, when the hello comes only now,
        after it (its answer sets another LR before the report): group 0's; else None."""
        return self._lr0() if self._client is None else None

    def _set_lr(self, lr: float) -> None:
        groups = self.optimizer.param_groups
        client = self._core.client
        if client is not None and client.momentum is not None:
            set_momentum(groups, client.momentum)
        first = groups[0]
        if type(first["lr"]) is float:  # the per-step path, first
            if first["lr"] == lr:
                return  # in force already: most steps of a stepwise schedule
            if len(groups) == 1:
                first["lr"] = lr
                self._last_lr = [lr]
                return
        if set_lr([self.optimizer], lr):
            lrs: list[float | torch.Tensor] = [*self.get_last_lr()]
            self._last_lr = lrs


class _PutBack:
    """What the adapter core restores at `action: restore`: the scheduler's kept state."""

    __slots__ = ("scheduler",)

    def __init__(self, scheduler: LRPilotScheduler) -> None:
        self.scheduler = scheduler

    def restore(self) -> None:
        self.scheduler._restore()
