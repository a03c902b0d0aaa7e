"""Opening the store: the engine with per-dialect settings, then ``alembic upgrade head``.

SQLite (the default, one file in the state directory) runs in WAL mode with
``synchronous=FULL``, so a committed row survives the process being killed (and a power
cut); PostgreSQL serves several replicas. Several worker processes may open the same
database at once: the upgrade is serialised by a file lock beside the SQLite file, or by a
transaction-scoped advisory lock on PostgreSQL.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, Engine, create_engine, event, func, make_url, select
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DATABASE_NAME = "wsi-server.db"
SQLITE_BUSY_TIMEOUT_MS = 5000
# Key of the PostgreSQL advisory lock held while migrating (any constant unique to us).
MIGRATION_LOCK_KEY = 0x7753_4D69_6772  # "wsMigr"


def default_database_url(state_dir: Path) -> str:
    """URL of the default SQLite database in ``state_dir`` (created if missing)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = (state_dir / DATABASE_NAME).resolve()
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration built in code; ``connection`` is the one env.py uses."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock another process may hold.
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Store:
    """The database engine of the store, migrated to the newest schema.

    Build it with :meth:`open`; the table families (``UserSessions``, ``Shares``,
    ``AuditLog``) take it as their one argument.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Store:
        """Create the engine for ``url`` (``sqlite:///PATH`` or
        ``postgresql+psycopg://...``) and upgrade the schema to the newest migration."""
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        lock: Path | None = None
        if backend == "sqlite":
            database = parsed.database
            if database in (None, "", ":memory:"):
                engine = create_engine(
                    parsed,
                    poolclass=StaticPool,
                    connect_args={"check_same_thread": False},
                )
            else:
                db_path = Path(database)
                db_path.parent.mkdir(parents=True, exist_ok=True)
                lock = db_path.with_name(db_path.name + ".migrate.lock")
                engine = create_engine(
                    parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
                )
            event.listen(engine, "connect", _sqlite_on_connect)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
        store = cls(engine)
        if migrate:
            try:
                store._upgrade(lock)
            except BaseException:
                engine.dispose()
                raise
        return store

    def _upgrade(self, lock: Path | None) -> None:
        if lock is not None:
            with _file_lock(lock), self._engine.begin() as conn:
                command.upgrade(alembic_config(conn), "head")
            return
        with self._engine.begin() as conn:
            if self.dialect_name == "postgresql":
                # Released at commit, after the upgrade: the next process sees it done.
                conn.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
            command.upgrade(alembic_config(conn), "head")

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect_name(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
