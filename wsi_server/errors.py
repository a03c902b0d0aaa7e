"""The one exception tree of wsi-server and its single table to HTTP status.

::

    WsiServerError                      500 internal_error
    ├── BadRequest                      400 bad_request
    ├── NotFound                        404 not_found
    │   ├── SlideNotFound               404 slide_not_found
    │   └── TileNotFound                404 tile_not_found
    ├── UnsupportedSlide                415 unsupported_format
    ├── UnreadableSlide                 422 unreadable_slide
    └── BackendUnavailable              503 backend_unavailable

Every error reaches a client as ``{"error": code, "detail": text}``; the text is written
for people and never holds a stack trace or a filesystem path.
"""

from __future__ import annotations


class WsiServerError(Exception):
    """Root of every error wsi-server raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail or self.code.replace("_", " ")


class BadRequest(WsiServerError):
    status = 400
    code = "bad_request"


class NotFound(WsiServerError):
    status = 404
    code = "not_found"


class SlideNotFound(NotFound):
    code = "slide_not_found"


class TileNotFound(NotFound):
    code = "tile_not_found"


class UnsupportedSlide(WsiServerError):
    """No backend can read this file (or folder)."""

    status = 415
    code = "unsupported_format"


class UnreadableSlide(WsiServerError):
    """A backend recognised the file but could not read it: corrupt, truncated, half-written."""

    status = 422
    code = "unreadable_slide"


class BackendUnavailable(WsiServerError):
    status = 503
    code = "backend_unavailable"


def error_body(exc: WsiServerError) -> dict[str, str]:
    """The JSON body every error response carries."""
    return {"error": exc.code, "detail": exc.detail}
