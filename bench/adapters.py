"""What an lrpilot adapter adds to an epoch, against the framework's own scheduler.

    .venv/bin/python bench/adapters.py [--quick] [--no-record] [--only NAME ...]

For each adapter (torch scheduler, Lightning callback, HF Trainer callback, Keras callback;
per epoch and, where it applies, per step) the same seeded training runs alternately with
the framework's own scheduler (the baseline: torch's ReduceLROnPlateau / ExponentialLR,
Lightning's plateau handling with `"monitor"`, the Trainer's `reduce_lr_on_plateau` /
`linear`, Keras' ReduceLROnPlateau) and with the lrpilot adapter against a real
`lrpilot serve` on loopback. Every epoch is timed from its start to the next one's
(training, validation, the scheduler or the adapter, the trainer's own bookkeeping); the
figures are the medians over all epochs but each run's first, of ROUNDS runs each way,
interleaved. Overhead = median with lrpilot - median of the baseline; ratio = their
quotient. The figures are appended to bench/RESULTS.md unless --no-record.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from conftest import Controller  # noqa: E402
from measured import context  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
POLICY = """\
version: 1
defaults:
  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 2}
jobs:
  - match: "*-step"
    policy: {type: exponential, unit: step, decay_rate: 0.99, decay_steps: 1}
  - match: "hf-*"
    policy: {type: plateau, monitor: eval_loss, factor: 0.5, patience: 2}
"""
GAMMA = 0.99  # the baselines' per-step decay, as the policy's
INSIDE: list[float] = []  # seconds spent inside the adapter's per-epoch and per-step calls


def timed(obj: Any, *names: str) -> Any:
    """Wraps the named methods of `obj` (on the instance) to add their wall time to INSIDE."""
    for name in names:
        method = getattr(obj, name)

        def wrapper(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                INSIDE.append(time.perf_counter() - start)

        setattr(obj, name, wrapper)
    return obj


@dataclass
class Case:
    name: str
    baseline: str
    ours: str
    run: Callable[[bool, str, int], list[float]]  # (with lrpilot, job, epochs) -> epoch times
    steps_per_epoch: int
    times: dict[bool, list[float]] = field(default_factory=lambda: {False: [], True: []})
    inside: list[float] = field(default_factory=list)  # per run: seconds per epoch


def _epoch_times(starts: list[float]) -> list[float]:
    """Durations between consecutive epoch starts (the last start is the end of training),
    without the first epoch (warm-up)."""
    return [b - a for a, b in itertools.pairwise(starts)][1:]


# -- torch -----------------------------------------------------------------------------------


def _torch_data(n: int = 2048) -> tuple[Any, ...]:
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n + 512, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 1, generator=g)) + 0.3 * torch.randn(n + 512, 1, generator=g)
    return x[:n], y[:n], x[n:], y[n:]


def _torch_model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
        torch.nn.Linear(128, 1),
    )  # fmt: skip


def torch_loop(endpoint: str, per_step: bool) -> Callable[[bool, str, int], list[float]]:
    def run(ours: bool, job: str, epochs: int) -> list[float]:
        import torch

        from lrpilot.client.torch import LRPilotScheduler

        x, y, xv, yv = _torch_data()
        model = _torch_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched: Any
        if ours:
            unit = "step" if per_step else "epoch"
            sched = LRPilotScheduler(opt, job=job, endpoint=endpoint, unit=unit)
            sched.client  # noqa: B018 - the hello, before the clock runs
            timed(sched, "step")
        elif per_step:
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, GAMMA)
        else:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
        starts = []
        for _ in range(epochs):
            starts.append(time.perf_counter())
            for i in range(0, len(x), 64):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x[i : i + 64]), y[i : i + 64])
                loss.backward()
                opt.step()
                if per_step:
                    sched.step(loss.detach()) if ours else sched.step()
            with torch.no_grad():
                val = torch.nn.functional.mse_loss(model(xv), yv)
            if not per_step:
                sched.step(val)
        starts.append(time.perf_counter())
        if ours:
            sched.close()
        return _epoch_times(starts)

    return run


# -- Lightning -------------------------------------------------------------------------------


def lightning_fit(endpoint: str, per_step: bool) -> Callable[[bool, str, int], list[float]]:
    def run(ours: bool, job: str, epochs: int) -> list[float]:
        import pytorch_lightning as pl
        import torch

        from lrpilot.client.lightning import LRPilotCallback

        x, y, xv, yv = _torch_data()
        starts: list[float] = []

        class Module(pl.LightningModule):  # type: ignore[misc]
            def __init__(self) -> None:
                super().__init__()
                self.net = _torch_model()

            def training_step(self, batch: Any, batch_idx: int) -> Any:
                return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

            def validation_step(self, batch: Any, batch_idx: int) -> None:
                self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch[0]), batch[1]))

            def on_train_epoch_start(self) -> None:
                starts.append(time.perf_counter())

            def configure_optimizers(self) -> Any:
                opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
                if ours:
                    return opt
                if per_step:
                    sched = torch.optim.lr_scheduler.ExponentialLR(opt, GAMMA)
                    return {
                        "optimizer": opt,
                        "lr_scheduler": {"scheduler": sched, "interval": "step"},
                    }
                sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
                return {
                    "optimizer": opt,
                    "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"},
                }

        loader = torch.utils.data.DataLoader
        train = loader(torch.utils.data.TensorDataset(x, y), batch_size=64)
        val = loader(torch.utils.data.TensorDataset(xv, yv), batch_size=512)
        callbacks = []
        if ours:
            unit = "step" if per_step else "epoch"
            callback = LRPilotCallback(job=job, endpoint=endpoint, unit=unit)
            hooks = ("on_train_epoch_start", "on_validation_end", "on_train_batch_end")
            callbacks.append(timed(callback, *hooks))
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        pl.seed_everything(0, verbose=False)
        trainer.fit(Module(), train, val)
        starts.append(time.perf_counter())
        return _epoch_times(starts)

    return run


# -- HF Trainer ------------------------------------------------------------------------------


def hf_train(endpoint: str, per_step: bool) -> Callable[[bool, str, int], list[float]]:
    def run(ours: bool, job: str, epochs: int) -> list[float]:
        import torch
        import transformers

        from lrpilot.client.hf import LRPilotTrainerCallback

        starts: list[float] = []

        class Clock(transformers.TrainerCallback):  # type: ignore[misc]
            def on_epoch_begin(self, *args: Any, **kwargs: Any) -> None:
                starts.append(time.perf_counter())

        class Tokens(torch.utils.data.Dataset):  # type: ignore[misc]
            def __init__(self, n: int, seed: int) -> None:
                g = torch.Generator().manual_seed(seed)
                self.ids = torch.randint(2, 64, (n, 16), generator=g)
                self.ids[: n // 2, 5] = 1
                self.labels = (self.ids == 1).any(dim=1).long()

            def __len__(self) -> int:
                return len(self.labels)

            def __getitem__(self, i: int) -> dict[str, Any]:
                return {"input_ids": self.ids[i], "labels": self.labels[i]}

        transformers.set_seed(0)
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=2,
        )
        kind = "constant" if ours else "linear" if per_step else "reduce_lr_on_plateau"
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(
                output_dir=out,
                num_train_epochs=epochs,
                per_device_train_batch_size=16,
                per_device_eval_batch_size=128,
                learning_rate=1e-3,
                lr_scheduler_type=kind,
                eval_strategy="epoch",
                metric_for_best_model="eval_loss",
                logging_strategy="steps",
                logging_steps=5,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            callbacks: list[Any] = [Clock()]
            if ours:
                unit = "step" if per_step else "epoch"
                callback = LRPilotTrainerCallback(job=job, endpoint=endpoint, unit=unit)
                hooks = ("on_epoch_begin", "on_step_begin", "on_evaluate", "on_log")
                callbacks.insert(0, timed(callback, *hooks))
            trainer = transformers.Trainer(
                model=transformers.BertForSequenceClassification(config),
                args=args,
                train_dataset=Tokens(256, 1),
                eval_dataset=Tokens(256, 2),
                callbacks=callbacks,
            )
            trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
            trainer.train()
            starts.append(time.perf_counter())
            return _epoch_times(starts)

    return run


# -- Keras -----------------------------------------------------------------------------------


def keras_fit(endpoint: str) -> Callable[[bool, str, int], list[float]]:
    def run(ours: bool, job: str, epochs: int) -> list[float]:
        import keras
        import numpy as np

        from lrpilot.client.keras import LRPilotCallback

        starts: list[float] = []

        class Clock(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                starts.append(time.perf_counter())

        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2560, 32)).astype("float32")
        y = np.tanh(x @ rng.normal(size=(32, 1))).astype("float32")
        model = keras.Sequential(
            [
                keras.Input((32,)),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(1),
            ]
        )
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9), loss="mse")
        if ours:
            scheduler: Any = timed(
                LRPilotCallback(job=job, endpoint=endpoint), "on_epoch_begin", "on_epoch_end"
            )
        else:
            scheduler = keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2)
        model.fit(
            x[:2048],
            y[:2048],
            validation_data=(x[2048:], y[2048:]),
            epochs=epochs,
            batch_size=64,
            verbose=0,
            callbacks=[scheduler, Clock()],
        )
        starts.append(time.perf_counter())
        return _epoch_times(starts)

    return run


# -- the run ---------------------------------------------------------------------------------


def cases(endpoint: str) -> list[Case]:
    return [
        Case("torch", "ReduceLROnPlateau.step(val_loss)", "LRPilotScheduler.step(val_loss)",
             torch_loop(endpoint, False), 32),
        Case("torch-step", "ExponentialLR.step() every step",
             'LRPilotScheduler(unit="step").step(loss) every step', torch_loop(endpoint, True), 32),
        Case("lightning", 'ReduceLROnPlateau, "monitor": "val_loss"', "LRPilotCallback()",
             lightning_fit(endpoint, False), 32),
        Case("lightning-step", 'ExponentialLR, "interval": "step"', 'LRPilotCallback(unit="step")',
             lightning_fit(endpoint, True), 32),
        Case("hf", 'lr_scheduler_type="reduce_lr_on_plateau"',
             'LRPilotTrainerCallback(), lr_scheduler_type="constant"',
             hf_train(endpoint, False), 16),
        Case("hf-step", 'lr_scheduler_type="linear"',
             'LRPilotTrainerCallback(unit="step"), logging_steps=5', hf_train(endpoint, True), 16),
        Case("keras", "keras.callbacks.ReduceLROnPlateau", "LRPilotCallback()", keras_fit(endpoint),
             32),
    ]  # fmt: skip


ADAPTER_VERSIONS = (
    "torch",
    "pytorch-lightning",
    "transformers",
    "keras",
    "tensorflow-cpu",
    "pyzmq",
)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def rows(done: list[Case]) -> list[tuple[str, ...]]:
    out = []
    for case in done:
        base, ours = (statistics.median(case.times[k]) for k in (False, True))
        per_step = (ours - base) / case.steps_per_epoch
        out.append(
            (
                case.name,
                f"{case.baseline}: {ms(base)}",
                f"{case.ours}: {ms(ours)}",
                f"{ms(ours - base)} ({ms(per_step)} per step, {case.steps_per_epoch} steps)",
                ms(statistics.median(case.inside)),
                f"{ours / base:.3f}",
                f"{len(case.times[True])} + {len(case.times[False])}",
            )
        )
    return out


def record(table: list[tuple[str, ...]], lines: list[str]) -> None:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [
        "",
        f"## {when} — adapters' per-epoch overhead (bench/adapters.py)",
        "",
        *(f"- {line}" for line in lines),
        "",
        "| adapter | framework's own scheduler: median epoch | with lrpilot: median epoch "
        "| overhead per epoch | inside lrpilot's calls per epoch | ratio "
        "| epochs timed (lrpilot + own) |",
        "|---|---|---|---|---|---|---|",
        *(f"| {' | '.join(row)} |" for row in table),
        "",
        "Each epoch timed from its start to the next one's; medians over every epoch but the "
        "first of each run, runs interleaved with the baseline. The overhead also holds the "
        "controller's own CPU time (it shares the machine's cores with the training); "
        "'inside lrpilot's calls' is the wall time spent in the adapter's per-epoch and "
        "per-step calls (median over runs), which the machine's load disturbs far less. A "
        "negative overhead is noise: the cost is below what the machine's jitter lets one see.",
        "",
    ]
    with RESULTS.open("a") as out:
        out.write("\n".join(text))
    print(f"appended to {RESULTS.relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 5 epochs each way")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--only", nargs="*", help="case names (torch, torch-step, lightning, ...)")
    args = parser.parse_args()
    rounds, epochs = (1, 6) if args.quick else (3, 11)
    started, started_load = time.monotonic(), "/".join(f"{x:.2f}" for x in os.getloadavg())
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    done: list[Case] = []
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        c = Controller(Path(tmp) / "state", policy).start()
        try:
            for case in cases(c.bind):
                if args.only and case.name not in args.only:
                    continue
                for r in range(rounds):
                    for ours in (r % 2 == 1, r % 2 == 0):  # alternate which goes first
                        job = f"{case.name.split('-')[0]}-{r}-{int(ours)}"
                        job += "-step" if case.name.endswith("-step") else ""
                        INSIDE.clear()
                        case.times[ours] += case.run(ours, job, epochs)
                        if ours:
                            case.inside.append(sum(INSIDE) / epochs)
                done.append(case)
                print(" | ".join(rows([case])[0]), flush=True)
        finally:
            c.stop()
    if not args.no_record and done:
        argv = " ".join(sys.argv[1:])
        run = f"run: `bench/adapters.py{' ' + argv if argv else ''}`"
        record(
            rows(done),
            [
                *context(started_load, ADAPTER_VERSIONS, "the training"),
                f"{run}, {time.monotonic() - started:.0f} s",
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
