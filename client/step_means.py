"""Per-step metrics without device syncs: summed where they live, read once per report.

With `unit="step"` a trainer hands its loss to lrpilot at every optimizer step, usually as a
tensor on an accelerator. Converting it to a Python number there (`loss.item()`,
`float(loss)`) makes the host wait for the device at every step. `StepMeans` instead adds
each step's value to a running sum on the value's own device (an in-place add, queued like
the training step's own kernels), and at each report boundary starts a non-blocking copy of
the sums to the host. The copy is read one report later, when the device has long finished
it: one host read per report, none between reports, and the training step never waits for
the read. What is reported is the mean over the steps since the previous report.

Python numbers (and numpy scalars) take no device, so a window holding only those is
reported at once; a window holding a tensor is reported at the next boundary, with its own
step, epoch and LR. During a range test the report waits for the controller anyway, so the
window is read at once (`now=True`).

Example:

    means = StepMeans()
    for step in range(1000):
        loss = train_step()
        means.add({"loss": loss})                 # no host read
        if (step + 1) % 10 == 0:
            window = means.close(epoch=0, step=step, trained_lr=lr)
            if window is not None:
                report(window.step, window.metrics)  # the previous 10 steps' mean
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .adapter import Window
from .core import to_scalar

__all__ = ["StepMeans", "Window"]


class _Pending:
    """A closed window whose tensor sums are on their way to the host."""

    __slots__ = ("counts", "event", "floats", "host", "names", "window")

    def __init__(
        self,
        window: Window,
        floats: dict[str, float],
        counts: dict[str, int],
        sums: dict[str, torch.Tensor],
    ) -> None:
        self.window = window
        self.floats = floats
        self.counts = counts
        self.names = list(sums)
        self.event: Any = None
        self.host: torch.Tensor | None = None
        if not sums:
            return
        parts = list(sums.values())
        if len(parts) == 1:
            flat = parts[0].reshape(1)
        else:
            flat = torch.stack([p.to(torch.float32) for p in parts])
        if flat.device.type == "cuda":
            # Pinned memory: the copy is truly asynchronous; the event says when it landed.
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.event.record(torch.cuda.current_stream(flat.device))
        else:
            # On the CPU the sum is final already (nothing adds to it any more); on another
            # accelerator it is read one report late, when its work has long finished.
            self.host = flat

    def read(self) -> Window:
        """The window with its means: the one host read of its tensors."""
        metrics = {name: total / self.counts[name] for name, total in self.floats.items()}
        if self.host is not None:
            if self.event is not None and not self.event.query():
                self.event.synchronize()  # the device is a whole report behind: wait for it
            for name, total in zip(self.names, self.host.tolist(), strict=True):
                mean = total / self.counts[name]
                if math.isfinite(mean):
                    metrics[name] = mean
        w = self.window
        return Window(w.epoch, w.step, metrics, w.trained_lr)


class StepMeans:
    """Running sums of per-step metrics, on the device of each, and the window waiting to be
    read (see the module's docstring). Not thread-safe: call it from the training loop."""

    def __init__(self) -> None:
        self._floats: dict[str, float] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._pending: _Pending | None = None

    @property
    def empty(self) -> bool:
        """Nothing added since the last window and no window waiting to be read."""
        return not self._counts and self._pending is None

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Adds one step's metrics: numbers to host sums, one-element tensors to sums on
        their device (no host read); other values are left out."""
        for name, value in metrics.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                self._add_tensor(name, value.detach())
            else:
                found = to_scalar(value)
                if found is None:
                    continue
                self._floats[name] = self._floats.get(name, 0.0) + found
            self._counts[name] = self._counts.get(name, 0) + 1

    def _add_tensor(self, name: str, value: torch.Tensor) -> None:
        if value.dim():
            value = value.reshape(())
        total = self._sums.get(name)
        if total is None or total.device != value.device:
            # float32 (float64 stays float64) whatever the loss's dtype: a bf16 sum of
            # hundreds of steps would lose the mean's digits.
            dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
            total = self._sums[name] = torch.zeros_like(value, dtype=dtype)
        total.add_(value)

    def close(
        self, epoch: int, step: int, trained_lr: float | None, now: bool = False
    ) -> Window | None:
        """A report boundary after optimizer step `step`: ends the window and returns the one
        to report now (the previous window, read now; or this one if it holds no tensors, or
        with `now`), or None when nothing is ready yet."""
        closed = _Pending(
            Window(epoch, step, {}, trained_lr), self._floats, self._counts, self._sums
        )
        self._floats, self._counts, self._sums = {}, {}, {}
        ready, self._pending = self._pending, None
        if not closed.counts:
            return None if ready is None else ready.read()
        if ready is not None:
            if now:  # both at once: the older goes without, the newer is what matters
                return closed.read()
            self._pending = closed
            return ready.read()
        if now or closed.host is None:
            return closed.read()
        self._pending = closed
        return None

    def drain(self) -> Window | None:
        """The window still waiting (at the end of training), read now; None if none."""
        ready, self._pending = self._pending, None
        return None if ready is None else ready.read()
