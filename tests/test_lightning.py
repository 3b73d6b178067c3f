"""A real Lightning `Trainer.fit` whose LR is decided by a real `lrpilot serve` process.

Parity: the same seeded model and data trained with torch's ReduceLROnPlateau configured
the Lightning way (`"monitor": "val_loss"` in configure_optimizers) and with LRPilotCallback
(or LRPilotScheduler in configure_optimizers) against the controller use the same LR at
every optimizer step. The policy file says no `compat`: `compat: auto` follows the
framework the callback names in its hello (`lightning` → torch semantics).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Controller

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

from lrpilot.client.lightning import LRPilotCallback  # noqa: E402
from lrpilot.client.torch import LRPilotScheduler  # noqa: E402

Factory = Callable[..., Controller]

POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.02}
"""
TORCH_PARAMS = {"factor": 0.5, "patience": 1, "threshold": 0.02}  # threshold_mode rel
EPOCHS = 12

# Lightning's advice about DataLoader workers and logging is noise here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _loaders() -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.3 * torch.randn(320, 1, generator=g)
    train = torch.utils.data.TensorDataset(x[:256], y[:256])
    val = torch.utils.data.TensorDataset(x[256:], y[256:])
    return (
        torch.utils.data.DataLoader(train, batch_size=32),
        torch.utils.data.DataLoader(val, batch_size=64),
    )


class Regressor(pl.LightningModule):  # type: ignore[misc]
    """`scheduler`: None, "torch" (ReduceLROnPlateau) or a factory of one for the optimizer."""

    def __init__(self, scheduler: Any = None, lr: float = 0.3) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
        )
        self.scheduler = scheduler
        self.lr = lr
        self.used: list[float] = []  # the LR of every optimizer step

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.used.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.scheduler is None:
            return opt
        if self.scheduler == "torch":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **TORCH_PARAMS)
        else:
            sched = self.scheduler(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


def _fit(
    scheduler: Any = None,
    callbacks: list[Any] | None = None,
    ckpt_path: str | None = None,
    **trainer: Any,
) -> list[float]:
    pl.seed_everything(0, verbose=False)
    model = Regressor(scheduler)
    train, val = _loaders()
    options: dict[str, Any] = {
        "max_epochs": EPOCHS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": callbacks or [],
    }
    options.update(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(**options).fit(model, train, val, ckpt_path=ckpt_path)
    return model.used


@pytest.fixture(scope="module")
def torch_lrs() -> list[float]:
    """The LR of every step with torch's ReduceLROnPlateau, the Lightning way."""
    used = _fit("torch")
    assert len(used) == EPOCHS * 8
    assert len(set(used)) >= 3, "the seeded run must reduce at least twice"
    return used


def test_callback_gets_exactly_torch_reduce_lr_on_plateau_lrs(
    controller_factory: Factory, torch_lrs: list[float]
) -> None:
    c = controller_factory(POLICY)
    callback = LRPilotCallback(job="lightning-parity", endpoint=c.bind)
    # The default sanity check (2 validation batches before training) must not be reported.
    assert _fit(callbacks=[callback]) == torch_lrs
    assert callback.client is None  # closed at the end of fit


def test_lightning_accepts_the_scheduler_as_a_plateau_scheduler(
    controller_factory: Factory, torch_lrs: list[float]
) -> None:
    c = controller_factory(POLICY)
    made: list[LRPilotScheduler] = []

    def scheduler(opt: Any) -> LRPilotScheduler:
        made.append(LRPilotScheduler(opt, job="lightning-scheduler", endpoint=c.bind))
        return made[-1]

    try:
        assert _fit(scheduler) == torch_lrs
    finally:
        for s in made:
            s.close()


def test_a_scheduler_of_its_own_is_a_clear_error(controller_factory: Factory) -> None:
    c = controller_factory(POLICY)
    callback = LRPilotCallback(job="lightning-both", endpoint=c.bind)
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau.*return only the optimizer"):
        _fit("torch", callbacks=[callback], max_epochs=1)


def test_a_missing_monitor_is_named_once(
    controller_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    c = controller_factory(POLICY)
    callback = LRPilotCallback(job="lightning-monitor", endpoint=c.bind, monitor="val_acc")
    with caplog.at_level(logging.WARNING, logger="lrpilot.client"):
        _fit(callbacks=[callback], max_epochs=3)
    named = [r for r in caplog.records if "'val_acc' is not among" in r.getMessage()]
    assert len(named) == 1 and "val_loss" in named[0].getMessage()


def test_unit_step_follows_a_step_schedule(controller_factory: Factory) -> None:
    """unit="step": reports every optimizer step without waiting; each step's LR is the
    schedule's for an earlier or the same step, never going back, and decisions arrive
    (how late depends on the machine: these steps take about a millisecond)."""
    c = controller_factory(
        "version: 1\ndefaults:\n"
        "  policy: {type: exponential, unit: step, decay_rate: 0.5, decay_steps: 8}\n"
    )
    callback = LRPilotCallback(job="lightning-steps", endpoint=c.bind, unit="step")
    used = _fit(callbacks=[callback], max_epochs=3, num_sanity_val_steps=0)
    schedule = [0.3 * 0.5 ** (t / 8) for t in range(len(used))]
    found = [min(range(len(schedule)), key=lambda t: abs(schedule[t] - lr)) for lr in used]
    assert all(
        math.isclose(schedule[t], lr, rel_tol=1e-12) for t, lr in zip(found, used, strict=True)
    )
    assert all(t <= s for s, t in enumerate(found))  # never ahead of the step
    assert found == sorted(found) and len(set(found)) >= 3  # decisions were applied
    assert c.metric("lrpilot_reports_total", training_job="lightning-steps") == len(used)


def test_fit_from_a_checkpoint_resumes_the_run(controller_factory: Factory, tmp_path: Any) -> None:
    """The callback's count of validation runs is in Lightning's checkpoint: a fit with
    ckpt_path says hello from there, so the controller continues the same run."""
    import json

    from conftest import run_cli

    c = controller_factory(POLICY)
    first = LRPilotCallback(job="lightning-resume", endpoint=c.bind)
    _fit(callbacks=[first], max_epochs=3, enable_checkpointing=True, default_root_dir=tmp_path)
    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    again = LRPilotCallback(job="lightning-resume", endpoint=c.bind)
    _fit(callbacks=[again], max_epochs=5, ckpt_path=str(checkpoint))
    history = json.loads(
        run_cli("history", "lightning-resume", "--json", "--admin", c.admin).stdout
    )
    assert [r["reason"] for r in history].count("initial") == 1  # one run throughout
    (status,) = json.loads(run_cli("status", "--json", "--admin", c.admin).stdout)
    assert status["epoch"] == 4


class LossKeeper(Regressor):
    """Keeps each training step's loss (a plain copy, read after the fit)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach().clone())
        return loss


def test_unit_step_reports_the_mean_loss_of_the_report_before() -> None:
    """unit="step": the training loss is summed on its device and read once per report, one
    report late: each report carries the mean loss of the `report_every` steps before the
    previous report."""
    from test_client import ScriptedPeer

    from lrpilot.client.protocol import Report

    peer = ScriptedPeer(lr=0.3)
    try:
        pl.seed_everything(0, verbose=False)
        model = LossKeeper()
        train, _ = _loaders()
        callback = LRPilotCallback(
            job="job-a", endpoint=peer.endpoint, unit="step", report_every=4, monitor=None
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(
                max_epochs=2,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[callback],
            ).fit(model, train)
        reports = peer.of_type(Report)
    finally:
        peer.close()
    losses = [float(t) for t in model.losses]
    assert len(losses) == 16
    assert [r.step for r in reports] == [3, 7, 11, 15]
    assert reports[0].metrics == {}
    for i, report in enumerate(reports[1:]):
        assert report.metrics == {"loss": pytest.approx(sum(losses[4 * i : 4 * i + 4]) / 4)}
