"""The loss-spike guard in a real Lightning `Trainer.fit`: weights corrupted at a random
step (× 50) are rolled back once, bit for bit, at LR × lr_factor; `on_exhausted: stop` sets
`trainer.should_stop`."""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Controller

torch = pytest.importorskip("torch")
pl = pytest.importorskip("pytorch_lightning")

from lrpilot.client.lightning import LRPilotCallback  # noqa: E402

Factory = Callable[..., Controller]
POLICY = """\
version: 1
defaults:
  policy: {type: constant, unit: step}
  guard: {spike: 3.0, window: 20, warmup: 30, snapshot_every: 25, lr_factor: 0.5,
          cooldown: 40, max_rollbacks: 2, on_exhausted: stop}
"""
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Regressor(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, corrupt_at: int | None, factor: float = 50.0) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.corrupt_at, self.factor = corrupt_at, factor

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == self.corrupt_at:
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(self.factor)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Watch(pl.Callback):  # type: ignore[misc]
    """After lrpilot's callback: records the state each step starts from, checks each
    rollback, and waits for each answer (steps here take a millisecond)."""

    def __init__(self, pilot: LRPilotCallback) -> None:
        self.pilot = pilot
        self.at_start: dict[int, dict[str, Any]] = {}
        self.rollbacks: list[tuple[int, float, bool]] = []
        self.stopped_at: int | None = None

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self._check(trainer, module)  # lrpilot's callback applies decisions here too

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        core = self.pilot._core
        step = trainer.global_step
        self._check(trainer, module)
        self.at_start[step] = {k: v.clone() for k, v in module.state_dict().items()}
        if trainer.should_stop and self.stopped_at is None:
            self.stopped_at = step
        if core.client is not None:
            core.client.flush()

    def _check(self, trainer: Any, module: Any) -> None:
        """lrpilot's callback (just before this one) restored: the weights are the state the
        snapshot's step started from, and the LR is set."""
        core = self.pilot._core
        if len(core.rollbacks) > len(self.rollbacks):
            _asked, unit = core.rollbacks[-1]
            assert unit is not None
            now = module.state_dict()
            equal = all(torch.equal(now[k], self.at_start[unit][k]) for k in now)
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.rollbacks.append((trainer.global_step, lr, equal))
            self.at_start[trainer.global_step] = {k: v.clone() for k, v in now.items()}


class Checkpoints:
    """A user's `snapshot_fn(unit)` / `restore_fn(unit)` (for models too large to copy):
    the module's and optimizer's state kept by unit, every call recorded."""

    def __init__(self) -> None:
        self.model: Any = None
        self.saved: dict[int, tuple[Any, Any]] = {}
        self.calls: list[tuple[str, int | None]] = []

    def snapshot_fn(self, unit: int | None = None) -> None:
        self.calls.append(("snapshot", unit))
        opt = self.model.trainer.optimizers[0]
        state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.saved[-1 if unit is None else unit] = (state, copy.deepcopy(opt.state_dict()))

    def restore_fn(self, unit: int | None = None) -> None:
        self.calls.append(("restore", unit))
        state, opt_state = self.saved[-1 if unit is None else unit]
        self.model.load_state_dict(state)
        self.model.trainer.optimizers[0].load_state_dict(copy.deepcopy(opt_state))


def _fit(
    c: Controller,
    job: str,
    corrupt_at: int | None,
    points: Checkpoints | None = None,
    factor: float = 50.0,
) -> tuple[float, Watch]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.randn(8, 1, generator=g) + 0.05 * torch.randn(512, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    model = Regressor(corrupt_at, factor)
    hooks: dict[str, Any] = {}
    if points is not None:
        points.model = model
        hooks = {"snapshot_fn": points.snapshot_fn, "restore_fn": points.restore_fn}
    pilot = LRPilotCallback(job=job, endpoint=c.bind, unit="step", monitor="loss", **hooks)
    watch = Watch(pilot)
    watch.at_start[0] = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            max_epochs=7,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[pilot, watch],
        ).fit(model, loader)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model.net(x), y)), watch


def test_lightning_corrupted_weights_roll_back_once_bit_for_bit(
    controller_factory: Factory,
) -> None:
    c = controller_factory(POLICY)
    clean, plain = _fit(c, "lightning-clean", None)
    assert plain.rollbacks == []
    corrupt_at = random.Random().randint(60, 160)
    final, watch = _fit(c, "lightning-spiked", corrupt_at)
    assert len(watch.rollbacks) == 1, (corrupt_at, watch.rollbacks)
    _step, lr, equal = watch.rollbacks[0]
    assert equal, "the restored weights are not the snapshot's"
    assert lr == pytest.approx(0.025)
    assert final <= 2 * clean, (final, clean)


def test_lightning_users_snapshot_fn_and_restore_fn_of_a_unit_serve_the_guard(
    controller_factory: Factory,
) -> None:
    """For a model too large to copy: the guard calls `snapshot_fn(unit)` at every multiple
    of snapshot_every, from step 0, and `restore_fn(unit)` once, with the newest healthy
    snapshot's unit; no in-memory copy is made."""
    c = controller_factory(POLICY)
    corrupt_at = random.Random().randint(60, 160)
    points = Checkpoints()
    _, watch = _fit(c, "lightning-hooks", corrupt_at, points)
    snapshots = [unit for kind, unit in points.calls if kind == "snapshot"]
    assert snapshots[:4] == [0, 25, 50, 75] and all(u is not None for u in snapshots)
    restores = [unit for kind, unit in points.calls if kind == "restore"]
    assert restores == [corrupt_at // 25 * 25], (corrupt_at, points.calls)
    assert len(watch.rollbacks) == 1
    _step, lr, equal = watch.rollbacks[0]
    assert equal and lr == pytest.approx(0.025)
    assert all(type(k).__name__ == "_UserSnapshot" for k in watch.pilot._core.kept.values())


def test_lightning_a_nan_loss_is_reported_as_nan_and_rolled_back(
    controller_factory: Factory,
) -> None:
    """Weights turned NaN: the training loss, summed on its device per report, reaches the
    controller as NaN (a spike), and the one rollback brings finite weights back."""
    c = controller_factory(POLICY)
    corrupt_at = random.Random().randint(60, 160)
    final, watch = _fit(c, "lightning-nan", corrupt_at, factor=math.nan)
    assert watch.pilot._core.rollbacks == [(corrupt_at // 25 * 25,) * 2], corrupt_at
    assert len(watch.rollbacks) == 1
    _step, lr, equal = watch.rollbacks[0]
    assert equal and lr == pytest.approx(0.025)
    assert math.isfinite(final)


def test_lightning_on_exhausted_stop_sets_should_stop(controller_factory: Factory) -> None:
    c = controller_factory(POLICY.replace("max_rollbacks: 2", "max_rollbacks: 0"))
    _, watch = _fit(c, "lightning-exhausted", 100)
    assert watch.rollbacks == []
    assert watch.stopped_at is not None and watch.stopped_at <= 103
