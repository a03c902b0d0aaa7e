"""The one exception tree of wsi-server and its single table to HTTP status.

::

    WsiServerError                      500 internal_error
    ├── BadRequest                      400 bad_request
    ├── Unauthenticated                 401 unauthenticated
    ├── Forbidden                       403 forbidden
    ├── NotFound                        404 not_found
    │   ├── SlideNotFound               404 slide_not_found
    │   └── TileNotFound                404 tile_not_found
    ├── NotAcceptable                   406 not_acceptable
    ├── Gone                            410 gone
    │   └── ShareExpired                410 share_expired
    ├── PayloadTooLarge                 413 payload_too_large
    ├── UnsupportedMediaType            415 unsupported_media_type
    ├── UnsupportedSlide                415 unsupported_format
    ├── UnreadableSlide                 422 unreadable_slide
    ├── TooManyRequests                 429 too_many_requests
    ├── Unimplemented                   501 not_implemented
    └── BackendUnavailable              503 backend_unavailable

Every error reaches a client as ``{"error": code, "detail": text}``; the text is written
for people and never holds a stack trace or a filesystem path.
"""

from __future__ import annotations


class WsiServerError(Exception):
    """Root of every error wsi-server raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    headers: dict[str, str] | None = None
    """Extra response headers (e.g. ``Retry-After``)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail or self.code.replace("_", " ")


class BadRequest(WsiServerError):
    status = 400
    code = "bad_request"


class Unauthenticated(WsiServerError):
    """No identity, or one that does not verify (bad, expired or revoked token or cookie)."""

    status = 401
    code = "unauthenticated"


class Forbidden(WsiServerError):
    """Known identity without the right (e.g. not an admin, a cross-site request). Slides a
    principal may not see are ``SlideNotFound``, never this: they must look absent."""

    status = 403
    code = "forbidden"


class NotFound(WsiServerError):
    status = 404
    code = "not_found"


class SlideNotFound(NotFound):
    code = "slide_not_found"


class TileNotFound(NotFound):
    code = "tile_not_found"


class NotAcceptable(WsiServerError):
    """No representation the request accepts (e.g. a DICOM transfer syntax the server
    cannot give)."""

    status = 406
    code = "not_acceptable"


class Gone(WsiServerError):
    status = 410
    code = "gone"


class ShareExpired(Gone):
    """A share link that has expired or been revoked."""

    code = "share_expired"


class TooManyRequests(WsiServerError):
    status = 429
    code = "too_many_requests"


class PayloadTooLarge(WsiServerError):
    """A request body over the configured limit (e.g. a STOW-RS upload)."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(WsiServerError):
    """A request body of a media type the route does not take."""

    status = 415
    code = "unsupported_media_type"


class UnsupportedSlide(WsiServerError):
    """No backend can read this file (or folder)."""

    status = 415
    code = "unsupported_format"


class UnreadableSlide(WsiServerError):
    """A backend recognised the file but could not read it: corrupt, truncated, half-written."""

    status = 422
    code = "unreadable_slide"


class Unimplemented(WsiServerError):
    """A well-formed request for something this server does not do (e.g. a IIIF image that
    no pyramid level of the slide is small enough to render)."""

    status = 501
    code = "not_implemented"


class BackendUnavailable(WsiServerError):
    status = 503
    code = "backend_unavailable"


def error_body(exc: WsiServerError) -> dict[str, str]:
    """The JSON body every error response carries."""
    return {"error": exc.code, "detail": exc.detail}
