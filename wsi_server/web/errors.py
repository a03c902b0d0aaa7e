"""The app's exception handlers: every error becomes ``{"error", "detail"}`` JSON with the
status of its class (``wsi_server.errors``); nothing else reaches a client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from wsi_server.errors import WsiServerError, error_body
from wsi_server.metrics import Metrics

log = logging.getLogger("wsi_server.app")
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


def loggable_path(path: str) -> str:
    """A request path fit for a log line: a share link's token is replaced."""
    return "/s/<token>" if path.startswith("/s/") else path


def exception_handlers(metrics: Metrics) -> dict[type[Exception], ErrorHandler]:
    async def on_wsi_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, WsiServerError)
        metrics.errors.labels(exc.code).inc()
        return JSONResponse(error_body(exc), status_code=exc.status,
                            headers=exc.headers)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        metrics.errors.labels(code).inc()
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)}, status_code=exc.status_code
        )

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", loggable_path(request.url.path))
        metrics.errors.labels("internal_error").inc()
        return JSONResponse(
            {"error": "internal_error", "detail": "the server failed to handle this request"},
            status_code=500,
        )

    return {
        WsiServerError: on_wsi_error,
        HTTPException: on_http_error,
        Exception: on_unexpected,
    }
