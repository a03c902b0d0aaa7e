"""ASGI middleware of the app (besides ``metrics.ServerTimingMiddleware``)."""

from __future__ import annotations

from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class GzipExceptTiles:
    """gzip for JSON, HTML and scripts; tiles (already compressed images: Deep Zoom,
    IIIF and DICOMweb frames) skip the middleware entirely, which keeps per-request work
    off the hot path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=1024)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if path.startswith(("/slides/", "/iiif/")) or (
            path.startswith("/dicomweb/") and "/frames/" in path  # DICOMweb frames
        ):
            await self.app(scope, receive, send)
        else:
            await self.gzip(scope, receive, send)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
AUTH_COOKIES = (b"wsi_session=", b"wsi_share=")


def content_security_policy(frame_ancestors: str, form_targets: str = "") -> str:
    """No inline script, nothing from another origin; who may frame the viewer is set.
    ``form_targets``: origins a form may lead to besides this one (the identity provider,
    whose sign-out page the sign-out form redirects to)."""
    form_action = f"'self' {form_targets}".strip()
    return (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
        f"base-uri 'none'; form-action {form_action}; frame-ancestors {frame_ancestors}"
    )


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower case (the form of an Origin header)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return ""
    return f"{scheme.lower()}://{rest.split('/', 1)[0].lower()}"


class Hardening:
    """Security headers on every response, and a cross-site request check: a
    state-changing request whose ``Origin`` (or, without one, ``Referer``) is another site
    is refused with 403; one authenticated by cookie must name its origin."""

    def __init__(
        self, app: ASGIApp, frame_ancestors: str, public_url: str | None,
        form_targets: str = "",
    ) -> None:
        self.app = app
        self.public_origin = origin_of(public_url) if public_url else None
        csp = content_security_policy(frame_ancestors, form_targets)
        self.headers = [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]

    def _cross_site(self, scope: Scope) -> str | None:
        headers = dict(scope.get("headers", ()))
        origin = headers.get(b"origin", b"").decode("latin-1").lower()
        if origin == "null" and headers.get(b"sec-fetch-site") == b"same-origin":
            # A form posted from our own page under Referrer-Policy: no-referrer carries
            # "Origin: null"; the browser's own Sec-Fetch-Site still says where it came from
            return None
        if not origin:
            referer = headers.get(b"referer", b"").decode("latin-1")
            origin = origin_of(referer) if referer else ""
        if origin:
            own = self.public_origin or (
                f"{scope.get('scheme', 'http')}://"
                + headers.get(b"host", b"").decode("latin-1").lower()
            )
            if origin != own:
                return "cross-site request refused"
            return None
        cookie = headers.get(b"cookie", b"")
        if b"authorization" not in headers and any(c in cookie for c in AUTH_COOKIES):
            return "a request authenticated by cookie must name its Origin"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS:
            refused = self._cross_site(scope)
            if refused is not None:
                response = JSONResponse({"error": "forbidden", "detail": refused},
                                        status_code=403)
                await response(scope, receive, self._with_headers(send))
                return
        await self.app(scope, receive, self._with_headers(send))

    def _with_headers(self, send: Send) -> Send:
        extra = self.headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_headers
