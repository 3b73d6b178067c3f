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
from .store import (
    METRIC_POINTS_KEPT,
    METRIC_RUNS_KEPT,
    AuditRow,
    MetricPoint,
    Writes,
    decode_metrics,
    decode_row,
    encode_row,
    rfc3339,
)

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
CREATE TABLE IF NOT EXISTS metrics (
    job TEXT NOT NULL, run BIGINT NOT NULL, t BIGINT NOT NULL, epoch BIGINT NOT NULL,
    lr DOUBLE PRECISION NOT NULL, time DOUBLE PRECISION NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (job, run, t));
CREATE TABLE IF NOT EXISTS metric_strides (
    job TEXT NOT NULL, run BIGINT NOT NULL, stride BIGINT NOT NULL, PRIMARY KEY (job, run));
CREATE TABLE IF NOT EXISTS quarantine (
    job TEXT NOT NULL, data BYTEA, error TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS controllers (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, endpoint TEXT NOT NULL, admin TEXT NOT NULL,
    shards INTEGER[] NOT NULL DEFAULT '{}', heartbeat TIMESTAMPTZ NOT NULL);
"""

_AUDIT_COLUMNS = "time, job, old_lr, new_lr, reason, version, epoch, source, run, detail"

#: Recorded metrics, as `Store._record` writes them, in CTEs of the commit statement (which
#: all see the tables as they were before it: so the thinning counts the run's rows that
#: survive the turn plus its new points, and no row is both deleted and written).
_RECORD = f"""nm AS (SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[],
    %b::float8[], %b::float8[], %b::bytea[]) AS nm(job, run, t, epoch, lr, time, data)),
mf AS (SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS mf(job, run, t)),
thin AS (SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[]) AS thin(job, run, stride)),
kept AS (
    SELECT m.job, m.run, m.t FROM metrics m JOIN thin USING (job, run)
    WHERE NOT EXISTS (SELECT FROM mf WHERE mf.job = m.job AND mf.run = m.run AND m.t >= mf.t)
    UNION SELECT job, run, t FROM nm JOIN thin USING (job, run)),
strides AS (
    SELECT DISTINCT ON (thin.job, thin.run) thin.job, thin.run, k,
        thin.stride << k AS stride, count(kept.t) AS n
    FROM thin CROSS JOIN generate_series(0, 40) AS k
    LEFT JOIN kept ON kept.job = thin.job AND kept.run = thin.run
        AND mod(kept.t, NULLIF(thin.stride << k, 0)) = 0
    WHERE thin.stride << k > 0
    GROUP BY thin.job, thin.run, thin.stride, k
    HAVING count(kept.t) <= {METRIC_POINTS_KEPT}
    ORDER BY thin.job, thin.run, k),
newrun AS (SELECT DISTINCT unnest(%b::text[]) AS job),
ranked AS (
    SELECT job, run, row_number() OVER (PARTITION BY job ORDER BY run DESC) AS n
    FROM (SELECT job, run FROM metrics WHERE job IN (SELECT job FROM newrun)
        UNION SELECT job, run FROM nm WHERE job IN (SELECT job FROM newrun)) AS r),
dropped AS (SELECT job, run FROM ranked WHERE n >= {METRIC_RUNS_KEPT}),
dm AS (
    DELETE FROM metrics m USING mf WHERE m.job = mf.job AND m.run = mf.run AND m.t >= mf.t
    AND NOT EXISTS (SELECT FROM nm WHERE nm.job = m.job AND nm.run = m.run AND nm.t = m.t)),
dt AS (
    DELETE FROM metrics m USING strides s
    WHERE m.job = s.job AND m.run = s.run AND mod(m.t, s.stride) <> 0),
dr AS (DELETE FROM metrics m USING dropped d WHERE m.job = d.job AND m.run = d.run),
drs AS (DELETE FROM metric_strides m USING dropped d WHERE m.job = d.job AND m.run = d.run),
im AS (
    INSERT INTO metrics (job, run, t, epoch, lr, time, data)
    SELECT nm.job, nm.run, nm.t, nm.epoch, nm.lr, nm.time, nm.data
    FROM nm LEFT JOIN strides s USING (job, run)
    WHERE (s.stride IS NULL OR mod(nm.t, s.stride) = 0)
    AND NOT EXISTS (SELECT FROM dropped d WHERE d.job = nm.job AND d.run = nm.run)
    ON CONFLICT (job, run, t) DO UPDATE SET epoch = excluded.epoch, lr = excluded.lr,
        time = excluded.time, data = excluded.data),
ss AS (
    INSERT INTO metric_strides (job, run, stride) SELECT job, run, stride FROM strides s
    WHERE k > 0 AND NOT EXISTS (SELECT FROM dropped d WHERE d.job = s.job AND d.run = s.run)
    ON CONFLICT (job, run) DO UPDATE SET stride = excluded.stride)"""


#: A turn's commit as one statement of data-modifying CTEs over arrays, one per table. The
#: arrays go as binary parameters (`%b`): no text to format per element here or to parse
#: there (the bytea rows, the floats), a third of what the 64-job commit took in text.
_COMMIT_ROWS = f"""
WITH j AS (
    INSERT INTO jobs (job, shard, data)
    SELECT * FROM unnest(%b::text[], %b::int[], %b::bytea[])
    ON CONFLICT (job) DO UPDATE SET data = excluded.data),
s AS (
    INSERT INTO snapshots (job, run, epoch, data)
    SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bytea[])
    ON CONFLICT (job, run, epoch) DO UPDATE SET data = excluded.data),
p AS (
    DELETE FROM snapshots
    USING unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[]) AS p(job, run, lo, t)
    WHERE snapshots.job = p.job AND snapshots.run = p.run AND snapshots.epoch <= p.t
    AND snapshots.epoch >= coalesce(p.lo, -9223372036854775808)),
o AS (
    DELETE FROM snapshots USING unnest(%b::text[], %b::bigint[]) AS o(job, run)
    WHERE snapshots.job = o.job AND snapshots.run = o.run),
a AS (
    INSERT INTO audit ({_AUDIT_COLUMNS})
    SELECT * FROM unnest(%b::text[], %b::text[], %b::float8[], %b::float8[], %b::text[],
        %b::bigint[], %b::bigint[], %b::text[], %b::bigint[], %b::text[])),
forgotten AS (SELECT unnest(%b::text[]) AS job),
dj AS (DELETE FROM jobs USING forgotten WHERE jobs.job = forgotten.job),
ds AS (DELETE FROM snapshots USING forgotten WHERE snapshots.job = forgotten.job),
dfm AS (DELETE FROM metrics USING forgotten WHERE metrics.job = forgotten.job),
dfs AS (DELETE FROM metric_strides USING forgotten WHERE metric_strides.job = forgotten.job),
"""
#: ... most turns: each point a new row (no run to thin, no new run, no resume), a plan
#: prepared once. The turns that need more take `_RECORD`'s (planned each time).
_COMMIT = (
    _COMMIT_ROWS
    + """im AS (
    INSERT INTO metrics (job, run, t, epoch, lr, time, data)
    SELECT * FROM unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[],
        %b::float8[], %b::float8[], %b::bytea[])
    ON CONFLICT (job, run, t) DO UPDATE SET epoch = excluded.epoch, lr = excluded.lr,
        time = excluded.time, data = excluded.data)
SELECT NULL, NULL, NULL, NULL WHERE false
"""
)
_COMMIT_THIN = _COMMIT_ROWS + _RECORD + "\nSELECT job, run, stride, n FROM strides\n"


#: Runs whose lowest stored snapshot epoch a store remembers, at most.
_FLOORS_KEPT = 100_000


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
        #: (job, run) -> [points stored (an upper bound), stride]: the thinning of recorded
        #: metrics (as `Store` keeps it), read on first use, changed once a commit succeeded,
        #: dropped with the shard (its next owner writes the run on).
        self._thinning: dict[tuple[str, int], list[int]] = {}
        #: (job, run) -> no snapshot of the run below this epoch (this session pruned them),
        #: so a prune reads the pkey index from there. Without it each prune walked every
        #: snapshot row the earlier prunes deleted and vacuum had not removed yet: a turn's
        #: prune of 64 jobs went from 0.3 ms to 68 ms in 1,500 turns. Kept and dropped as
        #: `_thinning` is (another controller may have written a shard's runs meanwhile).
        self._floors: dict[tuple[str, int], int] = {}
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
        if fresh:  # another controller may have written any run since
            self._thinning = {}
            self._floors = {}
        elif before - self.owned:
            if self._thinning:
                self._thinning = {k: v for k, v in self._thinning.items() if self.owns(k[0])}
            if self._floors:
                self._floors = {k: v for k, v in self._floors.items() if self.owns(k[0])}
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

    def load_jobs(self) -> Iterator[tuple[str, dict[str, Any] | ValueError]]:
        """Every stored job's row, of every shard (admin `status` across controllers)."""
        return self._load("SELECT job, data FROM jobs", ())

    def load_shards(
        self, shards: Iterable[int]
    ) -> Iterator[tuple[str, dict[str, Any] | ValueError]]:
        """The rows of the jobs in `shards` (those a tick gained)."""
        return self._load("SELECT job, data FROM jobs WHERE shard = ANY(%s)", (list(shards),))

    def _load(
        self, query: str, args: tuple[Any, ...]
    ) -> Iterator[tuple[str, dict[str, Any] | ValueError]]:
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
        for job, error in w.quarantine:  # rows that decode but do not fit (Batch.job)
            self.quarantine(job, error)
        names = {
            *w.jobs,
            *w.deleted,
            *(s[0] for s in w.snapshots),
            *(r.job for r in w.audit),
            *(p.job for p in w.metrics),
            *(m[0] for m in w.metrics_from),
        }
        foreign = sorted(n for n in names if not self.owns(n))
        if foreign:
            raise NotOwner(f"job {foreign[0]!r} is not in a shard this controller holds")
        conn = self._session()
        jobs = list(w.jobs)
        snapshots = {(j, r, e): data for j, r, e, data in w.snapshots}  # the last one wins
        deleted = list(w.deleted)
        points, thin, states = self._thin(w)
        params = (
            jobs,
            [shard_of(n, self.shards) for n in jobs],
            list(w.jobs.values()),
            *_columns(4, [(*key, data) for key, data in snapshots.items()]),
            *_columns(4, [(j, r, self._floors.get((j, r)), t) for j, r, t in w.prune]),
            *_columns(2, w.old_runs),
            *_columns(10, [row.values() for row in w.audit]),
            deleted,
            *_columns(7, points),
        )
        statement = _COMMIT
        if thin or w.metrics_from or w.old_runs:
            statement = _COMMIT_THIN
            params += (*_columns(3, w.metrics_from), *_columns(3, thin), [j for j, _ in w.old_runs])
        try:
            # One statement, so one round trip and one implicit transaction: all or nothing.
            thinned = conn.execute(statement, params).fetchall()
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                self.owned = frozenset()  # the locks ended with the session
            raise StoreUnavailable(f"cannot commit to {self.where()}: {_why(exc)}") from None
        for job, run, stride, count in thinned:  # counted exactly: no longer an upper bound
            states[(job, int(run))] = [int(count), int(stride)]
        self._thinning.update(states)
        floors = self._floors
        if len(floors) > _FLOORS_KEPT:  # a hint only: forgotten, a prune reads from the start
            floors.clear()
        for job, run, t in w.prune:  # every snapshot of the run up to t is gone ...
            floor = floors.get((job, run))
            floors[(job, run)] = t + 1 if floor is None else max(floor, t + 1)
        for job, run, epoch in snapshots:  # ... but those this statement wrote
            floor = floors.get((job, run))
            if floor is not None and epoch < floor:
                floors[(job, run)] = epoch
        for key in w.old_runs:  # a run that ended gets no more points nor snapshots
            self._thinning.pop(key, None)
            floors.pop(key, None)
        if w.deleted:
            gone = set(w.deleted)
            for key in [k for k in self._thinning if k[0] in gone]:
                del self._thinning[key]
            for key in [k for k in floors if k[0] in gone]:
                del floors[key]

    # -- recorded metrics -------------------------------------------------------------------

    def _thin(
        self, w: Writes
    ) -> tuple[list[tuple[Any, ...]], list[tuple[str, int, int]], dict[tuple[str, int], list[int]]]:
        """The turn's points to write (every stride-th t of its run, the last of a t in the
        turn), the runs whose count may pass METRIC_POINTS_KEPT (job, run, stride: the
        statement doubles the stride until it does not), and the thinning states to keep
        once the commit succeeded: `Store._record`'s rule, decided here and in SQL."""
        forgotten = set(w.deleted)  # `Store` deletes their points after writing them
        keys = {(p.job, p.run) for p in w.metrics if p.job not in forgotten}
        self._read_thinning([k for k in keys if k not in self._thinning])
        states = {key: list(self._thinning[key]) for key in keys}
        rows: dict[tuple[str, int, int], tuple[Any, ...]] = {}
        for p in w.metrics:
            state = states.get((p.job, p.run))
            if state is not None and p.t % state[1] == 0:
                # An upper bound: a resumed run reports an epoch again and replaces its row.
                state[0] += 1
                rows[(p.job, p.run, p.t)] = (
                    p.job,
                    p.run,
                    p.t,
                    p.epoch,
                    p.lr,
                    p.wall,
                    encode_row(p.metrics),
                )
        thin = [(*key, s[1]) for key, s in states.items() if s[0] > METRIC_POINTS_KEPT]
        return list(rows.values()), thin, states

    def _read_thinning(self, keys: list[tuple[str, int]]) -> None:
        """The thinning state of runs this store has not written yet, from the tables."""
        if not keys:
            return
        rows = self._read(
            "SELECT k.job, k.run, (SELECT count(*) FROM metrics m WHERE m.job = k.job "
            "AND m.run = k.run), (SELECT s.stride FROM metric_strides s WHERE s.job = k.job "
            "AND s.run = k.run) FROM unnest(%s::text[], %s::bigint[]) AS k(job, run)",
            tuple(_columns(2, keys)),
        )
        for job, run, count, stride in rows:
            self._thinning[(job, int(run))] = [int(count), int(stride or 1)]

    def metric_runs(self, job: str) -> list[int]:
        """The runs of `job` with recorded metrics, oldest first (whichever controller
        recorded them)."""
        rows = self._read("SELECT DISTINCT run FROM metrics WHERE job = %s ORDER BY run", (job,))
        return [int(r[0]) for r in rows]

    def metric_rows(
        self, job: str, run: int, after: int = -1
    ) -> list[tuple[int, int, float, float, bytes]]:
        """The recorded points of one run (those with t > `after`) in order of t: (t, epoch,
        lr, wall, msgpack of the metrics), as `Store.metric_rows`."""
        rows = self._read(
            "SELECT t, epoch, lr, time, data FROM metrics WHERE job = %s AND run = %s "
            "AND t > %s ORDER BY t",
            (job, run, after),
        )
        return [(int(t), int(e), lr, wall, bytes(data)) for t, e, lr, wall, data in rows]

    def metric_count(self, job: str, run: int) -> int:
        """How many points of the run are recorded."""
        rows = self._read("SELECT count(*) FROM metrics WHERE job = %s AND run = %s", (job, run))
        return int(rows[0][0])

    def metrics(self, job: str, run: int) -> list[MetricPoint]:
        """The recorded points of one run of `job`, in order of t."""
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
