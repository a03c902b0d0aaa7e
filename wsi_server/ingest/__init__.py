"""Ingest: scanner drop folder ─▶ settled ─▶ validated (own process) ─▶ moved into the library.

Public names: :class:`IngestConfig`, :class:`IngestPipeline`, :class:`IngestHook` (what
``create_app`` uses: the ``/api/ingest`` route and start/stop in the lifespan).
"""

from wsi_server.ingest.pipeline import IngestConfig, IngestPipeline
from wsi_server.ingest.web import IngestHook

__all__ = ["IngestConfig", "IngestHook", "IngestPipeline"]
