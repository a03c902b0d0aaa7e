"""``Principal``: who is asking, resolved once per request by the auth middleware.

Three kinds: a signed-in ``user`` (session cookie or bearer token), a ``share`` link viewer
(read-only access to the slides of the share links it opened), and ``anonymous`` (only with
``--auth none`` on loopback, or ``--allow-anonymous``). A principal carries what the access
policy needs, already resolved from the access file when the identity was verified, so the
tile path pays set look-ups and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from starlette.authentication import BaseUser

Kind = Literal["user", "share", "anonymous"]
ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class ShareGrant:
    """Read-only access to one slide through a share link."""

    share_id: str
    slide_id: str
    expires_at: datetime
    created_by_name: str
    allow_associated: bool = False
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Principal(BaseUser):
    kind: Kind
    subject: str
    name: str
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    collections: frozenset[str] | None = frozenset()
    """Collections this principal sees; None: every collection (admins, ``--auth none``)."""
    shares: tuple[ShareGrant, ...] = ()
    session_key: str = ""
    """Identifies one viewing session (a hash, never the credential itself) for the audit
    trail's one-record-per-session slide views."""
    via: str = "anonymous"
    """``session``, ``bearer``, ``share`` or ``anonymous``: how the identity was proven."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # -- starlette's BaseUser --------------------------------------------------------
    @property
    def is_authenticated(self) -> bool:
        return self.kind != "anonymous"

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def identity(self) -> str:
        return self.actor

    # -- what the policy and the audit trail read -----------------------------------
    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles

    @property
    def actor(self) -> str:
        """The audit trail's name for this principal: the user's subject, ``share:<id>``
        for a link viewer, ``anonymous`` otherwise."""
        if self.kind == "share" and self.shares:
            return f"share:{self.shares[0].share_id}"
        return self.subject

    def share_for(self, slide_id: str) -> ShareGrant | None:
        for grant in self.shares:
            if grant.slide_id == slide_id:
                return grant
        return None

    def with_shares(self, shares: tuple[ShareGrant, ...]) -> Principal:
        """This principal, also holding the share links it opened."""
        if not shares:
            return self
        if self.kind == "anonymous" and self.collections is not None:
            first = shares[0]
            return Principal(
                kind="share", subject=f"share:{first.share_id}",
                name=f"Shared link from {first.created_by_name}", shares=shares,
                session_key=self.session_key, via="share",
            )
        return Principal(
            kind=self.kind, subject=self.subject, name=self.name, groups=self.groups,
            roles=self.roles, collections=self.collections, shares=shares,
            session_key=self.session_key, via=self.via, extra=self.extra,
        )


def anonymous(session_key: str = "", *, everything: bool) -> Principal:
    """The anonymous principal: with ``--auth none`` it sees every collection and is the
    local administrator (a single-user install on loopback); with sign-in on it sees
    nothing."""
    if everything:
        return Principal(
            kind="anonymous", subject="anonymous", name="anonymous", collections=None,
            roles=frozenset({ADMIN}), session_key=session_key,
        )
    return Principal(kind="anonymous", subject="anonymous", name="anonymous",
                     session_key=session_key)
