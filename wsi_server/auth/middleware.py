"""Identity middleware: resolves the ``Principal`` once per request (HTTP and WebSocket)
into ``scope["user"]`` (``request.user``), then keeps anonymous clients out of everything
but the public routes when sign-in is on.

Order in the app: ``AuthenticationMiddleware(backend=PrincipalBackend)`` then
``RequireSignIn``. Access to a slide is not decided here but by ``AppContext.slide``.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from starlette.authentication import AuthCredentials, AuthenticationBackend, AuthenticationError
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wsi_server.auth.principal import Principal
from wsi_server.auth.service import AuthService
from wsi_server.errors import Unauthenticated, WsiServerError, error_body

# Reachable without signing in: probes, the sign-in itself, share links, static assets.
PUBLIC_PREFIXES = ("/auth/", "/s/", "/viewer/static/", "/viewer/osd/")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/favicon.ico", "/api/me"})


class CredentialError(AuthenticationError):
    """Carries the error a credential check ended with (401, or 503 when the identity
    provider cannot be reached) out of the authentication middleware."""

    def __init__(self, error: WsiServerError) -> None:
        super().__init__(error.detail)
        self.error = error


class PrincipalBackend(AuthenticationBackend):
    def __init__(self, auth: AuthService) -> None:
        self.auth = auth

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, Principal]:
        try:
            principal = await self.auth.resolve(conn)
        except WsiServerError as exc:
            raise CredentialError(exc) from None
        scopes = ["authenticated"] if principal.is_authenticated else []
        if principal.is_admin:
            scopes.append("admin")
        return AuthCredentials(scopes), principal


def on_auth_error(conn: HTTPConnection, exc: Exception) -> Response:
    """A bearer token that does not verify: 401 with a JSON error (RFC 6750); 503 when
    the identity provider cannot be asked."""
    error = exc.error if isinstance(exc, CredentialError) else Unauthenticated(str(exc))
    headers = {}
    if error.status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return JSONResponse(error_body(error), status_code=error.status, headers=headers)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def wants_html(scope: Scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"accept":
            return b"text/html" in value
    return False


class RequireSignIn:
    """With sign-in on, an anonymous request for anything but a public route gets 401
    JSON, or a redirect to sign in when a browser asks for a page. Share-link viewers
    pass: the access policy limits them to their slides."""

    def __init__(self, app: ASGIApp, enabled: bool) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            not self.enabled
            or scope["type"] not in ("http", "websocket")
            or is_public(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        user = scope.get("user")
        if isinstance(user, Principal) and user.kind != "anonymous":
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
            return
        response: Response
        if scope.get("method") in ("GET", "HEAD") and wants_html(scope):
            target = scope["path"]
            query = scope.get("query_string", b"").decode("latin-1")
            if query:
                target += "?" + query
            response = RedirectResponse("/auth/login?next=" + quote(target, safe=""), 302)
        else:
            response = Response(
                json.dumps({"error": Unauthenticated.code, "detail": "sign in first"}),
                status_code=401, media_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
        await response(scope, receive, send)
