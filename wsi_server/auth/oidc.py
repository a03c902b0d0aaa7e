"""OpenID Connect: provider discovery and browser sign-in (authorization code with PKCE).

The protocol is authlib's Starlette client (state, nonce, PKCE S256, ID token signature and
claims). This module adds what wsi-server needs around it: the provider must report exactly
the configured issuer, every failed sign-in is a ``LoginFailed`` with a reason fit for the
user (never a 500), and no token, code or cookie value is logged.

authlib keeps the state of a sign-in in progress in ``request.session``: mount
``login_middleware()`` around the sign-in routes (and only those).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from authlib.common.errors import AuthlibBaseError
from authlib.common.urls import add_params_to_uri
from authlib.integrations.base_client.errors import MismatchingStateError
from authlib.integrations.starlette_client import OAuth, OAuthError
from joserfc.errors import JoseError
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
LOGIN_COOKIE = "wsi_login"
LOGIN_COOKIE_MAX_AGE = 600
BASE_SCOPES = ("openid", "profile", "email")
# Claims that describe the ID token itself; userinfo never overrides them.
_PROTOCOL_CLAIMS = frozenset(
    {"iss", "sub", "aud", "exp", "iat", "nbf", "nonce", "azp", "at_hash", "c_hash",
     "auth_time", "jti", "sid"}
)


def _client_errors(name: str) -> tuple[type[Exception], ...]:
    """``httpx.<name>``, and ``httpx2.<name>`` when installed: authlib's HTTP client is
    httpx2 when it can import it, httpx otherwise."""
    types: list[type[Exception]] = [getattr(httpx, name)]
    try:
        import httpx2
    except ImportError:
        return tuple(types)
    types.append(getattr(httpx2, name))
    return tuple(types)


_HTTP_ERRORS = _client_errors("HTTPError")
_STATUS_ERRORS = _client_errors("HTTPStatusError")
_TRANSPORT_ERRORS = _client_errors("TransportError")
_EXCHANGE_ERRORS: tuple[type[Exception], ...] = (*_HTTP_ERRORS, ValueError, KeyError, TypeError)
_PROVIDER_ERRORS: tuple[type[Exception], ...] = (AuthlibBaseError, *_HTTP_ERRORS, ValueError)


class _NoVerifierInLogs(logging.Filter):
    """Drops authlib's debug line that prints the PKCE code verifier."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Using code_verifier")


logging.getLogger("authlib.integrations.base_client.sync_app").addFilter(_NoVerifierInLogs())


class DiscoveryError(Exception):
    """The discovery document is unreachable, malformed or names another issuer."""


class LoginFailed(Exception):
    """A sign-in that did not complete. ``reason`` is short and safe to show the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of an OpenID provider's discovery document wsi-server uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None = None
    end_session_endpoint: str | None = None
    id_token_signing_alg_values_supported: tuple[str, ...] = ("RS256",)

    @classmethod
    def from_document(cls, doc: object, issuer: str) -> ProviderMetadata:
        """Validate a discovery document fetched for the configured ``issuer``."""
        if not isinstance(doc, Mapping):
            raise DiscoveryError("the discovery document is not a JSON object")
        reported = doc.get("issuer")
        if reported != issuer:
            raise DiscoveryError(
                f"the provider reports issuer {reported!r} but {issuer!r} is configured; "
                "they must be identical (mind a trailing slash)"
            )
        required = ("authorization_endpoint", "token_endpoint", "jwks_uri")
        missing = [k for k in required if not _url(doc.get(k))]
        if missing:
            raise DiscoveryError(f"the discovery document lacks {', '.join(missing)}")
        algs = doc.get("id_token_signing_alg_values_supported")
        if not isinstance(algs, list) or not all(isinstance(a, str) for a in algs) or not algs:
            algs = ["RS256"]
        return cls(
            issuer=issuer,
            authorization_endpoint=doc["authorization_endpoint"],
            token_endpoint=doc["token_endpoint"],
            jwks_uri=doc["jwks_uri"],
            userinfo_endpoint=_url(doc.get("userinfo_endpoint")),
            end_session_endpoint=_url(doc.get("end_session_endpoint")),
            id_token_signing_alg_values_supported=tuple(algs),
        )


def _url(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def discovery_url(issuer: str) -> str:
    """Where the discovery document of ``issuer`` is (OpenID Connect Discovery §4)."""
    return issuer.rstrip("/") + DISCOVERY_PATH


async def discover(issuer: str, http: httpx.AsyncClient) -> ProviderMetadata:
    """Fetch and validate the provider's discovery document; ``DiscoveryError`` if unusable."""
    url = discovery_url(issuer)
    try:
        response = await http.get(url, headers={"Accept": "application/json"})
        response.raise_for_status()
        doc = response.json()
    except _STATUS_ERRORS as exc:
        raise DiscoveryError(f"{url} answered HTTP {_status(exc)}") from exc
    except _HTTP_ERRORS as exc:
        raise DiscoveryError(f"{url} is unreachable ({type(exc).__name__}: {exc})") from exc
    except ValueError as exc:
        raise DiscoveryError(f"{url} did not return JSON") from exc
    return ProviderMetadata.from_document(doc, issuer)


class Discovery:
    """``discover`` behind a cache: an async callable giving the provider's metadata.

    Fetched once, then again after ``ttl`` seconds; while the provider is unreachable the
    last good metadata is kept, and a first fetch that failed is retried at most every
    ``retry_after`` seconds (in between, the same ``DiscoveryError`` is raised again).
    Use from one event loop.
    """

    def __init__(
        self, issuer: str, http: httpx.AsyncClient, *, ttl: float = 3600.0,
        retry_after: float = 5.0,
    ) -> None:
        self.issuer = issuer
        self.ttl = ttl
        self.retry_after = retry_after
        self.fetches = 0
        self._http = http
        self._lock = asyncio.Lock()
        self._metadata: ProviderMetadata | None = None
        self._next_fetch = 0.0
        self._error: str | None = None

    async def __call__(self) -> ProviderMetadata:
        if self._metadata is not None and time.monotonic() < self._next_fetch:
            return self._metadata
        async with self._lock:
            now = time.monotonic()
            if now < self._next_fetch:
                if self._metadata is not None:
                    return self._metadata
                raise DiscoveryError(self._error or "discovery failed")
            self.fetches += 1
            try:
                self._metadata = await discover(self.issuer, self._http)
            except DiscoveryError as exc:
                self._next_fetch = now + self.retry_after
                if self._metadata is None:
                    self._error = str(exc)
                    raise
                log.warning("OIDC discovery failed, keeping the last metadata: %s", exc)
                return self._metadata
            self._next_fetch = now + self.ttl
            return self._metadata


def login_middleware(secret: str, https_only: bool, *, path: str = "/") -> list[Middleware]:
    """The session middleware a sign-in needs, to mount only around the sign-in routes.

    A signed cookie ``wsi_login`` (10 minutes, SameSite=Lax, HttpOnly, Secure when
    ``https_only``) holds the state, nonce and PKCE verifier of a sign-in in progress.
    """
    return [
        Middleware(
            SessionMiddleware, secret_key=secret, session_cookie=LOGIN_COOKIE,
            max_age=LOGIN_COOKIE_MAX_AGE, path=path, same_site="lax", https_only=https_only,
        )
    ]


class OidcLogin:
    """Browser sign-in with one OpenID provider: ``redirect`` sends the user to it,
    ``complete`` handles the callback and returns who signed in.

    ``client_secret=None`` makes a public client (PKCE only). ``extra_scopes`` are asked
    for in addition to ``openid profile email`` (e.g. ``groups``).
    """

    def __init__(
        self, issuer: str, client_id: str, client_secret: str | None, *,
        extra_scopes: Sequence[str] = (), timeout: float = 10.0,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.scopes = (*BASE_SCOPES, *(s for s in extra_scopes if s not in BASE_SCOPES))
        client_kwargs: dict[str, Any] = {
            "scope": " ".join(self.scopes),
            "code_challenge_method": "S256",
            "timeout": timeout,
        }
        if not client_secret:
            client_kwargs["token_endpoint_auth_method"] = "none"
        self._oauth = OAuth()
        self._client = self._oauth.register(
            "oidc", server_metadata_url=discovery_url(issuer), client_id=client_id,
            client_secret=client_secret or None, client_kwargs=client_kwargs,
        )
        self._metadata: ProviderMetadata | None = None

    async def provider_metadata(self) -> ProviderMetadata:
        """The provider's metadata (loaded once); ``DiscoveryError`` if unusable."""
        if self._metadata is None:
            try:
                doc = await self._client.load_server_metadata()
            except _STATUS_ERRORS as exc:
                raise DiscoveryError(
                    f"{discovery_url(self.issuer)} answered HTTP {_status(exc)}"
                ) from exc
            except _HTTP_ERRORS as exc:
                raise DiscoveryError(
                    f"{discovery_url(self.issuer)} is unreachable ({type(exc).__name__})"
                ) from exc
            except ValueError as exc:
                raise DiscoveryError(f"{discovery_url(self.issuer)} did not return JSON") from exc
            self._metadata = ProviderMetadata.from_document(doc, self.issuer)
        return self._metadata

    async def redirect(self, request: Request, redirect_uri: str) -> Response:
        """A 302 to the provider's authorization endpoint; remembers state, nonce and the
        PKCE verifier in the sign-in session."""
        _require_session(request)
        await self._metadata_for_login()
        try:
            return await self._client.authorize_redirect(request, redirect_uri)
        except _PROVIDER_ERRORS as exc:
            log.warning("OIDC sign-in could not start: %s", _describe(exc))
            raise LoginFailed("the sign-in could not be started") from exc

    async def complete(self, request: Request) -> dict[str, Any]:
        """Handle the provider's callback: the signed-in user's verified claims (ID token
        claims, completed by userinfo when the provider has it)."""
        claims, _ = await self.complete_with_id_token(request)
        return claims

    async def complete_with_id_token(self, request: Request) -> tuple[dict[str, Any], str]:
        """``complete``, also returning the raw ID token (for ``logout_url``'s hint)."""
        _require_session(request)
        error = request.query_params.get("error")
        if error:
            code = _safe_code(error)
            log.info("OIDC sign-in refused by the provider: %s", code)
            raise LoginFailed(f"the identity provider refused the sign-in ({code})")
        await self._metadata_for_login()
        try:
            token = await self._client.authorize_access_token(request)
        except MismatchingStateError as exc:
            log.info("OIDC callback without a matching sign-in state")
            raise LoginFailed("this sign-in expired or was not started here; try again") from exc
        except OAuthError as exc:
            log.warning("OIDC token exchange failed: %s", _describe(exc))
            raise LoginFailed("the identity provider did not accept the sign-in") from exc
        except (JoseError, AuthlibBaseError) as exc:
            log.warning("OIDC ID token rejected: %s", _describe(exc))
            raise LoginFailed("the identity provider's answer did not verify") from exc
        except _TRANSPORT_ERRORS as exc:
            log.warning("OIDC provider unreachable during sign-in: %s", _describe(exc))
            raise LoginFailed("the identity provider is unavailable") from exc
        except _EXCHANGE_ERRORS as exc:
            log.warning("OIDC token exchange failed: %s", _describe(exc))
            raise LoginFailed("the identity provider did not accept the sign-in") from exc

        id_token = token.get("id_token")
        identity = token.get("userinfo")
        if not isinstance(id_token, str) or not identity:
            log.warning("OIDC token response without an ID token")
            raise LoginFailed("the identity provider returned no ID token")
        claims = dict(identity)
        metadata = await self._metadata_for_login()
        if metadata.userinfo_endpoint:
            claims.update(await self._userinfo(token, claims.get("sub")))
        return claims, id_token

    def logout_url(
        self, post_logout_redirect_uri: str, id_token_hint: str | None = None
    ) -> str | None:
        """The provider's RP-initiated logout URL, or None when it has none (or its metadata
        is not loaded yet: await ``provider_metadata()`` at startup to be sure)."""
        metadata = self._metadata
        if metadata is None or metadata.end_session_endpoint is None:
            return None
        params = {"post_logout_redirect_uri": post_logout_redirect_uri,
                  "client_id": self.client_id}
        if id_token_hint:
            params["id_token_hint"] = id_token_hint
        return str(add_params_to_uri(metadata.end_session_endpoint, params))

    async def _metadata_for_login(self) -> ProviderMetadata:
        try:
            return await self.provider_metadata()
        except DiscoveryError as exc:
            log.error("OIDC provider %s unusable: %s", self.issuer, exc)
            raise LoginFailed("the identity provider is unavailable") from exc

    async def _userinfo(self, token: Mapping[str, Any], subject: object) -> dict[str, Any]:
        try:
            info = await self._client.userinfo(token=token)
        except _PROVIDER_ERRORS as exc:
            log.warning("OIDC userinfo failed: %s", _describe(exc))
            raise LoginFailed("the identity provider did not return the user's profile") from exc
        if info.get("sub") != subject:
            log.warning("OIDC userinfo names another subject than the ID token")
            raise LoginFailed("the identity provider's answer did not verify")
        return {k: v for k, v in info.items() if k not in _PROTOCOL_CLAIMS}


def _require_session(request: Request) -> None:
    if "session" not in request.scope:
        raise RuntimeError("the sign-in routes need login_middleware() around them")


def _safe_code(value: str) -> str:
    """An OAuth error code as sent by the provider, reduced to what such codes contain."""
    return re.sub(r"[^a-z0-9_.-]", "", value.lower())[:64] or "error"


def _describe(exc: BaseException) -> str:
    """An exception as a log line; the messages of these exceptions hold no token."""
    if isinstance(exc, _STATUS_ERRORS):
        return f"HTTP {_status(exc)} from {_where(exc)}"
    if isinstance(exc, _HTTP_ERRORS):
        return f"{type(exc).__name__} ({_where(exc)})"
    return f"{type(exc).__name__}: {exc}"


def _status(exc: Exception) -> object:
    return getattr(getattr(exc, "response", None), "status_code", "?")


def _where(exc: Exception) -> str:
    """The URL of a failed request, without its query."""
    try:
        url = exc.request.url  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # no request attached
        return "?"
    return f"{url.scheme}://{url.netloc.decode()}{url.path}"
