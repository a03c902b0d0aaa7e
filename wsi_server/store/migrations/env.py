"""Alembic environment of the store.

``Store.open`` passes its open connection in ``config.attributes["connection"]``; the
``alembic`` command line works too, with ``sqlalchemy.url`` set in its configuration.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from wsi_server.store.tables import metadata

config = context.config


def _run(connection: Connection) -> None:
    # Batch mode lets later migrations alter tables on SQLite (copy and move).
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as conn:
        _run(conn)


if context.is_offline_mode():
    run_offline()
else:
    run_online()
