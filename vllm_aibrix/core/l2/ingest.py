"""Bounded, batched, asynchronous write queue for L2 ingestion.

The engine must never wait for L2, and a slow or dead L2 must never make the
engine's memory grow. So:

* :meth:`IngestQueue.offer` takes an item whose bytes the caller has already
  copied (the source slot may be reused right after), appends it and
  returns at once -- it only holds a lock for a deque append.
* The bytes of all items not yet written (queued plus the batch being
  written) are bounded by ``max_bytes``. When a new item does not fit, the
  *oldest* queued items are dropped and counted: under sustained overload
  the freshest blocks are the most likely to be asked for again.
* One writer thread takes up to ``batch_size`` items at a time and hands them
  to ``sink`` (the store's batched put). Whatever the sink does, the batch is
  released afterwards, so nothing is retained.

Invariant (checked by tests): ``submitted == written + failed + dropped +
pending`` for blocks and for bytes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class IngestItem:
    """One block to write: its storage key and an owned copy of its payload."""

    __slots__ = ("__weakref__", "data", "key")

    def __init__(self, key: bytes, data: bytes) -> None:
        self.key = key
        self.data = data

    @property
    def nbytes(self) -> int:
        return len(self.data)


# The sink writes a batch and returns how many of its items were written
# (the rest count as failed); raising means all failed.
Sink = Callable[[list[IngestItem]], int]


@dataclass
class IngestStats:
    """Counters of one queue (monotonic, blocks and bytes)."""

    submitted_blocks: int = 0
    submitted_bytes: int = 0
    written_blocks: int = 0
    written_bytes: int = 0
    failed_blocks: int = 0
    failed_bytes: int = 0
    dropped_blocks: int = 0
    dropped_bytes: int = 0
    batches: int = 0


class IngestQueue:
    """See the module docstring."""

    def __init__(
        self,
        sink: Sink,
        *,
        max_bytes: int,
        batch_size: int,
        name: str = "l2-ingest",
    ) -> None:
        if max_bytes <= 0 or batch_size <= 0:
            raise ValueError("max_bytes and batch_size must be > 0")
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.stats = IngestStats()
        self._sink = sink
        self._queue: deque[IngestItem] = deque()
        self._queued_bytes = 0
        self._inflight_bytes = 0
        self._inflight_blocks = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------
    def offer(self, item: IngestItem) -> bool:
        """Queue ``item``; False (and counted as dropped) if it cannot be accepted."""
        n = item.nbytes
        with self._cond:
            self.stats.submitted_blocks += 1
            self.stats.submitted_bytes += n
            if self._closed or n > self.max_bytes:
                self._count_drop(n)
                return False
            while self._queue and self._queued_bytes + self._inflight_bytes + n > self.max_bytes:
                old = self._queue.popleft()
                self._queued_bytes -= old.nbytes
                self._count_drop(old.nbytes)
            if self._queued_bytes + self._inflight_bytes + n > self.max_bytes:
                # Only the batch being written is left and it still leaves no room.
                self._count_drop(n)
                return False
            self._queue.append(item)
            self._queued_bytes += n
            self._cond.notify_all()
            return True

    def record_drop(self, nbytes: int) -> None:
        """Count a block that was submitted but refused before it was copied."""
        with self._cond:
            self.stats.submitted_blocks += 1
            self.stats.submitted_bytes += nbytes
            self._count_drop(nbytes)

    # -- observers ---------------------------------------------------------------------
    @property
    def pending_bytes(self) -> int:
        """Bytes accepted but not yet written or dropped (queued + being written)."""
        with self._cond:
            return self._queued_bytes + self._inflight_bytes

    @property
    def pending_blocks(self) -> int:
        with self._cond:
            return len(self._queue) + self._inflight_blocks

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything accepted so far is written (or failed/dropped)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and self._inflight_blocks == 0, timeout=timeout
            )

    def close(self, timeout: float | None = 1.0) -> None:
        """Write what can be written within ``timeout``, drop the rest, stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            while self._queue:
                old = self._queue.popleft()
                self._queued_bytes -= old.nbytes
                self._count_drop(old.nbytes)
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- writer side -------------------------------------------------------------------------
    def _count_drop(self, n: int) -> None:
        self.stats.dropped_blocks += 1
        self.stats.dropped_bytes += n

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed and not self._queue:
                    return
                take = min(self.batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                nbytes = sum(i.nbytes for i in batch)
                self._queued_bytes -= nbytes
                self._inflight_bytes += nbytes
                self._inflight_blocks += len(batch)
            try:
                ok = max(0, min(len(batch), int(self._sink(batch))))
            except Exception as e:  # the sink is ours, but a bug must not kill the writer
                logger.debug("L2 ingestion batch failed: %s", e)
                ok = 0
            ok_bytes = sum(i.nbytes for i in batch[:ok])
            with self._cond:
                self._inflight_bytes -= nbytes
                self._inflight_blocks -= len(batch)
                self.stats.batches += 1
                self.stats.written_blocks += ok
                self.stats.written_bytes += ok_bytes
                self.stats.failed_blocks += len(batch) - ok
                self.stats.failed_bytes += nbytes - ok_bytes
                self._cond.notify_all()
            del batch  # release the payloads before waiting for the next batch
