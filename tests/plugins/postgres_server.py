"""A real PostgreSQL for the store tests (see tests/test_store.py).

``postgres_server`` is one server per session, from Debian's ``postgresql`` package
(``/usr/lib/postgresql/*/bin``), on a free loopback port with its data and socket in a
temporary folder; run as the ``postgres`` system user when the suite runs as root (the
server refuses root). ``postgres_url`` is a database of the session; ``fresh_postgres_url``
an empty database for one test, dropped after it; ``store_url`` runs a test on both
engines (a new SQLite file, a new PostgreSQL database). Without the binaries the tests
are skipped locally and fail in CI (env ``CI`` set).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.plugins.redis_server import free_port

SUPERUSER = "postgres"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "postgres: talks to a real PostgreSQL server")


def _bindir() -> Path:
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (required in CI): ./dev installs it")
        pytest.skip("PostgreSQL is not installed (Debian package postgresql)")
    return found[-1]


class PostgresServer:
    """A ``postgres`` child process with trust authentication on 127.0.0.1."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        # Not under pytest's tmp dir: its parents are private to root.
        self.workdir = Path(tempfile.mkdtemp(prefix="wsi-postgres-"))
        self.data = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.workdir)
                pytest.fail("running as root needs the 'postgres' system user")
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
            self._user = {"user": account.pw_uid, "group": account.pw_gid,
                          "extra_groups": []}

    def _run(self, *args: str) -> None:
        subprocess.run(args, check=True, cwd=self.workdir, capture_output=True, **self._user)

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
            "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync",
        )
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.bindir / "postgres"), "-D", str(self.data),
                    "-p", str(self.port),
                    "-c", "listen_addresses=127.0.0.1",
                    "-c", f"unix_socket_directories={self.workdir}",
                    "-c", "fsync=on",
                    "-c", "synchronous_commit=on",
                    "-c", "max_connections=200",
                ],
                cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, **self._user,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def dsn(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL (psycopg 3 driver) of a database."""
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown: clients are cut off
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer(_bindir())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database of the session (shared by the tests that use it)."""
    return postgres_server.url(postgres_server.create_database())


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty database for this test alone, dropped after it."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database of each engine: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'wsi-server.db'}"
    return str(request.getfixturevalue("fresh_postgres_url"))
