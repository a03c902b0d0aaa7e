"""ASGI middleware of the app (besides ``metrics.ServerTimingMiddleware``)."""

from __future__ import annotations

from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send


class GzipExceptTiles:
    """gzip for JSON, HTML and scripts; tiles (already compressed images) skip the
    middleware entirely, which keeps per-request work off the hot path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/slides/"):
            await self.app(scope, receive, send)
        else:
            await self.gzip(scope, receive, send)
