"""``AuthService``: turns the credentials of a request into a ``Principal``.

Credentials, in order: ``Authorization: Bearer`` (a JWT verified against the provider's
JWKS, or an opaque token checked at its userinfo endpoint), the ``wsi_session`` cookie (a
signed handle of a sign-in kept in the store), and the ``wsi_share`` cookie (signed handles
of the share links this browser opened). Every verification is cached, so the tile path
pays a dictionary look-up: cookies for ``RECHECK_SECONDS`` (a sign-out or a revoked share
link takes effect within that time on every worker), bearer tokens until they expire.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
from itsdangerous import BadSignature, URLSafeSerializer, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.requests import HTTPConnection

from wsi_server.auth.policy import AccessConfig
from wsi_server.auth.principal import Principal, ShareGrant, anonymous
from wsi_server.errors import BackendUnavailable, Unauthenticated
from wsi_server.ingest.state import ScanRecord
from wsi_server.settings import Settings
from wsi_server.store.audit import AuditLog
from wsi_server.store.engine import Store
from wsi_server.store.sessions import UserSessions
from wsi_server.store.shares import Share, Shares

log = logging.getLogger(__name__)

SESSION_COOKIE = "wsi_session"
SHARE_COOKIE = "wsi_share"
RECHECK_SECONDS = 5.0
MAX_SHARES_PER_BROWSER = 8
FAILURES_PER_MINUTE = 5
_CACHE_SIZE = 20_000
_T = TypeVar("_T")


def digest(value: str) -> str:
    """A short hash naming a credential (sessions in the audit trail, logs)."""
    return hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:16]


def load_secret(settings: Settings, state_dir: Path) -> str:
    """The cookie-signing key: the setting, else a random key kept in the state folder
    (created once, readable by the server's user only; every worker reads the same)."""
    if settings.session_secret:
        return settings.session_secret
    path = state_dir / "session.key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    tmp = state_dir / f".session.key.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48))
    try:
        os.link(tmp, path)  # the first worker wins; the others read its key
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def groups_of(claims: Mapping[str, Any], claim: str) -> frozenset[str]:
    """The groups claim as a set: a list of strings, or one space/comma separated string."""
    raw = claims.get(claim)
    if isinstance(raw, str):
        return frozenset(g for g in raw.replace(",", " ").split() if g)
    if isinstance(raw, list | tuple):
        return frozenset(str(g) for g in raw if isinstance(g, str | int) and str(g))
    return frozenset()


def display_name(claims: Mapping[str, Any]) -> str:
    for key in ("name", "preferred_username", "email", "sub"):
        value = claims.get(key)
        if isinstance(value, str) and value:
            return value[:200]
    return "unknown user"


class _TtlCache:
    """A bounded map whose entries expire (verified credentials)."""

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._size = size

    def get(self, key: str) -> tuple[bool, Any]:
        hit = self._data.get(key)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def put(self, key: str, value: Any, ttl: float) -> None:
        self._data[key] = (time.monotonic() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def bump(self, key: str, value: Any) -> None:
        """Replace a live entry's value, keeping its expiry."""
        hit = self._data.get(key)
        if hit is not None:
            self._data[key] = (hit[0], value)

    def drop(self, key: str) -> None:
        self._data.pop(key, None)


class AuthService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        access: AccessConfig,
        secret: str,
    ) -> None:
        self.settings = settings
        self.mode = settings.auth
        self.access = access
        self.store = store
        self.sessions = UserSessions(store)
        self.shares = Shares(store)
        self.audit = AuditLog(store)
        self.executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="wsi-store")
        self.secret = secret
        self._session_signer = URLSafeTimedSerializer(secret, salt="wsi-session")
        self._share_signer = URLSafeSerializer(secret, salt="wsi-share")
        self._cookies = _TtlCache()
        self._bearers = _TtlCache()
        self._anonymous_by_client = _TtlCache(4096)
        self._failures = _TtlCache(4096)
        self.http: httpx.AsyncClient | None = None
        self.bearer: Any = None
        self.login: Any = None
        if self.mode == "oidc":
            from wsi_server.auth.oidc import Discovery, OidcLogin
            from wsi_server.auth.tokens import BearerVerifier

            assert settings.oidc_issuer and settings.oidc_client_id
            self.http = httpx.AsyncClient(timeout=10.0)
            discovery = Discovery(settings.oidc_issuer, self.http)
            self.bearer = BearerVerifier(
                discovery, settings.oidc_audience or settings.oidc_client_id, http=self.http
            )
            self.login = OidcLogin(
                settings.oidc_issuer, settings.oidc_client_id, settings.oidc_client_secret,
                extra_scopes=settings.oidc_scopes.split(),
            )

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a store call off the event loop; a database that cannot be reached is
        ``BackendUnavailable`` (503), never a 500."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except (OperationalError, InterfaceError) as exc:
            log.warning("state store unavailable: %s", type(exc).__name__)
            raise BackendUnavailable("the state store (database) is unavailable") from None

    async def ping(self) -> bool:
        """True when the state store answers (for ``/readyz``)."""
        def probe() -> None:
            with self.store.engine.connect() as conn:
                conn.execute(select(1))

        try:
            await self.run(probe)
        except BackendUnavailable:
            return False
        return True

    async def start(self) -> None:
        """Load the provider's metadata at start (sign-out needs its end-session
        endpoint); a provider that is down now is asked again at the first sign-in."""
        if self.login is None:
            return
        try:
            await self.login.provider_metadata()
        except Exception as exc:
            log.warning("OpenID provider %s not reachable at start: %s",
                        self.settings.oidc_issuer, exc)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.executor, self.audit.flush)
        if self.http is not None:
            await self.http.aclose()
        self.executor.shutdown(wait=True)
        self.store.close()

    # -- principals ------------------------------------------------------------------
    def principal_from_claims(
        self, claims: Mapping[str, Any], *, via: str, session_key: str
    ) -> Principal:
        groups = groups_of(claims, self.settings.oidc_groups_claim)
        collections, roles = self.access.resolve(groups)
        return Principal(
            kind="user", subject=str(claims.get("sub", "")), name=display_name(claims),
            groups=groups, roles=roles, collections=collections, via=via,
            session_key=session_key,
        )

    async def resolve(self, conn: HTTPConnection) -> Principal:
        """Who is asking. Raises ``Unauthenticated`` for a bearer token that does not
        verify; a stale or forged cookie is simply no identity."""
        auth = conn.headers.get("authorization")
        client = conn.client.host if conn.client else ""
        base: Principal | None
        # Only a Bearer credential counts, and only with sign-in on: a Basic header that a
        # reverse proxy forwards is not ours to judge.
        if auth is not None and self.bearer is not None and auth[:7].lower() == "bearer ":
            base = await self._bearer_principal(auth, client)
        else:
            base = await self._session_principal(conn.cookies.get(SESSION_COOKIE))
        if base is None:
            base = self._anonymous(client)
        share_cookie = conn.cookies.get(SHARE_COOKIE)
        if share_cookie:
            grants = await self._share_grants(share_cookie)
            base = base.with_shares(grants)
        return base

    def _anonymous(self, client: str) -> Principal:
        """The anonymous principal of a client address (one per address, cached: its
        session key groups the address's slide views in the audit trail)."""
        hit, principal = self._anonymous_by_client.get(client)
        if not hit:
            principal = anonymous(digest(client), everything=self.mode == "none")
            self._anonymous_by_client.put(client, principal, 3600.0)
        return principal

    async def _bearer_principal(self, header: str, client: str) -> Principal:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        if self.bearer is None:
            raise Unauthenticated("this server accepts no bearer tokens (--auth none)")
        hit, principal = self._bearers.get(token)  # by the token itself: no hash per request
        if hit:
            return principal
        key = digest(token)
        from wsi_server.auth.tokens import ProviderUnavailable, TokenError

        try:
            verified = await self.bearer.verify(token)
        except ProviderUnavailable:
            raise BackendUnavailable(
                "the identity provider cannot be reached to check this token; try again"
            ) from None
        except TokenError as exc:
            await self.record_failure(client, f"bearer token: {exc.reason}")
            raise Unauthenticated(f"bearer token rejected: {exc.reason}") from None
        principal = self.principal_from_claims(verified.claims, via="bearer", session_key=key)
        ttl = max(1.0, min(verified.expires_at - time.time(), 3600.0))
        self._bearers.put(token, principal, ttl)
        return principal

    async def _session_principal(self, cookie: str | None) -> Principal | None:
        if not cookie:
            return None
        hit, principal = self._cookies.get(cookie)
        if hit:
            return principal
        principal = None
        try:
            token = self._session_signer.loads(
                cookie, max_age=int(self.settings.session_hours * 3600)
            )
        except BadSignature:
            token = None
        if isinstance(token, str):
            record = await self.run(self.sessions.get, token)
            if record is not None:
                # Rights come from the access file as it is now (the roles stored at
                # sign-in were resolved from it then, and may since have been withdrawn).
                collections, roles = self.access.resolve(record.groups)
                principal = Principal(
                    kind="user", subject=record.subject, name=record.name,
                    groups=frozenset(record.groups), roles=roles, collections=collections,
                    via="session", session_key=digest(token),
                )
        self._cookies.put(cookie, principal, RECHECK_SECONDS)
        return principal

    async def _share_grants(self, cookie: str) -> tuple[ShareGrant, ...]:
        hit, grants = self._cookies.get("share:" + cookie)
        if hit:
            return grants
        try:
            tokens = self._share_signer.loads(cookie)
        except BadSignature:
            tokens = []
        if not isinstance(tokens, list):
            tokens = []
        shares = await self.run(self._active_shares, [t for t in tokens if isinstance(t, str)])
        grants = tuple(
            ShareGrant(s.id, s.slide_id, s.expires_at, s.created_by_name, s.allow_associated,
                       s.note)
            for s in shares
        )
        self._cookies.put("share:" + cookie, grants, RECHECK_SECONDS)
        return grants

    def _active_shares(self, tokens: Iterable[str]) -> list[Share]:
        out = []
        for token in list(tokens)[:MAX_SHARES_PER_BROWSER]:
            share = self.shares.by_token(token)
            if share is not None and share.state() == "active":
                out.append(share)
        return out

    # -- cookies ---------------------------------------------------------------------
    def session_cookie(self, token: str) -> str:
        return self._session_signer.dumps(token)

    def session_token(self, cookie: str | None) -> str | None:
        if not cookie:
            return None
        try:
            token = self._session_signer.loads(cookie)
        except BadSignature:
            return None
        return token if isinstance(token, str) else None

    def forget_cookie(self, cookie: str) -> None:
        self._cookies.drop(cookie)

    def share_cookie(self, existing: str | None, token: str) -> str:
        """The share cookie with ``token`` added (newest first, at most a few links)."""
        tokens: list[str] = []
        if existing:
            try:
                old = self._share_signer.loads(existing)
                if isinstance(old, list):
                    tokens = [t for t in old if isinstance(t, str)]
            except BadSignature:
                pass
        tokens = [token, *(t for t in tokens if t != token)][:MAX_SHARES_PER_BROWSER]
        return self._share_signer.dumps(tokens)

    def forget_share(self, cookie: str | None) -> None:
        if cookie:
            self._cookies.drop("share:" + cookie)

    # -- audit -----------------------------------------------------------------------
    async def record(
        self, action: str, principal: Principal | None, *, slide: str | None = None,
        outcome: str = "success", detail: Mapping[str, Any] | None = None,
        client: str | None = None,
    ) -> None:
        """Append an audit record; it is committed when this returns."""
        actor = principal.actor if principal else "anonymous"
        name = principal.name if principal else "anonymous"
        await self.run(
            lambda: self.audit.append(action, actor, name, slide=slide, outcome=outcome,  # type: ignore[arg-type]
                                      detail=detail, client=client)
        )

    def record_ingest(self, rec: ScanRecord) -> None:
        """Called from the ingest thread: one audit record per scan outcome (``ingest.done``,
        ``ingest.quarantined``, ``ingest.duplicate``). No file names: they often carry
        patient identifiers; the scan number leads to them in ``GET /api/ingest``."""
        outcome = "done" if rec.state in ("done", "converting") else rec.state
        detail: dict[str, Any] = {"scan": rec.id, "urgent": rec.urgent}
        if rec.error:
            detail["reason"] = {k: rec.error[k] for k in ("error", "detail") if k in rec.error}
        self.audit.append(
            f"ingest.{outcome}", "system:ingest", "ingest pipeline", slide=rec.slide_id,
            outcome="success" if outcome == "done" else "failure", detail=detail,
        )

    async def record_failure(self, client: str, reason: str) -> None:
        """An ``auth.failure`` record; at most ``FAILURES_PER_MINUTE`` per client address,
        so a flood of bad credentials cannot turn into a flood of database writes."""
        hit, count = self._failures.get(client)
        count = (count if hit else 0) + 1
        if not hit:
            self._failures.put(client, count, 60.0)
        else:
            self._failures.bump(client, count)
        if count > FAILURES_PER_MINUTE:
            return
        await self.run(
            lambda: self.audit.append("auth.failure", "anonymous", "anonymous",
                                      outcome="failure", detail={"reason": reason},
                                      client=client or None)
        )

    async def record_view(self, principal: Principal, slide_id: str, client: str) -> None:
        """One audit record per (principal, slide, viewing session): the first request
        commits it; the next ones only count (memory), flushed every few seconds."""
        if self.audit.count_view(principal.actor, slide_id, principal.session_key):
            return
        await self.run(
            lambda: self.audit.view(principal.actor, principal.name, slide_id,
                                    principal.session_key, client or None)
        )


def session_expiry(settings: Settings, now: datetime) -> datetime:
    return now + timedelta(hours=settings.session_hours)
