"""Prometheus metrics, one registry per app (no module-level state)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
            "Tile cache lookups by tier (memory, redis) and result (hit, miss, error, and "
            "bypass: Redis skipped during the back-off after a fault).",
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


# -- Server-Timing ---------------------------------------------------------------
def server_timing(source: str, seconds: float) -> str:
    """A ``Server-Timing`` entry naming how a tile was produced (memory, redis,
    passthrough, rendered) and how long it took."""
    return f"{source};dur={seconds * 1000:.2f}"


class ServerTimingMiddleware:
    """Adds ``Server-Timing: total;dur=<ms>`` to every HTTP response, after any entry
    the handler set (tiles name their source there)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_with_timing(message: Message) -> None:
            if message["type"] == "http.response.start":
                total = f"total;dur={(time.perf_counter() - start) * 1000:.2f}".encode()
                headers = list(message.get("headers", ()))
                for i, (name, value) in enumerate(headers):
                    if name.lower() == b"server-timing":
                        headers[i] = (name, value + b", " + total)
                        break
                else:
                    headers.append((b"server-timing", total))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_timing)
