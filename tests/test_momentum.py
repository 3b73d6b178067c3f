"""`cycle_momentum`: the momentum a one_cycle plan sets, in every adapter, against a real
controller, and what `status` and `/metrics` show of it.

The oracle is torch's own `OneCycleLR` (the same run with it instead of lrpilot, in the same
test): torch's scheduler gives bit-equal weights; Lightning and the HF Trainer set the
same LR and momentum before every optimizer step; Keras sets `beta_1` / `momentum` (which
its compiled train step reads: the weights equal an eager loop that sets the same values).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Controller, Wire, run_cli

from lrpilot.client import plans
from lrpilot.controller.admin import Admin

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

Factory = Callable[..., Controller]

TOTAL = 16  # steps of the cycle (and of the Lightning / HF / Keras runs)
CYCLE = dict(max_lr=0.05, total_steps=TOTAL, pct_start=0.25, base_momentum=0.8, max_momentum=0.95)


def one_cycle(total: int = TOTAL, unit: str = "step") -> str:
    return f"""\
version: 1
defaults:
  policy: {{type: one_cycle, unit: {unit}, max_lr: 0.05, total_steps: {total}, pct_start: 0.25,
           cycle_momentum: true, base_momentum: 0.8, max_momentum: 0.95}}
"""


def torch_cycle(opt: Any, total: int = TOTAL) -> Any:
    import torch

    kw = {**CYCLE, "total_steps": total}
    return torch.optim.lr_scheduler.OneCycleLR(opt, kw.pop("max_lr"), **kw)


def beta1(group: dict[str, Any]) -> float:
    return float(group["betas"][0] if "betas" in group else group["momentum"])


# -- torch --------------------------------------------------------------------------------


@pytest.mark.parametrize("adam", [False, True], ids=["sgd", "adam"])
def test_torch_run_is_bit_for_bit_torch_one_cycle_lr(
    controller_factory: Factory, adam: bool
) -> None:
    torch = pytest.importorskip("torch")
    from lrpilot.client.torch import LRPilotScheduler

    total = 60
    c = controller_factory(one_cycle(total))

    def train(make: Callable[[Any], Any]) -> tuple[list[Any], list[tuple[float, float]]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        if adam:
            opt: Any = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(total, 16, 8, generator=g), torch.randn(total, 16, 1, generator=g)
        sched = make(opt)
        used = []
        try:
            for t in range(total):
                group = opt.param_groups[0]
                used.append((group["lr"], beta1(group)))
                loss = torch.nn.functional.mse_loss(model(x[t]), y[t])
                loss.backward()
                opt.step()
                opt.zero_grad()
                sched.step()
        finally:
            getattr(sched, "close", lambda: None)()
        return [p.detach().clone() for p in model.parameters()], used

    def ours(opt: Any) -> Any:
        sched = LRPilotScheduler(opt, job=f"mom-torch-{adam}", endpoint=c.bind, unit="step")
        assert sched.client.plan is not None  # the hello's answer: the plan, from step 0
        return sched

    want_weights, want = train(lambda opt: torch_cycle(opt, total))
    got_weights, got = train(ours)
    assert got == want  # every step's LR and momentum, exactly
    assert len({m for _, m in got}) > total // 2  # it did cycle
    for a, b in zip(got_weights, want_weights, strict=True):
        assert torch.equal(a, b)


def test_torch_range_test_copy_puts_momentum_back() -> None:
    torch = pytest.importorskip("torch")
    from lrpilot.client.torch import StateSnapshot

    model = torch.nn.Linear(2, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.85, 0.99))
    copy = StateSnapshot(model, [sgd, adam])
    sgd.param_groups[0]["momentum"], adam.param_groups[0]["betas"] = 0.5, (0.6, 0.99)
    copy.restore()
    assert sgd.param_groups[0]["momentum"] == 0.9 and adam.param_groups[0]["betas"][0] == 0.85


# -- Lightning ----------------------------------------------------------------------------


def _lightning_fit(callbacks: list[Any], scheduler: bool) -> tuple[list[Any], list[Any]]:
    torch = pytest.importorskip("torch")
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
            )
            self.used: list[tuple[float, float]] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_before_optimizer_step(self, optimizer: Any) -> None:
            group = optimizer.param_groups[0]
            self.used.append((group["lr"], beta1(group)))

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
            if not scheduler:
                return opt
            sched = {"scheduler": torch_cycle(opt), "interval": "step"}
            return {"optimizer": opt, "lr_scheduler": sched}

    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(128, 8, generator=g), torch.randn(128, 1))
    model = Module()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    return [p.detach().clone() for p in model.parameters()], model.used


def test_lightning_callback_sets_momentum_as_one_cycle_lr(controller_factory: Factory) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("pytorch_lightning")
    from lrpilot.client.lightning import LRPilotCallback

    c = controller_factory(one_cycle())
    want_weights, want = _lightning_fit([], scheduler=True)
    cb = LRPilotCallback(job="mom-lightning", endpoint=c.bind, unit="step", monitor=None)
    got_weights, got = _lightning_fit([cb], scheduler=False)
    assert len(got) == TOTAL and got == want
    assert len({m for _, m in got}) > TOTAL // 2
    for a, b in zip(got_weights, want_weights, strict=True):
        assert torch.equal(a, b)


# -- Hugging Face -------------------------------------------------------------------------


def test_hf_callback_sets_betas_as_one_cycle_lr(
    controller_factory: Factory, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lrpilot.client.hf import LRPilotTrainerCallback

    class Log(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.used: list[tuple[float, float]] = []

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            group = kw["optimizer"].param_groups[0]
            self.used.append((group["lr"], beta1(group)))

    class Data(torch.utils.data.Dataset):  # type: ignore[misc]
        def __len__(self) -> int:
            return 128

        def __getitem__(self, i: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(8, generator=g), "labels": torch.randn(1, generator=g)}

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def forward(self, x: Any, labels: Any) -> dict[str, Any]:
            return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}

    c = controller_factory(one_cycle())
    transformers.set_seed(0)
    log = Log()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=0.01,
        lr_scheduler_type="constant",
        eval_strategy="no",
        logging_steps=4,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    callback = LRPilotTrainerCallback(job="mom-hf", endpoint=c.bind, unit="step")
    trainer = transformers.Trainer(
        model=Net(), args=args, train_dataset=Data(), callbacks=[callback, log]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    ref_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.01)
    ref = torch_cycle(ref_opt)
    want = []
    for _ in range(TOTAL):
        want.append((ref_opt.param_groups[0]["lr"], beta1(ref_opt.param_groups[0])))
        ref_opt.step()
        ref.step()
    assert log.used == want
    assert trainer.optimizer.param_groups[0]["betas"][1] == 0.999  # only beta1 cycles


# -- Keras --------------------------------------------------------------------------------


@pytest.mark.parametrize("adam", [True, False], ids=["adam", "sgd"])
def test_keras_sets_beta_1_or_momentum_from_the_plan_at_every_step(
    controller_factory: Factory, adam: bool
) -> None:
    keras = pytest.importorskip("keras")
    np = pytest.importorskip("numpy")
    from lrpilot.client.keras import LRPilotCallback

    c = controller_factory(one_cycle())
    name = "beta_1" if adam else "momentum"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 8)).astype("float32")
    y = rng.standard_normal((128, 1)).astype("float32")

    def model_and_optimizer() -> tuple[Any, Any]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
        )
        if adam:
            return model, keras.optimizers.Adam(learning_rate=0.01)
        return model, keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)

    def read(optimizer: Any) -> float:
        return float(keras.ops.convert_to_numpy(getattr(optimizer, name)))

    class Seen(keras.callbacks.Callback):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.used: list[tuple[float, float]] = []

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            opt = self.model.optimizer
            self.used.append((float(keras.ops.convert_to_numpy(opt.learning_rate)), read(opt)))

    model, optimizer = model_and_optimizer()
    model.compile(optimizer=optimizer, loss="mse")
    ours, seen = LRPilotCallback(job=f"mom-keras-{adam}", endpoint=c.bind, unit="step"), Seen()
    # Two fits: the second one's train step was compiled by the first (with the first's
    # variable); the callback has it compiled again to read the new one.
    for epochs in (1, 2):
        model.fit(x, y, batch_size=16, initial_epoch=epochs - 1, epochs=epochs, shuffle=False,
                  verbose=0, callbacks=[ours, seen])  # fmt: skip
    plan = {"kind": "one_cycle", "params": {**CYCLE, "cycle_momentum": True}, "from": 0,
            "until": None}  # fmt: skip
    want = [
        (float(np.float32(plans.value("one_cycle", plan["params"], 0.01, t))),
         float(np.float32(plans.momentum({**plan, "lr0": 0.01}, t))))
        for t in range(TOTAL)
    ]  # fmt: skip
    assert seen.used == want
    # After the fit the attribute is a float again (the last value set), as Keras keeps it.
    last = plans.momentum({**plan, "lr0": 0.01}, TOTAL)  # set after the last step
    assert type(getattr(optimizer, name)) is float and getattr(optimizer, name) == last

    assert optimizer.get_config()[name] == last

    # The compiled train step did use them: an eager loop that sets the same LR and
    # momentum before each step ends at the same weights; one that keeps the momentum
    # does not.
    def eager(cycle: bool) -> list[Any]:
        import tensorflow as tf

        ref, opt = model_and_optimizer()
        for t in range(TOTAL):
            lr, momentum = want[t]
            opt.learning_rate = lr
            if cycle:
                setattr(opt, name, momentum)
            batch = slice(16 * (t % 8), 16 * (t % 8 + 1))
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(keras.ops.square(ref(x[batch]) - y[batch]))
            grads = tape.gradient(loss, ref.trainable_variables)
            opt.apply_gradients(zip(grads, ref.trainable_variables, strict=True))
        return ref.get_weights()

    if keras.backend.backend() != "tensorflow":
        return
    got, same, kept = model.get_weights(), eager(True), eager(False)
    for a, b in zip(got, same, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got, kept, strict=True))


def test_keras_range_test_copy_puts_momentum_back() -> None:
    keras = pytest.importorskip("keras")
    from lrpilot.client.keras import _Momentum, _Snapshot

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01, beta_1=0.9), loss="mse")
    optimizer = model.optimizer
    copy = _Snapshot(model)
    optimizer.beta_1 = 0.5  # a float, as Keras keeps it
    copy.restore()
    assert optimizer.beta_1 == 0.9
    held = _Momentum(optimizer, "beta_1")  # a plan's momentum: a variable the step reads
    held.set(0.85)
    copy = _Snapshot(model)
    held.set(0.6)
    copy.restore()
    assert float(keras.ops.convert_to_numpy(optimizer.beta_1)) == pytest.approx(0.85)
    assert len(optimizer.variables) == len(copy.variables)  # not one of the optimizer's
    held.close()
    assert optimizer.beta_1 == 0.6 and type(optimizer.beta_1) is float


# -- status and /metrics ------------------------------------------------------------------

PHASES = """\
version: 1
jobs:
  - match: "plain-*"
    policy: {type: plateau, monitor: loss, patience: 3}
defaults:
  phases:
    - {type: constant, unit: step, until: 20}
    - {type: one_cycle, unit: step, max_lr: 0.05, total_steps: 40, pct_start: 0.25,
       cycle_momentum: true, base_momentum: 0.8, max_momentum: 0.95}
"""


def test_status_and_gauge_show_the_momentum_of_the_plan(controller_factory: Factory) -> None:
    c = controller_factory(PHASES)
    cycled, plain = Wire(c.bind, "cycle-a"), Wire(c.bind, "plain-a")
    try:
        first = cycled.hello(lr=0.01, plans=True)
        assert first.plan is not None and first.plan["kind"] == "constant"
        plain.hello(lr=0.01)
        plain.report(0, {"loss": 1.0}, lr=0.01)

        def shown() -> tuple[dict[str, Any], str]:
            # `status --json` keeps DESIGN.md's fields; the API's rows have the rest.
            table = run_cli("status", "--admin", c.admin).stdout
            return {r["job"]: r for r in Admin(c.admin).status()}, table

        cycled.report(0, {"loss": 1.0}, lr=0.01, step=9)
        rows, _ = shown()
        assert rows["cycle-a"]["momentum"] is None  # the constant phase sets none
        assert rows["plain-a"]["momentum"] is None
        with pytest.raises(AssertionError, match="no series"):
            c.metric("lrpilot_momentum", training_job="cycle-a")

        answer = cycled.report(0, {"loss": 1.0}, lr=0.01, step=29)  # in the one_cycle phase
        plan = answer.plan
        assert plan is not None and plan["kind"] == "one_cycle" and plan["from"] == 20
        want = plans.momentum(plan, 30)
        assert want is not None and 0.8 < want < 0.95
        rows, table = shown()
        assert rows["cycle-a"]["momentum"] == want
        assert c.metric("lrpilot_momentum", training_job="cycle-a") == want
        lines = table.splitlines()
        column = lines[0].index("MOMENTUM")  # the cell under the header ("step 29": 2 words)

        def cell(job: str) -> str:
            return next(line for line in lines if line.startswith(job))[column:].split()[0]

        assert cell("cycle-a") == format(want, ".4g") and cell("plain-a") == "-"
        with pytest.raises(AssertionError, match="no series"):
            c.metric("lrpilot_momentum", training_job="plain-a")
    finally:
        cycled.close()
        plain.close()


def test_simulate_json_rows_carry_the_momentum_of_torch_one_cycle_lr(
    write: Callable[[str, str], Path],
) -> None:
    torch = pytest.importorskip("torch")
    policy = write("p.yaml", one_cycle(40))
    history = write("h.csv", "epoch,step,loss\n" + "".join(f"0,{t},1.0\n" for t in range(39)))
    result = run_cli("simulate", "--policy", str(policy), "--job", "j", "--metrics", str(history),
                     "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01, momentum=0.9)
    ref = torch_cycle(opt, 40)
    want = []
    for _ in rows:  # a row's lr and momentum are those of the next step
        opt.step()
        ref.step()
        want.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
    assert [(r["lr"], r["momentum"]) for r in rows] == want

    plain = write("plain.yaml", "version: 1\ndefaults:\n  policy: {type: step, unit: step, "
                  "factor: 0.5, step_size: 10}\n")  # fmt: skip
    result = run_cli("simulate", "--policy", str(plain), "--job", "j", "--metrics", str(history),
                     "--initial-lr", "0.1", "--json")  # fmt: skip
    assert all("momentum" not in r for r in json.loads(result.stdout))
