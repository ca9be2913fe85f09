"""An executor for unit tests: submitted calls run only when the test says so."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


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
