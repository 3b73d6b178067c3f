"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temp dir, a free
loopback port, run as an unprivileged user (PostgreSQL refuses root), removed on close.

Debian's `postgresql` package provides the binaries (`make test` installs it).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PgCluster", "pg_bin"]


def pg_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """`with PgCluster() as pg:` a running server; `pg.dsn(db)` to reach it.

    Args:
        fsync: off for tests (a crash of the server process, not the machine, loses
            nothing); on for benchmarks, to compare with SQLite's synchronous=FULL.
    """

    def __init__(self, fsync: bool = False) -> None:
        bin_dir = pg_bin()
        if bin_dir is None:
            raise FileNotFoundError("PostgreSQL is not installed (make test installs it)")
        self.bin = bin_dir
        self.fsync = fsync
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="lrpilot-pg-"))
        self.data = self.dir / "data"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "nobody"
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self.started = False

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.dir
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed: {result.stdout}{result.stderr}")

    def start(self) -> PgCluster:
        if not self.data.exists():
            self._check(
                self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "lrpilot", "-N"),
                "initdb",
            )
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=100"
        )
        self._check(
            self._run(
                "pg_ctl",
                "-D",
                str(self.data),
                "-l",
                str(self.dir / "log"),
                "-w",
                "-o",
                options,
                "start",
            ),
            "pg_ctl start",
        )
        self.started = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash of the server (every session cut at once)."""
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
            self.started = False

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://lrpilot@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> str:
        """A fresh database; its DSN."""
        import psycopg

        for _ in range(50):  # bounded: the server may still be coming up after a restart
            try:
                with psycopg.connect(self.dsn(), autocommit=True) as conn:
                    conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
                return self.dsn(name)
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise RuntimeError(f"cannot create database {name}: {self.log()}")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "log").read_text()[-4000:]
        return ""

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
