"""The LR range test end to end, on a problem whose stability limit is known.

Linear regression trained with plain SGD on full batches, loss MSE = mean((Xw - y)^2): its
Hessian is (2/n)·XᵀX, and gradient descent diverges for every LR above 2/λ_max of it. A
real controller runs `range_test` (from 1e-6, `suggest: minimum`) and then a plateau phase
from the suggestion; the trainers are a real Keras `fit`, a real torch loop with
LRPilotScheduler(model=...), and two torch.distributed (gloo) ranks with DDP. The sweep must
run past the limit and stop, suggest an LR below the limit and within two decades of it,
put the weights back exactly as they were before the test, and training on from there must
bring the loss below 1 % of where it started.

The two-rank workers are this file run as a script (`python test_range_test_e2e.py CFG`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lrpilot.client.adapter import SWEEP_SYNC_EVERY

if __name__ != "__main__":
    from conftest import Controller, run_cli

    Factory = Callable[..., Controller]

N, D = 64, 4  # examples, features
NOISE = 0.1  # the targets' noise: the loss has a floor, as real data gives it
START_LR = 1e-6
POLICY = """\
version: 1
defaults:
  phases:
    - {type: range_test, start_lr: 1.0e-6, suggest: minimum}
    - {type: plateau, lr: suggested, unit: step, monitor: loss, factor: 0.5, patience: 20,
       min_delta: 0.0}
"""
STEPS_AFTER = 60  # steps trained after the restore
MAX_STEPS = 400  # a sweep from 1e-6 to 10 is 141 steps: every loop ends well before this
WORKER_TIMEOUT = 120  # seconds a two-rank worker may take


def problem() -> tuple[Any, Any]:
    """X (N×D) and y = X·w + noise, float32, the same for every framework and rank."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = x @ rng.normal(size=(D, 1)) + NOISE * rng.normal(size=(N, 1))
    return x.astype("float32"), y.astype("float32")


def stability_limit(x: Any) -> float:
    """2/λ_max of the Hessian (2/n)·XᵀX of the MSE: SGD on full batches diverges above it."""
    x64 = np.asarray(x, dtype="float64")
    return float(2 / np.linalg.eigvalsh(2 / len(x64) * x64.T @ x64).max())


def mse(x: Any, y: Any, w: Any) -> float:
    return float(np.mean((np.asarray(x, "float64") @ np.asarray(w, "float64") - y) ** 2))


def sweep_lr(step: int) -> float:
    """The range test's LR at `step`: start_lr · 10^(step / 20)."""
    return 10 ** (step / 20) * START_LR


# -- the two-rank workers --------------------------------------------------------------------


def torch_worker(cfg: dict[str, Any]) -> None:
    """One rank of a DDP job on its half of the rows; a JSON line per step: the LR the step
    used, the loss it computed and the weights after `sched.step`."""
    import datetime

    import torch
    import torch.distributed as dist

    from lrpilot.client.torch import LRPilotScheduler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # env://
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = (torch.from_numpy(a[rank::world]) for a in problem())
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(D, 1, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = LRPilotScheduler(
        opt, job=cfg["job"], monitor="loss", endpoint=cfg["endpoint"], timeout=10.0,
        unit="step", model=model,
    )  # fmt: skip
    rows, restored_at = [], None
    initial = model.module.weight.detach().clone()
    for step in range(MAX_STEPS):
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP averages the two ranks' gradients: the full batch's gradient
        opt.step()
        sched.step(loss)
        weights = model.module.weight.detach()
        rows.append({"step": step, "lr": lr, "loss": loss.item(), "w": weights.tolist()})
        if restored_at is None and torch.equal(weights, initial):
            restored_at = step
        if restored_at is not None and step >= restored_at + STEPS_AFTER:
            break
    sched.close()
    dist.destroy_process_group()
    out = {"initial": initial.tolist(), "restored_at": restored_at, "rows": rows}
    Path(cfg["out"]).write_text(json.dumps(out))


# -- the test side ---------------------------------------------------------------------------


def range_test_report(c: Controller, job: str, *args: str) -> dict[str, Any]:
    out = run_cli("range-test", job, "--json", "--admin", c.admin, *args)
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def check_the_sweep(report: dict[str, Any], limit: float) -> float:
    """The test ran past the limit, stopped on divergence and suggests below it, within
    two decades; returns the suggestion."""
    assert report["done"] and report["stop_reason"] == "divergence"
    lrs = [p[0] for p in report["points"]]
    assert lrs == pytest.approx([sweep_lr(t) for t in range(len(lrs))], rel=1e-9)
    assert lrs[-1] > limit  # it stopped after the limit, not before
    assert set(report["suggestions"]) == {"valley", "steep", "minimum"}
    suggested: float = report["suggested_lr"]
    assert report["suggest"] == "minimum"
    assert suggested == pytest.approx(report["suggestions"]["minimum"], rel=1e-7)
    assert limit / 100 < suggested < limit
    return suggested


def test_keras_fit_finds_an_lr_below_the_limit_restores_and_trains_on(
    controller_factory: Factory, tmp_path: Path
) -> None:
    """Real `fit`, full batches, 25 steps an epoch: the restore lands in mid-epoch."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import tensorflow as tf

    from lrpilot.client.keras import LRPilotCallback

    c = controller_factory(POLICY)
    x, y = problem()
    limit = stability_limit(x)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    (initial,) = model.get_weights()
    initial_loss = mse(x, y, initial)

    rows: list[tuple[float, Any, int]] = []  # after each step: LR for the next, weights, count

    class AfterEachStep(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            optimizer = self.model.optimizer
            lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            (w,) = self.model.get_weights()
            rows.append((lr, w, int(keras.ops.convert_to_numpy(optimizer.iterations))))

    callback = LRPilotCallback(job="keras-find-lr", endpoint=c.bind, unit="step", timeout=10.0)
    full_batches = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(
        full_batches, epochs=8, steps_per_epoch=25, shuffle=False, verbose=0,
        callbacks=[callback, AfterEachStep()],
    )  # fmt: skip

    report = range_test_report(c, "keras-find-lr", "--plot", str(tmp_path / "keras.png"))
    suggested = check_the_sweep(report, limit)
    # The trainer ran the sweep as a plan, streaming its reports: the restore came with the
    # answer to the last point's report, at the first step after it reached the trainer.
    stop = len(report["points"]) - 1
    restored = [i for i, (_, w, _) in enumerate(rows) if np.array_equal(w, initial)]
    assert len(restored) == 1 and restored[0] >= stop, (restored, stop)
    (back,) = restored
    assert back % 25 != 0  # in mid-epoch
    lr, weights, iterations = rows[back]
    assert np.array_equal(weights, initial) and iterations == 0  # exactly as before the test
    assert lr == pytest.approx(suggested, rel=1e-7)  # then the suggestion
    # Through the test each step ran the sweep's LR (the plan's, past the last point until
    # the restore came); the curve holds the losses of the LRs trained, in order.
    sweep = [lr for lr, _, _ in rows[:back]]
    assert sweep == pytest.approx([sweep_lr(t + 1) for t in range(back)], rel=1e-6)
    assert [p[0] for p in report["points"]] == pytest.approx(
        [sweep_lr(t) for t in range(stop + 1)], rel=1e-6
    )
    assert len(rows) - stop > STEPS_AFTER
    final = mse(x, y, model.get_weights()[0])
    assert final < 0.01 * initial_loss, (final, initial_loss)
    assert (tmp_path / "keras.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(  # the numbers for the README and the issue (pytest -s shows them)
        f"\nkeras: limit {limit:.4g}, stopped at lr {report['points'][-1][0]:.4g} "
        f"({len(report['points'])} points), suggestions {report['suggestions']}, "
        f"loss {initial_loss:.4g} -> {final:.4g}"
    )


def torch_run(
    sched: Any, model: Any, optimizer: Any, x: Any, y: Any
) -> tuple[list[tuple[float, Any]], int | None]:
    """Full-batch SGD steps until STEPS_AFTER steps after the restore (or MAX_STEPS):
    (LR the step used, weights after `sched.step`) per step, and the restore's step."""
    import torch

    initial = model.weight.detach().clone()
    rows: list[tuple[float, Any]] = []
    restored_at = None
    for step in range(MAX_STEPS):
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        sched.step(loss)
        rows.append((lr, model.weight.detach().clone()))
        if restored_at is None and torch.equal(rows[-1][1], initial):
            restored_at = step
        if restored_at is not None and step >= restored_at + STEPS_AFTER:
            break
    return rows, restored_at


def test_torch_scheduler_with_the_model_restores_and_trains_on(controller_factory: Factory) -> None:
    """`LRPilotScheduler(optimizer, model=model, unit="step")` in a plain loop: its hello
    comes after the first optimizer step, its copy of the state from before that step."""
    torch = pytest.importorskip("torch")
    from lrpilot.client.torch import LRPilotScheduler

    c = controller_factory(POLICY)
    x, y = (torch.from_numpy(a) for a in problem())
    limit = stability_limit(x.numpy())
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    initial = model.weight.detach().clone()
    initial_loss = mse(x.numpy(), y.numpy(), initial.numpy().T)
    with LRPilotScheduler(
        optimizer, job="torch-find-lr", monitor="loss", endpoint=c.bind, timeout=10.0,
        unit="step", model=model,
    ) as sched:  # fmt: skip
        rows, restored_at = torch_run(sched, model, optimizer, x, y)

    report = range_test_report(c, "torch-find-lr")
    suggested = check_the_sweep(report, limit)
    # Step 0 ran at the optimizer's own LR (the hello came after it): reported so, it is no
    # point of the curve. Steps 1.. ran the sweep's LRs, one per point, then the suggestion.
    # The sweep ran as a plan with its reports streamed: the restore came at the first step
    # after the answer to the last point's reached the trainer.
    stop = len(report["points"])  # the step of the last point
    assert restored_at is not None and restored_at >= stop  # as before the first step, exactly
    assert not torch.equal(rows[restored_at - 1][1], initial)  # the sweep had moved them
    used = [lr for lr, _ in rows]
    assert used[0] == 0.01
    assert used[1 : restored_at + 1] == pytest.approx([sweep_lr(t) for t in range(restored_at)])
    assert used[restored_at + 1] == pytest.approx(suggested, rel=1e-7)
    assert [p[0] for p in report["points"]] == pytest.approx([sweep_lr(t) for t in range(stop)])
    final = mse(x.numpy(), y.numpy(), model.weight.detach().numpy().T)
    assert final < 0.01 * initial_loss, (final, initial_loss)
    print(
        f"\ntorch: limit {limit:.4g}, stopped at lr {report['points'][-1][0]:.4g} "
        f"({len(report['points'])} points), suggestions {report['suggestions']}, "
        f"loss {initial_loss:.4g} -> {final:.4g}"
    )


def test_torch_scheduler_without_a_model_is_refused_and_keeps_its_lr(
    controller_factory: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    torch = pytest.importorskip("torch")
    from lrpilot.client.torch import LRPilotScheduler

    c = controller_factory(POLICY)
    x, y = (torch.from_numpy(a) for a in problem())
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    used = []
    with (
        caplog.at_level(logging.WARNING, logger="lrpilot.client"),
        LRPilotScheduler(
            optimizer, job="torch-no-model", monitor="loss", endpoint=c.bind, unit="step"
        ) as sched,
    ):
        for _ in range(30):
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            sched.step(loss)
        assert sched.client.flush(timeout=5)
    assert used == [0.01] * 30 and optimizer.param_groups[0]["lr"] == 0.01
    noticed = [r for r in caplog.records if "restore_unsupported" in r.getMessage()]
    assert len(noticed) == 1, [r.getMessage() for r in caplog.records]
    assert "model=model" in noticed[0].getMessage()
    out = run_cli("range-test", "torch-no-model", "--admin", c.admin)
    assert out.returncode == 1


class FullBatches:
    """A map-style dataset of `steps` items, each the whole (X, y): full-batch epochs."""

    def __init__(self, x: Any, y: Any, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.x, self.y


def check_the_restore(
    rows: list[tuple[float, Any]], stop: int, initial: Any, suggested: float
) -> None:
    """rows: after each step, the LR of the next step and the weights. The restore came
    after step `stop` (the last point), or later (the sweep runs as a plan, its reports
    streamed: at the first step after the answer reached the trainer), exactly to
    `initial`, with the suggested LR; before it, the sweep."""
    import torch

    restored = [i for i, (_, w) in enumerate(rows) if torch.equal(w, initial)]
    assert len(restored) == 1 and restored[0] >= stop, (restored, stop)
    (back,) = restored
    assert rows[back][0] == pytest.approx(suggested, rel=1e-7)
    sweep = [lr for lr, _ in rows[:back]]
    assert sweep == pytest.approx([sweep_lr(t + 1) for t in range(back)], rel=1e-9)
    assert len(rows) - back > STEPS_AFTER // 2  # and trained on (the loss checks follow)


def test_lightning_callback_restores_and_trains_on(controller_factory: Factory) -> None:
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("pytorch_lightning")
    from lrpilot.client.lightning import LRPilotCallback

    c = controller_factory(POLICY)
    x, y = (torch.from_numpy(a) for a in problem())
    limit = stability_limit(x.numpy())

    class Regression(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(D, 1, bias=False)
            self.rows: list[tuple[float, Any]] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            # After the callbacks' batch end: the LR for the next step, the weights now.
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.rows.append((lr, self.net.weight.detach().clone()))

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    module = Regression()
    initial = module.net.weight.detach().clone()
    callback = LRPilotCallback(
        job="lightning-find-lr", monitor=None, endpoint=c.bind, timeout=10.0, unit="step"
    )
    loader = torch.utils.data.DataLoader(FullBatches(x, y, 25), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pl.Trainer(
            max_epochs=8, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        ).fit(module, loader)  # fmt: skip

    report = range_test_report(c, "lightning-find-lr")
    suggested = check_the_sweep(report, limit)
    check_the_restore(module.rows, len(report["points"]) - 1, initial, suggested)
    initial_loss = mse(x.numpy(), y.numpy(), initial.numpy().T)
    assert mse(x.numpy(), y.numpy(), module.net.weight.detach().numpy().T) < 0.01 * initial_loss


def test_hf_trainer_callback_restores_and_trains_on(
    controller_factory: Factory, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers = pytest.importorskip("transformers")
    from lrpilot.client.hf import LRPilotTrainerCallback

    c = controller_factory(POLICY)
    x, y = (torch.from_numpy(a) for a in problem())
    limit = stability_limit(x.numpy())

    class Regression(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(D, 1, bias=False)

        def forward(self, x: Any, labels: Any = None) -> dict[str, Any]:
            predicted = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(predicted, labels), "logits": predicted}

    rows: list[tuple[float, Any]] = []

    class BeforeEachStep(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step > 0:  # the LR and weights the step after it will use
                lr = kw["optimizer"].param_groups[0]["lr"]
                rows.append((lr, kw["model"].net.weight.detach().clone()))

    torch.manual_seed(0)
    model = Regression()
    initial = model.net.weight.detach().clone()
    callback = LRPilotTrainerCallback(job="hf-find-lr", endpoint=c.bind, timeout=10.0, unit="step")
    examples = [{"x": x[i], "labels": y[i]} for i in range(N)]
    args = transformers.TrainingArguments(
        str(tmp_path / "out"), max_steps=200, per_device_train_batch_size=N,
        learning_rate=0.01, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=examples, callbacks=[callback, BeforeEachStep()]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    report = range_test_report(c, "hf-find-lr")
    suggested = check_the_sweep(report, limit)
    check_the_restore(rows, len(report["points"]) - 1, initial, suggested)
    initial_loss = mse(x.numpy(), y.numpy(), initial.numpy().T)
    assert mse(x.numpy(), y.numpy(), model.net.weight.detach().numpy().T) < 0.01 * initial_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_ranks_sweep_in_lockstep_and_restore_at_the_same_step(
    controller_factory: Factory, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    c = controller_factory(POLICY)
    port, procs = _free_port(), []
    for rank in (0, 1):
        cfg = {"job": "ddp-find-lr", "endpoint": c.bind, "out": str(tmp_path / f"{rank}.json")}
        log = open(tmp_path / f"{rank}.log", "w")  # noqa: SIM115 - the child holds it
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, json.dumps(cfg)], env=env, stdout=log, stderr=log
            )
        )
        log.close()
    try:
        for rank, p in enumerate(procs):
            code = p.wait(WORKER_TIMEOUT)
            assert code == 0, (tmp_path / f"{rank}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    out0, out1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    rank0, rank1 = out0["rows"], out1["rows"]
    x, _ = problem()
    report = range_test_report(c, "ddp-find-lr")
    suggested = check_the_sweep(report, stability_limit(x))  # DDP: the full batch's Hessian
    # Step 0 ran at the optimizer's own LR, before the hello: no point. Step k+1 is point k.
    stop = len(report["points"])  # the step of the last point
    # The ranks stream the sweep and wait for the answers only before every 16th step: the
    # end of the test applies at the first of those after the last point, on both ranks.
    # (Or at the sweep's end, where they wait too: step 1 runs its first LR, 1e-6, step 141
    # its last, 10.)
    sync = min(-(-(stop + 1) // SWEEP_SYNC_EVERY) * SWEEP_SYNC_EVERY, 142)
    # Through the test every step at the same LR on both ranks (the sweep is a plan), then
    # the suggestion from the same step. (After the test, decisions are not waited for:
    # each rank applies one at its first step after it arrived.)
    test = slice(0, sync + 1)
    assert [r["lr"] for r in rank0[test]] == [r["lr"] for r in rank1[test]]
    assert rank0[sync]["lr"] == rank1[sync]["lr"] == pytest.approx(suggested, rel=1e-7)
    swept_on = [r["lr"] for r in rank0[stop + 1 : sync]]  # the sweep went on meanwhile
    assert swept_on == pytest.approx([sweep_lr(t) for t in range(stop, sync - 1)], rel=1e-6)
    assert len(rank0) == len(rank1) == sync + STEPS_AFTER
    # Both restored after the same step, to the same weights (DDP's, from before step 0).
    assert out0["initial"] == out1["initial"]
    assert out0["restored_at"] == out1["restored_at"] == sync - 1
    assert [i for i, r in enumerate(rank1) if r["w"] == out1["initial"]] == [sync - 1]
    assert all(a["w"] == b["w"] for a, b in zip(rank0[test], rank1[test], strict=True))
    # Each rank its own half of the rows, one decision on the mean of their two losses.
    assert rank0[0]["loss"] != rank1[0]["loss"]
    first = report["points"][0][1]
    assert first == pytest.approx((rank0[1]["loss"] + rank1[1]["loss"]) / 2, rel=1e-6)


if __name__ == "__main__":
    torch_worker(json.loads(sys.argv[1]))
