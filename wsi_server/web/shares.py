"""Share-link front: create, list and revoke links (``/api/slides/{id}/shares``,
``/api/shares``), and open one (``/s/{token}``), which gives the browser read-only access
to that one slide for the link's lifetime."""

from __future__ import annotations

import json
import math
import re
import time
from collections import OrderedDict
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from wsi_server.auth import policy
from wsi_server.auth.middleware import wants_html
from wsi_server.auth.service import SHARE_COOKIE
from wsi_server.context import AppContext, principal
from wsi_server.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ShareExpired,
    TooManyRequests,
    WsiServerError,
)
from wsi_server.store._time import utcnow
from wsi_server.store.shares import NOTE_LENGTH
from wsi_server.web.auth import base_url, message_page, secure_cookies

DEFAULT_DAYS = 7
MAX_BODY = 16 * 1024
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{20,128}$")
_SHARE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VIEWPORT_KEYS = ("x", "y", "z", "r")


def parse_share_request(body: bytes, max_days: int) -> dict[str, Any]:
    """Validate a share-creation body: ``expires_in_days`` (1..max, default 7, capped),
    ``note`` (text), ``viewport`` ({x, y, z[, r]} in slide pixels, zoom and degrees),
    ``allow_associated`` (bool)."""
    if len(body) > MAX_BODY:
        raise BadRequest("the request body is too large")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise BadRequest("the body must be JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(data) - {"expires_in_days", "note", "viewport", "allow_associated"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    days = data.get("expires_in_days", DEFAULT_DAYS)
    if isinstance(days, bool) or not isinstance(days, int | float) or not math.isfinite(days) \
            or days <= 0:
        raise BadRequest("expires_in_days must be a positive number")
    if days > max_days:
        raise BadRequest(f"expires_in_days is at most {max_days} on this server")
    note = data.get("note")
    if note is not None:
        if not isinstance(note, str):
            raise BadRequest("note must be text")
        note = note.strip() or None
        if note is not None and len(note) > NOTE_LENGTH:
            raise BadRequest(f"note is at most {NOTE_LENGTH} characters")
    viewport = data.get("viewport")
    if viewport is not None:
        if not isinstance(viewport, dict) or set(viewport) - set(VIEWPORT_KEYS) \
                or not {"x", "y", "z"} <= set(viewport):
            raise BadRequest("viewport must be {x, y, z} with an optional r")
        for k, v in viewport.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise BadRequest(f"viewport.{k} must be a number")
        if viewport["z"] <= 0:
            raise BadRequest("viewport.z must be positive")
        viewport = {k: float(viewport[k]) for k in VIEWPORT_KEYS if k in viewport}
    allow = data.get("allow_associated", False)
    if not isinstance(allow, bool):
        raise BadRequest("allow_associated must be true or false")
    return {"days": float(days), "note": note, "viewport": viewport, "allow_associated": allow}


def viewer_target(slide_id: str, viewport: dict[str, Any] | None) -> str:
    target = f"/view/{slide_id}"
    if viewport:
        target += "?" + urlencode({k: round(v, 4) for k, v in viewport.items()})
    return target


class BadTokenThrottle:
    """Slows down guessing: after ``limit`` unknown, expired or revoked tokens from one
    client within ``window`` seconds, that client gets 429 until the window passes."""

    def __init__(self, limit: int = 10, window: float = 60.0, size: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self._hits: OrderedDict[str, list[float]] = OrderedDict()
        self._size = size

    def _recent(self, client: str, now: float) -> list[float]:
        hits = [t for t in self._hits.get(client, []) if now - t < self.window]
        self._hits[client] = hits
        self._hits.move_to_end(client)
        while len(self._hits) > self._size:
            self._hits.popitem(last=False)
        return hits

    def check(self, client: str) -> None:
        now = time.monotonic()
        hits = self._recent(client, now)
        if len(hits) >= self.limit:
            retry = max(1, math.ceil(self.window - (now - hits[0])))
            exc = TooManyRequests("too many invalid share links from this address; wait "
                                  f"{retry} s")
            exc.headers = {"Retry-After": str(retry)}
            raise exc

    def failed(self, client: str) -> None:
        now = time.monotonic()
        self._recent(client, now).append(now)


def routes(ctx: AppContext) -> list[BaseRoute]:
    auth = ctx.auth
    throttle = BadTokenThrottle()

    def client_of(request: Request) -> str:
        return request.client.host if request.client else ""

    async def create(request: Request) -> Response:
        entry = await ctx.slide(request, readable=False)
        who = principal(request)
        if not policy.can_share_slide(who, entry.collection):
            raise Forbidden("a shared view is read-only: it cannot share further")
        spec = parse_share_request(await request.body(), ctx.settings.share_max_days)
        expires = utcnow() + timedelta(days=spec["days"])
        share, token = await auth.run(
            lambda: auth.shares.create(
                entry.id, who.subject, who.name, expires, spec["note"], spec["viewport"],
                spec["allow_associated"],
            )
        )
        await auth.record("share.create", who, slide=entry.id, client=client_of(request),
                          detail={"share": share.id, "expires_at": share.as_dict()["expires_at"],
                                  "allow_associated": share.allow_associated})
        body = share.as_dict()
        body["url"] = f"{base_url(ctx, request)}/s/{token}"
        return JSONResponse(body, status_code=201, headers={"Cache-Control": "no-store"})

    async def list_shares(request: Request) -> Response:
        who = principal(request)
        if not policy.can_share(who):
            raise Forbidden("a shared view has no share links of its own")
        everyone = request.query_params.get("all") in ("1", "true") and who.is_admin
        shares = await auth.run(auth.shares.list, None if everyone else who.subject)
        return JSONResponse({"shares": [s.as_dict() for s in shares]},
                            headers={"Cache-Control": "no-store"})

    async def revoke(request: Request) -> Response:
        who = principal(request)
        share_id = str(request.path_params["share_id"])
        if not policy.can_share(who) or not _SHARE_ID.match(share_id):
            raise NotFound("no share link with this id")
        share = await auth.run(auth.shares.get, share_id)
        if share is None or (share.created_by != who.subject and not who.is_admin):
            raise NotFound("no share link with this id")
        revoked = await auth.run(auth.shares.revoke, share_id, who.subject)
        assert revoked is not None
        detail: dict[str, Any] = {"share": share_id}
        if share.created_by != who.subject:
            detail["by_admin"] = True
            detail["created_by"] = share.created_by
        await auth.record("share.revoke", who, slide=share.slide_id, detail=detail,
                          client=client_of(request))
        return JSONResponse(revoked.as_dict(), headers={"Cache-Control": "no-store"})

    async def open_link(request: Request) -> Response:
        client = client_of(request)
        try:
            throttle.check(client)
            token = str(request.path_params["token"])
            share = await auth.run(auth.shares.by_token, token) if _TOKEN.match(token) else None
            if share is None:
                throttle.failed(client)
                await auth.record_failure(client, "share link: unknown token")
                raise NotFound("this share link does not exist")
            state = share.state()
            if state != "active":
                throttle.failed(client)
                await auth.record("share.open", None, slide=share.slide_id, outcome="failure",
                                  detail={"share": share.id, "state": state}, client=client)
                raise ShareExpired(
                    f"this share link has been {'revoked' if state == 'revoked' else 'expired'}"
                    "; ask the pathologist who sent it for a new one"
                )
        except WsiServerError as exc:
            if not wants_html(request.scope):
                raise
            title = {410: "Share link no longer valid", 429: "Too many attempts"}.get(
                exc.status, "Share link not found")
            page = message_page(title, exc.detail, exc.status)
            for k, v in (exc.headers or {}).items():
                page.headers[k] = v
            return page
        await auth.run(auth.shares.record_open, share.id)
        await auth.record("share.open", None, slide=share.slide_id, client=client,
                          detail={"share": share.id, "created_by": share.created_by})
        old = request.cookies.get(SHARE_COOKIE)
        auth.forget_share(old)
        response = RedirectResponse(viewer_target(share.slide_id, share.viewport), 303)
        max_age = max(60, int((share.expires_at - utcnow()).total_seconds()))
        response.set_cookie(
            SHARE_COOKIE, auth.share_cookie(old, token), max_age=max_age, httponly=True,
            samesite="lax", secure=secure_cookies(ctx, request), path="/",
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    return [
        Route("/api/slides/{slide_id}/shares", create, methods=["POST"]),
        Route("/api/shares", list_shares),
        Route("/api/shares/{share_id}", revoke, methods=["DELETE"]),
        Route("/s/{token}", open_link),
    ]
