"""What the client has to send, and what it owes the controller: pure state, no sockets.

The `Outbox` keeps every report until the controller answers it (an `lr`, or an `error`
that sending it again cannot fix). Each kept report sits in one of two queues, in seq order:
waiting to go out (`unsent`), or sent in the current *generation* (`inflight`). A
generation ends when what was sent may be lost (a lost connection, `unknown_session`,
`unavailable`, a move to another endpoint): its unanswered reports go back to the front of
the send queue, and answers to its sends are stale. `error{code: "unavailable"}` holds
every send until a backoff has passed (1 s, doubling up to 30 s, reset by an answer).

Time is passed in (`now`, seconds of any monotonic clock), so tests drive the backoff and
the silence check with a clock of their own; `Client` is the socket shell around it.

Example:

    box = Outbox(stats=dict.fromkeys(STATS, 0))
    box.keep(Kept(1, epoch=0, step=None, metrics={"loss": 1.0}, lr=0.1, start_step=0))
    burst = box.burst(100)          # [the report]; the hello is due first (box.need_hello)
    box.hello_went(now=0.0, seq=0)
    box.went(len(burst), now=0.0)
    box.on_error("unavailable", 1, now=0.2)   # -> HOLD: nothing goes out before now=1.2
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import MutableMapping

__all__ = [
    "HOLD",
    "IGNORE",
    "MAX_KEPT",
    "REFUSED",
    "REPLAY",
    "RETRY_FIRST",
    "RETRY_MAX",
    "STATS",
    "Kept",
    "Outbox",
]

#: The most reports a client keeps unanswered; beyond it the oldest is dropped (and counted).
MAX_KEPT = 10_000
#: Backoff of resends after `unavailable`, in seconds: the first, and the cap of the doubling.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0

#: `Client.stats` keys, each counting one thing that happened.
STATS = (
    "sent",  # messages that went out, resends and hellos included
    "replies",  # lr messages received
    "timeouts",  # times the controller did not answer within `timeout`
    "invalid",  # frames that were not a valid message for this job
    "errors",  # error messages received
    "hellos",  # hellos sent
    "backpressure",  # sends refused by a full socket buffer while connected (the reports wait)
    "resent",  # reports sent again (after a reconnect, unknown_session, unavailable, a move)
    "dropped",  # reports given up unanswered: the oldest, when MAX_KEPT were kept
    "moved",  # `moved` replies followed to the endpoint they named
    "failovers",  # switches to the next endpoint because the current one was unreachable
    "retries",  # connection attempts that failed (the next is at most 1 s later)
    "rollbacks",  # a guard's `action: restore` applied (the loss spiked)
)

# What `Outbox.on_error` tells the shell to do.
IGNORE = "ignore"  # a stale answer: the report was answered already, or sent again since
HOLD = "hold"  # retryable: kept, nothing goes out until the backoff has passed (warn once)
REPLAY = "replay"  # the controller forgot the session: hello, then every kept report again
REFUSED = "refused"  # not retryable: the report (or hello) is given up (warn once)


class Kept:
    """A report kept until it is answered: what it says, and where a replay of it starts."""

    __slots__ = (
        "done",
        "epoch",
        "frame",
        "gen",
        "lr",
        "metrics",
        "owed",
        "seq",
        "start_step",
        "step",
    )

    def __init__(
        self,
        seq: int,
        epoch: int,
        step: int | None,
        metrics: dict[str, float],
        lr: float,
        start_step: int,
    ) -> None:
        self.seq = seq
        self.epoch = epoch
        self.step = step
        self.metrics = metrics
        self.lr = lr
        self.start_step = start_step  # a hello that replays this report starts at this step
        self.frame = b""  # encoded when first sent: a burst is encoded together, warm
        self.gen = -1  # the send generation it last went out in; -1: not sent yet
        self.done = False  # answered or dropped; skipped where it still sits in a queue
        self.owed = 0  # answers still due to sends from before a replay: each is stale


class Outbox:
    """The kept reports, the hello that must precede them, and the `unavailable` backoff.

    Args:
        stats: the counters to update (`resent`, `dropped`); `Client.stats`.
        max_kept: the most reports kept; beyond it the oldest is dropped.
        retry_first, retry_max: the `unavailable` backoff, in seconds.
    """

    def __init__(
        self,
        stats: MutableMapping[str, int],
        max_kept: int = MAX_KEPT,
        retry_first: float = RETRY_FIRST,
        retry_max: float = RETRY_MAX,
    ) -> None:
        self.stats = stats
        self.max_kept = max_kept
        self.retry_first, self.retry_max = retry_first, retry_max
        self.kept: dict[int, Kept] = {}
        self.unsent: deque[Kept] = deque()
        self.inflight: deque[Kept] = deque()
        self.gen = 0
        self.need_hello = True  # say hello before the next report
        self.hello_sent = False  # ever: then close() says bye
        self.hello_answered = False  # the last hello
        self.rehello_seq = 0  # the newest seq when the last hello went out
        self.retry_at = 0.0  # > 0: after `unavailable`, nothing is sent until then
        self.backoff = retry_first
        self.silent_since: float | None = None  # the first send since last heard from

    # -- what there is ---------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of reports kept unanswered."""
        return len(self.kept)

    def wants_to_send(self) -> bool:
        """A hello or a report waits to go out, and no backoff holds it."""
        return bool(self.unsent or self.need_hello) and not self.retry_at

    def hello_start(self, epoch: int, step: int) -> tuple[int, int]:
        """(start_epoch, start_step) of the next hello: the oldest kept report's (a replay
        starts there), else where training is (`epoch`, `step`)."""
        for queue in (self.inflight, self.unsent):
            oldest = next((k for k in queue if not k.done), None)
            if oldest is not None:
                return oldest.epoch, oldest.start_step
        return epoch, step

    def burst(self, budget: int) -> list[Kept]:
        """Up to `budget` reports to send next, in order (the hello goes first)."""
        queue = self.unsent
        while queue and queue[0].done:
            queue.popleft()
        return [kept for kept in itertools.islice(queue, budget) if not kept.done]

    def silent_for(self, now: float) -> float:
        """Seconds since the first send the controller has not answered yet (0: none)."""
        return 0.0 if self.silent_since is None else now - self.silent_since

    # -- events ----------------------------------------------------------------------------

    def keep(self, kept: Kept) -> bool:
        """A new report. Returns True when it pushed the oldest kept one out (dropped)."""
        self.kept[kept.seq] = kept
        self.unsent.append(kept)
        if len(self.kept) <= self.max_kept:
            return False
        for queue in (self.inflight, self.unsent):
            while queue:
                oldest = queue.popleft()
                if not oldest.done:
                    oldest.done = True
                    del self.kept[oldest.seq]
                    self.stats["dropped"] += 1
                    return True
        return False  # pragma: no cover - more kept than queued cannot happen

    def hello_went(self, now: float, seq: int) -> None:
        """The hello went out; `seq` is the newest report seq at that moment."""
        self.need_hello = False
        self.hello_sent = True
        self.hello_answered = False
        self.rehello_seq = seq
        self.sent_something(now)

    def went(self, count: int, now: float) -> None:
        """The first `count` reports of the last `burst` went out, in this generation."""
        if count <= 0:
            return
        self.sent_something(now)
        queue, inflight, gen = self.unsent, self.inflight, self.gen
        while count:
            kept = queue.popleft()
            if kept.done:
                continue
            if kept.gen >= 0:
                self.stats["resent"] += 1
            kept.gen = gen
            inflight.append(kept)
            count -= 1

    def sent_something(self, now: float) -> None:
        if self.silent_since is None:
            self.silent_since = now

    def heard(self) -> None:
        """Any message from the controller: it is alive, the silence ends."""
        self.silent_since = None

    def tick(self, now: float) -> None:
        """A held backoff that has passed releases the kept reports for sending again."""
        if self.retry_at and now >= self.retry_at:
            self.retry_at = 0.0
            self.rewind()

    def lost(self) -> None:
        """The connection is gone (or replaced): hello again, resend what was in flight."""
        self.need_hello = True
        self.silent_since = None
        self.rewind()

    def rewind(self) -> None:
        """What is in flight may be lost: a new generation resends it, oldest first."""
        self.gen += 1
        live = [k for k in self.inflight if not k.done]
        self.inflight.clear()
        self.unsent.extendleft(reversed(live))

    def answered(self, seq: int | None) -> None:
        """An `lr` answering report `seq` (None: the hello, or a push)."""
        if seq is None:
            self.hello_answered = True
            return
        self.backoff = self.retry_first
        self._forget(seq)

    def _forget(self, seq: int) -> None:
        kept = self.kept.pop(seq, None)
        if kept is None:
            return
        kept.done = True
        inflight = self.inflight
        while inflight and inflight[0].done:
            inflight.popleft()
        if len(inflight) > 2 * len(self.kept) + 64:  # answered out of order behind a laggard
            self.inflight = deque(k for k in inflight if not k.done)

    def on_error(self, code: str, seq: int | None, retryable: bool, now: float) -> str:
        """An `error` reply to report `seq` (None: to the hello): what the shell does next,
        one of IGNORE, HOLD, REPLAY, REFUSED. The outbox has already done its part."""
        if seq is None:  # the hello was refused
            self.hello_answered = True
            if retryable:
                self.need_hello, self.rehello_seq = True, 0
                self.hold(now)
                return HOLD
            return REFUSED
        kept = self.kept.get(seq)
        if kept is None:
            return IGNORE  # answered already
        if kept.owed:
            # The answer to a send from before the last replay: the controller answers every
            # send, and a report's answers come in the order it was sent.
            kept.owed -= 1
            return IGNORE
        if kept.gen < self.gen:
            return IGNORE  # sent again since (after a lost connection or a backoff)
        if retryable:
            self.hold(now)
            return HOLD
        if code == "unknown_session" and kept.seq > self.rehello_seq:
            # The controller forgot this session (it restarted): hello from the oldest kept
            # report, then everything kept again. A report kept at that hello and refused
            # again is given up, so a controller that forgets every time cannot loop us.
            self.need_hello = True
            for other in self.inflight:
                if other is not kept and not other.done:
                    other.owed += 1  # its refusal may still come, after it is sent again
            self.rewind()
            return REPLAY
        self._forget(seq)
        return REFUSED

    def hold(self, now: float) -> None:
        """Send nothing until the backoff has passed, then resend it all."""
        if not self.retry_at:
            self.retry_at = now + self.backoff
            self.backoff = min(2 * self.backoff, self.retry_max)
