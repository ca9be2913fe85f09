"""L2 backend on Mooncake Store (``mooncake-transfer-engine`` / ``-non-cuda``).

A :class:`MooncakeBackend` is a *pure client* of an existing Mooncake Store
cluster by default (``mooncake_global_segment_size_mb=0``): the memory lives
in storage nodes that mount segments, the master only keeps metadata. A
process may also contribute memory itself by setting a segment size.

How the Mooncake client behaves (measured with 0.3.13 over TCP, see
docs/l2-mooncake-infinistore.md), and what this module does about it:

* ``put`` on an existing key keeps the old value; the contract here is
  overwrite, so writes use the ``upsert`` family.
* Writes and zero-copy reads go through the pointer calls
  (``batch_upsert_from`` / ``batch_get_into``): they move bytes straight
  between the caller's memory and the storage node. The bytes-based calls
  (``upsert_batch``, ``get_batch``) stage every value through the client's
  local buffer, which is slower and caps a batch at
  ``mooncake_local_buffer_size_mb``.
* Values are not size-prefixed by the caller, so :meth:`get_many` asks the
  master for the sizes (``batch_get_replica_desc``, one cheap RPC) and then
  reads every value into memory it owns.
* Over TCP the transfer engine reads and writes local memory through the
  socket, so caller buffers need no registration; registration
  (``register_buffer``) only matters for RDMA memory regions, which this
  backend does not use (protocol is always ``tcp``).
* When the master dies, calls that need it retry internally for ~4.3 s and
  ``setup`` retries 20 times (~90 s). Every call here therefore runs under
  the op deadline (``l2_cache_op_timeout_ms``) and, after a failure, the next
  calls first ask the master a one-key ``batch_is_exist`` (which fails within
  a millisecond while the master is down) so that a dead cluster costs one
  fast :class:`BackendError` per call instead of a stall.
* Empty values cannot be stored (allocation of size 0 fails): they raise.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ClassVar, TypeVar

import numpy as np

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.l2.backend import (
    BackendError,
    BackendTimeout,
    Buffer,
    L2BackendBase,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Mooncake error codes we act on (mooncake-store/include/types.h).
OBJECT_NOT_FOUND = -704
BUFFER_TOO_SMALL = -600  # also "cannot allocate": the value does not fit
_PING_KEY = "aibrix-ping"

# Setup against a dead master retries 20 times by default (~90 s); one attempt
# is enough for us, a failed construction is retried by the store anyway.
_SETUP_RETRIES_ENV = "MC_STORE_CLIENT_SETUP_RETRIES"
_BIND_ENV = "MC_TCP_BIND_ADDRESS"


def _split_host_port(addr: str, what: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BackendError(f"{what}={addr!r} is not host:port")
    return host.strip("[]"), int(port)


def _address(buf: Buffer) -> tuple[int, int, Any]:
    """(address, length, owner) of a C-contiguous buffer; keep ``owner`` alive."""
    mv = memoryview(buf)
    if not mv.c_contiguous:
        raise BackendError("Mooncake backend needs C-contiguous buffers")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    arr = np.frombuffer(mv, dtype=np.uint8)
    return int(arr.ctypes.data), arr.nbytes, arr


class MooncakeBackend(L2BackendBase):
    """Raw L2 backend on a Mooncake Store cluster (TCP transport)."""

    name: ClassVar[str] = "mooncake"

    def __init__(self, config: CacheConfig, *, store: Any = None) -> None:
        """Connect to the cluster named by ``config`` (``mooncake_*`` fields).

        ``store`` injects an already set-up ``MooncakeDistributedStore``
        (benchmarks compare against the same client); normally omitted.
        Raises :class:`BackendError` when the package is missing or the master
        cannot be reached within the op timeout.
        """
        self.config = config
        self.timeout_s = config.l2_op_timeout_s
        self._closed = False
        self._degraded = threading.Event()
        # Raw calls run here so that a stalled call costs the caller at most the
        # deadline; a call that outlives it keeps its worker until Mooncake gives up.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mooncake-l2")
        if store is not None:
            self._store = store
            return
        try:
            from mooncake.store import MooncakeDistributedStore
        except ImportError as e:
            self._pool.shutdown(wait=False)
            raise BackendError(
                "l2_cache_backend=MOONCAKE needs the Mooncake client: pip install "
                "mooncake-transfer-engine-non-cuda (CPU) or mooncake-transfer-engine "
                f"(CUDA), plus apt libibverbs1 libnuma1 ({e})"
            ) from e
        master_host, master_port = _split_host_port(config.mooncake_master, "mooncake_master")
        try:
            # Fail fast on a dead master: Mooncake's own setup would retry for ~90 s.
            socket.create_connection((master_host, master_port), timeout=self.timeout_s).close()
        except OSError as e:
            self._pool.shutdown(wait=False)
            raise BackendError(
                f"Mooncake master {config.mooncake_master} is unreachable: {e}"
            ) from e
        # The transfer engine advertises this address to peers; without it it
        # picks the first external interface even when everything is local.
        os.environ.setdefault(_BIND_ENV, config.mooncake_local_hostname)
        os.environ.setdefault(_SETUP_RETRIES_ENV, "1")
        store = MooncakeDistributedStore()

        def setup() -> int:
            return int(
                store.setup(
                    config.mooncake_local_hostname,
                    config.mooncake_metadata_server,
                    config.mooncake_global_segment_size_mb << 20,
                    config.mooncake_local_buffer_size_mb << 20,
                    "tcp",
                    "",
                    config.mooncake_master,
                )
            )

        fut = self._pool.submit(setup)
        # Setup registers memory and mounts the segment: allow it more than one op.
        setup_timeout = max(5.0, 5 * self.timeout_s)
        try:
            rc = fut.result(timeout=setup_timeout)
        except FutureTimeout:
            # The late setup must still be undone, or its segment leaks in the cluster.
            fut.add_done_callback(lambda _f: store.close())
            self._pool.shutdown(wait=False)
            raise BackendError(
                f"Mooncake setup did not finish within {setup_timeout:.3g}s "
                f"(master {config.mooncake_master})"
            ) from None
        if rc != 0:
            self._pool.shutdown(wait=False)
            raise BackendError(
                f"Mooncake setup failed with code {rc} (master {config.mooncake_master}, "
                f"metadata {config.mooncake_metadata_server})"
            )
        self._store = store

    # -- plumbing ---------------------------------------------------------------
    @staticmethod
    def _key(key: bytes) -> str:
        # Mooncake keys are strings; keys here are arbitrary digests.
        return key.hex()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the pool within the op deadline, failing fast while degraded."""
        if self._closed:
            raise BackendError("Mooncake backend is closed")
        if self._degraded.is_set():
            self._probe_or_raise(what)
        try:
            fut: Future[T] = self._pool.submit(fn)
        except RuntimeError as e:  # pool shut down by close()
            raise BackendError("Mooncake backend is closed") from e
        try:
            return fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._degraded.set()
            raise BackendTimeout(
                f"Mooncake {what} took longer than {self.timeout_s:.3g}s"
            ) from None
        except BackendError:
            raise
        except Exception as e:
            self._degraded.set()
            raise BackendError(f"Mooncake {what} failed: {type(e).__name__}: {e}") from e

    def _probe_or_raise(self, what: str) -> None:
        """One-key existence query: fails within milliseconds while the master is down."""
        fut = self._pool.submit(self._store.batch_is_exist, [_PING_KEY])
        try:
            codes = fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise BackendError(f"Mooncake {what}: master does not answer") from None
        except Exception as e:
            raise BackendError(f"Mooncake {what}: master probe failed: {e}") from e
        if not codes or codes[0] < 0:
            raise BackendError(f"Mooncake {what}: master unavailable (code {codes})")
        self._degraded.clear()

    def _failed(self, what: str, keys: Sequence[str], codes: Sequence[int]) -> BackendError:
        self._degraded.set()
        bad = [(k, c) for k, c in zip(keys, codes, strict=False) if c < 0]
        return BackendError(
            f"Mooncake {what} failed for {len(bad)}/{len(keys)} keys "
            f"(first: {bad[0][0]} code {bad[0][1]})"
        )

    # -- L2BackendBase --------------------------------------------------------------------
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Presence of each key, one master RPC."""
        if not keys:
            return []
        skeys = [self._key(k) for k in keys]
        codes = self._call("exists", lambda: list(self._store.batch_is_exist(skeys)))
        if len(codes) != len(skeys) or any(c < 0 for c in codes):
            raise self._failed("exists", skeys, codes)
        return [c == 1 for c in codes]

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        """Values of ``keys``: sizes from the master, then one batched read into owned memory."""
        if not keys:
            return []
        skeys = [self._key(k) for k in keys]

        def run() -> list[Buffer | None]:
            sizes = self._sizes(skeys)
            found = [i for i, n in enumerate(sizes) if n > 0]
            out: list[Buffer | None] = [None] * len(skeys)
            if len(found) < len(skeys):
                # A dead master also answers "no replicas": tell misses from failures.
                absent = [skeys[i] for i, n in enumerate(sizes) if n <= 0]
                codes = list(self._store.batch_is_exist(absent))
                if len(codes) != len(absent) or any(c < 0 for c in codes):
                    raise self._failed("get", absent, codes)
            if not found:
                return out
            # One uninitialised arena for the batch (no zero-fill, one allocation);
            # each value is a view of it, so the arena lives as long as any value.
            arena = np.empty(sum(sizes[i] for i in found), dtype=np.uint8)
            base = int(arena.ctypes.data)
            offsets: dict[int, int] = {}
            off = 0
            for i in found:
                offsets[i] = off
                off += sizes[i]
            codes = self._store.batch_get_into(
                [skeys[i] for i in found],
                [base + offsets[i] for i in found],
                [sizes[i] for i in found],
            )
            for i, code in zip(found, codes, strict=True):
                if code == sizes[i]:
                    out[i] = arena[offsets[i] : offsets[i] + code].data
                elif code in (OBJECT_NOT_FOUND, BUFFER_TOO_SMALL) or code >= 0:
                    # Deleted or overwritten with another size in between: a miss.
                    continue
                else:
                    raise self._failed("get", [skeys[i]], [code])
            return out

        return self._call("get", run)

    def _sizes(self, skeys: list[str]) -> list[int]:
        """Value size per key from the master; 0 for a missing key."""
        desc = self._store.batch_get_replica_desc(skeys)
        sizes: list[int] = []
        for k in skeys:
            size = 0
            for replica in desc.get(k, ()):
                if replica.is_memory_replica():
                    size = int(replica.get_memory_descriptor().buffer_descriptor.size)
                    break
                if replica.is_disk_replica():
                    size = int(replica.get_disk_descriptor().object_size)
                    break
            sizes.append(size)
        return sizes

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[memoryview]) -> list[int]:
        """Read values straight into caller memory (``batch_get_into``), -1 = miss.

        Unlike the other calls this one is not abandoned at the deadline: a
        late transfer would write into buffers the caller already reused. Its
        worst case is Mooncake's own retry time (~4.3 s for the first call after
        the master died; later calls fail fast through the probe).
        """
        if len(keys) != len(buffers):
            raise ValueError("keys and buffers differ in length")
        if not keys:
            return []
        if self._closed:
            raise BackendError("Mooncake backend is closed")
        if self._degraded.is_set():
            self._probe_or_raise("get_into")
        if any(memoryview(b).readonly for b in buffers):
            raise ValueError("get_into needs writable buffers")
        skeys = [self._key(k) for k in keys]
        addrs = [_address(b) for b in buffers]
        try:
            codes = list(
                self._store.batch_get_into(skeys, [a[0] for a in addrs], [a[1] for a in addrs])
            )
        except Exception as e:
            self._degraded.set()
            raise BackendError(f"Mooncake get_into failed: {e}") from e
        out: list[int] = []
        for k, code in zip(skeys, codes, strict=True):
            if code >= 0:
                out.append(code)
            elif code in (OBJECT_NOT_FOUND, BUFFER_TOO_SMALL):
                out.append(-1)  # missing, or larger than its buffer: never a partial copy
            else:
                raise self._failed("get_into", [k], [code])
        return out

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        """Upsert every value straight from the caller's memory (``batch_upsert_from``)."""
        if not items:
            return
        skeys = [self._key(k) for k, _ in items]
        addrs = [_address(v) for _, v in items]
        if any(n == 0 for _, n, _ in addrs):
            raise BackendError("Mooncake cannot store empty values")

        def run() -> list[int]:
            return list(
                self._store.batch_upsert_from(skeys, [a[0] for a in addrs], [a[1] for a in addrs])
            )

        # ``addrs`` holds the buffers until the call returns, even past the deadline.
        codes = self._call("put", run)
        if len(codes) != len(skeys) or any(c != 0 for c in codes):
            raise self._failed("put", skeys, codes)

    def put_many_parts(self, items: Sequence[tuple[bytes, Sequence[Buffer]]]) -> None:
        """Join each value's parts into one contiguous buffer, then :meth:`put_many`.

        Mooncake has a multi-buffer put but no multi-buffer *upsert*, and a put
        would keep a stale value, so the parts are joined (one copy).
        """
        joined: list[tuple[bytes, Buffer]] = []
        for key, parts in items:
            joined.append((key, parts[0] if len(parts) == 1 else b"".join(parts)))
        self.put_many(joined)

    def delete(self, keys: Sequence[bytes]) -> None:
        """Remove keys (forced: a fresh key is still leased); missing keys are fine."""
        if not keys:
            return
        skeys = [self._key(k) for k in keys]
        codes = self._call("delete", lambda: list(self._store.batch_remove(skeys, True)))
        if any(c not in (0, OBJECT_NOT_FOUND) for c in codes):
            raise self._failed("delete", skeys, codes)

    def ping(self) -> bool:
        """True when the master answers an existence query."""
        if self._closed:
            return False
        try:
            self._probe_or_raise("ping")
            return True
        except BackendError:
            return False

    def close(self) -> None:
        """Leave the cluster (unmounts this process's segment, if any)."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False)
        deadline = time.monotonic() + max(1.0, self.timeout_s)
        # close() talks to the master; do not hang shutdown on a dead one.
        t = threading.Thread(target=self._store.close, name="mooncake-close", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()))
