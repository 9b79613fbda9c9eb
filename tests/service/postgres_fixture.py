"""A real, throwaway PostgreSQL 15 server for the store tests (initdb + pg_ctl, loopback only).

PostgreSQL refuses to run as root, so as root the binaries run as the `postgres` user with
the data directory in a temporary directory handed to that user. Each test gets a database
of its own. Tests skip, saying why, only where no PostgreSQL binaries exist.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import pytest

BIN_DIRS = (
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/14/bin",
)


def find_bin() -> pathlib.Path | None:
    """The directory holding initdb and pg_ctl, or None."""
    for d in (os.environ.get("HESSIAN_PG_BIN", ""), *BIN_DIRS):
        if d and (pathlib.Path(d) / "pg_ctl").exists():
            return pathlib.Path(d)
    found = shutil.which("pg_ctl")
    return pathlib.Path(found).parent if found else None


class PostgresServer:
    """initdb, start and stop one PostgreSQL cluster on a loopback port."""

    def __init__(self, bindir: pathlib.Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="hessian-pg-"))
        self.data = self.tmp / "data"
        self.log = self.tmp / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.tmp, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.tmp} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh empty database; its DSN."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def remove(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (skipped, saying why, without binaries)."""
    bindir = find_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) found; set HESSIAN_PG_BIN")
    from conftest import free_port

    server = PostgresServer(bindir, free_port())
    server.init()
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            server.remove()


@pytest.fixture(name="postgres_dsn")
def postgres_dsn_fixture(postgres_server: PostgresServer) -> str:
    """The DSN of a fresh, empty database on the session's PostgreSQL server."""
    return postgres_server.create_database()
