"""The access policy: the access file and the pure decisions made from it.

The access file (``--access-config``, TOML) maps groups of the identity provider's groups
claim to collections (the top-level folders of the library roots) and to roles::

    [[grant]]
    group = "bham-histopathology"            # a value of the groups claim
    collections = ["birmingham", "solihull"] # top-level folders of the library roots
    [[grant]]
    group = "pathology-admins"
    role = "admin"                           # sees every collection and the audit trail

Every decision is a pure function of a ``Principal`` and a slide's id and collection,
tested without a server.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from wsi_server.auth.principal import ADMIN, Principal

ROLES = frozenset({ADMIN})
ASSOCIATED_WITH_IDENTIFIERS = frozenset({"label", "macro"})


class AccessConfigError(ValueError):
    """The access file cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Grant:
    group: str
    collections: frozenset[str] = frozenset()
    role: str | None = None


@dataclass(frozen=True, slots=True)
class AccessConfig:
    grants: tuple[Grant, ...] = ()

    def resolve(self, groups: Iterable[str]) -> tuple[frozenset[str] | None, frozenset[str]]:
        """(collections, roles) granted to a member of ``groups``; collections is None
        when a role (admin) grants every collection."""
        groups = set(groups)
        collections: set[str] = set()
        roles: set[str] = set()
        for grant in self.grants:
            if grant.group in groups:
                collections |= grant.collections
                if grant.role:
                    roles.add(grant.role)
        if ADMIN in roles:
            return None, frozenset(roles)
        return frozenset(collections), frozenset(roles)


def parse_access_config(text: str, source: str = "access file") -> AccessConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AccessConfigError(f"{source}: not valid TOML: {exc}") from None
    unknown = set(data) - {"grant"}
    if unknown:
        raise AccessConfigError(f"{source}: unknown table(s) {sorted(unknown)}; "
                                "only [[grant]] entries are allowed")
    raw = data.get("grant", [])
    if not isinstance(raw, list):
        raise AccessConfigError(f"{source}: 'grant' must be an array of tables ([[grant]])")
    grants = []
    for i, item in enumerate(raw, 1):
        where = f"{source}: grant #{i}"
        if not isinstance(item, dict):
            raise AccessConfigError(f"{where}: must be a table")
        extra = set(item) - {"group", "collections", "role"}
        if extra:
            raise AccessConfigError(f"{where}: unknown key(s) {sorted(extra)}")
        group = item.get("group")
        if not isinstance(group, str) or not group:
            raise AccessConfigError(f"{where}: 'group' must be a non-empty string")
        cols = item.get("collections", [])
        if not isinstance(cols, list) or not all(isinstance(c, str) and c for c in cols):
            raise AccessConfigError(f"{where}: 'collections' must be a list of folder names")
        if any("/" in c or c in (".", "..") for c in cols):
            raise AccessConfigError(f"{where}: a collection is a top-level folder name, "
                                    "without '/'")
        role = item.get("role")
        if role is not None and role not in ROLES:
            raise AccessConfigError(f"{where}: unknown role {role!r} (known: "
                                    f"{', '.join(sorted(ROLES))})")
        if not cols and role is None:
            raise AccessConfigError(f"{where}: grants neither collections nor a role")
        grants.append(Grant(group, frozenset(cols), role))
    return AccessConfig(tuple(grants))


def load_access_config(path: Path | None) -> AccessConfig:
    """The access file at ``path``; no file grants nothing (only share links work)."""
    if path is None:
        return AccessConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AccessConfigError(f"cannot read the access file {path}: {exc.strerror}") from None
    return parse_access_config(text, str(path))


# -- decisions ----------------------------------------------------------------------
def can_see(principal: Principal, slide_id: str, collection: str | None) -> bool:
    """May ``principal`` see the slide? Through a collection it was granted (a slide at
    the top of a root belongs to no collection: admins only), or a share link."""
    cols = principal.collections
    if cols is None:
        return True
    if collection is not None and collection in cols:
        return True
    return principal.share_for(slide_id) is not None


def withheld_associated(
    principal: Principal, slide_id: str, collection: str | None, server_hides: bool
) -> frozenset[str]:
    """Associated images withheld from ``principal`` for this slide: label and macro when
    the server hides them for everyone, or when the principal sees the slide only through
    a share link whose creator did not allow them."""
    if server_hides:
        return ASSOCIATED_WITH_IDENTIFIERS
    cols = principal.collections
    if cols is None or (collection is not None and collection in cols):
        return frozenset()
    grant = principal.share_for(slide_id)
    if grant is not None and grant.allow_associated:
        return frozenset()
    return ASSOCIATED_WITH_IDENTIFIERS


def can_audit(principal: Principal) -> bool:
    return principal.is_admin


def can_share(principal: Principal) -> bool:
    """Share-link viewers are read-only; users (and the local anonymous admin) share."""
    return principal.kind != "share"


def can_share_slide(principal: Principal, collection: str | None) -> bool:
    """May ``principal`` create a share link for a slide of ``collection``? Only through
    its own access (a collection, or every collection): a slide seen only through someone
    else's link cannot be passed on (nor its label and macro opened up)."""
    if not can_share(principal):
        return False
    cols = principal.collections
    return cols is None or (collection is not None and collection in cols)
