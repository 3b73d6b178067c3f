"""Durable state: per-job policy state, epoch snapshots and the audit log, in SQLite (WAL).

Commits are grouped: every job row, snapshot and audit row of one loop turn
goes in one transaction with `synchronous=FULL`, committed before any reply
of that turn leaves the controller, so an LR a client has received survives
kill -9 (and a power cut). Rows are msgpack (rows written by 0.1 as JSON text
still load); old snapshots are deleted by key range, never by scanning.
`STATE_DIR/audit.jsonl` mirrors committed audit rows; on start the mirror is
completed from the database, so a crash between the two loses nothing.
A database that fails SQLite's integrity check is refused, never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import msgpack

from .errors import DiskFull, StateDirError, StateDirLocked, StoreCorrupt, StoreUnavailable

__all__ = [
    "METRIC_POINTS_KEPT",
    "METRIC_RUNS_KEPT",
    "AuditRow",
    "MetricPoint",
    "MetricStore",
    "StateDirLocked",
    "StateStore",
    "Store",
    "StoreCorrupt",
    "StoreUnavailable",
    "Writes",
    "decode_metrics",
    "decode_row",
    "encode_row",
]

log = logging.getLogger("lrpilot.controller")

SNAPSHOTS_KEPT = 200
#: Recorded metrics: at most this many points per run (every k-th, k doubling as a run grows)
METRIC_POINTS_KEPT = 10_000
#: ... for the job's last this many runs.
METRIC_RUNS_KEPT = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (job TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    job TEXT NOT NULL, run INTEGER NOT NULL, epoch INTEGER NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (job, run, epoch));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, job TEXT NOT NULL,
    old_lr REAL, new_lr REAL NOT NULL, reason TEXT NOT NULL, version INTEGER NOT NULL,
    epoch INTEGER, source TEXT NOT NULL, run INTEGER NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS audit_job ON audit (job, id);
CREATE INDEX IF NOT EXISTS audit_job_run ON audit (job, run, id);
CREATE TABLE IF NOT EXISTS metrics (
    job TEXT NOT NULL, run INTEGER NOT NULL, t INTEGER NOT NULL, epoch INTEGER NOT NULL,
    lr REAL NOT NULL, time REAL NOT NULL, stride INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (job, run, t)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    job TEXT NOT NULL, data BLOB, error TEXT NOT NULL, time TEXT NOT NULL);
"""


@dataclass(frozen=True)
class AuditRow:
    """One LR change: who, from what to what, why, and at which epoch it applies."""

    time: str
    job: str
    old_lr: float | None
    new_lr: float
    reason: str
    version: int
    epoch: int | None
    source: str
    run: int = 0
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)  # flat: no deep copy needed

    def values(self) -> tuple[Any, ...]:
        """The fields in column order (the audit table's, after its id)."""
        return tuple(self.__dict__.values())


@dataclass(frozen=True)
class MetricPoint:
    """One decided epoch (or step) as the job trained it: the (aggregated) metrics reported
    for `t` and the LR in force during it.

    Args:
        t: the epoch, or the step for a `unit: step` job.
        epoch: the epoch the report named (equal to `t` for epoch jobs).
        wall: Unix time of the decision.
    """

    job: str
    run: int
    t: int
    epoch: int
    lr: float
    wall: float
    metrics: dict[str, float]


def decode_metrics(data: bytes) -> dict[str, float]:
    """A recorded point's metrics; {} for a row that does not decode."""
    try:
        value = msgpack.unpackb(data, raw=False)
    except Exception:  # msgpack raises several types for corrupt input
        return {}
    return value if isinstance(value, dict) else {}


#: The Unix times rfc3339 writes as they are (years 1970...9999); others are clamped.
_FIRST, _LAST = 0.0, 253402300799.999


def rfc3339(ts: float) -> str:
    """`ts` (Unix seconds) in RFC 3339 UTC with milliseconds. Never raises: a time outside
    the years 1970...9999 (or not finite) is written as the nearest end of that range."""
    ts = min(max(ts, _FIRST), _LAST) if ts == ts else _FIRST
    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"$f"}:
            return float(obj["$f"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _loads(text: str) -> Any:
    return _decode(json.loads(text))


def encode_row(data: dict[str, Any]) -> bytes:
    """A stored row (job state or snapshot) as msgpack; NaN and inf are kept as they are."""
    return msgpack.packb(data, use_bin_type=True)  # type: ignore[no-any-return]


def decode_row(data: bytes | str) -> dict[str, Any]:
    """A stored row back; JSON text is a row written by lrpilot 0.1.

    Raises:
        ValueError: the row does not decode to a mapping.
    """
    try:
        value = _loads(data) if isinstance(data, str) else msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several types for corrupt input
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a mapping but {type(value).__name__}")
    return value


@dataclass
class Writes:
    """Everything one loop turn commits, in one transaction.

    Args:
        jobs: encoded job rows by job name.
        snapshots: (job, run, epoch, encoded row) epoch-end states for resumes.
        prune: (job, run, epoch): delete that run's snapshots up to epoch.
        old_runs: (job, run): delete every snapshot of a run that ended.
        audit: LR changes.
        deleted: jobs forgotten (row, snapshots and recorded metrics).
        metrics: recorded metric points (thinned as they are written).
        metrics_from: (job, run, t): delete that run's points from t on (a resume redoes them).
        quarantine: (job, why): move the job's stored row to the quarantine table (it did
            not decode or fit the schema); done first, so a job made anew in the same turn
            is written after its old row moved aside.
    """

    jobs: dict[str, bytes] = field(default_factory=dict)
    snapshots: list[tuple[str, int, int, bytes]] = field(default_factory=list)
    prune: list[tuple[str, int, int]] = field(default_factory=list)
    old_runs: list[tuple[str, int]] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    quarantine: list[tuple[str, str]] = field(default_factory=list)
    metrics: list[MetricPoint] = field(default_factory=list)
    metrics_from: list[tuple[str, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.jobs
            or self.snapshots
            or self.audit
            or self.deleted
            or self.metrics
            or self.quarantine
        )


def _unusable(path: Path, exc: sqlite3.DatabaseError) -> StateDirError:
    """What to tell the operator when `state.db` cannot be opened: only a database that is
    damaged is called damaged (moving a healthy one aside on a full disk loses state)."""
    code = getattr(exc, "sqlite_errorcode", None)
    full = code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    if full or code is None or code & 0xFF == sqlite3.SQLITE_IOERR:
        # SQLite reports a write refused for want of space as "disk I/O error" as often as
        # "disk is full"; a write of our own tells which (its errno names the cause).
        no_space = _write_refused(path.parent)
        if full or no_space is not None:
            why = no_space.strerror if no_space is not None else "database or disk is full"
            return DiskFull(
                f"cannot write {path}: the disk holding {path.parent} is full ({why}); "
                "free space there (or raise the file size limit) and start again"
            )
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or code is None:
        return StoreCorrupt(
            f"{path} is damaged ({exc}); move it aside to start with an empty state"
        )
    return StateDirError(f"cannot use {path}: {exc}")


def _write_refused(directory: Path, size: int = 1 << 16) -> OSError | None:
    """The error of writing `size` bytes to a scratch file in `directory`, if it is a
    want of space (ENOSPC, EDQUOT, EFBIG: the file size limit); else None."""
    probe = directory / ".lrpilot-space-probe"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * size)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


class StateStore(Protocol):
    """What the controller needs from durable state; `Store` (SQLite, the embedded default)
    and `lrpilot.controller.pgstore.PgStore` (PostgreSQL, several controllers) provide it.

    Every method runs on the controller's loop thread. A read may yield (`load_jobs`) or
    raise (`load_job`) the `ValueError` of a stored row that does not decode; the caller
    moves it aside with `Writes.quarantine`. `commit` writes one turn's rows, quarantine
    included, in one transaction, or nothing; it raises when the rows could not be stored.
    """

    #: Rows moved to the `quarantine` table because they did not decode or fit.
    quarantined: int

    def load_jobs(self) -> Iterator[tuple[str, dict[str, Any] | ValueError]]: ...

    def load_job(self, job: str) -> dict[str, Any] | None: ...

    def snapshot(self, job: str, run: int, epoch: int) -> dict[str, Any] | None: ...

    def commit(self, w: Writes) -> None: ...

    def history(
        self,
        job: str,
        limit: int | None = None,
        run: int | None = None,
        since: str | None = None,
    ) -> list[AuditRow]: ...

    def last_run(self, job: str) -> int | None: ...

    # Recorded metrics (see `MetricStore`).
    def metric_runs(self, job: str) -> list[int]: ...

    def metric_rows(
        self, job: str, run: int, after: int = -1
    ) -> list[tuple[int, int, float, float, bytes]]: ...

    def metric_count(self, job: str, run: int) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class MetricStore(Protocol):
    """A store that records metrics (`Writes.metrics`, `Writes.metrics_from`, thinned to
    METRIC_POINTS_KEPT points per run, the last METRIC_RUNS_KEPT runs) and reads them back:
    what `lrpilot metrics`, `simulate --job` and the web view need. `Store` and `PgStore`
    (every controller's jobs) provide it."""

    def metric_runs(self, job: str) -> list[int]: ...

    def metric_rows(
        self, job: str, run: int, after: int = -1
    ) -> list[tuple[int, int, float, float, bytes]]: ...

    def metric_count(self, job: str, run: int) -> int: ...


class Store:
    """The state directory: `state.db` (locked for the life of the store) and `audit.jsonl`.

    Args:
        state_dir: created if missing.

    Raises:
        StateDirLocked: another controller runs on this directory.
        StoreCorrupt: the database fails its integrity check.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "state.db"
        self._lock: IO[str] | None = None
        self._lock_db(path)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # One process owns the database (the flock above): exclusive locking keeps the WAL
            # index in the heap, so there is no -shm file whose mmap could SIGBUS the
            # controller on a full or broken disk (and no shared-memory locking per commit).
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise _unusable(path, exc) from None
        #: Rows moved to the `quarantine` table because they did not decode.
        self.quarantined = 0
        #: (job, run) -> [points stored, stride]: the thinning of recorded metrics, read from
        #: the table on first use and changed only once a transaction committed.
        self._thinning: dict[tuple[str, int], list[int]] = {}
        self._audit_path = self.dir / "audit.jsonl"
        self._sync_audit_mirror()
        self._audit = open(self._audit_path, "a", encoding="utf-8")  # noqa: SIM115

    def _lock_db(self, path: Path) -> None:
        """flock the database file itself (SQLite's own locks are fcntl locks, independent of
        flock), so deleting a `lock` file cannot let a second controller in; `lock` only
        tells the holder's pid."""
        self._lock = open(path, "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            try:
                holder = (self.dir / "lock").read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise StateDirLocked(
                f"state dir {self.dir} is locked by another controller (pid {holder})"
            ) from None
        with contextlib.suppress(OSError):
            (self.dir / "lock").write_text(str(os.getpid()))

    # -- jobs -------------------------------------------------------------------

    def load_jobs(self) -> Iterator[tuple[str, dict[str, Any] | ValueError]]:
        """Every stored job's row, or the ValueError of a row that does not decode (the
        caller quarantines it through `Writes.quarantine`)."""
        for job, data in self.db.execute("SELECT job, data FROM jobs"):
            try:
                yield job, decode_row(data)
            except ValueError as exc:
                yield job, exc

    def load_job(self, job: str) -> dict[str, Any] | None:
        """The job's stored row, or None.

        Raises:
            ValueError: the row does not decode (quarantine it through `Writes.quarantine`).
        """
        row = self.db.execute("SELECT data FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else decode_row(row[0])

    def snapshot(self, job: str, run: int, epoch: int) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT data FROM snapshots WHERE job = ? AND run = ? AND epoch = ?", (job, run, epoch)
        ).fetchone()
        if row is None:
            return None
        try:
            return decode_row(row[0])
        except ValueError:
            return None

    def commit(self, w: Writes) -> None:
        """Write one turn's rows in one durable transaction; nothing is written on failure.

        Raises:
            sqlite3.Error, OSError: the commit failed (full disk, I/O error, read-only).
        """
        if not w:
            return
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            now = rfc3339(time.time())
            cur.executemany(
                "INSERT INTO quarantine (job, data, error, time) "
                "SELECT job, data, ?, ? FROM jobs WHERE job = ?",
                [(error, now, job) for job, error in w.quarantine],
            )
            cur.executemany("DELETE FROM jobs WHERE job = ?", [(job,) for job, _ in w.quarantine])
            cur.executemany(
                "INSERT INTO jobs (job, data) VALUES (?, ?) "
                "ON CONFLICT(job) DO UPDATE SET data = excluded.data",
                w.jobs.items(),
            )
            cur.executemany(
                "INSERT OR REPLACE INTO snapshots (job, run, epoch, data) VALUES (?, ?, ?, ?)",
                w.snapshots,
            )
            cur.executemany(
                "DELETE FROM snapshots WHERE job = ? AND run = ? AND epoch <= ?", w.prune
            )
            cur.executemany("DELETE FROM snapshots WHERE job = ? AND run = ?", w.old_runs)
            cur.executemany(
                "INSERT INTO audit (time, job, old_lr, new_lr, reason, version, epoch, source,"
                " run, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [row.values() for row in w.audit],
            )
            cur.executemany(
                "DELETE FROM metrics WHERE job = ? AND run = ? AND t >= ?", w.metrics_from
            )
            thinning = self._record(cur, w.metrics, [job for job, _ in w.old_runs])
            for job in w.deleted:
                cur.execute("DELETE FROM jobs WHERE job = ?", (job,))
                cur.execute("DELETE FROM snapshots WHERE job = ?", (job,))
                cur.execute("DELETE FROM metrics WHERE job = ?", (job,))
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
        for job, error in w.quarantine:
            self.quarantined += 1
            log.error("state of job %r is unusable (%s); moved to the quarantine table", job, error)
        self._thinning.update(thinning)
        for key in w.old_runs:  # a run that ended gets no more points
            self._thinning.pop(key, None)
        for job in w.deleted:
            for key in [k for k in self._thinning if k[0] == job]:
                del self._thinning[key]
        if w.audit:
            try:
                self._audit.write("".join(json.dumps(r.to_json()) + "\n" for r in w.audit))
                self._audit.flush()
            except OSError as exc:  # committed already; the mirror is completed on the next start
                log.error("cannot append to %s: %s", self._audit_path, exc)

    # -- recorded metrics ---------------------------------------------------------------

    def _thin_state(self, cur: sqlite3.Cursor, job: str, run: int) -> list[int]:
        state = self._thinning.get((job, run))
        if state is None:
            count, stride = cur.execute(
                "SELECT count(*), max(stride) FROM metrics WHERE job = ? AND run = ?", (job, run)
            ).fetchone()
            state = [int(count), int(stride or 1)]
        return list(state)

    def _record(
        self, cur: sqlite3.Cursor, points: list[MetricPoint], new_runs: list[str]
    ) -> dict[tuple[str, int], list[int]]:
        """Write the turn's metric points, keeping every stride-th t of a run: when a run
        passes METRIC_POINTS_KEPT points its stride doubles and the points off it go.
        Returns the thinning states to keep once the transaction commits."""
        changed: dict[tuple[str, int], list[int]] = {}
        rows = []
        for p in points:
            key = (p.job, p.run)
            state = changed.get(key)
            if state is None:
                state = changed[key] = self._thin_state(cur, p.job, p.run)
            if p.t % state[1] == 0:
                # An upper bound: a resumed run reports an epoch again and replaces its row.
                state[0] += 1
                rows.append(
                    (p.job, p.run, p.t, p.epoch, p.lr, p.wall, state[1], encode_row(p.metrics))
                )
        cur.executemany(
            "INSERT INTO metrics (job, run, t, epoch, lr, time, stride, data) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (job, run, t) DO UPDATE SET "
            "epoch = excluded.epoch, lr = excluded.lr, time = excluded.time, data = excluded.data",
            rows,
        )
        for key, state in changed.items():
            if state[0] <= METRIC_POINTS_KEPT:
                continue
            state[0] = cur.execute(
                "SELECT count(*) FROM metrics WHERE job = ? AND run = ?", key
            ).fetchone()[0]
            while state[0] > METRIC_POINTS_KEPT:
                state[1] *= 2
                cur.execute(
                    "DELETE FROM metrics WHERE job = ? AND run = ? AND t % ? != 0",
                    (*key, state[1]),
                )
                state[0] -= cur.rowcount
                cur.execute(
                    "UPDATE metrics SET stride = ? WHERE job = ? AND run = ?", (state[1], *key)
                )
        for job in set(new_runs):  # a job started a new run: it and the last runs before it
            cur.execute(
                "DELETE FROM metrics WHERE job = ? AND run NOT IN (SELECT DISTINCT run FROM "
                "metrics WHERE job = ? ORDER BY run DESC LIMIT ?)",
                (job, job, METRIC_RUNS_KEPT - 1),
            )
        return changed

    def metric_runs(self, job: str) -> list[int]:
        """The runs of `job` with recorded metrics, oldest first."""
        rows = self.db.execute(
            "SELECT DISTINCT run FROM metrics WHERE job = ? ORDER BY run", (job,)
        ).fetchall()
        return [r[0] for r in rows]

    def metric_rows(
        self, job: str, run: int, after: int = -1
    ) -> list[tuple[int, int, float, float, bytes]]:
        """The recorded points of one run (those with t > `after`) as stored, in order of t:
        (t, epoch, lr, wall, msgpack of the metrics). Decoding is left to the reader
        (`metric_columns`), so a reader in another thread does it off the loop."""
        return self.db.execute(
            "SELECT t, epoch, lr, time, data FROM metrics WHERE job = ? AND run = ? AND t > ? "
            "ORDER BY t",
            (job, run, after),
        ).fetchall()

    def metric_count(self, job: str, run: int) -> int:
        """How many points of the run are recorded."""
        row = self.db.execute(
            "SELECT count(*) FROM metrics WHERE job = ? AND run = ?", (job, run)
        ).fetchone()
        return int(row[0])

    def metrics(self, job: str, run: int) -> list[MetricPoint]:
        """The recorded points of one run of `job`, in order of t (a row that does not decode
        keeps its LR, with no metrics)."""
        return [
            MetricPoint(job, run, t, epoch, lr, wall, decode_metrics(data))
            for t, epoch, lr, wall, data in self.metric_rows(job, run)
        ]

    def history(
        self,
        job: str,
        limit: int | None = None,
        run: int | None = None,
        since: str | None = None,
    ) -> list[AuditRow]:
        """The job's audit rows, oldest first, filtered in SQL.

        Args:
            limit: only the last `limit` rows.
            run: only this run's rows.
            since: only rows at or after this RFC 3339 time.
        """
        where, args = "job = ?", [job]  # type: tuple[str, list[Any]]
        if run is not None:
            where += " AND run = ?"
            args.append(run)
        if since is not None:
            where += " AND time >= ?"
            args.append(since)
        rows = self.db.execute(
            "SELECT time, job, old_lr, new_lr, reason, version, epoch, source, run, detail "
            f"FROM audit WHERE {where} ORDER BY id DESC LIMIT ?",
            (*args, -1 if limit is None else limit),
        ).fetchall()
        return [AuditRow(*r) for r in reversed(rows)]

    def last_run(self, job: str) -> int | None:
        """The run of the job's latest audit row (None: the job has none)."""
        row = self.db.execute(
            "SELECT run FROM audit WHERE job = ? ORDER BY id DESC LIMIT 1", (job,)
        ).fetchone()
        return None if row is None else int(row[0])

    def _sync_audit_mirror(self) -> None:
        """Append to audit.jsonl the committed rows it misses (a crash between commit and write)."""
        try:
            with open(self._audit_path, "rb") as fh:
                have = sum(1 for line in fh if line.strip())
        except FileNotFoundError:
            have = 0
        rows = self.db.execute(
            "SELECT time, job, old_lr, new_lr, reason, version, epoch, source, run, detail "
            "FROM audit ORDER BY id LIMIT -1 OFFSET ?",
            (have,),
        ).fetchall()
        if rows:
            with open(self._audit_path, "a", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(AuditRow(*r).to_json()) + "\n")

    def close(self) -> None:
        audit = getattr(self, "_audit", None)
        if audit is not None:
            audit.close()
        db = getattr(self, "db", None)
        if db is not None:
            db.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
