"""Two tiers: an in-process LRU in front of a shared cache (Redis).

Hot tiles never leave the process; a front miss asks the back tier and, on a hit,
promotes the tile to the front. ``lookup`` says which tier answered, so the tile path
can label a hit ``memory`` or ``redis``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from wsi_server.cache.memory import MemoryCache

if TYPE_CHECKING:
    from wsi_server.metrics import Metrics


class BackTier(Protocol):
    name: str

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes) -> None: ...
    async def ping(self) -> bool: ...
    async def close(self) -> None: ...
    def bind_metrics(self, metrics: Metrics) -> None: ...


class TieredCache:
    name = "tiered"

    def __init__(self, front: MemoryCache | None, back: BackTier) -> None:
        self.front = front
        self.back = back

    def bind_metrics(self, metrics: Metrics) -> None:
        """Each tier counts its own lookups."""
        if self.front is not None:
            self.front.bind_metrics(metrics)
        self.back.bind_metrics(metrics)

    async def lookup(self, key: str) -> tuple[bytes | None, str]:
        """The bytes and the name of the tier that had them (``""`` on a miss)."""
        if self.front is not None:
            value, tier = await self.front.lookup(key)
            if value is not None:
                return value, tier
        value = await self.back.get(key)
        if value is None:
            return None, ""
        if self.front is not None:
            self.front.set_sync(key, value)
        return value, self.back.name

    async def get(self, key: str) -> bytes | None:
        return (await self.lookup(key))[0]

    async def set(self, key: str, value: bytes) -> None:
        if self.front is not None:
            self.front.set_sync(key, value)
        await self.back.set(key, value)

    async def ping(self) -> bool:
        """Whether the shared tier is reachable (the front tier always is)."""
        return await self.back.ping()

    async def close(self) -> None:
        if self.front is not None:
            await self.front.close()
        await self.back.close()
