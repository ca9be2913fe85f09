"""The worker half of the connector: executes the scheduler's plans on one rank.

Owns this rank's L1 slot array (same number of slots on every rank), copies
engine blocks <-> slots, fetches its shard of L2 blocks, and reports how many
leading blocks of each load arrived. Blocks past that prefix are reported to
vLLM as load errors; vLLM takes the union over ranks, which truncates the
request at the shortest prefix any rank loaded, and recomputes the rest on
every rank. No rank ever waits for another, so a dead or stalled rank cannot
hang the group: a load is bounded by the L2 operation timeout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from vllm_aibrix.core.config import CacheConfig, L2Backend
from vllm_aibrix.core.counters import Counters
from vllm_aibrix.core.jobs import SerialJobs
from vllm_aibrix.core.memory import SlotBuffer
from vllm_aibrix.core.planner import fill_prefix
from vllm_aibrix.vllm.copy import CopyHandle, KVLayout
from vllm_aibrix.vllm.engine_info import EngineInfo
from vllm_aibrix.vllm.faults import FileFaults, LoadFaults, NoFaults, perturb_blocks
from vllm_aibrix.vllm.metadata import AIBrixConnectorMetadata, AIBrixWorkerMetadata, LoadSpec

logger = logging.getLogger(__name__)


class _InflightLoad:
    """An async load and the lock that decides whether it may still write.

    A load that outlives its deadline is reported failed to vLLM at once (it
    recomputes the blocks) and cancelled; the load thread checks
    ``cancelled`` under the lock right before it writes into engine blocks,
    so a late load can never overwrite blocks that vLLM has already handed to
    the recompute. Its L2 fetches write straight into the load's L1 slots, so
    the planner is told about the failure only once the thread has stopped:
    until then it keeps those slots reserved (pinned, being filled) and
    cannot give them to another block.
    """

    def __init__(self, spec: LoadSpec, deadline: float) -> None:
        self.spec = spec
        self.deadline = deadline
        self.lock = threading.Lock()
        self.cancelled = False
        self.fence: Any = None  # a CUDA event from the forward thread, or None
        self.future: Future[tuple[int, list[int]]] | None = None


@dataclass
class _PendingStore:
    """A background store: the slots it writes or reads, the requests whose blocks it reads."""

    ticket: int
    slots: set[int]
    req_ids: set[str]
    copy: CopyHandle | None  # the queued device copy (CUDA), None on the CPU


class AIBrixWorker:
    """Worker-side logic for one TP rank.

    Stores (``store_async``) run on one background thread in step order
    while the next step computes. Two rules keep them from reading or
    writing the wrong bytes: a step waits for stores using a slot it reads
    or writes (evictions to L2, loads) before touching it; and before the
    forward of a step, stores still reading the blocks of requests vLLM freed
    since the previous step (finished, aborted, preempted: ``meta.freed``)
    complete -- on CUDA by making the compute stream wait for their copies,
    with no host sync. The forward is the first thing that may write a freed
    block, so no block is overwritten while a store reads it, and vLLM frees
    blocks at once (delaying the free through ``request_finished`` would hold
    them until a later engine step, which offline ``LLM`` use may never run).
    """

    def __init__(
        self,
        config: CacheConfig,
        info: EngineInfo,
        rank: int,
        *,
        faults: LoadFaults | None = None,
        executor: Executor | None = None,
        store_jobs: SerialJobs | None = None,
    ) -> None:
        self.config = config
        self.info = info
        self.rank = rank
        self.layout: KVLayout | None = None
        self.buffer: SlotBuffer | None = None
        self.l2: Any = None
        if config.l2_backend != L2Backend.NONE:
            from vllm_aibrix.core.l2.store import L2Store

            self.l2 = L2Store(config, info.namespace.digest)
        self.counters = Counters()
        self._lock = threading.Lock()
        if faults is None:
            faults = FileFaults(config.debug_fault_file) if config.debug_fault_file else NoFaults()
        self.faults = faults
        # Async loads run here; the scheduler simulation substitutes an
        # executor it steps by hand, so its runs are reproducible.
        self.executor: Executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="aibrix-load"
        )
        self._inflight: dict[int, _InflightLoad] = {}  # load id -> async load
        self._abandoned: dict[int, _InflightLoad] = {}  # past the deadline, thread running
        # Background stores; the scheduler simulation substitutes jobs it runs by hand.
        self.store_jobs = store_jobs or SerialJobs("aibrix-store")
        self._pending_stores: list[_PendingStore] = []
        self._errors: set[int] = set()
        self._loaded: dict[int, int] = {}  # load id -> leading blocks loaded
        self._l2_reported: dict[str, int] = {}  # L2Store totals already shipped

    # ----------------------------------------------------------- setup
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        self.layout = KVLayout(kv_caches, num_blocks)
        if self.layout.slot_bytes != self.info.slot_bytes:
            raise RuntimeError(
                f"KV tensors give {self.layout.slot_bytes} bytes per block but the "
                f"scheduler planned {self.info.slot_bytes}; unsupported KV layout"
            )
        self.buffer = SlotBuffer(self.info.num_slots, self.info.slot_bytes)
        logger.info(
            "aibrix L1 rank %d: %d slots x %d bytes (%.2f GiB)%s",
            self.rank,
            self.info.num_slots,
            self.info.slot_bytes,
            self.buffer.nbytes / (1 << 30),
            ", pinned" if self.buffer.pinned else "",
        )

    # ----------------------------------------------------------- loads
    @property
    def _l2_rank(self) -> int:
        """The rank whose L2 shard this rank reads and writes (0 for replicated KV)."""
        return 0 if self.info.kv_replicated else self.rank

    def handle_preemptions(self, meta: AIBrixConnectorMetadata) -> None:
        """Before the forward: stores still reading blocks vLLM freed must finish."""
        self._release_blocks_of(set(meta.freed))

    def _release_blocks_of(self, req_ids: set[str]) -> None:
        if not req_ids or not self._pending_stores:
            return
        done = self.store_jobs.done
        hits = [p for p in self._pending_stores if not p.req_ids.isdisjoint(req_ids)]
        hits = [p for p in hits if not done(p.ticket)]
        if not hits:
            return
        if self.layout is not None and self.layout.on_device:
            for p in hits:
                if p.copy is not None:
                    p.copy.wait_stream()  # GPU-side order: the forward queues behind
            return
        self._wait_ticket(hits[-1].ticket)

    def start_load(self, meta: AIBrixConnectorMetadata) -> None:
        assert self.buffer is not None
        self.store_jobs.check()
        touched = {s for _, s in meta.l2_before}
        touched.update(s for spec in meta.loads for s in spec.slots if s >= 0)
        self._release_blocks_of(set(meta.freed))  # if handle_preemptions was not called
        self._wait_stores(touched)
        # Evicted slots leave for L2 before anything in this step writes slots.
        self._ship_to_l2(meta.l2_before)
        fence = self.layout.fence() if meta.loads and self.layout is not None else None
        for spec in meta.loads:
            if spec.is_async:
                job = _InflightLoad(spec, time.monotonic() + self.config.load_deadline_s)
                # The load thread's copies must follow the GPU work queued so
                # far on the forward thread (its own current stream does not).
                job.fence = fence
                job.future = self.executor.submit(self._load, spec, job)
                self._inflight[spec.load_id] = job
            else:
                n_ok, failed = self._load(spec)
                self._errors.update(failed)
                self._loaded[spec.load_id] = n_ok

    def _load(self, spec: LoadSpec, job: _InflightLoad | None = None) -> tuple[int, list[int]]:
        """Fill slots from L2 where needed, then copy the good prefix into the engine.

        L1 and L2 blocks may alternate (a block of the hit can already be in
        L1); the good prefix ends at the first block that is not reserved or
        whose L2 fetch failed.
        """
        assert self.buffer is not None and self.layout is not None
        t0 = time.perf_counter()
        doomed = self.faults.l2_keys_to_drop(self.rank, [k for k in spec.l2_keys if k is not None])
        if doomed and self.l2 is not None:
            self.l2.delete(doomed, [self._l2_rank])
        ok = fill_prefix(spec.slots, spec.l2_keys, lambda lo, hi: self._fetch_l2(spec, lo, hi))
        ok = min(ok, self.faults.loaded_limit(self.rank, spec.req_id, ok))
        with job.lock if job is not None else contextlib.nullcontext():
            if job is not None and job.cancelled:
                return 0, list(spec.block_ids)
            handle = self.layout.scatter(
                self.buffer.tensor,
                spec.slots[:ok],
                spec.block_ids[:ok],
                after=job.fence if job is not None else None,
            )
            if job is not None:
                # An async load is reported done only once its copies are;
                # a sync one is ordered before the forward by the copy event.
                handle.wait()
            if ok and self.faults.corrupt(self.rank, spec.req_id):
                # Sensitivity check for tests: perturb what was loaded, report success.
                perturb_blocks(self.layout.layers, spec.block_ids[:ok])
        dt = time.perf_counter() - t0
        with self._lock:
            self.counters.add("load_blocks", ok)
            self.counters.add("load_bytes", ok * self.info.slot_bytes)
            self.counters.add("load_seconds", dt)
        return ok, spec.block_ids[ok:]

    def _fetch_l2(self, spec: LoadSpec, lo: int, hi: int) -> int:
        """Fetch this rank's shards of ``spec.l2_keys[lo:hi]`` straight into their slots.

        Also for an async load past its deadline: the planner keeps an
        abandoned load's slots reserved until its thread is done.
        """
        assert self.buffer is not None
        if self.l2 is None:
            return 0
        keys = [k for k in spec.l2_keys[lo:hi] if k is not None]
        slots = spec.slots[lo:hi]
        if self.layout is not None:
            # The host is about to write slot rows a queued copy may still read.
            self.layout.synchronize()
        return self._count_l2(
            self.l2.get_blocks(keys, self._l2_rank, [self.buffer.slot(s) for s in slots])
        )

    def _count_l2(self, got: int) -> int:
        got = int(got)
        with self._lock:
            self.counters.add("l2_get_blocks", got)
        return got

    def _ship_to_l2(self, writes: list[tuple[bytes, int]]) -> None:
        """Copy the named slots into the L2 write queue (the copy happens now)."""
        if not writes or self.l2 is None or (self.info.kv_replicated and self.rank != 0):
            return
        assert self.buffer is not None
        keys = [k for k, _ in writes]
        src = [self.buffer.slot(s) for _, s in writes]
        accepted = self.l2.submit_put(keys, self._l2_rank, src)
        with self._lock:
            self.counters.add("l2_put_blocks", accepted)

    def poll_finished(self) -> set[str]:
        """Async loads finished since the last call (their errors are queued)."""
        done: set[str] = set()
        for load_id, job in list(self._abandoned.items()):
            assert job.future is not None
            if job.future.done():
                # Only now may the planner reuse the load's slots.
                del self._abandoned[load_id]
                self._loaded[load_id] = 0
        now = time.monotonic()
        for load_id, job in list(self._inflight.items()):
            req_id = job.spec.req_id
            fut = job.future
            assert fut is not None
            if not fut.done():
                if now < job.deadline:
                    continue
                with job.lock:
                    late = not fut.done()
                    if late:
                        job.cancelled = True
                if late:
                    logger.warning(
                        "aibrix rank %d: load for %s exceeded %.1fs; recomputing it",
                        self.rank,
                        req_id,
                        self.config.load_deadline_s,
                    )
                    del self._inflight[load_id]
                    with self._lock:
                        self.counters.add("load_timeouts")
                    self._errors.update(job.spec.block_ids)
                    self._abandoned[load_id] = job
                    done.add(req_id)
                    continue
            del self._inflight[load_id]
            try:
                n_ok, failed = fut.result()
            except Exception:
                logger.exception("aibrix: load for %s failed; recomputing it", req_id)
                n_ok, failed = 0, list(job.spec.block_ids)
            self._errors.update(failed)
            self._loaded[load_id] = n_ok
            done.add(req_id)
        return done

    def take_load_errors(self) -> set[int]:
        errs, self._errors = self._errors, set()
        return errs

    def take_worker_meta(self) -> AIBrixWorkerMetadata | None:
        if not self._loaded:
            return None
        loaded, self._loaded = self._loaded, {}
        return AIBrixWorkerMetadata({r: {self.rank: n} for r, n in loaded.items()})

    # ----------------------------------------------------------- stores
    def save(self, meta: AIBrixConnectorMetadata) -> None:
        """After the forward: copy this step's new blocks to L1, then its L2 writes."""
        assert self.buffer is not None and self.layout is not None
        if not self.config.store_async:
            self._save_now(meta)
            return
        self.store_jobs.check()
        self._prune_stores()
        if not meta.stores and not meta.l2_after:
            return
        slots = [s for st in meta.stores for s in st.slots]
        blocks = [b for st in meta.stores for b in st.block_ids]
        handle = None
        if blocks and self.layout.on_device:
            # Queued now, behind this step's forward on the GPU; the job only
            # waits for it, so the next step's kernels are not held back.
            fence = self.layout.fence()
            handle = self.layout.gather(blocks, self.buffer.tensor, slots, after=fence)
        l2_after = list(meta.l2_after)

        def job() -> None:
            if blocks:
                self._copy_to_slots(blocks, slots, handle)
            self._ship_to_l2(l2_after)

        ticket = self.store_jobs.submit(job)
        used = set(slots)
        used.update(s for _, s in l2_after)
        req_ids = {st.req_id for st in meta.stores}
        self._pending_stores.append(_PendingStore(ticket, used, req_ids, handle))

    def _wait_stores(self, slots: set[int]) -> None:
        """Wait for the background stores that write or read any of ``slots``."""
        last = 0
        for p in self._pending_stores:
            if not p.slots.isdisjoint(slots):
                last = p.ticket
        if last:
            self._wait_ticket(last)

    def _wait_ticket(self, ticket: int) -> None:
        if not self.store_jobs.done(ticket):
            t0 = time.perf_counter()
            self.store_jobs.wait(ticket)
            with self._lock:
                self.counters.add("store_wait_seconds", time.perf_counter() - t0)
        self._prune_stores()

    def _prune_stores(self) -> None:
        done = self.store_jobs.done
        self._pending_stores = [p for p in self._pending_stores if not done(p.ticket)]

    def _save_now(self, meta: AIBrixConnectorMetadata) -> None:
        if meta.stores:
            slots = [s for st in meta.stores for s in st.slots]
            blocks = [b for st in meta.stores for b in st.block_ids]
            self._copy_to_slots(blocks, slots)
        self._ship_to_l2(meta.l2_after)

    def _copy_to_slots(
        self, blocks: list[int], slots: list[int], queued: CopyHandle | None = None
    ) -> None:
        """Engine blocks -> slots (or wait for ``queued``, that copy already on the GPU), counted.

        The slot bytes exist only once the copy is done (D2H on CUDA); the L2
        writes that follow read them on the host.
        """
        assert self.buffer is not None and self.layout is not None
        t0 = time.perf_counter()
        h = queued if queued is not None else self.layout.gather(blocks, self.buffer.tensor, slots)
        h.wait()
        with self._lock:
            self.counters.add("store_bytes", len(slots) * self.info.slot_bytes)
            self.counters.add("store_seconds", time.perf_counter() - t0)

    def take_counters(self) -> dict[str, float]:
        with self._lock:
            out = self.counters.take()
        if self.l2 is not None:
            # L2Store counts cumulatively; ship what is new since the last call.
            st = self.l2.stats
            for name, attr in (
                ("l2_errors", "errors"),
                ("l2_corrupt", "corrupt"),
                ("l2_ingest_dropped_blocks", "ingest_dropped_blocks"),
            ):
                total = int(getattr(st, attr, 0))
                if total > self._l2_reported.get(attr, 0):
                    out[name] = out.get(name, 0) + total - self._l2_reported.get(attr, 0)
                self._l2_reported[attr] = total
        return out

    def shutdown(self) -> None:
        self.store_jobs.close()
        self.executor.shutdown(wait=True)
        if self.l2 is not None:
            self.l2.flush(timeout=5.0)
            self.l2.close()
