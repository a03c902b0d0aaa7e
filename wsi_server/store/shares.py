"""Share links: read-only access to one slide for whoever holds the link's token.

A share has a short public id (for listing and revoking) and a secret token (in the link);
the table keeps only the token's SHA-256. Revoking keeps the row, for the audit trail.
"""

from __future__ import annotations

import builtins
import hmac
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select, update

from wsi_server.store._time import as_utc, iso, utcnow
from wsi_server.store.engine import Store
from wsi_server.store.secrets import hash_token
from wsi_server.store.tables import NOTE_LENGTH, shares

t = shares
ShareState = Literal["active", "expired", "revoked"]

# Columns a Share carries: all but the token hash.
_COLUMNS = [c for c in t.c if c.name != "token_hash"]


@dataclass(frozen=True)
class Share:
    """One share link, without its token or the token's hash."""

    id: str
    slide_id: str
    created_by: str
    created_by_name: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    note: str | None
    viewport: dict[str, Any] | None
    allow_associated: bool
    open_count: int
    last_opened_at: datetime | None

    @classmethod
    def _from_row(cls, row: Any) -> Share:
        return cls(**{c.name: getattr(row, c.name) for c in _COLUMNS})

    def state(self, now: datetime | None = None) -> ShareState:
        """``revoked`` once revoked, else ``expired`` from ``expires_at`` on, else
        ``active``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= (utcnow() if now is None else as_utc(now)):
            return "expired"
        return "active"

    def as_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON-ready fields plus ``state``; times in ISO-8601 UTC."""
        return {
            "id": self.id,
            "slide_id": self.slide_id,
            "created_by": self.created_by,
            "created_by_name": self.created_by_name,
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "revoked_by": self.revoked_by,
            "note": self.note,
            "viewport": self.viewport,
            "allow_associated": self.allow_associated,
            "open_count": self.open_count,
            "last_opened_at": iso(self.last_opened_at),
            "state": self.state(now),
        }


class Shares:
    """The ``shares`` table."""

    def __init__(self, store: Store, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._engine = store.engine
        self._clock = clock

    def create(
        self,
        slide_id: str,
        created_by: str,
        created_by_name: str,
        expires_at: datetime,
        note: str | None = None,
        viewport: Mapping[str, Any] | None = None,
        allow_associated: bool = False,
    ) -> tuple[Share, str]:
        """Store a new share and return it with its token (256 random bits, URL-safe);
        the token is not kept and cannot be shown again. A note is at most 500 chars."""
        if note is not None and len(note) > NOTE_LENGTH:
            raise ValueError(f"a share note is at most {NOTE_LENGTH} characters")
        token = secrets.token_urlsafe(32)
        share_id = secrets.token_urlsafe(9)
        with self._engine.begin() as conn:
            conn.execute(
                t.insert().values(
                    id=share_id,
                    token_hash=hash_token(token),
                    slide_id=slide_id,
                    created_by=created_by,
                    created_by_name=created_by_name,
                    created_at=self._clock(),
                    expires_at=as_utc(expires_at),
                    note=note,
                    viewport=dict(viewport) if viewport is not None else None,
                    allow_associated=allow_associated,
                    open_count=0,
                )
            )
            row = conn.execute(select(*_COLUMNS).where(t.c.id == share_id)).one()
        return Share._from_row(row), token

    def get(self, share_id: str) -> Share | None:
        """The share with this id, in whatever state."""
        with self._engine.connect() as conn:
            row = conn.execute(select(*_COLUMNS).where(t.c.id == share_id)).first()
        return None if row is None else Share._from_row(row)

    def by_token(self, token: str) -> Share | None:
        """The share this token opens, in whatever state (the caller checks
        :meth:`Share.state`); None for an unknown token."""
        digest = hash_token(token)
        with self._engine.connect() as conn:
            row = conn.execute(
                select(t.c.token_hash, *_COLUMNS).where(t.c.token_hash == digest)
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return Share._from_row(row)

    def list(self, created_by: str | None = None) -> builtins.list[Share]:
        """The shares ``created_by`` made (None: everyone's), newest first."""
        query = select(*_COLUMNS).order_by(t.c.created_at.desc(), t.c.id.desc())
        if created_by is not None:
            query = query.where(t.c.created_by == created_by)
        with self._engine.connect() as conn:
            return [Share._from_row(row) for row in conn.execute(query)]

    def revoke(self, share_id: str, by: str) -> Share | None:
        """Revoke a share for good; revoking it again changes nothing. Returns the share
        (None when unknown)."""
        with self._engine.begin() as conn:
            conn.execute(
                update(t)
                .where(t.c.id == share_id, t.c.revoked_at.is_(None))
                .values(revoked_at=self._clock(), revoked_by=by)
            )
            row = conn.execute(select(*_COLUMNS).where(t.c.id == share_id)).first()
        return None if row is None else Share._from_row(row)

    def record_open(self, share_id: str) -> bool:
        """Count one opening of the share's link; False when the share is unknown."""
        with self._engine.begin() as conn:
            result = conn.execute(
                update(t)
                .where(t.c.id == share_id)
                .values(open_count=t.c.open_count + 1, last_opened_at=self._clock())
            )
        return result.rowcount > 0
