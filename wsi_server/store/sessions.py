"""Signed-in users' sessions, found by the hash of their cookie token.

The token is given to the browser once, by :meth:`UserSessions.create`; the table keeps
only its SHA-256, so a copy of the database does not sign anyone in.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update

from wsi_server.store._time import as_utc, utcnow
from wsi_server.store.engine import Store
from wsi_server.store.secrets import hash_token
from wsi_server.store.tables import USER_AGENT_LENGTH, user_sessions

t = user_sessions


@dataclass(frozen=True)
class SessionRecord:
    """One session as stored; ``id`` is the hash of its token, never the token."""

    id: str
    subject: str
    name: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    claims_expires_at: datetime
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    user_agent: str | None

    @classmethod
    def _from_row(cls, row: Any) -> SessionRecord:
        return cls(
            id=row.id,
            subject=row.subject,
            name=row.name,
            groups=tuple(row.groups),
            roles=tuple(row.roles),
            claims_expires_at=row.claims_expires_at,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            user_agent=row.user_agent,
        )


class UserSessions:
    """The ``user_sessions`` table."""

    def __init__(self, store: Store, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._engine = store.engine
        self._clock = clock

    def create(
        self,
        subject: str,
        name: str,
        groups: Iterable[str],
        roles: Iterable[str],
        expires_at: datetime,
        user_agent: str | None = None,
        *,
        claims_expires_at: datetime | None = None,
    ) -> str:
        """Store a new session and return its token (256 random bits, URL-safe).

        ``claims_expires_at`` is when the identity provider's claims (groups, roles) are
        due for a refresh; it defaults to ``expires_at``. A long ``user_agent`` is cut.
        """
        token = secrets.token_urlsafe(32)
        expires_at = as_utc(expires_at)
        with self._engine.begin() as conn:
            conn.execute(
                t.insert().values(
                    id=hash_token(token),
                    subject=subject,
                    name=name,
                    groups=list(groups),
                    roles=list(roles),
                    claims_expires_at=as_utc(claims_expires_at or expires_at),
                    created_at=self._clock(),
                    expires_at=expires_at,
                    revoked_at=None,
                    user_agent=user_agent[:USER_AGENT_LENGTH] if user_agent else None,
                )
            )
        return token

    def get(self, token: str) -> SessionRecord | None:
        """The live session of ``token``: None when unknown, expired or revoked."""
        digest = hash_token(token)
        with self._engine.connect() as conn:
            row = conn.execute(select(t).where(t.c.id == digest)).first()
        if row is None or not hmac.compare_digest(row.id, digest):
            return None
        if row.revoked_at is not None or row.expires_at <= self._clock():
            return None
        return SessionRecord._from_row(row)

    def revoke(self, token: str) -> bool:
        """End the session of ``token`` (sign-out); False when unknown or already revoked."""
        with self._engine.begin() as conn:
            result = conn.execute(
                update(t)
                .where(t.c.id == hash_token(token), t.c.revoked_at.is_(None))
                .values(revoked_at=self._clock())
            )
        return result.rowcount > 0

    def purge_expired(self) -> int:
        """Delete the sessions past their expiry; returns how many."""
        with self._engine.begin() as conn:
            result = conn.execute(delete(t).where(t.c.expires_at <= self._clock()))
        return result.rowcount
