"""One contract for every TileCache: the in-process LRU, Redis, and the two tiers."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from wsi_server.cache import MemoryCache, TileCache
from wsi_server.cache.redis import RedisCache
from wsi_server.cache.tiered import TieredCache

ITEM_MAX = 64 * 1024


def _memory(redis_url: str) -> TileCache:
    return MemoryCache(8 * 2**20, ITEM_MAX)


def _redis(redis_url: str) -> TileCache:
    return RedisCache(redis_url, ttl_seconds=60, timeout=0.5, max_item_bytes=ITEM_MAX)


def _tiered(redis_url: str) -> TileCache:
    return TieredCache(MemoryCache(8 * 2**20, ITEM_MAX), _redis(redis_url))  # type: ignore[arg-type]


def _tiered_no_front(redis_url: str) -> TileCache:
    return TieredCache(None, _redis(redis_url))  # type: ignore[arg-type]


BACKENDS = {"memory": _memory, "redis": _redis, "tiered": _tiered, "redis-only": _tiered_no_front}


@pytest.fixture(params=list(BACKENDS))
async def cache(request: Any) -> AsyncIterator[TileCache]:
    url = request.getfixturevalue("redis_url") if request.param != "memory" else ""
    c = BACKENDS[request.param](url)
    yield c
    await c.close()


async def test_is_a_tile_cache(cache: TileCache) -> None:
    assert isinstance(cache, TileCache)
    assert isinstance(cache.name, str) and cache.name
    assert await cache.ping() is True


async def test_missing_key_is_none(cache: TileCache) -> None:
    assert await cache.get("tile:absent") is None


async def test_set_then_get_returns_the_same_bytes(cache: TileCache) -> None:
    value = bytes(range(256)) * 40 + os.urandom(1000)
    await cache.set("tile:a", value)
    assert await cache.get("tile:a") == value


async def test_empty_value_is_a_hit(cache: TileCache) -> None:
    await cache.set("tile:empty", b"")
    assert await cache.get("tile:empty") == b""


async def test_overwrite_replaces_and_keys_are_independent(cache: TileCache) -> None:
    await cache.set("tile:x", b"one")
    await cache.set("tile:y", b"other")
    await cache.set("tile:x", b"two")
    assert await cache.get("tile:x") == b"two"
    assert await cache.get("tile:y") == b"other"


async def test_oversized_item_is_not_stored(cache: TileCache) -> None:
    await cache.set("tile:big", b"\0" * (ITEM_MAX + 1))
    assert await cache.get("tile:big") is None
    await cache.set("tile:small", b"\0" * (ITEM_MAX // 2))
    assert await cache.get("tile:small") is not None


async def test_concurrent_use(cache: TileCache) -> None:
    values = {f"tile:c{i}": os.urandom(100 + i) for i in range(50)}
    await asyncio.gather(*(cache.set(k, v) for k, v in values.items()))
    got = await asyncio.gather(*(cache.get(k) for k in values))
    assert dict(zip(values, got, strict=True)) == values
