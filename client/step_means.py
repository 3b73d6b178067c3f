"""Per-step metrics without device syncs: summed where they live, read once per report.

With `unit="step"` a trainer hands its loss to lrpilot at every optimizer step, usually as a
tensor on an accelerator. Converting it to a Python number there (`loss.item()`,
`float(loss)`) makes the host wait for the device at every step. `StepMeans` instead adds
each step's value to a running sum on the value's own device (an in-place add, queued like
the training step's own kernels), and at each report boundary starts a non-blocking copy of
the sums to the host. The copy is read at the next boundary, when the device has long
finished it: one host read per report, none between reports, and the training step never
waits for the read. A report thus carries the mean over the `report_every` steps before the
previous report (one report late); numbers (Python, numpy) take no device and are reported
at their own boundary. During a range test the report waits for the controller anyway, so
its window is read at once (`now=True`): the sweep's losses belong to their own LRs; so
is a guard's (a spike is judged at the step it happened, before the next snapshot).

Example:

    means = StepMeans()
    for step in range(1000):
        loss = train_step()
        means.add({"loss": loss})                 # no host read
        if (step + 1) % 10 == 0:
            report(step, means.close() or {})     # the mean of the 10 steps before
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .core import to_scalar

__all__ = ["StepMeans"]


class _Window:
    """The sums of one report's steps, the tensors' on their way to the host."""

    __slots__ = ("counts", "event", "floats", "host", "names")

    def __init__(
        self, floats: dict[str, float], counts: dict[str, int], sums: dict[str, torch.Tensor]
    ) -> None:
        self.floats = floats
        self.counts = counts
        self.names = list(sums)
        self.event: Any = None
        self.host: torch.Tensor | None = None
        if not sums:
            return
        parts = list(sums.values())
        flat = parts[0].reshape(1) if len(parts) == 1 else torch.stack(parts)
        if flat.device.type == "cuda":
            # Pinned memory: the copy is truly asynchronous; the event says when it landed.
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.event.record(torch.cuda.current_stream(flat.device))
        else:
            # On the CPU the sum is final already (nothing adds to it any more); on another
            # accelerator it is read a report later, when its work has long finished.
            self.host = flat

    def read(self) -> dict[str, float]:
        """The means: the one host read of the window's tensors."""
        means = {name: total / self.counts[name] for name, total in self.floats.items()}
        if self.host is not None:
            if self.event is not None and not self.event.query():
                self.event.synchronize()  # the device is a whole report behind: wait for it
            for name, total in zip(self.names, self.host.tolist(), strict=True):
                # NaN and inf are kept: a diverged loss is what a guard must see.
                means[name] = total / self.counts[name]
        return means


#: The most values of one metric kept before they are summed on their device.
FOLD = 256


def _total(kept: list[torch.Tensor]) -> torch.Tensor:
    """The float32 sum of one-element tensors, on their device (one stack and one sum:
    no host read). float32 whatever their dtype: a bf16 sum of hundreds of steps would
    lose the mean's digits; the same dtype for every metric, so that a report's sums travel
    to the host as one tensor."""
    first = kept[0]
    try:
        return torch.stack(kept).sum(dtype=torch.float32)  # all alike: the common case
    except RuntimeError:  # shapes () and (1,) mixed, or a value on another device
        stacked = torch.stack([t.reshape(()).to(first.device) for t in kept])
    return stacked.sum(dtype=torch.float32)


class StepMeans:
    """Running sums of per-step metrics, each on its device, and the window waiting to be
    read (see the module's docstring). Not thread-safe: call it from the training loop."""

    def __init__(self) -> None:
        self._floats: dict[str, float] = {}
        self._kept: dict[str, list[torch.Tensor]] = {}  # this window's values, detached
        self._counts: dict[str, int] = {}
        self._pending: _Window | None = None
        #: Nothing added since the last report and no window waiting to be read.
        self.idle = True

    def add(self, metrics: Mapping[str, Any]) -> None:
        """Adds one step's metrics: numbers to host sums, one-element tensors to sums on
        their device (no host read); other values are left out."""
        self.idle = False
        for name, value in metrics.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, torch.Tensor):
                if value.numel() == 1:
                    self.add_tensor(name, value)
                continue
            found = to_scalar(value)
            if found is not None:
                self._floats[name] = self._floats.get(name, 0.0) + found
                self._counts[name] = self._counts.get(name, 0) + 1

    def add_tensor(self, name: str, value: torch.Tensor) -> None:
        """Adds one step's one-element tensor `name` (the per-step path of a training loop
        that hands over its loss: no host read, no kernel, no dict built). The values are
        kept, detached, and summed on their device at the report (or every `FOLD` steps)."""
        self.idle = False
        kept = self._kept.get(name)
        if kept is None:
            kept = self._kept[name] = []
        kept.append(value.detach())
        if len(kept) >= FOLD:  # one sum on the device per FOLD steps bounds what is kept
            kept[:] = [_total(kept)]
        self._counts[name] = self._counts.get(name, 0) + 1

    def close(self, now: bool = False) -> dict[str, float] | None:
        """A report boundary: ends this report's window and returns the means to report now,
        or None when none are ready. Those are the previous window's (read now, one report
        late), or this one's when it holds numbers only or with `now` (a range test)."""
        if now and len(self._kept) == 1 and not self._floats and self._pending is None:
            read = self._one_now()
            if read is not None:
                return read
        sums = {name: _total(kept) for name, kept in self._kept.items()}
        closed = _Window(self._floats, self._counts, sums)
        self._floats, self._counts, self._kept = {}, {}, {}
        ready, self._pending = self._pending, None
        self.idle = closed.host is None or now
        if now or closed.host is None:
            # Numbers only (or a range test): this window now; an older one still waiting
            # is left out, its steps are history once a newer mean is known.
            return closed.read() if closed.counts else None if ready is None else ready.read()
        self._pending = closed
        return None if ready is None else ready.read()

    def _one_now(self) -> dict[str, float] | None:
        """`close(now=True)` of a window that holds one value of one metric (a range test's
        report every step): that value read as it is, with no stack, sum or window built
        (the float32 number `close` would give); None for any other window."""
        ((name, kept),) = self._kept.items()
        if len(kept) != 1 or self._counts.get(name) != 1:
            return None
        value = kept[0].float().item()
        self._kept, self._counts = {}, {}
        self.idle = True
        return {name: value}  # NaN and inf too: a non-finite loss is news (a spike)
