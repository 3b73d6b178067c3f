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
from typing import IO, Any, Protocol

import msgpack

from .errors import DiskFull, StateDirError, StateDirLocked, StoreCorrupt, StoreUnavailable

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
    """

    jobs: dict[str, bytes] = field(default_factory=dict)
    snapshots: list[tuple[str, int, int, bytes]] = field(default_factory=list)
    prune: list[tuple[str, int, int]] = field(default_factory=list)
    old_runs: list[tuple[str, int]] = field(default_factory=list)
    audit: list[AuditRow] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.jobs or self.snapshots or self.audit or self.deleted)


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

    Every method runs on the controller's loop thread. `commit` writes one turn's rows in one
    transaction, or nothing; it raises when the rows could not be stored.
    """

    #: Rows moved to the `quarantine` table because they did not decode.
    quarantined: int

    def load_jobs(self) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def load_job(self, job: str) -> dict[str, Any] | None: ...

    def quarantine(self, job: str, error: str) -> None: ...

    def snapshot(self, job: str, run: int, epoch: int) -> dict[str, Any] | None: ...

    def commit(self, w: Writes) -> None: ...

    def history(self, job: str, limit: int | None = None) -> list[AuditRow]: ...

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
            raise _unusable(path, exc) from None
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

    def load_jobs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every stored job's row; a row that does not decode is quarantined, not returned."""
        bad: list[tuple[str, Any, str]] = []
        for job, data in self.db.execute("SELECT job, data FROM jobs"):
            try:
                yield job, decode_row(data)
            except ValueError as exc:
                bad.append((job, data, str(exc)))
        for job, data, error in bad:
            self._quarantine(job, data, error)

    def load_job(self, job: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM jobs WHERE job = ?", (job,)).fetchone()
        if row is None:
            return None
        try:
            return decode_row(row[0])
        except ValueError as exc:
            self._quarantine(job, row[0], str(exc))
            return None

    def quarantine(self, job: str, error: str) -> None:
        """Move a job's row that cannot be used (it decodes but does not fit) aside."""
        row = self.db.execute("SELECT data FROM jobs WHERE job = ?", (job,)).fetchone()
        if row is not None:
            self._quarantine(job, row[0], error)

    def _quarantine(self, job: str, data: Any, error: str) -> None:
        log.error("state of job %r is unusable (%s); moved to the quarantine table", job, error)
        self.quarantined += 1
        try:
            with self.db:
                self.db.execute(
                    "INSERT INTO quarantine (job, data, error, time) VALUES (?, ?, ?, ?)",
                    (job, data, error, rfc3339(time.time())),
                )
                self.db.execute("DELETE FROM jobs WHERE job = ?", (job,))
        except sqlite3.Error as exc:
            log.error("cannot quarantine job %r in %s: %s", job, self.dir / "state.db", exc)

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
        if w.audit:
            try:
                self._audit.write("".join(json.dumps(r.to_json()) + "\n" for r in w.audit))
                self._audit.flush()
            except OSError as exc:  # committed already; the mirror is completed on the next start
                log.error("cannot append to %s: %s", self._audit_path, exc)

    def history(self, job: str, limit: int | None = None) -> list[AuditRow]:
        """The job's audit rows, oldest first (the last `limit` only, if given)."""
        rows = self.db.execute(
            "SELECT time, job, old_lr, new_lr, reason, version, epoch, source, run, detail "
            "FROM audit WHERE job = ? ORDER BY id DESC LIMIT ?",
            (job, -1 if limit is None else limit),
        ).fetchall()
        return [AuditRow(*r) for r in reversed(rows)]

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
