"""Multi-process jobs against a real controller: torch.distributed (gloo, 2 processes on
localhost, launched as torchrun would: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and Keras
models under TensorFlow's MultiWorkerMirroredStrategy (2 workers, TF_CONFIG on free ports).

The workers are this file run as a script (`python test_distributed.py CONFIG_JSON`); each
writes one JSON line per epoch: the LR its optimizer used, its own validation loss, how long
the report waited and whether the controller answered.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if __name__ != "__main__":
    from conftest import Controller, run_cli, wait_for

    Factory = Callable[..., Controller]

WORKER_TIMEOUT = 150  # seconds a worker may run before the test gives up on it


# -- the workers -------------------------------------------------------------------------------


def _write(path: str, row: dict[str, Any]) -> None:
    with open(path, "a") as out:
        out.write(json.dumps(row) + "\n")


def _pause_if_asked(cfg: dict[str, Any], epoch: int) -> None:
    """A rank told to stop reporting after `pause_after` waits here to be killed."""
    if epoch == cfg.get("pause_after"):
        _write(cfg["out"], {"paused": True})
        time.sleep(60)
        os._exit(3)  # never killed: the test has failed already


def torch_worker(cfg: dict[str, Any]) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from lrpilot.client.torch import LRPilotScheduler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # env://
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 1, generator=g)) + 0.3 * torch.randn(512, 1, generator=g)
    xt, yt = x[:384][rank::world], y[:384][rank::world]  # each rank its own shards
    xv, yv = x[384:][rank::world], y[384:][rank::world]
    torch.manual_seed(0)
    model: Any = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1)
    )
    if cfg["ddp"]:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    sched = LRPilotScheduler(opt, job=cfg["job"], endpoint=cfg["endpoint"], timeout=5.0)
    for epoch in range(cfg["epochs"]):
        lr = opt.param_groups[0]["lr"]
        for i in range(0, len(xt), 16):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(xt[i : i + 16]), yt[i : i + 16]).backward()
            opt.step()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(model(xv), yv))
        start = time.monotonic()
        sched.step(val)
        waited = time.monotonic() - start
        row = {"epoch": epoch, "lr": lr, "val": val, "waited": waited}
        _write(cfg["out"], {**row, "online": sched.client.online, "rank": rank})
        _pause_if_asked(cfg, epoch)
    sched.close()
    if cfg["ddp"]:
        dist.destroy_process_group()


def guard_worker(cfg: dict[str, Any]) -> None:
    """DDP with a guard: rank 1's batch at `spike_at` has huge targets; every rank writes the
    rollbacks it applied (and at which step) and its final weights."""
    import datetime

    import torch
    import torch.distributed as dist

    from lrpilot.client.torch import LRPilotScheduler

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # env://
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(512, 8, generator=g)
    y = x @ torch.ones(8, 1) + 0.05 * torch.randn(512, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)
    sched = LRPilotScheduler(
        opt,
        job=cfg["job"],
        endpoint=cfg["endpoint"],
        timeout=5.0,
        unit="step",
        monitor="loss",
        model=model,
    )
    applied: list[list[int]] = []
    for step in range(cfg["steps"]):
        i = step * 16 % 512
        xb, yb = x[i : i + 16], y[i : i + 16]
        if step == cfg["spike_at"] and rank == 1:
            yb = yb * 1e4  # a batch of huge targets on one rank
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen = len(sched._core.rollbacks)
        sched.step(loss)
        for asked, unit in sched._core.rollbacks[seen:]:
            applied.append([step, asked, -1 if unit is None else unit])
    weights = [float(v) for p in model.parameters() for v in p.detach().flatten()]
    _write(
        cfg["out"],
        {"rank": rank, "applied": applied, "weights": weights, "lr": opt.param_groups[0]["lr"]},
    )
    sched.close()
    dist.destroy_process_group()


def keras_worker(cfg: dict[str, Any]) -> None:
    """Keras 3 under MultiWorkerMirroredStrategy, with a custom training loop that drives
    the callback's hooks (Keras 3's `fit` does not run under this strategy:
    keras-team/keras#20585)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from lrpilot.client.keras import LRPilotCallback

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype("float32")
    w = rng.normal(size=(8, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.3 * rng.normal(size=(512, 1))).astype("float32")
    xv, yv = x[384:][rank::2], y[384:][rank::2]
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
        )
        opt = keras.optimizers.SGD(learning_rate=cfg["lr"], momentum=0.9)
        model.compile(optimizer=opt, loss="mse")
    data = tf.data.Dataset.from_tensor_slices((x[:384], y[:384])).batch(32)
    batches = strategy.experimental_distribute_dataset(data)

    @tf.function  # type: ignore[misc]
    def train_step(xb: Any, yb: Any) -> Any:
        def replica(xb: Any, yb: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(xb, training=True) - yb) ** 2)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        return strategy.run(replica, args=(xb, yb))

    callback = LRPilotCallback(job=cfg["job"], endpoint=cfg["endpoint"], timeout=5.0)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch in range(cfg["epochs"]):
        callback.on_epoch_begin(epoch)
        lr = float(opt.learning_rate.numpy())
        for xb, yb in batches:
            train_step(xb, yb)
        val = float(np.mean((model(xv).numpy() - yv) ** 2))
        start = time.monotonic()
        callback.on_epoch_end(epoch, {"val_loss": val})
        waited = time.monotonic() - start
        _write(cfg["out"], {"epoch": epoch, "lr": lr, "val": val, "waited": waited})
    callback.on_train_end()


# -- the test side -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(tmp_path: Path, kind: str, rank: int, env: dict[str, str], **cfg: Any) -> Any:
    out = tmp_path / f"{kind}-{rank}.jsonl"
    cfg = {"kind": kind, "out": str(out), **cfg}
    log = open(tmp_path / f"{kind}-{rank}.log", "w")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(
        [sys.executable, __file__, json.dumps(cfg)],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "OMP_NUM_THREADS": "1", **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    proc.out = out  # type: ignore[attr-defined]
    proc.log = tmp_path / f"{kind}-{rank}.log"  # type: ignore[attr-defined]
    return proc


def _rows(proc: Any) -> list[dict[str, Any]]:
    path: Path = proc.out
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _finish(procs: list[Any], timeout: float = WORKER_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            code = p.wait(max(1.0, deadline - time.monotonic()))
            assert code == 0, f"worker exited {code}:\n{p.log.read_text()[-3000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def _torch_env(rank: int, port: int) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def _torch_plateau(values: list[float], lr: float, **params: Any) -> list[float]:
    """The LR of each epoch with torch's ReduceLROnPlateau stepped on `values`."""
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **params)
    out = [lr]
    for value in values[:-1]:
        ref.step(value)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_ddp_ranks_get_one_decision_per_epoch_from_their_mean_loss(
    controller_factory: Factory, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    c = controller_factory(
        "version: 1\ndefaults:\n"
        "  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 0, min_delta: 0.05}\n"
    )
    port, epochs, lr = _free_port(), 10, 0.1
    cfg = {"job": "ddp-mean", "endpoint": c.bind, "epochs": epochs, "lr": lr, "ddp": True}
    procs = [_spawn(tmp_path, "torch", r, _torch_env(r, port), **cfg) for r in (0, 1)]
    _finish(procs)
    rank0, rank1 = (_rows(p) for p in procs)
    assert [r["epoch"] for r in rank0] == [r["epoch"] for r in rank1] == list(range(epochs))
    assert all(r["online"] for r in rank0 + rank1)
    # Each rank validates on its own shard: different losses, one decision on their mean.
    assert all(a["val"] != b["val"] for a, b in zip(rank0, rank1, strict=True))
    mean = [math.fsum([a["val"], b["val"]]) / 2 for a, b in zip(rank0, rank1, strict=True)]
    params = {"factor": 0.5, "patience": 0, "threshold": 0.05}
    expected = _torch_plateau(mean, lr, **params)
    assert [r["lr"] for r in rank0] == [r["lr"] for r in rank1] == expected
    assert min(expected) < lr, "the seeded run must reduce at least once"
    # The controller decided on the mean: the value it holds is the last epoch's mean.
    (status,) = json.loads(run_cli("status", "--json", "--admin", c.admin).stdout)
    assert (status["job"], status["epoch"], status["value"]) == ("ddp-mean", epochs - 1, mean[-1])
    assert c.metric("lrpilot_reports_total", training_job="ddp-mean") == 2 * epochs


def test_a_killed_rank_does_not_stop_the_other_ranks_decisions(
    controller_factory: Factory, tmp_path: Path
) -> None:
    """Rank 1 reports epochs 0 and 1, then is SIGKILLed: rank 0 gets every later epoch's
    decision once `aggregate_timeout` (1 s) has passed, and its LRs are the policy's.
    (No gradient all-reduce here: with one, the survivor's collective would fail at once.)"""
    pytest.importorskip("torch")
    c = controller_factory(
        "version: 1\ndefaults:\n"
        "  aggregate_timeout: 1s\n"
        "  policy: {type: exponential, decay_rate: 0.5, decay_steps: 1}\n"
    )
    port, epochs, lr = _free_port(), 6, 0.1
    cfg = {"job": "ddp-kill", "endpoint": c.bind, "epochs": epochs, "lr": lr, "ddp": False}
    survivor = _spawn(tmp_path, "torch", 0, _torch_env(0, port), **cfg)
    victim = _spawn(tmp_path, "torch", 1, _torch_env(1, port), pause_after=1, **cfg)
    try:

        def paused() -> bool:
            assert victim.poll() is None, victim.log.read_text()[-3000:]
            return any(r.get("paused") for r in _rows(victim))

        wait_for(paused, "rank 1 at its pause", timeout=WORKER_TIMEOUT)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
        _finish([survivor])
    finally:
        for p in (survivor, victim):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    rows = _rows(survivor)
    assert [r["lr"] for r in rows] == [lr * 0.5**e for e in range(epochs)]
    assert all(r["online"] for r in rows)  # every report answered within its timeout
    for r in rows[2:]:  # after the kill: decided when aggregate_timeout ran out
        assert 0.9 <= r["waited"] < 5.0, rows
    assert c.metric("lrpilot_late_decisions_total", training_job="ddp-kill") >= epochs - 2


def test_keras_multi_worker_mirrored_strategy_workers_share_decisions(
    controller_factory: Factory, tmp_path: Path
) -> None:
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    c = controller_factory(
        "version: 1\ndefaults:\n"
        "  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.01}\n"
    )
    ports, epochs, lr = [_free_port(), _free_port()], 8, 0.1
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    cfg = {"job": "mwms-mean", "endpoint": c.bind, "epochs": epochs, "lr": lr}
    procs = [
        _spawn(
            tmp_path,
            "keras",
            rank,
            {
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": rank}}
                )
            },
            **cfg,
        )
        for rank in (0, 1)
    ]
    _finish(procs)
    rank0, rank1 = (_rows(p) for p in procs)
    assert [r["epoch"] for r in rank0] == [r["epoch"] for r in rank1] == list(range(epochs))
    assert all(a["val"] != b["val"] for a, b in zip(rank0, rank1, strict=True))
    mean = [math.fsum([a["val"], b["val"]]) / 2 for a, b in zip(rank0, rank1, strict=True)]

    # Keras' own ReduceLROnPlateau stepped on the mean of the two workers' losses.
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss="mse")
    ref = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=0.5, patience=1, min_delta=0.01
    )
    ref.set_model(model)
    ref.on_train_begin()
    expected = []
    for epoch, value in enumerate(mean):
        expected.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
        ref.on_epoch_end(epoch, {"val_loss": value})
    assert [r["lr"] for r in rank0] == [r["lr"] for r in rank1] == expected
    assert min(expected) < lr, "the seeded run must reduce at least once"


if __name__ == "__main__":
    config = json.loads(sys.argv[1])
    workers = {"torch": torch_worker, "keras": keras_worker, "guard": guard_worker}
    workers[config["kind"]](config)


def test_a_spike_on_one_ranks_batch_rolls_both_ranks_back_at_the_same_step(
    controller_factory: Factory, tmp_path: Path
) -> None:
    """Two gloo ranks under DDP with a guard; rank 1 alone gets a batch of huge targets: the
    job-wide (mean) loss spikes, both ranks restore the same snapshot at the same step (a
    guarded job of several ranks reports in lockstep) and keep identical weights."""
    pytest.importorskip("torch")
    c = controller_factory(
        "version: 1\ndefaults:\n"
        "  policy: {type: constant, unit: step}\n"
        "  guard: {spike: 3.0, window: 20, warmup: 30, snapshot_every: 25, cooldown: 10}\n"
    )
    port = _free_port()
    cfg = {"job": "ddp-guard", "endpoint": c.bind, "steps": 120, "spike_at": 70, "lr": 0.05}
    procs = [_spawn(tmp_path, "guard", r, _torch_env(r, port), **cfg) for r in (0, 1)]
    _finish(procs)
    (rank0,), (rank1,) = (_rows(p) for p in procs)
    # Restored in step 70's `step()` call, before step 71 runs, to the snapshot of step 50.
    assert rank0["applied"] == rank1["applied"] == [[70, 50, 50]]
    assert rank0["weights"] == rank1["weights"]
    assert rank0["lr"] == rank1["lr"] == 0.025
    assert c.metric("lrpilot_rollbacks_total", training_job="ddp-guard") == 1.0
