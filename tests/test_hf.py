"""A real `transformers.Trainer` whose LR is decided by a real `lrpilot serve` process.

A 2-layer BERT built from a config in the test (no download, HF_HUB_OFFLINE=1) on made-up
token sequences. The LR is read from the optimizer right before each optimizer step.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Controller, run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lrpilot.client.hf import LRPilotTrainerCallback  # noqa: E402

Factory = Callable[..., Controller]
PLATEAU = """\
version: 1
defaults:
  policy: {type: plateau, monitor: eval_loss, factor: 0.5, patience: 0, min_delta: 0.01}
"""
LR = 2e-3
STEPS_PER_EPOCH = 8  # 128 examples, batches of 16


class Tokens(torch.utils.data.Dataset):  # type: ignore[misc]
    """Sequences of 8 tokens; the label says whether token 1 is among them."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, 32, (n, 8), generator=g)
        self.ids[: n // 2, 3] = 1
        self.ids = self.ids[torch.randperm(n, generator=g)]
        self.labels = (self.ids == 1).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[i],
        }


class LrLog(transformers.TrainerCallback):  # type: ignore[misc]
    """The LR the optimizer uses at each step, with the epoch it belongs to."""

    def __init__(self) -> None:
        self.used: list[tuple[int, float]] = []
        self.epoch = -1

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.epoch += 1

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        self.used.append((self.epoch, optimizer.param_groups[0]["lr"]))


def _train(tmp_path: Path, callbacks: list[Any], **overrides: Any) -> tuple[Any, LrLog]:
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
    options: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "num_train_epochs": 6,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "learning_rate": LR,
        "lr_scheduler_type": "constant",
        "eval_strategy": "epoch",
        "logging_strategy": "steps",
        "logging_steps": 4,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    options.update(overrides)
    log = LrLog()
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**options),
        train_dataset=Tokens(128, 1),
        eval_dataset=Tokens(64, 2),
        callbacks=[*callbacks, log],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, log


def test_every_step_uses_the_controllers_lr_for_its_epoch(
    controller_factory: Factory, tmp_path: Path
) -> None:
    c = controller_factory(PLATEAU)
    trainer, log = _train(tmp_path, [LRPilotTrainerCallback(job="hf-plateau", endpoint=c.bind)])
    history = json.loads(run_cli("history", "hf-plateau", "--json", "--admin", c.admin).stdout)
    # The controller's decisions: each row's LR is in force from its epoch on.
    changes = [(row["epoch"], row["new_lr"]) for row in history]
    assert changes[0] == (0, LR) and len(changes) >= 2, changes  # it did reduce
    assert len(log.used) == 6 * STEPS_PER_EPOCH
    for epoch, lr in log.used:
        decided = [new for start, new in changes if start <= epoch][-1]
        assert lr == decided, (epoch, lr, changes)

    # The same decisions as torch's ReduceLROnPlateau on the evaluations (compat: auto, hf).
    evals = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
        ref_opt, factor=0.5, patience=0, threshold=0.01
    )
    expected = [LR]
    for value in evals[:-1]:
        ref.step(value)
        expected.append(ref_opt.param_groups[0]["lr"])
    assert [lr for _, lr in log.used[::STEPS_PER_EPOCH]] == expected
    # The trainer's own log says the LR the optimizer used (its constant scheduler follows).
    logged = [(e["step"], e["learning_rate"]) for e in trainer.state.log_history if "loss" in e]
    assert logged and all(lr == log.used[step - 1][1] for step, lr in logged)


def test_unit_step_exponential_is_keras_exponential_decay_at_every_step(
    controller_factory: Factory, tmp_path: Path
) -> None:
    c = controller_factory(
        "version: 1\ndefaults:\n"
        "  policy: {type: exponential, unit: step, decay_rate: 0.5, decay_steps: 10}\n"
    )
    callback = LRPilotTrainerCallback(job="hf-steps", endpoint=c.bind, unit="step")
    _, log = _train(tmp_path, [callback], num_train_epochs=3, eval_strategy="no")
    used = [lr for _, lr in log.used]
    assert len(used) == 3 * STEPS_PER_EPOCH

    def exponential_decay(step: int) -> float:  # Keras' ExponentialDecay, staircase=False
        return LR * 0.5 ** (step / 10)

    # The schedule is a plan: the callback evaluates it at every step (a report at each log,
    # every 4 steps, carries the training loss; no step waits for a decision).
    assert used == pytest.approx([exponential_decay(step) for step in range(len(used))], rel=1e-12)


def test_a_decaying_trainer_scheduler_is_a_clear_error(
    controller_factory: Factory, tmp_path: Path
) -> None:
    c = controller_factory(PLATEAU)
    callback = LRPilotTrainerCallback(job="hf-linear", endpoint=c.bind)
    with pytest.raises(ValueError, match=r'lr_scheduler_type="linear".*"constant"'):
        _train(tmp_path, [callback], lr_scheduler_type="linear", num_train_epochs=1)
