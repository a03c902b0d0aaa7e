"""Tile caches: the ``TileCache`` protocol and its backends.

A cache fault is a miss, never an error: implementations swallow their own failures,
count them, and log at most once per interval.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from wsi_server.cache.memory import MemoryCache

__all__ = ["MemoryCache", "NullCache", "TileCache"]


@runtime_checkable
class TileCache(Protocol):
    name: str

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

    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes) -> None:
        return None

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None
