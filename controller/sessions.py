"""Sessions of a job's ranks: who is a live worker, and which reports were already seen.

Pure and immutable: every function returns a new `Sessions`. A rank's
session is the 16 random bytes of its `Client` object; deduplication is per
(rank, session) on the report's `seq`, so a replayed report is decided once.
The maps are persistent (`PMap`): a report of a 4096-rank job costs what one
of an 8-rank job does, instead of copying every rank's entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from .pmap import PMap

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

    workers: PMap[int, Worker] = field(default_factory=PMap)
    seqs: PMap[str, int] = field(default_factory=PMap)
    reported: PMap[int, bool] = field(default_factory=PMap)  # a set: the ranks are its keys

    @classmethod
    def restored(cls, seqs: Mapping[str, int], reported: Iterable[int]) -> Sessions:
        """The stored part of a job's sessions (workers are in memory only)."""
        return cls(PMap(), PMap(seqs), PMap((rank, True) for rank in reported))

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
        seqs = self.seqs
        old = self.workers.get(rank)
        if old is not None and old.session != session:
            seqs = seqs.delete(old.session.hex())
        if session.hex() not in seqs:
            seqs = seqs.set(session.hex(), -1)
        workers = self.workers.set(rank, Worker(rank, session, now, host, pid, plans=plans))
        return Sessions(workers, seqs, self.reported)

    def worker(self, rank: int, session: bytes) -> Worker | None:
        """The rank's worker if `session` is its current, not departed, session."""
        w = self.workers.get(rank)
        return w if w is not None and w.session == session and not w.gone else None

    def seen(self, session: bytes, seq: int) -> bool:
        """Whether the report `seq` of `session` (or a later one) was already seen."""
        last: int = self.seqs.get(session.hex(), -1)
        return seq <= last

    def record(self, rank: int, session: bytes, seq: int, now: float, *, counts: bool) -> Sessions:
        """Remember `seq` and that the rank was heard from; `counts`: it joins the run."""
        w = self.workers[rank]
        workers = self.workers.set(rank, Worker(rank, session, now, w.host, w.pid, w.gone, w.plans))
        key = session.hex()
        seqs = self.seqs.set(key, max(seq, self.seqs.get(key, -1)))
        reported = self.reported
        if counts and rank not in reported:
            reported = reported.set(rank, True)
        return Sessions(workers, seqs, reported)

    def leave(self, rank: int, session: bytes) -> Sessions:
        w = self.worker(rank, session)
        if w is None:
            return self
        return replace(self, workers=self.workers.set(rank, replace(w, gone=True)))

    def new_run(self) -> Sessions:
        """A new run: every seq and every reported rank is forgotten; workers stay."""
        return Sessions(self.workers, PMap(), PMap())

    def live(self, now: float, timeout: float) -> list[Worker]:
        return [w for w in self.workers.values() if w.live(now, timeout)]

    def finished(self) -> bool:
        """Every rank that said hello has said bye: the job ended normally."""
        return bool(self.workers) and all(w.gone for w in self.workers.values())
