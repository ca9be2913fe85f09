"""The only module of the simulation that touches vllm_aibrix internals.

Everything else in ``tests/sim`` talks to the connector through vLLM's
public connector API (what a real engine calls). The few seams the
simulation needs beyond that -- replacing a worker's load executor and fault
hooks, reading the scheduler half's pins and L1 index, sharing one in-memory
L2 between the scheduler and worker halves -- are here, so that when the
connector's internals are renamed only this file changes.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch

from vllm_aibrix.core.l2.memory import MemoryBackend
from vllm_aibrix.vllm.faults import LoadFaults

__all__ = [
    "LoadFaults",
    "LoadPlan",
    "ManualExecutor",
    "StepClock",
    "abandoned_loads",
    "drop_shared_memory_l2",
    "flush_l2",
    "inflight_loads",
    "install_executor",
    "install_faults",
    "install_store_jobs",
    "l1_valid_entries",
    "l2_items",
    "load_plans",
    "namespace_digest",
    "pending_store_slots",
    "pool_state",
    "request_keys",
    "shared_memory_l2",
    "slot_bytes",
    "slot_view",
    "store_plans",
    "worker_rank",
]


# ----------------------------------------------------------------- executor
@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: Future[Any]
    submitted_step: int
    tag: str
    due: Any = None  # the simulation's note of when to run it


class ManualExecutor(Executor):
    """An executor whose jobs run only when the simulation says so.

    ``submit`` queues the job; :meth:`run` executes chosen jobs on the
    caller's thread. That makes "a slow load that finishes N steps later"
    deterministic and reproducible from a seed.
    """

    def __init__(self, rank: int = 0) -> None:
        self.jobs: deque[_Job] = deque()
        self.rank = rank
        self.step = 0
        self.closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self.closed:
            raise RuntimeError("executor shut down")
        fut: Future[Any] = Future()
        tag = ""
        spec = args[0] if args else None
        if spec is not None and hasattr(spec, "req_id"):
            tag = str(spec.req_id)
        self.jobs.append(_Job(fn, args, kwargs, fut, self.step, tag))
        return fut

    def __len__(self) -> int:
        return len(self.jobs)

    def run(self, pick: Callable[[_Job], bool] | None = None) -> int:
        """Run the queued jobs ``pick`` accepts (all by default), in FIFO order."""
        ran = 0
        keep: deque[_Job] = deque()
        while self.jobs:
            job = self.jobs.popleft()
            if pick is not None and not pick(job):
                keep.append(job)
                continue
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.fn(*job.args, **job.kwargs))
                except BaseException as e:  # surfaced through the future
                    job.future.set_exception(e)
            ran += 1
        self.jobs = keep
        return ran

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if wait and not cancel_futures:
            self.run()
        else:
            for job in self.jobs:
                job.future.cancel()
            self.jobs.clear()
        self.closed = True


# ------------------------------------------------------------ worker seams
def _worker(conn: Any) -> Any:
    w = conn._worker
    assert w is not None, "not a worker-role connector"
    return w


def install_lookup_executor(conn: Any, executor: Executor, clock: Callable[[], float]) -> None:
    """Answer the planner's background L2 lookups on ``executor``, timed by ``clock``."""
    planner = _sched(conn).planner
    if planner._probe_pool is not None:
        planner._probe_pool.shutdown(wait=False)
    planner._probe_pool = executor
    planner._clock = clock


def _sched(conn: Any) -> Any:
    s = conn._scheduler
    assert s is not None, "not a scheduler-role connector"
    return s


def install_executor(conn: Any, executor: Executor) -> None:
    """Make a worker-role connector run its async loads on ``executor``."""
    w = _worker(conn)
    old = w.executor
    w.executor = executor
    if old is not executor:
        old.shutdown(wait=False)


def install_store_jobs(conn: Any, jobs: Any) -> None:
    """Make a worker-role connector run its background stores on ``jobs`` (a HeldJobs)."""
    w = _worker(conn)
    old = w.store_jobs
    w.store_jobs = jobs
    if old is not jobs:
        old.close()


def abandoned_loads(conn: Any) -> int:
    """Async loads past their deadline whose threads have not finished (slots still held)."""
    return len(_worker(conn)._abandoned)


def pending_store_slots(conn: Any) -> set[int]:
    """Slots a background store not yet run will write or read."""
    w = _worker(conn)
    out: set[int] = set()
    for p in w._pending_stores:
        if not w.store_jobs.done(p.ticket):
            out |= p.slots
    return out


def install_faults(conn: Any, faults: LoadFaults) -> None:
    """Make a worker-role connector consult ``faults`` on every load."""
    _worker(conn).faults = faults


def worker_rank(conn: Any) -> int:
    return int(_worker(conn).rank)


def inflight_loads(conn: Any) -> int:
    """Async loads the worker still tracks (submitted, not yet reported)."""
    return len(_worker(conn)._inflight)


def flush_l2(conn: Any) -> None:
    """Wait until the worker's queued L2 writes are in the backend.

    The simulation calls this after every worker call that may queue writes,
    so that what a later lookup sees does not depend on thread timing.
    """
    w = _worker(conn)
    if w.l2 is not None:
        assert w.l2.flush(timeout=30.0), "L2 ingestion did not drain"


def slot_view(conn: Any, slot: int) -> torch.Tensor:
    """The bytes of one L1 slot on this worker (a view)."""
    w = _worker(conn)
    assert w.buffer is not None
    return w.buffer.slot(slot)


def slot_bytes(conn: Any) -> int:
    return int(conn.info.slot_bytes)


def namespace_digest(conn: Any) -> bytes:
    """The engine's base key namespace (both halves derive the same one)."""
    return bytes(conn.info.namespace.digest)


# ---------------------------------------------------------- scheduler seams
def pool_state(conn: Any) -> dict[str, int]:
    """Pins, pending L2 fills and per-request trackers of the scheduler half."""
    return dict(_sched(conn).pool_state())


def _index(conn: Any) -> tuple[Any, Any]:
    """(L1 index, keys still being filled from L2) of the scheduler half."""
    s = _sched(conn)
    planner = getattr(s, "planner", None)
    if planner is not None:  # core/planner.py
        return planner.l1, planner._filling
    return s.l1, s._pending  # the pre-planner scheduler half


def l1_valid_entries(conn: Any) -> list[tuple[bytes, int]]:
    """(key, slot) of every L1 entry the scheduler half would serve as a hit.

    That is every resident key that is not still being filled from L2: the
    design says such a slot holds that key's bytes on every rank.
    """
    l1, busy = _index(conn)
    return [(k, slot) for k, slot in list(l1._slot.items()) if k not in busy]


def request_keys(conn: Any, req_id: str) -> list[bytes]:
    """The cache keys the scheduler half has computed for a request so far.

    They may differ from keys of the engine's base namespace (a connector
    reset may move keys to a new epoch), so the simulation learns them here.
    """
    s = _sched(conn)
    planner = getattr(s, "planner", None)
    req = planner._requests.get(req_id) if planner is not None else s._trackers.get(req_id)
    return list(req.hasher.keys) if req is not None else []


@dataclass(frozen=True)
class LoadPlan:
    """What one load in a step's metadata asks the workers to do."""

    req_id: str
    block_ids: tuple[int, ...]
    from_l2: tuple[bool, ...]  # per block: filled from L2 (else an L1 hit / unplaced)
    unplaced: int  # trailing blocks without a slot (reported failed)
    is_async: bool


def load_plans(meta: Any) -> list[LoadPlan]:
    """The loads of one step's connector metadata (for provenance in messages)."""
    out = []
    for spec in getattr(meta, "loads", ()):
        out.append(
            LoadPlan(
                str(spec.req_id),
                tuple(int(b) for b in spec.block_ids),
                tuple(k is not None for k in spec.l2_keys),
                sum(1 for s in spec.slots if s < 0),
                bool(spec.is_async),
            )
        )
    return out


def store_plans(meta: Any) -> list[tuple[str, list[int], list[int]]]:
    """(req id, slots, engine block ids) of the stores in one step's metadata."""
    return [
        (str(st.req_id), [int(s) for s in st.slots], [int(b) for b in st.block_ids])
        for st in getattr(meta, "stores", ())
    ]


# -------------------------------------------------------------------- clock
class StepClock:
    """A monotonic clock the simulation advances: one second per engine step.

    Installed as the worker module's ``time.monotonic`` so load deadlines
    (``load_deadline_s``) expire after a chosen number of steps, not of
    wall-clock seconds. One process-wide patch, counted, for all simulations.
    """

    now = 0.0
    _users = 0
    _patch: Any = None

    @classmethod
    def acquire(cls) -> None:
        if cls._users == 0:
            import time
            import types

            from vllm_aibrix.vllm import worker

            proxy = types.SimpleNamespace(
                monotonic=lambda: cls.now,
                perf_counter=time.perf_counter,
                time=time.time,
                sleep=time.sleep,
            )
            cls._patch = mock.patch.object(worker, "time", proxy)
            cls._patch.start()
        cls._users += 1

    @classmethod
    def release(cls) -> None:
        cls._users -= 1
        if cls._users == 0 and cls._patch is not None:
            cls._patch.stop()
            cls._patch = None


# ------------------------------------------------------------------ shared L2
def shared_memory_l2(
    name: str, capacity_bytes: int | None
) -> tuple[dict[str, Any], MemoryBackend, contextlib.AbstractContextManager[Any]]:
    """Connector config entries, the backend, and a context to build the halves in.

    ``l2_cache_backend=MEMORY`` alone gives each L2Store (one in the
    scheduler half, one per worker) its own dict; ``memory_store_name`` makes
    them all use one process-wide store, as they would use one Redis. (Older
    code without that setting: every L2Store built inside the returned
    context gets the backend.)
    """
    from vllm_aibrix.core.l2 import memory

    if hasattr(memory, "shared_memory_backend"):
        backend = memory.shared_memory_backend(name)
        backend.capacity_bytes = capacity_bytes
        entries = {"l2_cache_backend": "MEMORY", "memory_store_name": name}
        return entries, backend, contextlib.nullcontext()
    backend = _FALLBACK_STORES.setdefault(name, MemoryBackend(capacity_bytes=capacity_bytes))
    ctx = mock.patch("vllm_aibrix.core.l2.store.create_backend", lambda config: backend)
    return {"l2_cache_backend": "MEMORY"}, backend, ctx


_FALLBACK_STORES: dict[str, MemoryBackend] = {}


def drop_shared_memory_l2(name: str) -> None:
    """Forget a shared in-process L2 (the simulation is over)."""
    from vllm_aibrix.core.l2 import memory

    _FALLBACK_STORES.pop(name, None)
    if hasattr(memory, "_SHARED"):
        with memory._SHARED_LOCK:
            memory._SHARED.pop(name, None)


def l2_items(backend: MemoryBackend) -> list[tuple[bytes, bytes]]:
    """A snapshot of the raw (storage key, value) pairs in the backend."""
    with backend._lock:
        return list(backend._data.items())
