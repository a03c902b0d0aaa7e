"""Ingest: scanner drop folder ─▶ settled ─▶ validated (own process) ─▶ moved into the library.

Public names: :class:`IngestConfig`, :class:`IngestPipeline`, :class:`IngestHook` (what
``create_app`` uses: the ``/api/ingest`` route and start/stop in the lifespan).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_server.ingest.pipeline import IngestConfig, IngestPipeline
    from wsi_server.ingest.web import IngestHook

__all__ = ["IngestConfig", "IngestHook", "IngestPipeline"]


def __getattr__(name: str) -> Any:
    # Lazy, so ``python -m wsi_server.ingest.validate`` starts without the pipeline.
    if name in ("IngestConfig", "IngestPipeline"):
        from wsi_server.ingest import pipeline

        return getattr(pipeline, name)
    if name == "IngestHook":
        from wsi_server.ingest.web import IngestHook

        return IngestHook
    raise AttributeError(name)
