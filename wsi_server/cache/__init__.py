"""Tile caches: the ``TileCache`` protocol and its backends.

A cache fault is a miss, never an error: implementations swallow their own failures,
count them, and log at most once per interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from wsi_server.cache.memory import MemoryCache

if TYPE_CHECKING:
    from wsi_server.metrics import Metrics
    from wsi_server.settings import Settings

__all__ = ["MemoryCache", "NullCache", "TileCache", "build_cache"]


@runtime_checkable
class TileCache(Protocol):
    name: str

    async def lookup(self, key: str) -> tuple[bytes | None, str]:
        """The cached bytes and the name of the tier that had them (``memory``,
        ``redis``); ``(None, "")`` on a miss or any fault. The tile path uses this."""
        ...

    def bind_metrics(self, metrics: Metrics) -> None:
        """Count hits, misses and faults per tier in the app's metrics."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The cached bytes, or None on a miss or any fault."""
        ...

    async def set(self, key: str, value: bytes) -> None:
        """Store; a fault is swallowed."""
        ...

    async def ping(self) -> bool:
        """True when the cache is reachable (for ``/readyz``)."""
        ...

    async def close(self) -> None: ...


class NullCache:
    """No caching (``--cache-size 0`` without Redis)."""

    name = "none"

    async def lookup(self, key: str) -> tuple[bytes | None, str]:
        return None, ""

    def bind_metrics(self, metrics: Metrics) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


def build_cache(settings: Settings) -> TileCache:
    """The tile cache the settings ask for: Redis behind a memory tier, memory, or none."""
    if settings.redis_url:
        from wsi_server.cache.redis import build_tiered_cache

        return build_tiered_cache(settings)
    if settings.cache_size > 0:
        return MemoryCache(settings.cache_size * 2**20)
    return NullCache()
