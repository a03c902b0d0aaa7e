"""Prometheus metrics, one registry per app (no module-level state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TILE_SOURCES = ("memory", "redis", "passthrough", "rendered")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tile_seconds = Histogram(
            "wsi_tile_seconds",
            "Time to produce a tile, by how it was produced.",
            ["source"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.cache_requests = Counter(
            "wsi_cache_requests_total",
            "Tile cache lookups by tier and result (hit, miss, error).",
            ["tier", "result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "wsi_errors_total",
            "Error responses by error code.",
            ["code"],
            registry=self.registry,
        )
        self.open_slides = Gauge(
            "wsi_open_slides", "Slides open in the reader pool.", registry=self.registry
        )
        self.renders_in_flight = Gauge(
            "wsi_renders_in_flight", "Tiles being rendered now.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
