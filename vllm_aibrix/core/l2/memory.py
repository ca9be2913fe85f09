"""In-process L2 backend: a locked dict with an optional byte capacity (LRU).

Meant for unit tests of everything above the backends (codec, store,
ingestion, manager) and for single-process experiments. It is node-local
and dies with the process.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.l2.backend import Buffer, L2BackendBase


class MemoryBackend(L2BackendBase):
    """Thread-safe dict store; evicts least recently used values past ``capacity_bytes``."""

    name = "memory"

    def __init__(self, config: CacheConfig | None = None, *, capacity_bytes: int | None = None):
        self.capacity_bytes = capacity_bytes
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        """Bytes of all stored values."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._data for k in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        with self._lock:
            out: list[Buffer | None] = []
            for k in keys:
                v = self._data.get(k)
                if v is not None:
                    self._data.move_to_end(k)
                out.append(v)
            return out

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        # Copy outside the lock: values may be views of caller memory.
        copies = [(bytes(k), bytes(v)) for k, v in items]
        with self._lock:
            for k, v in copies:
                old = self._data.pop(k, None)
                if old is not None:
                    self._bytes -= len(old)
                if self.capacity_bytes is not None and len(v) > self.capacity_bytes:
                    continue  # can never fit; dropping it is what a full cache does
                self._data[k] = v
                self._bytes += len(v)
                self._evict_locked()

    def delete(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for k in keys:
                old = self._data.pop(k, None)
                if old is not None:
                    self._bytes -= len(old)

    def raw_set(self, key: bytes, value: bytes) -> None:
        """Store ``value`` verbatim (tests use it to plant corrupt values)."""
        self.put_many([(key, value)])

    def _evict_locked(self) -> None:
        if self.capacity_bytes is None:
            return
        while self._bytes > self.capacity_bytes and self._data:
            _, v = self._data.popitem(last=False)
            self._bytes -= len(v)
            self.evictions += 1


_SHARED: dict[str, MemoryBackend] = {}
_SHARED_LOCK = threading.Lock()


def shared_memory_backend(name: str) -> MemoryBackend:
    """The process-wide memory store called ``name`` (made on first use).

    Lets the connector's scheduler half and its in-process workers (the
    scheduler simulation, single-process tests) see one store, as they would
    see one Redis.
    """
    with _SHARED_LOCK:
        backend = _SHARED.get(name)
        if backend is None:
            backend = _SHARED[name] = MemoryBackend()
        return backend
