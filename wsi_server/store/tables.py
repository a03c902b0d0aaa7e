"""Every table of the store, declared once on one ``MetaData``.

Migrations (``migrations/versions``) create the same schema by hand; a test checks that
the migrated database and this metadata agree on both engines. A schema change is a new
migration plus the matching change here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    false,
)
from sqlalchemy.types import TypeDecorator

from wsi_server.store._time import as_utc

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

SUBJECT_LENGTH = 255
NOTE_LENGTH = 500
USER_AGENT_LENGTH = 255


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware instant, stored as ``timestamptz`` on PostgreSQL and as naive UTC
    text on SQLite (which sorts and compares correctly); always read back in UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _json() -> JSON:
    return JSON(none_as_null=True)


user_sessions = Table(
    "user_sessions",
    metadata,
    Column("id", String(64), primary_key=True),  # sha256 hex of the token
    Column("subject", String(SUBJECT_LENGTH), nullable=False),
    Column("name", Text, nullable=False),
    Column("groups", _json(), nullable=False),
    Column("roles", _json(), nullable=False),
    Column("claims_expires_at", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("user_agent", String(USER_AGENT_LENGTH), nullable=True),
    Index(None, "subject"),
    Index(None, "expires_at"),
)

shares = Table(
    "shares",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False),
    Column("slide_id", String(255), nullable=False),
    Column("created_by", String(SUBJECT_LENGTH), nullable=False),
    Column("created_by_name", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Column("revoked_by", String(SUBJECT_LENGTH), nullable=True),
    Column("note", String(NOTE_LENGTH), nullable=True),
    Column("viewport", _json(), nullable=True),
    Column("allow_associated", Boolean, nullable=False, server_default=false()),
    Column("open_count", Integer, nullable=False, server_default="0"),
    Column("last_opened_at", UTCDateTime, nullable=True),
    Index(None, "token_hash", unique=True),
    Index(None, "created_by"),
    Index(None, "slide_id"),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", UTCDateTime, nullable=False),  # first occurrence
    Column("last_time", UTCDateTime, nullable=False),  # last occurrence (slide.view)
    Column("count", Integer, nullable=False, server_default="1"),
    Column("actor", String(SUBJECT_LENGTH), nullable=False),
    Column("actor_name", Text, nullable=False),
    Column("action", String(64), nullable=False),
    Column("slide", String(255), nullable=True),
    Column("session_key", String(128), nullable=True),
    Column("client", String(64), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("detail", _json(), nullable=True),
    Index(None, "time"),
    Index(None, "actor"),
    Index(None, "slide"),
    Index(None, "action"),
)
