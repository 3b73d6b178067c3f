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
from typing import IO, Any, Protocol

import msgpack

__all__ = [
    "AuditRow",
    "StateDirLocked",
    "StateStore",
    "Store",
    "StoreCorrupt",
    "StoreUnavailable",
    "Writes",
    "decode_row",
    "encode_row",
]

log = logging.getLogger("lrpilot.controller")

SNAPSHOTS_KEPT = 200

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
CREATE TABLE IF NOT EXISTS quarantine (
    job TEXT NOT NULL, data BLOB, error TEXT NOT NULL, time TEXT NOT NULL);
"""


class StateDirLocked(Exception):
    """Another controller holds the state directory."""


class StoreUnavailable(Exception):
    """The state cannot be read or written now (a database down or out of reach); clients
    are answered `unavailable` and resend."""


class StoreCorrupt(Exception):
    """The state database is damaged; it is not loaded."""


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


def rfc3339(ts: float) -> str:
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
        deleted: jobs forgotten (row and snapshots).
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

    def __bool__(self) -> bool:
        return bool(self.jobs or self.snapshots or self.audit or self.deleted or self.quarantine)


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

    def close(self) -> None: ...


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
            raise StoreCorrupt(
                f"{path} is damaged ({exc}); move it aside to start with an empty state"
            ) from None
        #: Rows moved to the `quarantine` table because they did not decode.
        self.quarantined = 0
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
            for job in w.deleted:
                cur.execute("DELETE FROM jobs WHERE job = ?", (job,))
                cur.execute("DELETE FROM snapshots WHERE job = ?", (job,))
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
        for job, error in w.quarantine:
            self.quarantined += 1
            log.error("state of job %r is unusable (%s); moved to the quarantine table", job, error)
        if w.audit:
            try:
                self._audit.write("".join(json.dumps(r.to_json()) + "\n" for r in w.audit))
                self._audit.flush()
            except OSError as exc:  # committed already; the mirror is completed on the next start
                log.error("cannot append to %s: %s", self._audit_path, exc)

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
