"""In-process, byte-bounded LRU tile cache: the embedded default."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_server.metrics import Metrics


class MemoryCache:
    name = "memory"

    def __init__(self, max_bytes: int, max_item_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_item_bytes = max_item_bytes if max_item_bytes is not None else max_bytes // 16
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self._hit_counter: Any = None
        self._miss_counter: Any = None

    def bind_metrics(self, metrics: Metrics) -> None:
        self._hit_counter = metrics.cache_requests.labels(self.name, "hit")
        self._miss_counter = metrics.cache_requests.labels(self.name, "miss")

    @property
    def current_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def get_sync(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def set_sync(self, key: str, value: bytes) -> None:
        size = len(value) + len(key)
        if size > self.max_item_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= len(old) + len(key)
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes and self._items:
                k, v = self._items.popitem(last=False)
                self._bytes -= len(v) + len(k)

    async def lookup(self, key: str) -> tuple[bytes | None, str]:
        value = self.get_sync(key)
        counter = self._miss_counter if value is None else self._hit_counter
        if counter is not None:
            counter.inc()
        return value, self.name

    async def get(self, key: str) -> bytes | None:
        return self.get_sync(key)

    async def set(self, key: str, value: bytes) -> None:
        self.set_sync(key, value)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
