"""The ingest pipeline inside the server: ``GET /api/ingest`` and start/stop in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from wsi_server.errors import Forbidden
from wsi_server.ingest.pipeline import IngestConfig, IngestPipeline, OnOutcome

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
        self.on_slide: Callable[[str], None] | None = None
        """Called with the id of each slide ingest adds (the server warms its cache)."""
        self.on_outcome: OnOutcome | None = None
        """Called from the ingest thread with each scan's outcome (the audit trail)."""

    @property
    def enabled(self) -> bool:
        return self.settings.ingest is not None

    def _on_ingested(self, path: Path) -> str | None:
        entry = self.library.add(path)
        if entry is None:
            return None
        if self.on_slide is not None and entry.error is None:
            self.on_slide(entry.id)
        return entry.id

    def start(self) -> None:
        if not self.enabled or self.pipeline is not None:
            return
        config = IngestConfig.from_settings(self.settings)
        self.pipeline = IngestPipeline(config, self._on_ingested)
        self.pipeline.on_outcome = self.on_outcome
        self.pipeline.on_followed = self.library.add  # another worker's slide: list it here
        self.pipeline.start()
        log.info("ingest: watching %s", config.watch)

    def stop(self) -> None:
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            pipeline.close()

    def routes(self) -> list[BaseRoute]:
        """``GET /api/ingest``: the queue, recent outcomes and failures."""

        async def ingest_status(request: Request) -> Response:
            if "admin" not in getattr(request.auth, "scopes", ()):
                # file names of scans often carry patient identifiers
                raise Forbidden("the ingest report is for administrators")
            pipeline = self.pipeline
            if pipeline is None:
                return JSONResponse(_DISABLED)
            return JSONResponse(await run_in_threadpool(pipeline.status))

        return [Route("/api/ingest", ingest_status)]
