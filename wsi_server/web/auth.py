"""Sign-in front: ``/auth/login``, ``/auth/callback``, ``/auth/logout`` (OpenID Connect,
authorization-code flow with PKCE, state and nonce, by authlib) and ``GET /api/me``."""

from __future__ import annotations

import html
import logging
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from wsi_server.auth.principal import Principal
from wsi_server.auth.service import SESSION_COOKIE, SHARE_COOKIE, session_expiry
from wsi_server.context import AppContext, principal
from wsi_server.store._time import iso, utcnow

log = logging.getLogger(__name__)


def safe_next(target: str | None) -> str:
    """A local path to return to after sign-in; anything that could leave the site (an
    absolute URL, ``//host``, a backslash trick, control characters) becomes ``/``."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    if any(c in target for c in "\\\r\n\t") or any(ord(c) < 32 for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def base_url(ctx: AppContext, request: Request) -> str:
    """The server's external URL: ``--public-url``, else what the request was sent to."""
    if ctx.settings.public_url:
        return ctx.settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def secure_cookies(ctx: AppContext, request: Request) -> bool:
    return base_url(ctx, request).startswith("https://")


def message_page(title: str, text: str, status: int) -> HTMLResponse:
    return HTMLResponse(
        f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)} · wsi-server</title>
<link rel="stylesheet" href="/viewer/static/common.css"></head>
<body class="page-message"><main class="message-card" role="alert">
<h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>
<p><a href="/">Back to the slide library</a></p></main></body></html>""",
        status_code=status,
        headers={"Cache-Control": "no-store"},
    )


def me_body(ctx: AppContext, who: Principal) -> dict[str, Any]:
    return {
        "auth": ctx.settings.auth,
        "kind": who.kind,
        "authenticated": who.is_authenticated,
        "subject": who.subject if who.kind == "user" else None,
        "name": who.name,
        "admin": who.is_admin,
        "can_share": who.kind != "share",
        "sign_out": ctx.settings.auth == "oidc" and who.via == "session",
        "shares": [
            {"id": g.share_id, "slide_id": g.slide_id, "created_by_name": g.created_by_name,
             "expires_at": iso(g.expires_at), "note": g.note,
             "allow_associated": g.allow_associated}
            for g in who.shares
        ],
    }


def routes(ctx: AppContext) -> list[BaseRoute]:
    auth = ctx.auth
    settings = ctx.settings

    async def me(request: Request) -> Response:
        return JSONResponse(me_body(ctx, principal(request)),
                            headers={"Cache-Control": "no-store"})

    out: list[BaseRoute] = [Route("/api/me", me)]
    if auth.login is None:
        return out
    from wsi_server.auth.oidc import DiscoveryError, LoginFailed, login_middleware

    async def login(request: Request) -> Response:
        request.session["next"] = safe_next(request.query_params.get("next"))
        try:
            return await auth.login.redirect(request, base_url(ctx, request) + "/auth/callback")
        except (LoginFailed, DiscoveryError) as exc:
            log.warning("sign-in could not start: %s", exc)
            return message_page("Sign-in is unavailable",
                                "The hospital sign-in service does not answer; try again "
                                "in a moment.", 503)

    async def callback(request: Request) -> Response:
        client = request.client.host if request.client else ""
        try:
            claims = await auth.login.complete(request)
        except (LoginFailed, DiscoveryError) as exc:
            reason = getattr(exc, "reason", None) or "the sign-in failed"
            await auth.record_failure(client, f"sign-in: {reason}")
            return message_page("Sign-in failed", f"{reason}. Try signing in again.", 401)
        who = auth.principal_from_claims(claims, via="session", session_key="")
        now = utcnow()
        token = await auth.run(
            lambda: auth.sessions.create(
                who.subject, who.name, sorted(who.groups), sorted(who.roles),
                session_expiry(settings, now), request.headers.get("user-agent"),
            )
        )
        await auth.record("auth.login", who, client=client,
                          detail={"groups": sorted(who.groups)})
        target = safe_next(request.session.pop("next", "/"))
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE, auth.session_cookie(token),
            max_age=int(settings.session_hours * 3600), httponly=True, samesite="lax",
            secure=secure_cookies(ctx, request), path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        """POST ends the sign-in (here and, by a redirect, at the provider). GET only
        sends the browser on to the provider's sign-out: a link on another site must not
        be able to end a session."""
        cookie = request.cookies.get(SESSION_COOKIE)
        token = auth.session_token(cookie) if request.method == "POST" else None
        who = principal(request)
        if token is not None:
            await auth.run(auth.sessions.revoke, token)
            auth.forget_cookie(cookie or "")
            await auth.record("auth.logout", who,
                              client=request.client.host if request.client else None)
        target = "/"
        try:
            target = auth.login.logout_url(base_url(ctx, request) + "/") or "/"
        except Exception:  # no end-session endpoint known: a local sign-out is enough
            target = "/"
        response = RedirectResponse(target, status_code=303)
        if request.method != "POST":
            return response
        secure = secure_cookies(ctx, request)
        response.delete_cookie(SESSION_COOKIE, path="/", secure=secure, httponly=True,
                               samesite="lax")
        response.delete_cookie(SHARE_COOKIE, path="/", secure=secure, httponly=True,
                               samesite="lax")
        return response

    https = bool(settings.public_url and settings.public_url.startswith("https://"))
    out.append(
        Mount(
            "/auth",
            routes=[
                Route("/login", login),
                Route("/callback", callback),
                Route("/logout", logout, methods=["GET", "POST"]),
            ],
            middleware=login_middleware(auth.secret, https, path="/auth"),
        )
    )
    return out
