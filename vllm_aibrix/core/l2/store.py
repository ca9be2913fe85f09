"""L2Store: the one object everything above the backends talks to.

It wraps one :class:`~vllm_aibrix.core.l2.backend.L2BackendBase` and adds

* the value codec (header + checksum [+ zstd]) on every value;
* a per-operation deadline (``config.l2_op_timeout_s``): backend calls run on
  a small thread pool and the caller waits at most that long -- except for
  backends that time themselves out (``capabilities.self_timed``, e.g. Redis
  with socket timeouts), which run on the caller's thread to save the hop;
* health tracking: an unreachable backend at start, or an operation that
  fails or times out later, marks L2 *down* (one warning). While down every
  operation returns a miss immediately; a background thread probes the
  backend every ``config.l2_cache_retry_interval_s`` and marks it up again;
* the asynchronous, bounded ingestion queue behind :meth:`submit_put`.

Nothing raises into the caller: a failure costs a miss (recompute), never an
exception and never wrong bytes -- a value is decoded into the caller's
tensor only after its header and checksum were verified.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from vllm_aibrix.core.config import CacheConfig, Compression
from vllm_aibrix.core.keys import rank_key
from vllm_aibrix.core.l2 import codec
from vllm_aibrix.core.l2.backend import BackendTimeout, L2BackendBase
from vllm_aibrix.core.l2.factory import create_backend
from vllm_aibrix.core.l2.ingest import IngestItem, IngestQueue

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class L2Stats:
    """Counters of one store (monotonic). Blocks unless named ``*_bytes``."""

    gets: int = 0  # blocks asked for by get_blocks
    get_hits: int = 0  # blocks decoded into the caller's tensor
    get_misses: int = 0  # asked for but not delivered (absent, corrupt, after a hole, down)
    corrupt: int = 0  # values present but rejected by the codec
    corrupt_reasons: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # backend calls that raised
    timeouts: int = 0  # backend calls that missed the deadline
    down_skips: int = 0  # operations answered as misses because L2 was down
    puts: int = 0  # blocks written (sync + async)
    put_bytes: int = 0  # payload bytes written
    get_bytes: int = 0  # payload bytes delivered
    exists_calls: int = 0
    deletes: int = 0
    ingest_submitted_blocks: int = 0
    ingest_dropped_blocks: int = 0  # dropped by the queue bound, or while L2 was down
    ingest_dropped_bytes: int = 0
    ingest_failed_blocks: int = 0  # the batched put failed
    ingest_pending_bytes: int = 0  # gauge
    went_down: int = 0  # up -> down transitions
    recovered: int = 0  # down -> up transitions


class L2Store:
    """Checked, deadline-bounded, failure-tolerant access to one L2 backend."""

    def __init__(
        self,
        config: CacheConfig,
        namespace_digest: bytes,
        backend: L2BackendBase | None = None,
        *,
        num_threads: int = 8,
        inline_calls: bool = True,
    ) -> None:
        if len(namespace_digest) != codec.NAMESPACE_BYTES:
            raise ValueError(f"namespace_digest must be {codec.NAMESPACE_BYTES} bytes")
        self.config = config
        self.namespace_digest = namespace_digest
        self.timeout_s = config.l2_op_timeout_s
        self.retry_interval_s = config.l2_cache_retry_interval_s
        self.compress = config.compression == Compression.ZSTD
        if self.compress and not codec.zstd_available():
            logger.warning("l2_cache_compression=ZSTD but 'zstandard' is missing; storing raw")
            self.compress = False
        self._stats = L2Stats()
        self._stats_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = threading.Event()
        self._up = False
        self._retry_thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="l2-op")
        self._ingest = IngestQueue(
            self._write_batch,
            max_bytes=max(1, int(config.l2_cache_ingestion_max_inflight_mb * (1 << 20))),
            batch_size=config.l2_cache_ingestion_batch_size,
        )
        self._backend: L2BackendBase | None = backend
        self._inline_allowed = inline_calls
        self._backend_label = backend.name if backend is not None else config.l2_backend.value
        if self._probe():
            self._set_up()
        else:
            self._mark_down(self._last_probe_error or "no answer to a ping")

    # -- health -------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """True while L2 is believed reachable."""
        return self._up and not self._closed.is_set()

    @property
    def backend(self) -> L2BackendBase | None:
        return self._backend

    _last_probe_error: str | None = None

    @property
    def _inline(self) -> bool:
        b = self._backend
        return self._inline_allowed and b is not None and b.capabilities.self_timed

    def _probe(self) -> bool:
        """Create the backend if needed and ping it, within the deadline."""
        if self._backend is None:
            try:
                self._backend = create_backend(self.config)
            except Exception as e:
                self._last_probe_error = f"cannot create backend: {e}"
                return False
            if self._backend is None:
                self._last_probe_error = "l2_cache_backend is NONE"
                return False
        backend = self._backend
        fut = self._pool.submit(backend.ping)
        try:
            ok = bool(fut.result(timeout=self.timeout_s))
        except FutureTimeout:
            self._last_probe_error = f"ping timed out after {self.timeout_s:.3g}s"
            return False
        except Exception as e:
            self._last_probe_error = f"ping failed: {e}"
            return False
        self._last_probe_error = None if ok else "no answer to a ping"
        return ok

    def _set_up(self) -> None:
        with self._state_lock:
            self._up = True

    def _mark_down(self, reason: str) -> None:
        with self._state_lock:
            if self._closed.is_set():
                return
            was_up = self._up
            self._up = False
            first = self._retry_thread is None
            if self._retry_thread is None or not self._retry_thread.is_alive():
                self._retry_thread = threading.Thread(
                    target=self._retry_loop, name="l2-reconnect", daemon=True
                )
                self._retry_thread.start()
            else:
                return  # already down and retrying
        if was_up or first:
            self._add(went_down=1)
            logger.warning(
                "L2 (%s) is unavailable: %s. Continuing without it (every L2 lookup is a "
                "miss); retrying every %.3gs.",
                self._backend_label,
                reason,
                self.retry_interval_s,
            )

    def _retry_loop(self) -> None:
        while not self._closed.wait(self.retry_interval_s):
            if self._probe():
                with self._state_lock:
                    if self._closed.is_set():
                        return
                    self._up = True
                    # Let a later failure start a new retry thread.
                    self._retry_thread = threading.current_thread()
                self._add(recovered=1)
                logger.warning("L2 (%s) is reachable again; using it.", self._backend_label)
                return
            logger.debug("L2 (%s) still down: %s", self._backend_label, self._last_probe_error)

    def _call(self, fn: Any, *args: Any) -> tuple[bool, Any]:
        """Run ``fn(*args)`` within the deadline; (ok, result).

        On the pool (the caller waits at most the op timeout), or inline for a
        self-timed backend (it gives up by itself).
        """
        if not self.available:
            self._add(down_skips=1)
            return False, None
        if self._inline:
            try:
                return True, fn(*args)
            except BackendTimeout:
                self._add(timeouts=1)
                self._mark_down(f"an operation took longer than {self.timeout_s:.3g}s")
            except Exception as e:
                self._add(errors=1)
                self._mark_down(f"{type(e).__name__}: {e}")
            return False, None
        try:
            fut: Future[Any] = self._pool.submit(fn, *args)
        except RuntimeError:  # pool shut down (closed)
            return False, None
        try:
            return True, fut.result(timeout=self.timeout_s)
        except (FutureTimeout, BackendTimeout):
            self._add(timeouts=1)
            self._mark_down(f"an operation took longer than {self.timeout_s:.3g}s")
        except Exception as e:
            self._add(errors=1)
            self._mark_down(f"{type(e).__name__}: {e}")
        return False, None

    # -- stats ----------------------------------------------------------------------------
    def _add(self, **deltas: int) -> None:
        with self._stats_lock:
            s = self._stats
            for name, d in deltas.items():
                setattr(s, name, getattr(s, name) + d)

    @property
    def stats(self) -> L2Stats:
        """The live counters (ingestion counters refreshed from the queue)."""
        q = self._ingest.stats
        with self._stats_lock:
            s = self._stats
            s.ingest_submitted_blocks = q.submitted_blocks
            s.ingest_dropped_blocks = q.dropped_blocks
            s.ingest_dropped_bytes = q.dropped_bytes
            s.ingest_failed_blocks = q.failed_blocks
        s.ingest_pending_bytes = self._ingest.pending_bytes
        return s

    # -- operations ---------------------------------------------------------------------------
    def exists_prefix(self, keys: Sequence[bytes], ranks: Sequence[int] = (0,)) -> int:
        """Leading keys whose shards for *all* ``ranks`` are present (one batched call)."""
        if not keys or not ranks:
            return 0
        backend = self._backend
        if backend is None:
            return 0
        self._add(exists_calls=1)
        skeys = [rank_key(k, r) for k in keys for r in ranks]
        ok, present = self._call(backend.exists, skeys)
        if not ok or len(present) != len(skeys):
            return 0
        width = len(ranks)
        n = 0
        for i in range(len(keys)):
            if not all(present[i * width : (i + 1) * width]):
                break
            n += 1
        return n

    def get_blocks(self, keys: Sequence[bytes], rank: int, dst: Sequence[torch.Tensor]) -> int:
        """Fetch, verify and decode ``rank``'s shard of each key into ``dst[i]``.

        Returns the length of the longest intact leading run. A missing or
        corrupt value ends it; a corrupt value is counted and never copied.
        Values after the first failure are not decoded at all.
        """
        n = min(len(keys), len(dst))
        if n == 0:
            return 0
        backend = self._backend
        skeys = [rank_key(k, rank) for k in keys[:n]]
        ok, values = (False, None) if backend is None else self._call(backend.get_many, skeys)
        if not ok or values is None or len(values) != n:
            self._add(gets=n, get_misses=n)
            return 0
        hits = 0
        got_bytes = 0
        bad: codec.DecodeStatus | None = None
        try:
            for i in range(n):
                value = values[i]
                if value is None:
                    break
                status = codec.decode_into(value, self.namespace_digest, skeys[i], dst[i])
                if status is not codec.DecodeStatus.OK:
                    bad = status
                    break
                hits += 1
                got_bytes += dst[i].numel() * dst[i].element_size()
        except Exception as e:  # e.g. a non-CPU or non-contiguous destination
            logger.warning("L2 get: cannot decode into destination: %s", e)
            self._add(errors=1)
        finally:
            del values  # the fetched values can be large; release them now
        with self._stats_lock:
            s = self._stats
            s.gets += n
            s.get_hits += hits
            s.get_misses += n - hits
            s.get_bytes += got_bytes
            if bad is not None:
                s.corrupt += 1
                s.corrupt_reasons[bad.value] = s.corrupt_reasons.get(bad.value, 0) + 1
        if bad is not None:
            logger.debug("L2 value %s rejected: %s", skeys[hits].hex(), bad.value)
        return hits

    def put_blocks(self, keys: Sequence[bytes], rank: int, src: Sequence[torch.Tensor]) -> None:
        """Write ``rank``'s shard of each key synchronously (tests, benchmarks)."""
        n = min(len(keys), len(src))
        if n == 0:
            return
        backend = self._backend
        if backend is None or not self.available:
            self._add(down_skips=1)
            return
        try:
            items, nbytes = self._encode([rank_key(k, rank) for k in keys[:n]], src[:n])
        except Exception as e:
            logger.warning("L2 put: cannot encode source: %s", e)
            self._add(errors=1)
            return
        ok, _ = self._call(backend.put_many_parts, items)
        if ok:
            self._add(puts=n, put_bytes=nbytes)

    def submit_put(self, keys: Sequence[bytes], rank: int, src: Sequence[Any]) -> int:
        """Copy the blocks now and queue them for writing; returns how many were accepted.

        Never blocks on L2. While L2 is down nothing is copied and every block
        counts as dropped.
        """
        n = min(len(keys), len(src))
        accepted = 0
        for i in range(n):
            skey = rank_key(keys[i], rank)
            if not self.available:
                self._ingest.record_drop(_nbytes(src[i]))
                continue
            try:
                data = bytes(codec.as_byte_view(src[i]))  # the copy; the slot may be reused now
            except Exception as e:
                logger.warning("L2 submit_put: cannot read source: %s", e)
                self._add(errors=1)
                continue
            accepted += self._ingest.offer(IngestItem(skey, data))
        return accepted

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued writes are done (written, failed or dropped)."""
        return self._ingest.flush(timeout)

    def delete(self, keys: Sequence[bytes], ranks: Sequence[int] = (0,)) -> None:
        """Remove the shards of ``keys`` for ``ranks`` (best effort)."""
        backend = self._backend
        if backend is None or not keys:
            return
        skeys = [rank_key(k, r) for k in keys for r in ranks]
        ok, _ = self._call(backend.delete, skeys)
        if ok:
            self._add(deletes=len(skeys))

    def close(self) -> None:
        """Write what is queued (bounded by the op timeout), then release everything."""
        if self._closed.is_set():
            return
        self._ingest.close(timeout=self.timeout_s)
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._backend is not None:
            try:
                self._backend.close()
            except Exception as e:
                logger.debug("L2 backend close: %s", e)

    def __enter__(self) -> L2Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------
    def _encode(self, skeys: Sequence[bytes], src: Sequence[Any]) -> tuple[list[Any], int]:
        items: list[tuple[bytes, tuple[bytes, memoryview]]] = []
        total = 0
        for skey, s in zip(skeys, src, strict=True):
            enc = codec.encode(self.namespace_digest, skey, s, compress=self.compress)
            items.append((skey, (enc.header, enc.body)))
            total += len(codec.as_byte_view(s))
        return items, total

    def _write_batch(self, batch: list[IngestItem]) -> int:
        """Ingestion sink: one batched put; all or nothing."""
        backend = self._backend
        if backend is None or not self.available:
            return 0
        items, nbytes = self._encode([i.key for i in batch], [i.data for i in batch])
        ok, _ = self._call(backend.put_many_parts, items)
        if not ok:
            return 0
        self._add(puts=len(batch), put_bytes=nbytes)
        return len(batch)


def _nbytes(buf: Any) -> int:
    if isinstance(buf, torch.Tensor):
        return buf.numel() * buf.element_size()
    return memoryview(buf).nbytes
