"""Response helpers the fronts share: cache policies and conditional image responses."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from wsi_server import codecs

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "public, no-cache"
PRIVATE = "private, max-age=300"


def image_response(request: Request, data: bytes, etag: str, cache_control: str) -> Response:
    """A JPEG answer with its ETag; ``304`` when the client already holds it."""
    headers = {"ETag": etag, "Cache-Control": cache_control}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=codecs.JPEG, headers=headers)
