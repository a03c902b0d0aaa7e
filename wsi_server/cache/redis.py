"""Redis tile cache, shared by every worker and replica, and the tiered cache built on it.

Any Redis fault (connection refused, a command slower than the timeout, Redis restarting,
Redis out of memory) is a miss: it is counted, logged at most once per interval, and the
tile is rendered as if Redis were empty. After a connection fault Redis is bypassed for
a short back-off, so a dead Redis costs one timeout per back-off rather than one per
tile; the connection pool reconnects on its own once Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wsi_server.cache.memory import MemoryCache
from wsi_server.cache.tiered import TieredCache

if TYPE_CHECKING:
    from wsi_server.cache import TileCache
    from wsi_server.metrics import Metrics
    from wsi_server.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "wsi:"


class ThrottledLog:
    """Log a fault at most once per ``interval`` seconds, with a count of the rest."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, message: str, *args: object) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return False
        extra = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
        self.logger.warning(message + extra, *args)
        self._last = now
        self._suppressed = 0
        return True


class RedisCache:
    """Tiles in Redis under ``wsi:<key>``, with a TTL and a per-item size guard."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl_seconds: int = 7 * 86400,
        timeout: float = 0.05,
        max_item_bytes: int = 2 * 2**20,
        backoff_seconds: float = 1.0,
        log_interval: float = 60.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.ttl_ms = int(ttl_seconds * 1000) or None
        self.timeout = timeout
        self.max_item_bytes = max_item_bytes
        self.backoff_seconds = backoff_seconds
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            decode_responses=False,
        )
        self._down_until = 0.0
        self._batch: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._flush_scheduled = False
        self._batches: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None
        self.hits = self.misses = self.errors = self.bypassed = 0
        self._log = ThrottledLog(log, log_interval)
        self._counters: dict[str, object] | None = None

    # -- metrics ---------------------------------------------------------------
    async def lookup(self, key: str) -> tuple[bytes | None, str]:
        value = await self.get(key)
        return value, self.name if value is not None else ""

    def bind_metrics(self, metrics: Metrics) -> None:
        self._counters = {
            r: metrics.cache_requests.labels(self.name, r)
            for r in ("hit", "miss", "error", "bypass")
        }

    def _count(self, result: str) -> None:
        if self._counters is not None:
            self._counters[result].inc()  # type: ignore[attr-defined]

    # -- faults ----------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False during the back-off that follows a connection fault."""
        return time.monotonic() >= self._down_until

    def _fault(self, op: str, exc: Exception) -> None:
        self.errors += 1
        self._count("error")
        self.last_error = f"{op}: {type(exc).__name__}: {exc}"
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            self._down_until = time.monotonic() + self.backoff_seconds
        self._log("redis tile cache fault, serving without it: %s", self.last_error)

    # -- TileCache ---------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        if not self.available:
            self.bypassed += 1
            self._count("bypass")
            return None
        try:
            value = await self._batched_get(key)
        except (RedisError, OSError) as exc:
            self._fault("get", exc)
            return None
        if value is None:
            self.misses += 1
            self._count("miss")
            return None
        self.hits += 1
        self._count("hit")
        return value if isinstance(value, bytes) else bytes(value, "latin-1")

    # -- batching ----------------------------------------------------------------
    # Lookups made in the same turn of the event loop (concurrent requests) go to Redis as
    # one MGET: a round trip and the client's per-command work are paid once per batch.
    async def _batched_get(self, key: str) -> bytes | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()
        self._batch.setdefault(key, []).append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._batch = self._batch, {}
        self._flush_scheduled = False
        task = asyncio.ensure_future(self._run_batch(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _run_batch(self, batch: dict[str, list[asyncio.Future[bytes | None]]]) -> None:
        keys = list(batch)
        try:
            if len(keys) == 1:
                values = [await self._client.get(KEY_PREFIX + keys[0])]
            else:
                values = await self._client.mget([KEY_PREFIX + k for k in keys])
        except (RedisError, OSError) as exc:
            for futures in batch.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
            return
        for key, value in zip(keys, values, strict=True):
            for f in batch[key]:
                if not f.done():
                    f.set_result(value if not isinstance(value, str) else value.encode())

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self.max_item_bytes or not self.available:
            return
        try:
            await self._client.set(KEY_PREFIX + key, value, px=self.ttl_ms)
        except (RedisError, OSError) as exc:
            self._fault("set", exc)

    async def ping(self) -> bool:
        """A real round trip, even during the back-off; success ends the back-off."""
        try:
            ok = bool(await self._client.ping())
        except (RedisError, OSError) as exc:
            self._fault("ping", exc)
            return False
        if ok:
            self._down_until = 0.0
            self.last_error = None
        return ok

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()


def build_tiered_cache(settings: Settings) -> TileCache:
    """A small in-process LRU (``--cache-size``) in front of Redis (``--redis-url``)."""
    assert settings.redis_url
    item_max = settings.cache_item_max * 1024
    back = RedisCache(
        settings.redis_url,
        ttl_seconds=settings.cache_ttl,
        timeout=settings.redis_timeout,
        max_item_bytes=item_max,
    )
    front = (
        MemoryCache(settings.cache_size * 2**20, min(item_max, settings.cache_size * 2**16))
        if settings.cache_size > 0
        else None
    )
    return TieredCache(front, back)
