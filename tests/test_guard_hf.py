"""The loss-spike guard in a real `transformers.Trainer` (a 2-layer BERT built from a
config, no download): weights corrupted at a random step (× 50) are rolled back once, bit
for bit, at LR × lr_factor, through the in-memory copies or the user's
`snapshot_fn(unit)`/`restore_fn(unit)`; with max_rollbacks spent, `on_exhausted: stop`
sets `control.should_training_stop`."""

from __future__ import annotations

import copy
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Controller

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf import Tokens  # noqa: E402

from lrpilot.client.hf import LRPilotTrainerCallback  # noqa: E402

Factory = Callable[..., Controller]
POLICY = """\
version: 1
defaults:
  policy: {type: constant, unit: step}
  guard: {spike: 3.0, window: 10, warmup: 15, snapshot_every: 10, lr_factor: 0.5,
          cooldown: 20, max_rollbacks: 2}
"""


class Watch(transformers.TrainerCallback):  # type: ignore[misc]
    """Corrupts the weights at the start of step `corrupt_at`, records the state each step
    starts from, and checks each rollback right after lrpilot's callback applied it."""

    def __init__(self, pilot: LRPilotTrainerCallback, corrupt_at: int | None) -> None:
        self.pilot, self.corrupt_at = pilot, corrupt_at
        self.at_start: dict[int, dict[str, Any]] = {}
        self.rollbacks: list[tuple[int, float, bool]] = []
        self.steps = 0  # the optimizer steps trained

    def _check(self, state: Any, model: Any, optimizer: Any) -> None:
        core = self.pilot._core
        if len(core.rollbacks) > len(self.rollbacks):
            _asked, unit = core.rollbacks[-1]
            assert unit is not None
            now = model.state_dict()
            equal = all(torch.equal(now[k], self.at_start[unit][k]) for k in now)
            lr = optimizer.param_groups[0]["lr"]
            self.rollbacks.append((state.global_step, lr, equal))

    def on_step_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._check(state, model, optimizer)
        self.at_start[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}
        if state.global_step == self.corrupt_at:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(50.0)

    def on_log(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self._check(state, model, optimizer)


class Checkpoints:
    """A user's `snapshot_fn(unit)` / `restore_fn(unit)` (for models too large to copy):
    the model's and optimizer's state kept by unit, every call recorded."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.saved: dict[int, tuple[Any, Any]] = {}
        self.calls: list[tuple[str, int | None]] = []

    def snapshot_fn(self, unit: int | None = None) -> None:
        self.calls.append(("snapshot", unit))
        model, opt = self.trainer.model, self.trainer.optimizer
        state = {k: v.clone() for k, v in model.state_dict().items()}
        self.saved[-1 if unit is None else unit] = (state, copy.deepcopy(opt.state_dict()))

    def restore_fn(self, unit: int | None = None) -> None:
        self.calls.append(("restore", unit))
        state, opt_state = self.saved[-1 if unit is None else unit]
        self.trainer.model.load_state_dict(state)
        self.trainer.optimizer.load_state_dict(copy.deepcopy(opt_state))


EPOCHS, STEPS_PER_EPOCH = 14, 8  # 128 examples, batches of 16


def _train(
    tmp_path: Path,
    c: Controller,
    job: str,
    corrupt_at: int | None,
    points: Checkpoints | None = None,
) -> tuple[float, Watch]:
    transformers.set_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    hooks: dict[str, Any] = {}
    if points is not None:
        hooks = {"snapshot_fn": points.snapshot_fn, "restore_fn": points.restore_fn}
    pilot = LRPilotTrainerCallback(job=job, endpoint=c.bind, unit="step", **hooks)
    watch = Watch(pilot, corrupt_at)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / job),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        # The loss of a perfect fit is then 0.1985, not ~0: "within 2×" is a real bound.
        label_smoothing_factor=0.1,
        lr_scheduler_type="constant",
        logging_strategy="steps",
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(128, 1), callbacks=[pilot, watch]
    )
    if points is not None:
        points.trainer = trainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
        loss = trainer.evaluate(Tokens(64, 2))["eval_loss"]  # held out
    watch.steps = trainer.state.global_step
    return float(loss), watch


def test_hf_corrupted_weights_roll_back_once_bit_for_bit(
    controller_factory: Factory, tmp_path: Path
) -> None:
    c = controller_factory(POLICY)
    clean, plain = _train(tmp_path, c, "hf-clean", None)
    assert plain.rollbacks == []
    corrupt_at = random.Random().randint(20, 40)
    final, watch = _train(tmp_path, c, "hf-spiked", corrupt_at)
    assert len(watch.rollbacks) == 1, (corrupt_at, watch.rollbacks)
    _step, lr, equal = watch.rollbacks[0]
    assert equal, "the restored weights are not the snapshot's"
    assert lr == pytest.approx(1e-3)
    assert clean < 0.3, clean  # trained: chance is ln 2 = 0.69, a perfect fit 0.1985
    assert final <= 2 * clean, (final, clean)


def test_hf_users_snapshot_fn_and_restore_fn_of_a_unit_serve_the_guard(
    controller_factory: Factory, tmp_path: Path
) -> None:
    """For a model too large to copy: the guard calls `snapshot_fn(unit)` at every multiple
    of snapshot_every, from step 0, and `restore_fn(unit)` once, with the newest healthy
    snapshot's unit; no in-memory copy is made."""
    c = controller_factory(POLICY)
    corrupt_at = random.Random().randint(20, 40)
    points = Checkpoints()
    _, watch = _train(tmp_path, c, "hf-hooks", corrupt_at, points)
    snapshots = [unit for kind, unit in points.calls if kind == "snapshot"]
    assert snapshots[:3] == [0, 10, 20] and all(u is not None for u in snapshots)
    restores = [unit for kind, unit in points.calls if kind == "restore"]
    assert restores == [corrupt_at // 10 * 10], (corrupt_at, points.calls)
    assert len(watch.rollbacks) == 1
    _step, lr, equal = watch.rollbacks[0]
    assert equal and lr == pytest.approx(1e-3)
    assert all(type(k).__name__ == "_UserSnapshot" for k in watch.pilot._core.kept.values())


def test_hf_on_exhausted_stop_sets_should_training_stop(
    controller_factory: Factory, tmp_path: Path
) -> None:
    """max_rollbacks 0 and `on_exhausted: stop`: the spike stops the Trainer at the next
    step (control.should_training_stop), with no rollback, long before its last step."""
    c = controller_factory(
        POLICY.replace("max_rollbacks: 2", "max_rollbacks: 0, on_exhausted: stop")
    )
    _, watch = _train(tmp_path, c, "hf-exhausted", 30)
    assert watch.rollbacks == [] and watch.pilot._core.rollbacks == []
    assert 30 < watch.steps <= 32 < EPOCHS * STEPS_PER_EPOCH, watch.steps
