"""The adapter core every framework adapter stands on, without a framework: the unit's
cadence, snapshot/restore and stop, against a scripted controller (real sockets)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_client import ScriptedPeer, until

from lrpilot.client.adapter import AdapterCore
from lrpilot.client.protocol import Hello, Report


@pytest.fixture
def peer() -> Iterator[ScriptedPeer]:
    p = ScriptedPeer()
    yield p
    p.close()


def core(peer: ScriptedPeer, **kwargs: Any) -> AdapterCore:
    kwargs.setdefault("unit", "step")
    kwargs.setdefault("report_every", 1)
    return AdapterCore(
        job="job-a", endpoint=peer.endpoint, timeout=1.0, strict=False, framework="test",
        **kwargs,
    )  # fmt: skip


class Copy:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        log.append("copied")

    def restore(self) -> None:
        self.log.append("restored")


def test_step_reports_go_out_every_report_every_steps_and_metrics_are_read_only_then(
    peer: ScriptedPeer,
) -> None:
    c = core(peer, report_every=4)
    c.connect(initial_lr=0.1, start_epoch=0, rank=0, world=1)
    reads: list[int] = []

    def metrics(step: int) -> dict[str, float]:
        reads.append(step)
        return {"loss": 1.0}

    for step in range(10):
        c.step_end(0, step, step, lambda s=step: metrics(s))  # type: ignore[misc]
    # Several steps at once (Keras' steps_per_execution): one report when a multiple is passed.
    c.step_end(0, 13, 10, lambda: metrics(13))
    assert reads == [3, 7, 13]
    assert c.client is not None and c.client.flush(timeout=10)
    assert [m.step for m in peer.of_type(Report)] == [3, 7, 13]
    c.close()
    assert c.client is None


def test_snapshot_then_restore_with_the_framework_copy_and_the_lr_after_it(
    peer: ScriptedPeer,
) -> None:
    log: list[str] = []
    c = core(peer)
    client = c.connect(
        initial_lr=0.1, start_epoch=0, rank=0, world=1,
        copy=lambda: Copy(log), after_snapshot=lambda: log.append("after snapshot"),
        before_restore=lambda: log.append("before restore"),
        after_restore=lambda: log.append(f"after restore, lr {client.lr}"),
    )  # fmt: skip
    assert peer.of_type(Hello)[0].restore  # the hello says this process can restore
    peer.push(peer.lr_message(None, None, 1, lr=1e-4, version=2, action="snapshot"))
    peer.push(peer.lr_message(None, None, 3, lr=0.05, version=3, action="restore"))
    until(lambda: client.poll(step=0) is not None and client.stats["replies"] == 3)
    assert c.begin(step=2) == 1e-4 and c.testing and log == ["copied", "after snapshot"]
    assert c.begin(step=3) == 0.05  # the restore ran first, then the LR changed
    assert log[2:] == ["before restore", "restored", "after restore, lr 0.0001"]
    assert c.restored and not c.testing and c.snapshot is None
    c.close()


def test_the_users_snapshot_fn_replaces_the_copy_and_no_copy_is_a_warning(
    peer: ScriptedPeer, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    c = core(
        peer, snapshot_fn=lambda: calls.append("snap"), restore_fn=lambda: calls.append("back")
    )
    c.connect(initial_lr=0.1, start_epoch=0, copy=lambda: Copy(calls))
    c._snapshot()
    assert c.testing and calls == ["snap"]
    c._restore()
    assert calls == ["snap", "back"] and c.restored
    bare = core(peer)
    bare.connect(initial_lr=0.1, start_epoch=0)
    assert not peer.of_type(Hello)[-1].restore  # no copy, no snapshot_fn: cannot restore
    bare._restore()
    assert not bare.restored and "kept no copy" in caplog.text
    c.close()
    bare.close()


def test_stop_is_seen_by_every_adapter_through_the_core(peer: ScriptedPeer) -> None:
    c = core(peer, unit="epoch")
    c.connect(initial_lr=0.1, start_epoch=0, rank=0, world=1)
    assert not c.stop_requested
    peer.handler = lambda identity, m: (
        [peer.lr_message(m.seq, m.epoch + 1, lr=0.01, version=2, action="stop")]
        if isinstance(m, Report)
        else peer.answer(identity, m)
    )
    assert c.epoch_end(0, {"val_loss": 1.0}) == 0.01
    assert c.stop_requested
    c.close()
    assert not c.stop_requested
