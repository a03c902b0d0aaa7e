"""The web viewer: slide list at ``/`` and an OpenSeadragon viewer at ``/view/{id}``."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from wsi_server.settings import Settings


def viewer_routes(settings: Settings) -> list[BaseRoute]:
    async def index(request: Request) -> Response:
        return HTMLResponse("<!doctype html><title>wsi-server</title><p>wsi-server</p>")

    return [Route("/", index)]
