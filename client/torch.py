"""PyTorch adapter: a scheduler that lets the lrpilot controller set the learning rate.

Used like `torch.optim.lr_scheduler.ReduceLROnPlateau`: call `step(val_loss)` once per
epoch after validation. The module needs no torch import of its own: it only touches the
optimizer's `param_groups`, so `lrpilot.client` never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .core import Client, scalar_metrics, to_scalar
from .env import resolve_job

if TYPE_CHECKING:
    from torch.optim import Optimizer

__all__ = ["LRPilotScheduler"]

logger = logging.getLogger("lrpilot.client")


class LRPilotScheduler:
    """Reports each epoch's metrics to the lrpilot controller and sets the LR it decides.

    `step()` counts epochs: the n-th call (0-based) reports epoch n, and the LR it sets
    applies from epoch n+1, as torch's `ReduceLROnPlateau`. Every param group is scaled by
    the same ratio new_lr / old_lr of group 0, so groups keep their relative LRs. The
    controller being absent or slow never stops training: the LR then stays as it is.
    Not thread-safe: call it from the training loop.

    Args:
        optimizer: a torch optimizer; group 0's LR is the job's LR.
        job: the job name; default `LRPILOT_JOB`.
        monitor: the metric name a float passed to `step()` is reported under.
        endpoint: the controller; default `LRPILOT_ENDPOINT`, else `tcp://127.0.0.1:5555`.
        timeout: the longest, in seconds, a `step()` waits for the controller.

    Raises:
        ValueError: no job name, or an optimizer whose LR is not a number in (0, 10].

    Example:

        sched = LRPilotScheduler(torch.optim.SGD(model.parameters(), lr=0.1), job="resnet-a")
        for epoch in range(100):
            train(...)
            sched.step(validate(...))
    """

    def __init__(
        self,
        optimizer: Optimizer,
        job: str | None = None,
        monitor: str = "val_loss",
        endpoint: str | None = None,
        timeout: float = 1.0,
    ) -> None:
        if not getattr(optimizer, "param_groups", None):
            raise ValueError("LRPilotScheduler needs a torch optimizer with param groups")
        self.optimizer = optimizer
        self.job = resolve_job(job)
        self.monitor = monitor
        self.endpoint = endpoint
        self.timeout = timeout
        #: The number of `step()` calls so far: the epoch the next `step()` reports.
        self.last_epoch = 0
        # The hello waits for the first step() or load_state_dict(): a resume must say hello
        # with its start epoch, or the controller would start a new run of the job.
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        """The lrpilot client (its `stats`, `online`, `stop_requested`); says hello if needed."""
        if self._client is None:
            self._client = self._connect(self._group_lr(0), start_epoch=self.last_epoch)
            self._set_lr(self._client.lr)
        return self._client

    def step(self, metrics: float | Mapping[str, Any]) -> None:
        """Reports the epoch just finished and sets the LR for the next one.

        Args:
            metrics: the monitored value (a float, numpy scalar or 0-d tensor), reported
                under `monitor`, or a mapping of metric names to values.
        """
        if isinstance(metrics, Mapping):
            report = scalar_metrics(metrics)
        else:
            value = to_scalar(metrics)
            if value is None:
                raise ValueError(
                    f"step() takes a number or a mapping of metrics, got {type(metrics).__name__}"
                )
            report = {self.monitor: value}
        lr = self.client.report(self.last_epoch, report)
        self.last_epoch += 1
        self._set_lr(lr)

    def get_last_lr(self) -> list[float]:
        """The LR of each param group, as torch schedulers return it."""
        return [self._group_lr(i) for i in range(len(self.optimizer.param_groups))]

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs: the epoch count, the LRs and the job."""
        return {"epoch": self.last_epoch, "last_lr": self.get_last_lr(), "job": self.job}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resumes from a checkpoint: the next `step()` reports the saved epoch count.

        Says hello again with that start epoch, so the controller resumes the job's run
        (and restores its policy state if the checkpoint is older than its last epoch).
        Load the optimizer's state first: the LR the controller answers is set on it.
        """
        epoch = state_dict["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"state_dict['epoch'] must be an integer >= 0, got {epoch!r}")
        if state_dict.get("job", self.job) != self.job:
            logger.warning(
                "loading the lrpilot state of job %r into job %r", state_dict["job"], self.job
            )
        last_lr = list(state_dict.get("last_lr") or [self._group_lr(0)])
        if self._client is not None:
            self._client.close()
        self.last_epoch = epoch
        self._client = self._connect(float(last_lr[0]), start_epoch=epoch)
        self._set_lr(self._client.lr)

    def close(self) -> None:
        """Says bye to the controller and closes the socket; safe to call twice."""
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> LRPilotScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------

    def _connect(self, initial_lr: float, start_epoch: int = 0) -> Client:
        return Client(
            self.endpoint,
            self.job,
            initial_lr=initial_lr,
            start_epoch=start_epoch,
            timeout=self.timeout,
            framework="torch",
        )

    def _group_lr(self, index: int) -> float:
        value = to_scalar(self.optimizer.param_groups[index]["lr"])
        if value is None:
            raise ValueError(f"param group {index} has no numeric lr")
        return value

    def _set_lr(self, new_lr: float) -> None:
        old_lr = self._group_lr(0)
        if new_lr == old_lr:
            return
        for i, group in enumerate(self.optimizer.param_groups):
            # Group 0 gets the decided value exactly; the others keep their ratio to it.
            lr = new_lr if i == 0 or old_lr == 0 else self._group_lr(i) * (new_lr / old_lr)
            if hasattr(group["lr"], "fill_"):  # a tensor LR (capturable optimizers)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
