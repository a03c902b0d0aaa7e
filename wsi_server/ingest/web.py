"""The ingest pipeline inside the server: ``GET /api/ingest`` and start/stop in the lifespan."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wsi_server.ingest.pipeline import IngestConfig, IngestPipeline

if TYPE_CHECKING:
    from wsi_server.library import Library

log = logging.getLogger(__name__)

_DISABLED: dict[str, Any] = {
    "enabled": False,
    "queue": {"waiting": [], "in_progress": [], "urgent": []},
    "recent": [],
    "failures": [],
    "events": [],
}


class IngestHook:
    """Runs the pipeline when ``settings.ingest`` is set; ingested slides join ``library``.

    The library folder is the first of ``settings.paths`` (created when missing).
    """

    def __init__(self, settings: Any, library: Library) -> None:
        self.settings = settings
        self.library = library
        self.pipeline: IngestPipeline | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.ingest is not None

    def _on_ingested(self, path: Path) -> str | None:
        entry = self.library.add(path)
        return entry.id if entry is not None else None

    def start(self) -> None:
        if not self.enabled or self.pipeline is not None:
            return
        config = IngestConfig.from_settings(self.settings)
        self.pipeline = IngestPipeline(config, self._on_ingested)
        self.pipeline.start()
        log.info("ingest: watching %s", config.watch)

    def stop(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close()

    def routes(self) -> list[BaseRoute]:
        async def ingest_status(request: Request) -> Response:
            pipeline = self.pipeline
            if pipeline is None:
                return JSONResponse(_DISABLED)
            return JSONResponse(await run_in_threadpool(pipeline.status))

        return [Route("/api/ingest", ingest_status)]
