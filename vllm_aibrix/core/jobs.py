"""SerialJobs: background work that runs one job at a time, in submission order.

The worker's asynchronous stores use it: a step's store (engine blocks ->
L1 slots, then the step's L2 writes) runs while the next step computes.
Order matters, not just completion: a later job may write a slot an earlier
one reads, so jobs never overlap or reorder, and waiting for job ``t`` means
every job submitted before ``t`` is done too.

A job that raises poisons the queue: the error is re-raised by the next
:meth:`SerialJobs.check` / :meth:`SerialJobs.wait` on the caller's thread.
A store that failed half-way leaves slots whose bytes are not their keys';
the engine must stop rather than serve them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class SerialJobs:
    """FIFO jobs on one background thread, addressed by increasing tickets."""

    def __init__(self, name: str = "aibrix-jobs") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._futures: dict[int, Future[Any]] = {}
        self._next = 1
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def submit(self, fn: Callable[[], Any]) -> int:
        """Queue ``fn``; returns its ticket (tickets only grow)."""
        self.check()
        with self._lock:
            ticket = self._next
            self._next += 1
            self._futures[ticket] = self._start(fn)
        return ticket

    def _start(self, fn: Callable[[], Any]) -> Future[Any]:
        return self._pool.submit(fn)

    def done(self, ticket: int) -> bool:
        """Whether job ``ticket`` (and so every earlier one) has finished."""
        with self._lock:
            fut = self._futures.get(ticket)
        if fut is None:
            return True
        if not fut.done():
            return False
        self._collect()
        return True

    def wait(self, ticket: int) -> None:
        """Block until job ``ticket`` and every earlier job have finished."""
        with self._lock:
            fut = self._futures.get(ticket)
        if fut is not None:
            self._block_on(fut)
        self._collect()
        self.check()

    def _block_on(self, fut: Future[Any]) -> None:
        fut.exception()  # waits; the error is collected below

    def wait_all(self) -> None:
        """Block until everything submitted so far has finished."""
        with self._lock:
            last = self._next - 1
        self.wait(last)

    def check(self) -> None:
        """Re-raise the first error a job raised (once seen, it stays)."""
        self._collect()
        if self._error is not None:
            raise RuntimeError("a background copy job failed") from self._error

    def _collect(self) -> None:
        with self._lock:
            for t in sorted(self._futures):
                fut = self._futures[t]
                if not fut.done():
                    break
                del self._futures[t]
                err = None if fut.cancelled() else fut.exception()
                if err is not None and self._error is None:
                    self._error = err

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._pool.shutdown(wait=True)
        self._collect()
