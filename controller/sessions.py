"""Sessions of a job's ranks: who is a live worker, and which reports were already seen.

Pure and immutable: every function returns a new `Sessions`. A rank's
session is the 16 random bytes of its `Client` object; deduplication is per
(rank, session) on the report's `seq`, so a replayed report is decided once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ["Sessions", "Worker"]


@dataclass(frozen=True)
class Worker:
    """One rank's live session."""

    rank: int
    session: bytes
    last_seen: float
    host: str = ""
    pid: int = 0
    gone: bool = False
    plans: bool = False  # its hello said `plans: true`: it gets `lr.plan`

    def live(self, now: float, timeout: float) -> bool:
        return not self.gone and now - self.last_seen <= timeout


@dataclass(frozen=True)
class Sessions:
    """The ranks of one job: workers by rank, the last seq seen per session, and the ranks
    that reported in the current run (a hello at epoch 0 from one of them starts a new run).

    `workers` is in memory only; `seqs` and `reported` are stored with the job.
    """

    workers: Mapping[int, Worker] = field(default_factory=dict)
    seqs: Mapping[str, int] = field(default_factory=dict)
    reported: frozenset[int] = frozenset()

    def join(
        self,
        rank: int,
        session: bytes,
        now: float,
        host: str = "",
        pid: int = 0,
        plans: bool = False,
    ) -> Sessions:
        """A rank said hello; a new session of a rank replaces (and forgets) its old one."""
        seqs = dict(self.seqs)
        old = self.workers.get(rank)
        if old is not None and old.session != session:
            seqs.pop(old.session.hex(), None)
        seqs.setdefault(session.hex(), -1)
        workers = {**self.workers, rank: Worker(rank, session, now, host, pid, plans=plans)}
        return Sessions(workers, seqs, self.reported)

    def worker(self, rank: int, session: bytes) -> Worker | None:
        """The rank's worker if `session` is its current, not departed, session."""
        w = self.workers.get(rank)
        return w if w is not None and w.session == session and not w.gone else None

    def seen(self, session: bytes, seq: int) -> bool:
        """Whether the report `seq` of `session` (or a later one) was already seen."""
        return seq <= self.seqs.get(session.hex(), -1)

    def record(self, rank: int, session: bytes, seq: int, now: float, *, counts: bool) -> Sessions:
        """Remember `seq` and that the rank was heard from; `counts`: it joins the run."""
        w = self.workers[rank]
        workers = {**self.workers, rank: replace(w, last_seen=now)}
        seqs = {**self.seqs, session.hex(): max(seq, self.seqs.get(session.hex(), -1))}
        reported = self.reported | {rank} if counts and rank not in self.reported else self.reported
        return Sessions(workers, seqs, reported)

    def leave(self, rank: int, session: bytes) -> Sessions:
        w = self.worker(rank, session)
        if w is None:
            return self
        return replace(self, workers={**self.workers, rank: replace(w, gone=True)})

    def new_run(self) -> Sessions:
        """A new run: every seq and every reported rank is forgotten; workers stay."""
        return Sessions(self.workers, {}, frozenset())

    def live(self, now: float, timeout: float) -> list[Worker]:
        return [w for w in self.workers.values() if w.live(now, timeout)]

    def finished(self) -> bool:
        """Every rank that said hello has said bye: the job ended normally."""
        return bool(self.workers) and all(w.gone for w in self.workers.values())
