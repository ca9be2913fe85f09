"""Executors for tests: submitted calls run only when the test says so."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

from vllm_aibrix.core.jobs import SerialJobs


class HeldExecutor(Executor):
    """Queues every submitted call; :meth:`run_all` runs them in order."""

    def __init__(self) -> None:
        self.pending: list[tuple[Future[Any], Callable[[], Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        self.pending.append((fut, lambda: fn(*args, **kwargs)))
        return fut

    def run_all(self) -> None:
        jobs, self.pending = self.pending, []
        for fut, job in jobs:
            fut.set_result(job())


class HeldJobs(SerialJobs):
    """SerialJobs whose jobs run only when the test says so, or when waited for.

    Jobs still run one at a time in submission order: :meth:`run` runs the
    oldest ones, and waiting for a ticket runs every job up to it on the
    waiting thread, as the real queue's thread would have.
    """

    def __init__(self) -> None:
        super().__init__()
        self.queue: deque[tuple[Future[Any], Callable[[], Any]]] = deque()

    def _start(self, fn: Callable[[], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        self.queue.append((fut, fn))
        return fut

    def _block_on(self, fut: Future[Any]) -> None:
        while not fut.done():
            self.run(1)

    def run(self, n: int | None = None) -> int:
        """Run the ``n`` oldest queued jobs (all by default); returns how many ran."""
        ran = 0
        while self.queue and (n is None or ran < n):
            fut, fn = self.queue.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # surfaced through the queue's check()
                    fut.set_exception(e)
            ran += 1
        return ran

    def close(self) -> None:
        self.run()
        super().close()
