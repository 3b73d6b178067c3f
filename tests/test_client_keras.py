"""LRPilotCallback in a real `model.fit` against a scripted controller."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")
np = pytest.importorskip("numpy")

from conftest import Controller, run_cli  # noqa: E402
from test_client import ScriptedPeer, free_endpoint, range_test_handler  # noqa: E402

from lrpilot.client.keras import LRPilotCallback  # noqa: E402
from lrpilot.client.protocol import Bye, Hello, Report  # noqa: E402


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer(lr=0.01)
    yield p
    p.close()


def make_model(optimizer: Any = None) -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(learning_rate=0.01),
        loss="mse",
        metrics=["mae", keras.metrics.R2Score(name="r2")],
    )
    return model


def data() -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def fit(model: Any, callback: LRPilotCallback, epochs: int = 4, **kwargs: Any) -> Any:
    x, y = data()
    return model.fit(
        x, y, validation_split=0.25, epochs=epochs, batch_size=16, verbose=0, callbacks=[callback],
        **kwargs,
    )  # fmt: skip


def test_a_decision_at_the_end_of_epoch_1_applies_in_epoch_2(
    peer: ScriptedPeer, capsys: pytest.CaptureFixture[str]
) -> None:
    peer.decide = lambda r: peer.lr / 2 if r.epoch == 1 else None
    model = make_model()
    callback = LRPilotCallback(job="job-a", endpoint=peer.endpoint, verbose=1)
    history = fit(model, callback).history

    lrs = history["learning_rate"]
    assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.01)
    assert lrs[2] == pytest.approx(0.005) and lrs[3] == pytest.approx(0.005)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.005)
    assert "Epoch 2: LRPilotCallback reducing learning rate to 0.005" in capsys.readouterr().out

    (hello,) = peer.of_type(Hello)
    assert hello.framework == "keras" and hello.start_epoch == 0
    assert hello.lr == pytest.approx(0.01)
    assert hello.directions["loss"] == "min" and hello.directions["val_loss"] == "min"
    assert hello.directions["r2"] == "max" and hello.directions["val_r2"] == "max"
    reports = peer.of_type(Report)
    assert [r.epoch for r in reports] == [0, 1, 2, 3]
    assert {"loss", "val_loss", "mae", "val_mae", "r2"} <= set(reports[0].metrics)
    assert reports[2].lr == pytest.approx(0.005)
    peer.wait_for(lambda ms: isinstance(ms[-1], Bye))  # on_train_end closed the client
    assert callback.client is None


def test_the_hello_reply_sets_the_lr_before_the_first_epoch(peer: ScriptedPeer) -> None:
    peer.lr = 0.002  # e.g. the policy's initial_lr
    history = fit(make_model(), LRPilotCallback(job="job-a", endpoint=peer.endpoint), epochs=2)
    assert history.history["learning_rate"] == pytest.approx([0.002, 0.002])


def test_a_push_applies_at_the_next_epoch_begin(peer: ScriptedPeer) -> None:
    override = peer.lr_message(None, 2, lr=0.03, version=5, reason="override")
    peer.handler = lambda identity, message: [*peer.answer(identity, message), override]
    history = fit(make_model(), LRPilotCallback(job="job-a", endpoint=peer.endpoint))
    assert history.history["learning_rate"][:2] == pytest.approx([0.01, 0.01])
    assert history.history["learning_rate"][2:] == pytest.approx([0.03, 0.03])


def test_a_learning_rate_schedule_is_an_error_naming_the_fix(peer: ScriptedPeer) -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.9)
    model = make_model(keras.optimizers.SGD(learning_rate=schedule))
    with pytest.raises(ValueError, match=r"float learning rate.*Adam\(learning_rate=1e-3\)"):
        fit(model, LRPilotCallback(job="job-a", endpoint=peer.endpoint))
    assert peer.messages == []  # refused before saying anything


def test_initial_epoch_resumes_the_run(peer: ScriptedPeer) -> None:
    fit(
        make_model(),
        LRPilotCallback(job="job-a", endpoint=peer.endpoint),
        initial_epoch=3,
        epochs=5,
    )
    hello = peer.of_type(Hello)[0]
    assert hello.start_epoch == 3 and hello.start_step == 0
    assert [r.epoch for r in peer.of_type(Report)] == [3, 4]


def test_an_absent_controller_leaves_the_lr_alone() -> None:
    callback = LRPilotCallback(job="job-a", endpoint=free_endpoint(), timeout=0.3)
    history = fit(make_model(), callback)
    assert history.history["learning_rate"] == pytest.approx([0.01] * 4)
    assert len(history.history["loss"]) == 4


def test_stop_action_stops_training(peer: ScriptedPeer) -> None:
    def stop_after_1(identity: bytes, message: Any) -> list[Any]:
        if isinstance(message, Report) and message.epoch == 1:
            return [peer.lr_message(message.seq, 2, version=2, reason="plateau", action="stop")]
        return peer.answer(identity, message)

    peer.handler = stop_after_1
    history = fit(make_model(), LRPilotCallback(job="job-a", endpoint=peer.endpoint), epochs=10)
    assert len(history.history["loss"]) == 2


def test_unit_step_reports_every_n_steps_and_applies_from_the_next_step(
    peer: ScriptedPeer,
) -> None:
    peer.decide = lambda r: 0.004 if r.step is not None and r.step >= 3 else None
    callback = LRPilotCallback(job="job-a", endpoint=peer.endpoint, unit="step", report_every=2)
    model = make_model()
    history = fit(model, callback, epochs=3)  # 3 batches of training data per epoch: 9 steps
    reports = peer.of_type(Report)
    assert [r.step for r in reports] == [1, 3, 5, 7]
    assert [r.epoch for r in reports] == [0, 1, 1, 2]
    assert "loss" in reports[0].metrics
    # Replies are not waited for; the one for step 3 has arrived by the end of training.
    assert history.history["learning_rate"][-1] == pytest.approx(0.004)


def test_bad_arguments_fail_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LRPILOT_JOB", raising=False)
    with pytest.raises(ValueError, match=r"job=.*LRPILOT_JOB"):
        LRPilotCallback()
    with pytest.raises(ValueError, match="unit"):
        LRPilotCallback(job="j", unit="batch")
    with pytest.raises(ValueError, match="report_every"):
        LRPilotCallback(job="j", unit="step", report_every=0)


def test_a_second_fit_says_hello_again_with_a_new_session(peer: ScriptedPeer) -> None:
    model = make_model()
    callback = LRPilotCallback(job="job-a", endpoint=peer.endpoint)
    fit(model, callback, epochs=2)
    fit(model, callback, epochs=1)  # the compiled metrics are built by now
    first, second = peer.of_type(Hello)
    assert first.session != second.session
    assert second.start_epoch == 0 and second.start_step == 6  # 3 steps per epoch so far
    assert first.directions == second.directions


class CountingSGD(keras.optimizers.SGD):  # type: ignore[misc]
    """A real SGD that counts reads of `iterations` and assignments of `learning_rate`."""

    reads = 0
    sets = 0

    @property
    def iterations(self) -> Any:
        CountingSGD.reads += 1
        return super().iterations

    @property
    def learning_rate(self) -> Any:
        return super().learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        CountingSGD.sets += 1
        keras.optimizers.SGD.learning_rate.fset(self, value)


def test_unit_step_reads_the_step_count_once_and_sets_the_lr_only_when_it_changes(
    peer: ScriptedPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tensorflow as tf

    peer.lr = 0.25  # exact in float32, as the optimizer holds it: no set for the same LR
    peer.decide = lambda r: 0.125 if r.step is not None and r.step >= 15 else None
    model = make_model(CountingSGD(learning_rate=0.25))
    fit(model, keras.callbacks.Callback(), epochs=1)  # builds and traces the model
    CountingSGD.reads = CountingSGD.sets = 0
    fit(model, keras.callbacks.Callback(), epochs=3)
    by_keras = CountingSGD.reads  # what fit itself reads
    CountingSGD.reads = CountingSGD.sets = 0
    # The callback writes the LR variable with one AssignVariableOp (not the setter's ~110 µs
    # of Python): count those.
    writes: list[float] = []
    assign = tf.raw_ops.AssignVariableOp

    def counted(resource: Any, value: Any, **kwargs: Any) -> Any:
        writes.append(float(value))
        return assign(resource=resource, value=value, **kwargs)

    monkeypatch.setattr(tf.raw_ops, "AssignVariableOp", counted)
    callback = LRPilotCallback(job="job-a", endpoint=peer.endpoint, unit="step")
    history = fit(model, callback, epochs=3)  # 9 more steps, each reported
    assert [r.step for r in peer.of_type(Report)] == list(range(12, 21))  # counted from 12
    assert CountingSGD.reads == by_keras + 1  # once, for the hello
    assert writes == [0.125] and CountingSGD.sets == 0  # the one change, 0.25 -> 0.125
    assert history.history["learning_rate"][-1] == pytest.approx(0.125)
    assert float(model.optimizer.learning_rate) == 0.125  # what Keras itself reads


def test_unit_step_against_a_real_controller_decides_every_step(
    controller_factory: Callable[..., Controller],
) -> None:
    c = controller_factory(
        "version: 1\ndefaults:\n  policy: {type: step, factor: 0.5, step_size: 4, unit: step}\n"
    )
    model = make_model(keras.optimizers.SGD(learning_rate=0.25))
    callback = LRPilotCallback(job="steps", endpoint=c.bind, unit="step")
    fit(model, callback, epochs=3)  # 9 steps; the end of fit waits for the last answers
    assert c.metric("lrpilot_reports_total", training_job="steps") == 9
    out = run_cli("history", "steps", "--json", "--admin", c.admin)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    # The schedule is a plan: audited once, when it starts, and evaluated by the callback at
    # every step (0.25 for steps 0-3, 0.125 for 4-7, 0.0625 from step 8).
    assert [r["reason"] for r in rows] == ["initial"]
    assert rows[0]["detail"].startswith("plan ") and '"kind":"step"' in rows[0]["detail"]
    assert float(model.optimizer.learning_rate) == pytest.approx(0.0625)
    assert callback.client is None


# -- LR range tests: snapshot and restore ------------------------------------------------------


class StateLog(keras.callbacks.Callback):  # type: ignore[misc]
    """After each batch (it runs after LRPilotCallback): the weights, the optimizer's
    variables and its LR."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[list[Any], list[Any], float]] = []

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.rows.append(state_of(self.model))


def state_of(model: Any) -> tuple[list[Any], list[Any], float]:
    optimizer = model.optimizer
    values = [np.array(v.numpy(), copy=True) for v in optimizer.variables]
    return model.get_weights(), values, float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def fit_many(model: Any, callbacks: list[Any], epochs: int) -> Any:
    """4 steps an epoch, no validation."""
    x, y = data()
    return model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks)


def test_a_restore_in_mid_epoch_puts_weights_and_adam_state_back_exactly(
    peer: ScriptedPeer,
) -> None:
    """unit="step": the restore decided on step 9 (the 2nd batch of the fit's 2nd epoch)
    applies before step 10; weights, Adam's moments, its step count and LR variable are as
    before the test, then the suggested LR is set, and the job's step count goes on."""
    peer.handler = range_test_handler(peer, stop_after=9, suggested=0.002)
    model = make_model(keras.optimizers.Adam(learning_rate=0.01))
    fit_many(model, [], epochs=1)  # Adam's state is not fresh: 4 steps
    before = state_of(model)
    log = StateLog()
    callback = LRPilotCallback(job="job-a", endpoint=peer.endpoint, unit="step")
    fit_many(model, [callback, log], epochs=3)  # steps 4..15

    weights, variables, lr = log.rows[9 - 4]  # after step 9 and its restore
    assert same(weights, before[0]) and same(variables[2:], before[1][2:])
    assert int(variables[0]) == 4  # Adam's iterations: as before the test
    assert lr == pytest.approx(0.002)  # the suggestion, not the restored 0.01
    assert not same(log.rows[8 - 4][0], before[0])  # the sweep did change them
    # Each LR of the sweep from the step after its report: the reports waited.
    assert [row[2] for row in log.rows[:5]] == pytest.approx(
        [1e-4 * 10 ** ((s + 1) / 4) for s in range(4, 9)]
    )
    assert [row[2] for row in log.rows[5:]] == pytest.approx([0.002] * 7)
    assert [r.step for r in peer.of_type(Report)] == list(range(4, 16))
    assert int(log.rows[-1][1][0]) == 4 + 6  # Adam counts on from the restored count


def test_an_epoch_range_test_restores_at_the_epoch_boundary(peer: ScriptedPeer) -> None:
    peer.handler = range_test_handler(peer, stop_after=2, suggested=0.003)
    model = make_model(keras.optimizers.SGD(learning_rate=0.01, momentum=0.9))
    before = state_of(model)
    seen: list[tuple[list[Any], list[Any], float]] = []
    at_begin = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: seen.append(state_of(model))
    )
    callback = LRPilotCallback(job="job-a", endpoint=peer.endpoint)
    history = fit_many(model, [callback, at_begin], epochs=5)
    lrs = history.history["learning_rate"]
    assert lrs[:3] == pytest.approx([1e-4, 1e-4 * 10**0.25, 1e-4 * 10**0.5])
    assert lrs[3:] == pytest.approx([0.003, 0.003])
    # The momentum slots did not exist before the first step: the snapshot built them.
    weights, variables, _ = seen[3]
    assert same(weights, before[0]) and len(variables) == len(before[1]) + 2
    assert int(variables[0]) == 0 and all(not v.any() for v in variables[2:])
    # The step count the controller hears goes on: a next fit says hello from step 20.
    fit_many(model, [callback], epochs=1)
    assert [h.start_step for h in peer.of_type(Hello)] == [0, 20]


def test_snapshot_and_restore_hooks_replace_the_copy_and_the_lr_is_set_after(
    peer: ScriptedPeer,
) -> None:
    """With hooks the callback copies nothing; after `restore_fn` it sets the suggested LR
    even when that equals the LR it set last (the restore may have changed the variable)."""
    calls: list[str] = []
    model = make_model(keras.optimizers.SGD(learning_rate=0.01))

    def restore() -> None:
        calls.append("restore")
        model.optimizer.learning_rate = 0.5  # as a checkpoint's LR variable would

    suggested = 1e-4 * 10**0.25  # the LR of step 1: the one the callback set last
    peer.handler = range_test_handler(peer, stop_after=1, suggested=suggested)
    callback = LRPilotCallback(
        job="job-a", endpoint=peer.endpoint, unit="step",
        snapshot_fn=lambda: calls.append("snapshot"), restore_fn=restore,
    )  # fmt: skip
    log = StateLog()
    fit_many(model, [callback, log], epochs=1)
    assert calls == ["snapshot", "restore"]
    assert [row[2] for row in log.rows] == pytest.approx([suggested] * 4)
    with pytest.raises(ValueError, match="go together"):
        LRPilotCallback(job="j", snapshot_fn=lambda: None)


def test_the_hello_says_the_callback_can_restore(peer: ScriptedPeer) -> None:
    fit(make_model(), LRPilotCallback(job="job-a", endpoint=peer.endpoint), epochs=1)
    assert [h.restore for h in peer.of_type(Hello)] == [True]


def test_during_a_range_test_each_step_reports_its_own_loss(peer: ScriptedPeer) -> None:
    """Batch-end logs hold the epoch's mean so far; the sweep needs each step's loss."""
    peer.handler = range_test_handler(peer, stop_after=9, suggested=1e-3)
    model = make_model(keras.optimizers.SGD(learning_rate=0.01))
    x, y = data()
    own: list[float] = []

    def before_step(batch: int, logs: Any) -> None:  # the loss the step computes
        rows = slice(16 * batch, 16 * (batch + 1))
        predicted = keras.ops.convert_to_numpy(model(x[rows]))
        own.append(float(np.mean((predicted - y[rows]) ** 2)))

    probe = keras.callbacks.LambdaCallback(on_train_batch_begin=before_step)
    callback = LRPilotCallback(job="job-a", endpoint=peer.endpoint, unit="step")
    history = model.fit(
        x, y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=[probe, callback]
    )
    reported = [r.metrics["loss"] for r in peer.of_type(Report)]
    assert reported[:10] == pytest.approx(own[:10], rel=1e-5)  # steps 0..9: the test
    # What the logs said at step 3: the mean of the epoch's 4 steps, not step 3's loss.
    assert history.history["loss"][0] == pytest.approx(np.mean(own[:4]), rel=1e-5)
    assert history.history["loss"][0] != pytest.approx(reported[3], rel=1e-2)
