"""Local disk L2 backend: one file per value under ``config.disk_path``.

* Capacity-bounded (``disk_capacity_gb``), least-recently-used files go first.
  Recency is kept in memory and mirrored to the files' mtime on every read,
  so the order survives a restart.
* Writes are atomic: a unique temp file in the target directory, optional
  fsync, then ``os.replace``. A reader sees the old value or the new one,
  never a half-written file; a crash leaves only ``*.tmp`` files, which the
  next start deletes.
* A restart rebuilds the index from the files on disk (size + mtime).
* A torn or tampered file cannot be served as good data: the codec's length
  and checksum reject it above this layer.

This is a single-node tier: several processes on one host may share the
directory (each evicts from its own view), but not several hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.l2.backend import BackendError, Buffer, L2BackendBase

logger = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"


class DiskBackend(L2BackendBase):
    """Capacity-bounded LRU file store. See the module docstring."""

    name = "disk"

    def __init__(
        self,
        config: CacheConfig,
        *,
        fsync: bool = False,
        capacity_bytes: int | None = None,
    ) -> None:
        if not config.disk_path:
            raise BackendError("disk_path is not set")
        self.root = os.path.abspath(config.disk_path)
        self.capacity_bytes = (
            capacity_bytes
            if capacity_bytes is not None
            else int(config.disk_capacity_gb * (1 << 30))
        )
        self.fsync = fsync
        self._lock = threading.Lock()
        # key -> file size, least recently used first.
        self._index: OrderedDict[bytes, int] = OrderedDict()
        self._bytes = 0
        self.evictions = 0
        os.makedirs(self.root, exist_ok=True)
        self._rebuild_index()

    # -- layout ------------------------------------------------------------------
    def _path(self, key: bytes) -> str:
        h = key.hex()
        # Two levels of 256 directories keep directories small for millions of files.
        return os.path.join(self.root, h[:2], h[2:4], h + _SUFFIX)

    def _rebuild_index(self) -> None:
        found: list[tuple[float, bytes, int]] = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                if name.endswith(_TMP_SUFFIX):
                    # An interrupted write; its value never became visible.
                    with contextlib.suppress(OSError):
                        os.unlink(full)
                    continue
                if not name.endswith(_SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(name[: -len(_SUFFIX)])
                    st = os.stat(full)
                except (ValueError, OSError):
                    continue
                found.append((st.st_mtime, key, st.st_size))
        found.sort()
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self._bytes += size
            victims = self._evict_locked(0)
        self._unlink(victims)
        if found:
            logger.info("disk L2 at %s: %d values, %d bytes", self.root, len(found), self._bytes)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._index)

    # -- API ---------------------------------------------------------------------
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [k in self._index for k in keys]

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        now = time.time()
        for key in keys:
            with self._lock:
                if key not in self._index:
                    out.append(None)
                    continue
                self._index.move_to_end(key)
            path = self._path(key)
            try:
                with open(path, "rb") as f:
                    out.append(f.read())
                # Persist recency so LRU order survives a restart.
                with contextlib.suppress(OSError):
                    os.utime(path, (now, now))
            except FileNotFoundError:
                # Evicted or deleted by someone else between index and open.
                self._forget(key)
                out.append(None)
            except OSError as e:
                raise BackendError(f"disk read {path}: {e}") from e
        return out

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        self.put_many_parts([(k, (v,)) for k, v in items])

    def put_many_parts(self, items: Sequence[tuple[bytes, Sequence[Buffer]]]) -> None:
        for key, parts in items:
            size = sum(memoryview(p).nbytes for p in parts)
            if size > self.capacity_bytes:
                continue  # could never fit; a cache may drop what it cannot hold
            path = self._path(key)
            tmp = f"{path}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}"
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    for p in parts:
                        view = memoryview(p).cast("B")
                        while view.nbytes:
                            n = os.write(fd, view)
                            view = view[n:]
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                # Reserve space before the file becomes visible so capacity holds.
                with self._lock:
                    old = self._index.pop(key, None)
                    if old is not None:
                        self._bytes -= old
                    victims = self._evict_locked(size)
                    self._index[key] = size
                    self._bytes += size
                os.replace(tmp, path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                self._forget(key)
                raise BackendError(f"disk write {path}: {e}") from e
            self._unlink(victims)

    def delete(self, keys: Sequence[bytes]) -> None:
        for key in keys:
            self._forget(key)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))

    def ping(self) -> bool:
        return os.path.isdir(self.root) and os.access(self.root, os.W_OK)

    # -- internals -----------------------------------------------------------------
    def _forget(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._bytes -= size

    def _evict_locked(self, incoming: int) -> list[bytes]:
        victims: list[bytes] = []
        while self._index and self._bytes + incoming > self.capacity_bytes:
            key, size = self._index.popitem(last=False)
            self._bytes -= size
            self.evictions += 1
            victims.append(key)
        return victims

    def _unlink(self, keys: list[bytes]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))
