"""Durable state: per-job policy state, epoch snapshots and the audit log, in SQLite (WAL).

A decision is committed — job row, snapshot and audit rows in one
transaction with `synchronous=FULL` — before its reply leaves the controller,
so an LR a client has received survives kill -9 (and a power cut).
`STATE_DIR/audit.jsonl` mirrors committed audit rows; on start the mirror is
completed from the database, so a crash between the two loses nothing.
A database that fails SQLite's integrity check is refused, never loaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

__all__ = ["AuditRow", "StateDirLocked", "Store", "StoreCorrupt"]

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
"""


class StateDirLocked(Exception):
    """Another controller holds the state directory."""


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
        return asdict(self)


def rfc3339(ts: float) -> str:
    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _dumps(obj: Any) -> str:
    # JSON has no NaN/inf; state may hold them (a diverged value): keep them as strings.
    return json.dumps(_encode(obj), separators=(",", ":"), allow_nan=False)


def _encode(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"$f": repr(obj)}
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_encode(v) for v in obj]
    return obj


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


class Store:
    """The state directory: a lock, `state.db` and `audit.jsonl`.

    Args:
        state_dir: created if missing; locked with flock for the life of the store.

    Raises:
        StateDirLocked: another controller runs on this directory.
        StoreCorrupt: the database fails its integrity check.
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock: IO[str] | None = open(self.dir / "lock", "a+")  # noqa: SIM115
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "unknown"
            self._lock.close()
            self._lock = None
            raise StateDirLocked(
                f"state dir {self.dir} is locked by another controller (pid {holder})"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        path = self.dir / "state.db"
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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
        self._audit_path = self.dir / "audit.jsonl"
        self._sync_audit_mirror()
        self._audit = open(self._audit_path, "a", encoding="utf-8")  # noqa: SIM115

    # -- jobs -------------------------------------------------------------------

    def load_jobs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every stored job's state.

        Raises:
            StoreCorrupt: a row that does not decode.
        """
        for job, data in self.db.execute("SELECT job, data FROM jobs ORDER BY job"):
            yield job, self._decode_row(job, data)

    def load_job(self, job: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT data FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else self._decode_row(job, row[0])

    def _decode_row(self, job: str, data: str) -> dict[str, Any]:
        try:
            value = _loads(data)
        except ValueError as exc:
            raise StoreCorrupt(f"state of job {job!r} does not decode: {exc}") from None
        if not isinstance(value, dict):
            raise StoreCorrupt(f"state of job {job!r} is not an object")
        return value

    def snapshot(self, job: str, run: int, epoch: int) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT data FROM snapshots WHERE job = ? AND run = ? AND epoch = ?", (job, run, epoch)
        ).fetchone()
        return None if row is None else self._decode_row(job, row[0])

    def commit(
        self,
        job: str,
        state: dict[str, Any],
        snapshot: tuple[int, int, dict[str, Any]] | None = None,
        audit: list[AuditRow] | None = None,
    ) -> None:
        """Write a job's state, an epoch snapshot and audit rows in one durable transaction."""
        audit = audit or []
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.execute(
                "INSERT INTO jobs (job, data) VALUES (?, ?) "
                "ON CONFLICT(job) DO UPDATE SET data = excluded.data",
                (job, _dumps(state)),
            )
            if snapshot is not None:
                run, epoch, data = snapshot
                cur.execute(
                    "INSERT OR REPLACE INTO snapshots (job, run, epoch, data) VALUES (?, ?, ?, ?)",
                    (job, run, epoch, _dumps(data)),
                )
                cur.execute(
                    "DELETE FROM snapshots WHERE job = ? AND (run != ? OR epoch <= ?)",
                    (job, run, epoch - SNAPSHOTS_KEPT),
                )
            for row in audit:
                cur.execute(
                    "INSERT INTO audit (time, job, old_lr, new_lr, reason, version, epoch, source,"
                    " run, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row.time,
                        row.job,
                        row.old_lr,
                        row.new_lr,
                        row.reason,
                        row.version,
                        row.epoch,
                        row.source,
                        row.run,
                        row.detail,
                    ),
                )
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
        try:
            for row in audit:
                self._audit.write(json.dumps(row.to_json()) + "\n")
            if audit:
                self._audit.flush()
        except OSError as exc:  # committed already; the mirror is completed on the next start
            log.error("cannot append to %s: %s", self._audit_path, exc)

    def delete_job(self, job: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM jobs WHERE job = ?", (job,))
            self.db.execute("DELETE FROM snapshots WHERE job = ?", (job,))

    def history(self, job: str, limit: int = 1000) -> list[AuditRow]:
        rows = self.db.execute(
            "SELECT time, job, old_lr, new_lr, reason, version, epoch, source, run, detail "
            "FROM audit WHERE job = ? ORDER BY id DESC LIMIT ?",
            (job, limit),
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
