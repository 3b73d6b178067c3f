"""State in PostgreSQL: the SQLite store's rows, shared by several controllers, in shards.

Jobs fall into S shards (crc32 of the job name mod S; S is fixed when the
schema is created, default 64). A controller owns a shard while it holds
`pg_try_advisory_lock(LOCK_CLASS, shard)` on its one database session, and it
commits on that same session: when the session ends (the controller died, or
its connection was cut or terminated) the locks go with it, and so does every
commit made with them. A controller never reconnects into its old shards: a
new session owns nothing until it has taken the locks again, so two
controllers never decide for one job.

Live controllers register in the `controllers` table with a heartbeat
(`tick()`, every `HEARTBEAT` s from the server loop) and split the shards
evenly by their rank in that table. A controller whose session is gone is
removed at once; one whose heartbeat stopped for `DEAD_AFTER` s has its
session terminated (so its locks, and its ability to commit, end) and is
removed; the survivors take its shards on their next tick, well within 3 s.

Example:
    store = PgStore("postgresql://lrpilot@db:5432/lrpilot")
    store.register("tcp://ctl-a:5555", "tcp://ctl-a:5556")
    gained, lost = store.tick()
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psycopg

from .errors import NotOwner, StoreUnavailable
from .store import AuditRow, Writes, decode_row, rfc3339

__all__ = ["DEAD_AFTER", "DEFAULT_SHARDS", "HEARTBEAT", "NotOwner", "PgStore", "shard_of"]

log = logging.getLogger("lrpilot.controller")

#: The first key of every lrpilot advisory lock: (LOCK_CLASS, shard), (LOCK_CLASS, -1) schema.
LOCK_CLASS = 0x6C72
DEFAULT_SHARDS = 64
#: Seconds between two heartbeats (and ownership checks) of a controller.
HEARTBEAT = 0.5
#: A controller not heard from this long is dead: its session is ended, its shards taken.
DEAD_AFTER = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job TEXT PRIMARY KEY, shard INTEGER NOT NULL, data BYTEA NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_shard ON jobs (shard);
CREATE TABLE IF NOT EXISTS snapshots (
    job TEXT NOT NULL, run BIGINT NOT NULL, epoch BIGINT NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (job, run, epoch));
CREATE TABLE IF NOT EXISTS audit (
    id BIGSERIAL PRIMARY KEY, time TEXT NOT NULL, job TEXT NOT NULL,
    old_lr DOUBLE PRECISION, new_lr DOUBLE PRECISION NOT NULL, reason TEXT NOT NULL,
    version BIGINT NOT NULL, epoch BIGINT, source TEXT NOT NULL, run BIGINT NOT NULL,
    detail TEXT);
CREATE INDEX IF NOT EXISTS audit_job ON audit (job, id);
CREATE INDEX IF NOT EXISTS audit_job_run ON audit (job, run, id);
CREATE TABLE IF NOT EXISTS quarantine (
    job TEXT NOT NULL, data BYTEA, error TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS controllers (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, endpoint TEXT NOT NULL, admin TEXT NOT NULL,
    shards INTEGER[] NOT NULL DEFAULT '{}', heartbeat TIMESTAMPTZ NOT NULL);
"""

_AUDIT_COLUMNS = "time, job, old_lr, new_lr, reason, version, epoch, source, run, detail"


#: A turn's commit as one statement of data-modifying CTEs over arrays, one per table.
_COMMIT = f"""
WITH j AS (
    INSERT INTO jobs (job, shard, data)
    SELECT * FROM unnest(%s::text[], %s::int[], %s::bytea[])
    ON CONFLICT (job) DO UPDATE SET data = excluded.data),
s AS (
    INSERT INTO snapshots (job, run, epoch, data)
    SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bytea[])
    ON CONFLICT (job, run, epoch) DO UPDATE SET data = excluded.data),
p AS (
    DELETE FROM snapshots USING unnest(%s::text[], %s::bigint[], %s::bigint[]) AS p(job, run, t)
    WHERE snapshots.job = p.job AND snapshots.run = p.run AND snapshots.epoch <= p.t),
o AS (
    DELETE FROM snapshots USING unnest(%s::text[], %s::bigint[]) AS o(job, run)
    WHERE snapshots.job = o.job AND snapshots.run = o.run),
a AS (
    INSERT INTO audit ({_AUDIT_COLUMNS})
    SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[], %s::float8[], %s::text[],
        %s::bigint[], %s::bigint[], %s::text[], %s::bigint[], %s::text[])),
forgotten AS (SELECT unnest(%s::text[]) AS job),
dj AS (DELETE FROM jobs USING forgotten WHERE jobs.job = forgotten.job),
ds AS (DELETE FROM snapshots USING forgotten WHERE snapshots.job = forgotten.job)
SELECT 1
"""


def _columns(n: int, rows: Iterable[Iterable[Any]]) -> list[list[Any]]:
    """Rows as n column lists (the arrays that `unnest` turns back into rows)."""
    columns: list[list[Any]] = [[] for _ in range(n)]
    for row in rows:
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def shard_of(job: str, shards: int) -> int:
    """The job's shard: stable across processes, machines and versions (not Python's hash)."""
    return zlib.crc32(job.encode()) % shards


class PgStore:
    """Durable state in PostgreSQL and the ownership of its shards, on one session.

    Args:
        dsn: `postgresql://USER@HOST:PORT/DB` (libpq: password from PGPASSWORD or ~/.pgpass).
        shards: S when this call creates the schema; an existing schema keeps its own.
        clock: monotonic time (injectable for tests).

    Raises:
        StoreUnavailable: the database cannot be reached or the schema cannot be created.
    """

    #: Seconds between two ticks.
    heartbeat = HEARTBEAT

    def __init__(
        self,
        dsn: str,
        shards: int = DEFAULT_SHARDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dsn = dsn
        self.clock = clock
        #: Rows moved to the `quarantine` table because they did not decode.
        self.quarantined = 0
        #: This controller's name in the `controllers` table.
        self.id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        #: Shards this controller holds the lock of, on the current session.
        self.owned: frozenset[int] = frozenset()
        self._told: frozenset[int] = frozenset()  # `owned` as the last tick handed it out
        self.endpoint = self.admin = ""
        self._owners: dict[int, tuple[str, str]] = {}  # shard -> (endpoint, admin) of another
        self._conn: psycopg.Connection[Any] | None = None
        self._next_connect = 0.0
        try:
            conn = self._connect()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s, -1)", (LOCK_CLASS,))
                cur.execute(_SCHEMA)  # type: ignore[arg-type]  # a constant
                cur.execute(
                    "INSERT INTO settings VALUES ('shards', %s) ON CONFLICT DO NOTHING",
                    (str(shards),),
                )
                row = cur.execute("SELECT value FROM settings WHERE key = 'shards'").fetchone()
        except psycopg.Error as exc:
            self.close()
            raise StoreUnavailable(f"cannot use {self.where()}: {_why(exc)}") from None
        assert row is not None
        #: S, as the schema was created with.
        self.shards = int(row[0])

    def where(self) -> str:
        """The database, for messages (without a password)."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error:
            return "the --store database"
        host, port, db = info.get("host", ""), info.get("port", ""), info.get("dbname", "")
        return f"postgresql://{host}:{port}/{db}"

    def _connect(self) -> psycopg.Connection[Any]:
        self._conn = psycopg.connect(
            self.dsn,
            autocommit=True,
            connect_timeout=3,
            application_name=f"lrpilot {self.id}"[:63],
            # A database that vanished without a FIN (a cut cable) is noticed in a few
            # seconds, not after the kernel's default of hours; the loop waits that long.
            tcp_user_timeout=3000,
            keepalives=1,
            keepalives_idle=2,
            keepalives_interval=1,
            keepalives_count=3,
        )
        return self._conn

    def _session(self) -> psycopg.Connection[Any]:
        """The session the locks were taken on; never a new one (see the module docstring)."""
        conn = self._conn
        if conn is None or conn.broken or conn.closed:
            self.owned = frozenset()  # the locks ended with the session
            raise StoreUnavailable(f"no session with {self.where()}")
        return conn

    # -- ownership ------------------------------------------------------------------------

    def owns(self, job: str) -> bool:
        return shard_of(job, self.shards) in self.owned

    def owner(self, job: str) -> tuple[str, str] | None:
        """(client endpoint, admin endpoint) of the controller that owns the job's shard, as
        of the last tick; None while nobody does (a hand-over in progress, or no database)."""
        shard = shard_of(job, self.shards)
        if shard in self.owned:
            return (self.endpoint, self.admin)
        return self._owners.get(shard)

    def register(self, endpoint: str, admin: str) -> None:
        """What other controllers send this one's clients to (`--advertise`)."""
        self.endpoint, self.admin = endpoint, admin

    def tick(self) -> tuple[frozenset[int], frozenset[int]]:
        """Heartbeat, end dead controllers, and take or give up shards towards an even split.

        Call it between loop turns, when every decision made is committed: shards in `lost`
        are no longer this controller's (drop their jobs from memory now), shards in `gained`
        are (load their jobs). Never raises: a failed session loses every shard. A new
        session's shards are all `gained` and the old one's all `lost`, even where they are
        the same shards: another controller may have decided for them in between.
        """
        before = self._told
        fresh = False
        try:
            conn = self._conn
            if conn is None or conn.broken or conn.closed:
                self.owned = frozenset()
                if conn is not None:
                    log.error("lost the session with %s; every shard given up", self.where())
                    with contextlib.suppress(Exception):
                        conn.close()
                    self._conn = None
                self._told = frozenset()
                if self.clock() < self._next_connect:
                    return frozenset(), before
                self._next_connect = self.clock() + HEARTBEAT
                conn = self._connect()
                fresh = True
                log.info("new session with %s", self.where())
            self._balance(conn)
        except psycopg.Error as exc:
            log.error("cannot coordinate shards through %s: %s", self.where(), _why(exc))
            if self._conn is None or self._conn.broken or self._conn.closed:
                self.owned = frozenset()  # else the session lives and keeps what it holds
        self._told = self.owned
        if fresh:
            return self.owned, before
        return self.owned - before, before - self.owned

    def shard(self, job: str) -> int:
        return shard_of(job, self.shards)

    def _balance(self, conn: psycopg.Connection[Any]) -> None:
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO controllers (id, pid, endpoint, admin, shards, heartbeat) "
                "VALUES (%s, pg_backend_pid(), %s, %s, %s, now()) ON CONFLICT (id) DO UPDATE "
                "SET pid = excluded.pid, endpoint = excluded.endpoint, admin = excluded.admin, "
                "shards = excluded.shards, heartbeat = excluded.heartbeat",
                (self.id, self.endpoint, self.admin, sorted(self.owned)),
            )
            # A controller whose heartbeat stopped may still hold its session (hung, or cut
            # off without a FIN): end the session, and with it its locks and its commits.
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM controllers WHERE id <> %s "
                "AND heartbeat < now() - make_interval(secs => %s) "
                "AND pid IN (SELECT pid FROM pg_stat_activity)",
                (self.id, DEAD_AFTER),
            )
            cur.execute(
                "DELETE FROM controllers WHERE id <> %s AND (heartbeat < now() - "
                "make_interval(secs => %s) OR pid NOT IN (SELECT pid FROM pg_stat_activity))",
                (self.id, DEAD_AFTER),
            )
            rows = cur.execute(
                "SELECT id, endpoint, admin, shards FROM controllers ORDER BY id"
            ).fetchall()
            ids = [r[0] for r in rows]
            rank, n = ids.index(self.id), len(ids)
            target = frozenset(s for s in range(self.shards) if s % n == rank)
            release = sorted(self.owned - target)
            if release:
                cur.execute(
                    "SELECT pg_advisory_unlock(%s, s) FROM unnest(%s::int[]) AS s",
                    (LOCK_CLASS, release),
                )
                self.owned -= frozenset(release)
            acquire = sorted(target - self.owned)
            if acquire:
                got = cur.execute(
                    "SELECT s FROM unnest(%s::int[]) AS s WHERE pg_try_advisory_lock(%s, s)",
                    (acquire, LOCK_CLASS),
                ).fetchall()
                self.owned |= frozenset(r[0] for r in got)
        self._owners = {
            shard: (endpoint, admin)
            for cid, endpoint, admin, shards in rows
            if cid != self.id
            for shard in shards
        }

    # -- rows -----------------------------------------------------------------------------

    def load_jobs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every stored job's row, of every shard (admin `status` across controllers)."""
        return self._load("SELECT job, data FROM jobs", ())

    def load_shards(self, shards: Iterable[int]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The rows of the jobs in `shards` (those a tick gained)."""
        return self._load("SELECT job, data FROM jobs WHERE shard = ANY(%s)", (list(shards),))

    def _load(self, query: str, args: tuple[Any, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
        rows = self._read(query, args)
        bad: list[tuple[str, Any, str]] = []
        for job, data in rows:
            try:
                yield job, decode_row(bytes(data))
            except ValueError as exc:
                bad.append((job, data, str(exc)))
        for job, data, error in bad:
            self._quarantine(job, data, error)

    def _read(self, query: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._session().execute(query, args).fetchall()  # type: ignore[arg-type]
        except psycopg.Error as exc:
            if self._conn is not None and (self._conn.broken or self._conn.closed):
                self.owned = frozenset()  # the locks ended with the session
            raise StoreUnavailable(f"cannot read from {self.where()}: {_why(exc)}") from None

    def load_job(self, job: str) -> dict[str, Any] | None:
        rows = self._read("SELECT data FROM jobs WHERE job = %s", (job,))
        if not rows:
            return None
        try:
            return decode_row(bytes(rows[0][0]))
        except ValueError as exc:
            self._quarantine(job, rows[0][0], str(exc))
            return None

    def quarantine(self, job: str, error: str) -> None:
        rows = self._read("SELECT data FROM jobs WHERE job = %s", (job,))
        if rows:
            self._quarantine(job, rows[0][0], error)

    def _quarantine(self, job: str, data: Any, error: str) -> None:
        log.error("state of job %r is unusable (%s); moved to the quarantine table", job, error)
        self.quarantined += 1
        try:
            conn = self._session()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO quarantine (job, data, error, time) VALUES (%s, %s, %s, %s)",
                    (job, data, error, rfc3339(time.time())),
                )
                conn.execute("DELETE FROM jobs WHERE job = %s", (job,))
        except (psycopg.Error, StoreUnavailable) as exc:
            log.error("cannot quarantine job %r in %s: %s", job, self.where(), exc)

    def snapshot(self, job: str, run: int, epoch: int) -> dict[str, Any] | None:
        rows = self._read(
            "SELECT data FROM snapshots WHERE job = %s AND run = %s AND epoch = %s",
            (job, run, epoch),
        )
        if not rows:
            return None
        try:
            return decode_row(bytes(rows[0][0]))
        except ValueError:
            return None

    def commit(self, w: Writes) -> None:
        """Write one turn's rows in one transaction on the session that holds their shards.

        Raises:
            NotOwner: a row belongs to a shard this session does not hold (nothing written).
            StoreUnavailable: the session is gone or the transaction failed.
        """
        if not w:
            return
        names = {*w.jobs, *w.deleted, *(s[0] for s in w.snapshots), *(r.job for r in w.audit)}
        foreign = sorted(n for n in names if not self.owns(n))
        if foreign:
            raise NotOwner(f"job {foreign[0]!r} is not in a shard this controller holds")
        conn = self._session()
        jobs = list(w.jobs)
        snapshots = {(j, r, e): data for j, r, e, data in w.snapshots}  # the last one wins
        deleted = list(w.deleted)
        params = (
            jobs,
            [shard_of(n, self.shards) for n in jobs],
            list(w.jobs.values()),
            *_columns(4, [(*key, data) for key, data in snapshots.items()]),
            *_columns(3, w.prune),
            *_columns(2, w.old_runs),
            *_columns(10, [row.values() for row in w.audit]),
            deleted,
        )
        try:
            # One statement, so one round trip and one implicit transaction: all or nothing.
            conn.execute(_COMMIT, params)
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                self.owned = frozenset()  # the locks ended with the session
            raise StoreUnavailable(f"cannot commit to {self.where()}: {_why(exc)}") from None

    def history(
        self,
        job: str,
        limit: int | None = None,
        run: int | None = None,
        since: str | None = None,
    ) -> list[AuditRow]:
        """The job's audit rows, oldest first, filtered in SQL (every controller's).

        Args:
            limit: only the last `limit` rows.
            run: only this run's rows.
            since: only rows at or after this RFC 3339 time.
        """
        rows = self._read(
            f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE job = %s "
            "AND (%s::bigint IS NULL OR run = %s) AND (%s::text IS NULL OR time >= %s) "
            "ORDER BY id DESC LIMIT %s",
            (job, run, run, since, since, limit),
        )
        return [AuditRow(*r) for r in reversed(rows)]

    def last_run(self, job: str) -> int | None:
        """The run of the job's latest audit row (None: the job has none)."""
        rows = self._read("SELECT run FROM audit WHERE job = %s ORDER BY id DESC LIMIT 1", (job,))
        return None if not rows else int(rows[0][0])

    def close(self) -> None:
        """Leave the `controllers` table and end the session: the shards are free at once."""
        conn, self._conn = self._conn, None
        self.owned = frozenset()
        if conn is None:
            return
        with contextlib.suppress(psycopg.Error):
            if not (conn.broken or conn.closed):
                conn.execute("DELETE FROM controllers WHERE id = %s", (self.id,))
        with contextlib.suppress(psycopg.Error):
            conn.close()


def _why(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
