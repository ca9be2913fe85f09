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
from typing import Any

import torch

from vllm_aibrix.core.config import CacheConfig, L2Backend
from vllm_aibrix.core.counters import Counters
from vllm_aibrix.core.memory import SlotBuffer
from vllm_aibrix.core.planner import fill_prefix
from vllm_aibrix.vllm.copy import KVLayout
from vllm_aibrix.vllm.engine_info import EngineInfo
from vllm_aibrix.vllm.faults import FileFaults, LoadFaults, NoFaults, perturb_blocks
from vllm_aibrix.vllm.metadata import AIBrixConnectorMetadata, AIBrixWorkerMetadata, LoadSpec

logger = logging.getLogger(__name__)


class _InflightLoad:
    """An async load and the lock that decides whether it may still write.

    A load that outlives its deadline is reported failed (vLLM recomputes its
    blocks) and cancelled; the load thread checks ``cancelled`` under the lock
    right before it writes into engine blocks, so a late load can never
    overwrite blocks that vLLM has already handed to the recompute.
    """

    def __init__(self, spec: LoadSpec, deadline: float) -> None:
        self.spec = spec
        self.deadline = deadline
        self.lock = threading.Lock()
        self.cancelled = False
        self.fence: Any = None  # a CUDA event from the forward thread, or None
        self.future: Future[tuple[int, list[int]]] | None = None


class AIBrixWorker:
    """Worker-side logic for one TP rank."""

    def __init__(
        self,
        config: CacheConfig,
        info: EngineInfo,
        rank: int,
        *,
        faults: LoadFaults | None = None,
        executor: Executor | None = None,
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

    def start_load(self, meta: AIBrixConnectorMetadata) -> None:
        assert self.buffer is not None
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
        ok = fill_prefix(spec.slots, spec.l2_keys, lambda lo, hi: self._fetch_l2(spec, lo, hi, job))
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

    def _fetch_l2(self, spec: LoadSpec, lo: int, hi: int, job: _InflightLoad | None = None) -> int:
        """Fetch this rank's shards of ``spec.l2_keys[lo:hi]`` into their slots.

        Async loads fetch into private buffers and copy into the slots only if
        the load was not abandoned meanwhile: an abandoned load's slots go
        back to the scheduler, which may reuse them at once.
        """
        assert self.buffer is not None
        if self.l2 is None:
            return 0
        keys = [k for k in spec.l2_keys[lo:hi] if k is not None]
        slots = spec.slots[lo:hi]
        if self.layout is not None:
            # The host is about to write slot rows a queued copy may still read.
            self.layout.synchronize()
        if job is None:
            return self._count_l2(
                self.l2.get_blocks(keys, self._l2_rank, [self.buffer.slot(s) for s in slots])
            )
        staging = torch.empty((len(slots), self.info.slot_bytes), dtype=torch.uint8)
        got = int(self.l2.get_blocks(keys, self._l2_rank, list(staging)))
        with job.lock:
            if job.cancelled:
                return 0
            for i in range(got):
                self.buffer.slot(slots[i]).copy_(staging[i])
        return self._count_l2(got)

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
                    self._loaded[load_id] = 0
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
        assert self.buffer is not None and self.layout is not None
        if meta.stores:
            t0 = time.perf_counter()
            slots = [s for st in meta.stores for s in st.slots]
            blocks = [b for st in meta.stores for b in st.block_ids]
            # The slot bytes exist only once the copy is done (D2H on CUDA);
            # the L2 writes below read them on the host.
            self.layout.gather(blocks, self.buffer.tensor, slots).wait()
            with self._lock:
                self.counters.add("store_bytes", len(slots) * self.info.slot_bytes)
                self.counters.add("store_seconds", time.perf_counter() - t0)
        self._ship_to_l2(meta.l2_after)

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
        self.executor.shutdown(wait=True)
        if self.l2 is not None:
            self.l2.flush(timeout=5.0)
            self.l2.close()
