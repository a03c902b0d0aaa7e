"""Sessions, share links and the audit log.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _time(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.JSON(none_as_null=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "user_sessions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        _json("groups", nullable=False),
        _json("roles", nullable=False),
        _time("claims_expires_at"),
        _time("created_at"),
        _time("expires_at"),
        _time("revoked_at", nullable=True),
        sa.Column("user_agent", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_user_sessions"),
    )
    op.create_index("ix_user_sessions_subject", "user_sessions", ["subject"])
    op.create_index("ix_user_sessions_expires_at", "user_sessions", ["expires_at"])

    op.create_table(
        "shares",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("slide_id", sa.String(255), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_by_name", sa.Text(), nullable=False),
        _time("created_at"),
        _time("expires_at"),
        _time("revoked_at", nullable=True),
        sa.Column("revoked_by", sa.String(255), nullable=True),
        sa.Column("note", sa.String(500), nullable=True),
        _json("viewport", nullable=True),
        sa.Column("allow_associated", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("open_count", sa.Integer(), nullable=False, server_default="0"),
        _time("last_opened_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_shares"),
    )
    op.create_index("ix_shares_token_hash", "shares", ["token_hash"], unique=True)
    op.create_index("ix_shares_created_by", "shares", ["created_by"])
    op.create_index("ix_shares_slide_id", "shares", ["slide_id"])

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _time("time"),
        _time("last_time"),
        sa.Column("count", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("actor", sa.String(255), nullable=False),
        sa.Column("actor_name", sa.Text(), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("slide", sa.String(255), nullable=True),
        sa.Column("session_key", sa.String(128), nullable=True),
        sa.Column("client", sa.String(64), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        _json("detail", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    for column in ("time", "actor", "slide", "action"):
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("shares")
    op.drop_table("user_sessions")
