"""A bounded LRU of open slide readers keyed by the slide's fingerprint.

A file replaced in place gets a new fingerprint, so it is opened anew and the stale
handle falls out of the pool. Evicted readers are not closed explicitly: a request may
still be reading from one, and the handle is released when the last reference goes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from wsi_server.readers import ReaderRegistry, SlideReader


class ReaderPool:
    def __init__(self, registry: ReaderRegistry, max_open: int = 32) -> None:
        self.registry = registry
        self.max_open = max_open
        self._readers: OrderedDict[tuple[Path, str], SlideReader] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[tuple[Path, str], threading.Lock] = {}

    def get(self, path: Path, fingerprint: str) -> SlideReader:
        key = (path, fingerprint)
        with self._lock:
            reader = self._readers.get(key)
            if reader is not None:
                self._readers.move_to_end(key)
                return reader
            opening = self._opening.setdefault(key, threading.Lock())
        with opening:  # one open per slide at a time; others wait for it
            with self._lock:
                reader = self._readers.get(key)
                if reader is not None:
                    return reader
            try:
                reader = self.registry.open(path)
            finally:
                with self._lock:
                    self._opening.pop(key, None)
            with self._lock:
                for stale in [k for k in self._readers if k[0] == path]:
                    del self._readers[stale]
                self._readers[key] = reader
                while len(self._readers) > self.max_open:
                    self._readers.popitem(last=False)
            return reader

    def __len__(self) -> int:
        return len(self._readers)

    def clear(self) -> None:
        with self._lock:
            self._readers.clear()
