"""The client's protocol state without sockets: the Outbox and the Decisions, driven by
events and a clock the test holds (no sleeps, no wall-clock windows)."""

from __future__ import annotations

import random

import pytest

from lrpilot.client.decisions import Decisions
from lrpilot.client.outbox import (
    HOLD,
    IGNORE,
    REFUSED,
    REPLAY,
    RETRY_FIRST,
    RETRY_MAX,
    STATS,
    Kept,
    Outbox,
)
from lrpilot.client.protocol import LrMessage


def box(max_kept: int = 10_000) -> Outbox:
    return Outbox(dict.fromkeys(STATS, 0), max_kept=max_kept)


def kept(seq: int, epoch: int = 0, step: int | None = None) -> Kept:
    return Kept(seq, epoch, step, {"loss": 1.0}, 0.1, step if step is not None else 0)


def send_all(b: Outbox, now: float) -> list[int]:
    """What a connected shell would send now: the hello if due, then every queued report."""
    if b.need_hello:
        b.hello_went(now, max(b.kept, default=0))
    burst = b.burst(1000)
    b.went(len(burst), now)
    return [k.seq for k in burst]


def test_unavailable_holds_every_send_for_1_then_2_then_4_s_and_an_answer_resets_it() -> None:
    b = box()
    for seq in (1, 2):
        b.keep(kept(seq, epoch=seq - 1))
    now = 100.0
    assert send_all(b, now) == [1, 2]
    waits = []
    for _ in range(7):  # the disk stays full for seven deliveries
        assert b.on_error("unavailable", 1, retryable=True, now=now) == HOLD
        held_until = b.retry_at
        # The second refusal of the same delivery holds no longer.
        assert b.on_error("unavailable", 2, retryable=True, now=now + 0.1) == HOLD
        assert b.retry_at == held_until
        waits.append(held_until - now)
        b.tick(held_until - 1e-9)
        assert not b.wants_to_send() and b.burst(10) == []  # held: nothing goes out
        b.tick(held_until)
        assert b.wants_to_send()
        now = held_until
        assert send_all(b, now) == [1, 2]  # everything again, in order
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert (RETRY_FIRST, RETRY_MAX) == (1.0, 30.0)
    assert b.stats["resent"] == 2 * 7
    b.answered(1)
    b.answered(2)
    assert len(b) == 0 and b.backoff == RETRY_FIRST


def test_answers_to_an_older_generation_are_stale() -> None:
    b = box()
    b.keep(kept(1))
    send_all(b, 0.0)
    b.lost()  # the connection dropped: a new generation resends report 1
    assert b.need_hello and b.burst(10)[0].seq == 1
    send_all(b, 1.0)
    b.rewind()  # e.g. a move: again
    assert b.on_error("unknown_session", 1, retryable=False, now=2.0) == IGNORE
    send_all(b, 2.0)
    assert b.on_error("schema", 1, retryable=False, now=3.0) == REFUSED
    assert len(b) == 0  # a refused report is given up


def test_unknown_session_replays_from_the_oldest_once_then_gives_up() -> None:
    b = box()
    send_all(b, 0.0)  # the hello, before any report
    for seq in range(1, 6):
        b.keep(kept(seq, epoch=0, step=10 + seq - 1))
    send_all(b, 0.0)
    b.answered(None)  # the hello's answer comes before the reports'
    b.answered(1)
    b.answered(2)
    assert b.on_error("unknown_session", 3, retryable=False, now=0.1) == REPLAY
    assert b.need_hello and b.hello_start(epoch=9, step=99) == (0, 12)  # from report 3
    assert send_all(b, 0.2) == [3, 4, 5]
    # Refusals of 4 and 5 sent before the hello, arriving after the replay went out (even
    # after the answers to the replay's hello and to 3, as a controller may send them): stale.
    b.answered(None)
    assert b.on_error("unknown_session", 4, retryable=False, now=0.25) == IGNORE
    assert b.on_error("unknown_session", 5, retryable=False, now=0.25) == IGNORE
    # The controller forgets again: reports kept at that hello are given up, no loop.
    assert b.on_error("unknown_session", 3, retryable=False, now=0.3) == REFUSED
    assert sorted(b.kept) == [4, 5]
    b.answered(4)
    b.answered(5)
    assert len(b) == 0 and b.stats["resent"] == 3


def test_beyond_max_kept_the_oldest_is_dropped_and_counted() -> None:
    b = box(max_kept=3)
    dropped = [b.keep(kept(seq)) for seq in range(1, 6)]
    assert dropped == [False, False, False, True, True]
    assert sorted(b.kept) == [3, 4, 5] and b.stats["dropped"] == 2
    assert send_all(b, 0.0) == [3, 4, 5]


def test_silence_is_measured_from_the_first_unanswered_send() -> None:
    b = box()
    assert b.silent_for(5.0) == 0.0
    b.keep(kept(1))
    send_all(b, 5.0)
    b.keep(kept(2))
    send_all(b, 5.5)
    assert b.silent_for(6.25) == 1.25  # from the hello's send, not the latest
    b.heard()
    assert b.silent_for(7.0) == 0.0


def test_a_refused_hello_is_retried_only_when_retryable() -> None:
    b = box()
    send_all(b, 0.0)
    assert b.on_error("unavailable", None, retryable=True, now=1.0) == HOLD
    assert b.need_hello and b.retry_at == 2.0
    b.tick(2.0)
    send_all(b, 2.0)
    assert b.on_error("max_jobs", None, retryable=False, now=3.0) == REFUSED
    assert not b.need_hello and b.hello_answered


@pytest.mark.parametrize("seed", range(20))
def test_any_order_of_answers_losses_and_holds_answers_each_report_once(seed: int) -> None:
    """Random event sequences: every kept report goes out again until answered, never
    after; the queues stay in seq order."""
    rng = random.Random(seed)
    b = box(max_kept=50)
    now, seq, answered = 0.0, 0, set()
    for _ in range(400):
        now += rng.uniform(0, 0.5)
        event = rng.random()
        if event < 0.4:
            seq += 1
            b.keep(kept(seq))
        elif event < 0.6 and b.wants_to_send():
            send_all(b, now)
        elif event < 0.8 and b.inflight:
            target = rng.choice([k.seq for k in b.inflight if not k.done] or [0])
            if target in b.kept:
                b.answered(target)
                answered.add(target)
        elif event < 0.9:
            b.lost()
        else:
            b.tick(now)
        for queue in (b.unsent, b.inflight):
            live = [k.seq for k in queue if not k.done]
            assert live == sorted(live)
        assert not answered & set(b.kept)
        assert set(b.kept) == {k.seq for q in (b.unsent, b.inflight) for k in q if not k.done}


# -- decisions --------------------------------------------------------------------------------


def lr(
    value: float, version: int, *, run: int = 1, epoch: int | None = None, step: int | None = None,
    action: str | None = None,
) -> LrMessage:  # fmt: skip
    return LrMessage(
        job="j", lr=value, version=version, run=run, reason="plateau", seq=None,
        apply_from_epoch=epoch, apply_from_step=step, action=action,
    )  # fmt: skip


def settle(d: Decisions, everything: bool = False) -> list[str | None]:
    actions = []
    for decision in d.due(everything):
        actions.append(decision.action)
        d.settle(decision)
    return actions


def test_a_decision_applies_at_its_boundary_not_before() -> None:
    d = Decisions(lr=0.1, epoch=0, step=0)
    assert d.accept(lr(0.05, 2, epoch=3))
    d.at(epoch=2)
    assert settle(d) == [] and d.lr == 0.1
    d.at(epoch=3)
    assert settle(d) == [None] and d.lr == 0.05


def test_older_versions_are_ignored_and_another_run_replaces_pending_ones() -> None:
    d = Decisions(lr=0.1, epoch=0, step=0)
    assert d.accept(lr(0.05, 3, epoch=5))
    assert not d.accept(lr(0.2, 2, epoch=1))  # older
    assert d.accept(lr(0.3, 1, run=2, epoch=1))  # a new run voids the pending one
    d.at(epoch=9)
    settle(d)
    assert d.lr == 0.3 and (d.run, d.version) == (2, 1)


def test_an_outdated_decision_changes_no_lr_but_its_action_still_happens() -> None:
    d = Decisions(lr=0.1, epoch=0, step=0)
    d.accept(lr(0.05, 2, epoch=5, action="snapshot"))  # received first, due later
    d.accept(lr(0.02, 3, epoch=3))  # an override, due earlier
    d.at(epoch=3)
    assert settle(d) == [None] and d.lr == 0.02
    d.at(epoch=5)
    assert settle(d) == ["snapshot"] and d.lr == 0.02 and d.last_action == "snapshot"


def test_stop_and_step_boundaries_and_apply_everything() -> None:
    d = Decisions(lr=0.1, epoch=0, step=0)
    d.accept(lr(0.04, 2, step=120, action="stop"))
    d.at(step=119)
    assert settle(d) == [] and not d.stop_requested
    assert settle(d, everything=True) == ["stop"] and d.stop_requested and d.lr == 0.04
