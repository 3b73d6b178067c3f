"""Per-step monitors without device syncs: the loss handed to a `unit="step"` scheduler is
summed where it lives and read to the host once per report, one report late.

Host reads are counted with a torch.Tensor subclass: the loss of every step is one, and so is
every tensor torch computes from it (`detach`, the running sum), so any conversion of them to a
Python number or copy to host memory anywhere in lrpilot is seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch")

from test_client import ScriptedPeer  # noqa: E402

from lrpilot.client.protocol import Report  # noqa: E402
from lrpilot.client.step_means import StepMeans  # noqa: E402
from lrpilot.client.torch import LRPilotScheduler  # noqa: E402

#: What makes the host read a tensor's value (on an accelerator: wait for the device).
READS = frozenset(
    {
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__float__",
        "__int__",
        "__index__",
        "__bool__",
        "__array__",
        "__format__",
        "__repr__",
        "__reduce_ex__",
    }
)


class Counted(torch.Tensor):
    """A tensor that records every host read of itself or of a tensor computed from it."""

    reads: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        to_device = name == "to" and any(
            isinstance(a, str | torch.device) for a in (*args[1:], *kwargs.values())
        )
        copied = name == "copy_" and len(args) > 1 and isinstance(args[1], Counted)
        if name in READS or to_device or copied:
            cls.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer(lr=0.1)
    yield p
    p.close()


def train(
    peer: ScriptedPeer, report_every: int, steps: int, as_mapping: bool = False
) -> tuple[list[float], list[int]]:
    """A real loop (an MLP, SGD) handing each step's loss to `LRPilotScheduler.step` as a
    counted tensor; returns the losses and the number of host reads after each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    kept: list[torch.Tensor] = []
    reads: list[int] = []
    Counted.reads.clear()
    with LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step", report_every=report_every
    ) as sched:
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            kept.append(loss.detach().clone())  # a plain tensor: read after the loop
            counted = loss.as_subclass(Counted)
            sched.step({"loss": counted} if as_mapping else counted)
            reads.append(len(Counted.reads))
        assert sched.client.flush(timeout=5)
    return [float(t) for t in kept], reads


@pytest.mark.parametrize("report_every", [1, 10])
def test_one_host_read_per_report_and_the_mean_one_report_late(
    peer: ScriptedPeer, report_every: int
) -> None:
    steps = 60
    losses, reads = train(peer, report_every, steps)
    reports = peer.of_type(Report)
    every = report_every
    # At most one read per report, and none at the steps between reports.
    assert reads[-1] <= steps // every + 1
    for step, (before, after) in enumerate(zip([0, *reads], reads, strict=False)):
        if (step + 1) % every:
            assert after == before, f"a host read at step {step}, between reports"
        else:
            assert after - before <= 1
    assert reads[-1] == steps // every - 1  # the first report has nothing to read yet
    # A report per boundary (no plan here), each carrying the mean of the window before.
    assert [r.step for r in reports] == list(range(every - 1, steps, every))
    assert reports[0].metrics == {}
    for i, report in enumerate(reports[1:]):
        window = losses[i * every : (i + 1) * every]
        assert report.metrics == {"loss": pytest.approx(sum(window) / every, rel=1e-6)}


def test_a_mapping_of_tensors_is_read_once_per_report(peer: ScriptedPeer) -> None:
    losses, reads = train(peer, 5, 20, as_mapping=True)
    assert reads[-1] == 3
    reports = peer.of_type(Report)
    assert reports[2].metrics == {"loss": pytest.approx(sum(losses[5:10]) / 5, rel=1e-6)}


def test_a_number_given_to_a_step_scheduler_is_the_loss(peer: ScriptedPeer) -> None:
    """README: `sched.step(loss)` with unit="step" reports `loss` (not `val_loss`)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with LRPilotScheduler(
        optimizer, job="job-a", endpoint=peer.endpoint, unit="step", report_every=2
    ) as sched:
        assert sched.monitor == "loss"
        for value in (1.0, 0.5, torch.tensor(0.25), torch.tensor([0.75])):
            sched.step(value)
        assert sched.client.flush(timeout=5)
    reports = peer.of_type(Report)
    assert reports[0].metrics == {"loss": pytest.approx(0.75)}  # numbers: their own report
    assert reports[1].metrics == {}  # tensors: read one report later (at close: not sent)
    epochs = LRPilotScheduler(optimizer, job="e", endpoint=peer.endpoint)
    custom = LRPilotScheduler(optimizer, job="c", endpoint=peer.endpoint, unit="step", monitor="x")
    assert (epochs.monitor, custom.monitor) == ("val_loss", "x")


def test_step_means_numbers_only_are_reported_at_their_own_boundary() -> None:
    means = StepMeans()
    means.add({"loss": 1.0, "acc": 0.5})
    means.add({"loss": 3.0, "bad": "x", "vector": torch.ones(3)})
    assert means.close() == {"loss": 2.0, "acc": 0.5}
    assert means.idle
    means.add({"loss": torch.tensor(4.0, dtype=torch.bfloat16)})
    assert means.close() is None and not means.idle  # read at the next boundary
    means.add({"loss": torch.tensor(1.0)})
    assert means.close(now=True) == {"loss": 1.0}  # a range test: read at once


def test_step_means_of_many_steps_are_folded_on_the_device_and_exact() -> None:
    from lrpilot.client.step_means import FOLD

    means = StepMeans()
    values = [float(i % 7) for i in range(2 * FOLD + 37)]
    for i, v in enumerate(values):
        dtype = torch.bfloat16 if i % 2 else torch.float32  # small integers: exact in bf16
        means.add_tensor("loss", torch.tensor([v], dtype=dtype))
    assert len(means._kept["loss"]) <= FOLD  # kept values are bounded
    assert means.close(now=True) == {"loss": pytest.approx(sum(values) / len(values))}


def test_step_means_keep_nan_and_inf_tensor_losses() -> None:
    """A diverged loss is information (a guard counts it as a spike): a window with a NaN or
    an inf step reports NaN or inf, read late or at once, never leaves the metric out."""
    import math

    means = StepMeans()
    for value in (1.0, math.nan, 2.0):
        means.add_tensor("loss", torch.tensor(value))
    means.add({"acc": torch.tensor(math.inf)})
    assert means.close() is None  # read one report late
    means.add_tensor("loss", torch.tensor(1.0))
    late = means.close()
    assert late is not None and math.isnan(late["loss"]) and late["acc"] == math.inf
    means.add_tensor("loss", torch.tensor(-math.inf))
    assert means.close(now=True) == {"loss": -math.inf}
