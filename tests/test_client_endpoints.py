"""Several controllers: endpoint lists, `moved` redirects and failover (DESIGN.md "Scale-out
and failover"). Scripted ROUTER peers for exact conversations, real `lrpilot serve`
processes (SIGKILL) for the end-to-end cases; the client's timers run on a test clock where
the test drives them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Clock, Controller, run_cli
from test_client import SLACK, Out, ScriptedPeer, free_endpoint, until

from lrpilot.client import Client
from lrpilot.client.env import endpoint_list
from lrpilot.client.protocol import ClientMessage, ErrorMessage, Hello, Report

PLATEAU = (
    "version: 1\ndefaults:\n"
    "  policy: {type: plateau, monitor: val_loss, factor: 0.5, patience: 1, min_delta: 0.0}\n"
)
LOSSES = [1.0, 0.9, 0.95, 0.97, 0.8, 0.85, 0.9, 0.7, 0.75, 0.8]


@pytest.fixture
def peers() -> Iterator[Callable[[], ScriptedPeer]]:
    made: list[ScriptedPeer] = []

    def make() -> ScriptedPeer:
        made.append(ScriptedPeer())
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(endpoint: str, **kwargs: Any) -> Client:
        kwargs.setdefault("job", "job-a")
        kwargs.setdefault("rank", 0)
        kwargs.setdefault("world", 1)
        kwargs.setdefault("initial_lr", 0.1)
        made.append(Client(endpoint, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def moved_to(target: str) -> Callable[[bytes, ClientMessage], list[Out]]:
    """A controller that owns no job: every hello and report is answered `moved`."""

    def handler(identity: bytes, message: ClientMessage) -> list[Out]:
        if isinstance(message, Hello | Report):
            seq = message.seq if isinstance(message, Report) else None
            return [ErrorMessage("moved", "not mine", seq, endpoint=target).to_wire()]
        return []

    return handler


# -- the list -----------------------------------------------------------------------------------


def test_an_endpoint_list_is_comma_separated_in_order_without_repeats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert endpoint_list(" tcp://a:1, tcp://b:2,,tcp://a:1 ") == ["tcp://a:1", "tcp://b:2"]
    assert endpoint_list(["tcp://a:1", "ipc:///tmp/x"]) == ["tcp://a:1", "ipc:///tmp/x"]
    monkeypatch.setenv("LRPILOT_ENDPOINT", "tcp://a:1,tcp://b:2")
    assert endpoint_list() == ["tcp://a:1", "tcp://b:2"]
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        endpoint_list("tcp://a:1,b:2")
    with pytest.raises(ValueError, match="no endpoint"):
        endpoint_list(" , ")
    with pytest.raises(ValueError, match="endpoint"):
        Client("tcp://127.0.0.1:1,nonsense", job="j", initial_lr=0.1)


def test_the_first_endpoint_that_accepts_is_used_within_the_timeout(
    peers: Callable[[], ScriptedPeer], clients: Callable[..., Client]
) -> None:
    peer = peers()
    start = time.monotonic()
    c = clients(f"{free_endpoint()},{peer.endpoint}", timeout=1.0)
    assert time.monotonic() - start < 1.0 + SLACK  # the dead one had its share only
    assert c.online and c.endpoint == peer.endpoint and c.stats["failovers"] == 1
    assert c.report(0, {"loss": 1.0}) == 0.1
    assert [type(m) for m in peer.messages] == [Hello, Report]


def test_no_endpoint_answering_costs_one_timeout_and_training_goes_on(
    clients: Callable[..., Client],
) -> None:
    start = time.monotonic()
    c = clients(f"{free_endpoint()},{free_endpoint()}", timeout=0.4)
    assert time.monotonic() - start < 0.4 + SLACK
    assert not c.online and c.report(0, {"loss": 1.0}) == 0.1 and c.unanswered == 1


# -- moved ----------------------------------------------------------------------------------------


def test_moved_is_followed_and_the_kept_reports_are_replayed_there(
    peers: Callable[[], ScriptedPeer], clients: Callable[..., Client]
) -> None:
    a, b = peers(), peers()
    # One database behind both: b's versions go on from a's.
    b.lr, b.version, b.decide = 0.2, 5, (lambda r: 0.05 if r.epoch == 3 else None)

    def hands_over_at_epoch_2(identity: bytes, message: ClientMessage) -> list[Out]:
        if isinstance(message, Report) and message.epoch >= 2:
            return moved_to(b.endpoint)(identity, message)
        return a.answer(identity, message)

    a.handler = hands_over_at_epoch_2
    c = clients(a.endpoint)
    assert c.report(0, {"val_loss": 1.0}) == 0.1
    assert c.report(1, {"val_loss": 0.9}) == 0.1
    assert c.report(2, {"val_loss": 0.8}) == 0.2  # moved, said hello at b, resent, answered
    assert c.report(3, {"val_loss": 0.7}) == 0.05
    assert c.endpoint == b.endpoint and c.endpoints == [a.endpoint, b.endpoint]
    assert c.stats["moved"] == 1 and c.stats["resent"] == 1 and c.online
    hello, *reports = b.messages
    assert isinstance(hello, Hello) and hello.start_epoch == 2  # from the oldest kept report
    assert [(r.seq, r.epoch) for r in reports] == [(3, 2), (4, 3)]  # type: ignore[union-attr]
    assert hello.session == c.session  # the same session: the controller deduplicates


def test_controllers_pointing_at_each_other_cost_at_most_one_timeout(
    peers: Callable[[], ScriptedPeer], clients: Callable[..., Client]
) -> None:
    a, b = peers(), peers()
    c = clients(a.endpoint, timeout=1.0)  # a answers the hello
    a.handler, b.handler = moved_to(b.endpoint), moved_to(a.endpoint)
    start = time.monotonic()
    assert c.report(0, {"loss": 1.0}) == 0.1
    assert time.monotonic() - start < 1.0 + SLACK
    # Eight hops at most (fewer when the timeout comes first on a busy machine), then it backs
    # off as on `unavailable`.
    assert 1 <= c.stats["moved"] <= 8 and c.unanswered == 1


def test_a_real_controller_behind_a_moved_redirect_decides_as_if_reached_directly(
    controller_factory: Callable[..., Controller],
    peers: Callable[[], ScriptedPeer],
    clients: Callable[..., Client],
) -> None:
    c = controller_factory(PLATEAU)
    redirect = peers()
    redirect.handler = moved_to(c.bind)  # e.g. a controller that does not own the shard
    moved = clients(redirect.endpoint, job="moved")
    direct = clients(c.bind, job="direct")
    for epoch, loss in enumerate(LOSSES):
        assert moved.report(epoch, {"val_loss": loss}) == direct.report(epoch, {"val_loss": loss})
    assert moved.stats["moved"] == 1 and moved.endpoint == c.bind
    assert _changes(c, "moved") == _changes(c, "direct") and len(_changes(c, "moved")) >= 2


# -- failover -------------------------------------------------------------------------------------


def test_an_unreachable_controller_fails_over_to_the_next_after_the_timeout(
    peers: Callable[[], ScriptedPeer], clients: Callable[..., Client]
) -> None:
    a, b = peers(), peers()
    clock = Clock()
    c = clients(f"{a.endpoint},{b.endpoint}", timeout=1.0, clock=clock)
    c.report(0, {"loss": 1.0})
    a.close()  # the controller is gone
    until(lambda: c.poll() is not None and not c.online)  # the client saw the connection go
    for epoch in (1, 2):
        assert c.report(epoch, {"loss": 1.0}) == 0.1  # kept; no wait while offline
    clock.t += 0.999
    c.poll()
    assert c.stats["failovers"] == 0 and c.endpoint == a.endpoint  # a may be restarting
    clock.t += 0.001
    c.poll()
    assert c.stats["failovers"] == 1 and c.endpoint == b.endpoint
    until(lambda: c.poll() is not None and c.unanswered == 0)
    hello, *reports = b.messages
    assert isinstance(hello, Hello) and hello.start_epoch == 1
    assert [r.epoch for r in reports] == [1, 2]  # type: ignore[union-attr]
    assert c.online and c.stats["timeouts"] == 0


def test_a_controller_that_stops_answering_costs_one_timeout_then_the_next_answers(
    peers: Callable[[], ScriptedPeer], clients: Callable[..., Client]
) -> None:
    a, b = peers(), peers()
    c = clients(f"{a.endpoint},{b.endpoint}", timeout=0.3)
    a.handler = lambda identity, message: []  # connected, but hung (e.g. SIGSTOP)
    start = time.monotonic()
    assert c.report(0, {"loss": 1.0}) == 0.1
    assert time.monotonic() - start < 0.3 + SLACK
    assert c.stats["timeouts"] == 1 and c.stats["failovers"] == 1 and c.endpoint == b.endpoint
    assert c.flush(timeout=10)  # the kept report, replayed at b
    assert [(type(m), getattr(m, "seq", None)) for m in b.messages] == [(Hello, None), (Report, 1)]
    assert c.online


def test_kill_9_of_one_real_controller_fails_over_to_the_other(
    controller_factory: Callable[..., Controller], clients: Callable[..., Client], tmp_path: Any
) -> None:
    first = controller_factory(PLATEAU, state_dir=tmp_path / "a")
    second = controller_factory(PLATEAU, state_dir=tmp_path / "b")
    c = clients(f"{first.bind},{second.bind}", job="failover", timeout=0.5)
    for epoch in range(4):
        c.report(epoch, {"val_loss": LOSSES[epoch]})
    assert c.endpoint == first.bind and c.unanswered == 0
    first.kill()  # SIGKILL
    start = time.monotonic()
    for epoch in range(4, 8):  # training goes on, the reports are kept
        c.report(epoch, {"val_loss": LOSSES[epoch]})
    assert time.monotonic() - start < 0.5 + SLACK  # one timeout at most, then no waits
    assert c.flush(timeout=10)  # fails over, says hello at the second, replays
    assert c.endpoint == second.bind and c.stats["failovers"] == 1 and c.online
    status = json.loads(run_cli("status", "--json", "--admin", second.admin).stdout)
    assert [(j["job"], j["epoch"]) for j in status] == [("failover", 7)]


def _changes(c: Controller, job: str) -> list[tuple[int, float]]:
    out = run_cli("history", job, "--json", "--admin", c.admin)
    assert out.returncode == 0, out.stderr
    return [(r["epoch"], r["new_lr"]) for r in json.loads(out.stdout) if r["reason"] != "initial"]
