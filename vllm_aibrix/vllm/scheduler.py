"""The scheduler half of the connector: every decision is made here, once.

It owns the L1 index (which key lives in which slot; every TP rank holds its
shard of a block in the same slot), asks L2 which blocks every rank has,
decides how many prompt tokens vLLM may skip, and emits per-step plans
(:class:`~vllm_aibrix.vllm.metadata.AIBrixConnectorMetadata`) that the
workers execute.

Slot lifecycle, and why it is safe:

* A slot is read by a load only while pinned; pinned slots are never evicted.
* A slot filled from L2 is *pending* until every rank reports the load; a
  pending key never counts as an L1 hit, and if any rank failed it is
  dropped, so bad bytes are never served twice.
* Slots written by this step's stores are pinned until the plan is built, so
  a later request in the same step cannot evict (and offload) a slot whose
  bytes the workers have not written yet.
* Workers execute plans in step order and, within a step, offloads before
  loads before stores, so an evicted slot is copied out before it is reused.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm_aibrix.core.config import CacheConfig, IngestionType, L2Backend
from vllm_aibrix.core.keys import Key, PrefixHasher
from vllm_aibrix.core.l1 import L1Index, L1Listener
from vllm_aibrix.core.manager import policy_params
from vllm_aibrix.vllm.engine_info import EngineInfo
from vllm_aibrix.vllm.metadata import (
    AIBrixConnectorMetadata,
    AIBrixWorkerMetadata,
    LoadSpec,
    StoreSpec,
)
from vllm_aibrix.vllm.stats import ConnectorCounters

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_MAX_BAD_KEYS = 1 << 16


@dataclass
class _Load:
    """A load in flight for one request."""

    slots: list[int]
    keys: list[Key]
    pending_from: int  # keys[pending_from:] are being filled from L2
    reports: dict[int, int] = field(default_factory=dict)  # rank -> blocks loaded


@dataclass
class _Tracker:
    """Per-request state."""

    request: Request
    hasher: PrefixHasher
    block_ids: list[int] = field(default_factory=list)
    next_store_block: int = 0
    lookup_start_block: int = 0
    lookup_l1_blocks: int = 0
    lookup_hit_blocks: int = 0
    load: _Load | None = None
    finished: bool = False


class AIBrixScheduler(L1Listener):
    """Scheduler-side logic. See the module docstring."""

    def __init__(self, config: CacheConfig, info: EngineInfo) -> None:
        self.config = config
        self.info = info
        self.B = info.block_tokens
        self.ranks = tuple(range(info.tp_size))
        self.l1 = L1Index(
            info.num_slots,
            config.l1_cache_eviction_policy,
            policy_params=policy_params(config),
            prefix_aware=config.l1_prefix_aware_eviction,
            listener=self,
        )
        self.l2: Any = None
        if config.l2_backend != L2Backend.NONE:
            from vllm_aibrix.core.l2.store import L2Store

            self.l2 = L2Store(config, info.namespace.digest)
        self.counters = ConnectorCounters()
        self.totals: dict[str, float] = {}  # cumulative, for tests and the demo
        self._trackers: dict[str, _Tracker] = {}
        self._pending: dict[Key, int] = {}  # key -> loads filling it from L2
        # L2 keys whose load failed on some rank. A lookup stops at them: the
        # request is recomputed instead of looping on load -> fail -> lookup
        # (the lookup only checks existence, a corrupt value still exists).
        # Cleared when this engine stores the block again (which rewrites L2).
        self._l2_bad: OrderedDict[Key, None] = OrderedDict()
        self._meta = AIBrixConnectorMetadata()
        self._step_pins: list[int] = []
        self._building = False

    # ---------------------------------------------------------------- helpers
    def _tracker(self, request: Request) -> _Tracker:
        tr = self._trackers.get(request.request_id)
        if tr is None:
            lora = getattr(request, "lora_request", None)
            ns = self.info.namespace.with_salt(
                getattr(request, "cache_salt", None),
                getattr(lora, "lora_name", None) if lora is not None else None,
            )
            tr = _Tracker(request=request, hasher=PrefixHasher(ns.digest, self.B))
            self._trackers[request.request_id] = tr
        return tr

    def _l1_prefix(self, keys: list[Key], start: int = 0) -> int:
        """Leading resident, non-pending keys from ``start``; returns the end index."""
        i = start
        while i < len(keys) and keys[i] in self.l1 and keys[i] not in self._pending:
            i += 1
        return i

    # ------------------------------------------------------------ lookups
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """How many tokens past ``num_computed_tokens`` the cache can supply."""
        tr = self._tracker(request)
        # At least one token must be computed so the engine can sample.
        max_blocks = max(0, (request.num_tokens - 1) // self.B)
        keys = tr.hasher.update(request.all_token_ids[: max_blocks * self.B])[:max_blocks]
        start = num_computed_tokens // self.B
        tr.lookup_start_block = start
        # Blocks the engine already has need no lookup; L1 continues from there
        # but must cover them too to be a usable prefix, so check from 0.
        n1 = self._l1_prefix(keys)
        n = n1
        if self.l2 is not None and n1 < len(keys):
            end = n1
            while end < len(keys) and keys[end] not in self._l2_bad:
                end += 1
            if end > n1:
                n += self.l2.exists_prefix(keys[n1:end], self.ranks)
        tr.lookup_l1_blocks = n1
        tr.lookup_hit_blocks = n
        self.counters.lookups += 1
        self.counters.lookup_tokens += max_blocks * self.B
        ext = n * self.B - num_computed_tokens
        if n <= start or ext <= 0 or ext < self.config.min_hit_tokens:
            return 0, False
        return ext, self.config.load_async

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """Plan the load the scheduler just committed to."""
        tr = self._tracker(request)
        tr.block_ids = list(block_ids)
        # The request is admitted: its L1-resident prefix counts as an access
        # for the policy (and may make blocks hot -> L2 under HOT ingestion).
        resident = self._l1_prefix(tr.hasher.keys)
        self.l1.touch(tr.hasher.keys[:resident])
        if num_external_tokens <= 0:
            return
        start = tr.lookup_start_block
        end = start + num_external_tokens // self.B
        keys = tr.hasher.keys[:end]
        n1 = min(resident, end)
        # Pin the L1 part first, so reserving slots for the L2 part below can
        # never evict a block this very load needs.
        l1_keys = keys[start:n1] if n1 > start else []
        slots = self.l1.pin(l1_keys)
        l1_part = len(slots)
        load_keys = list(l1_keys)
        l2_keys: list[bytes | None] = [None] * l1_part
        for i in range(max(n1, start), end):
            placed = self.l1.insert([keys[i]], parent=keys[i - 1] if i else None)
            if not placed:
                break  # no slot free (all pinned): the rest is reported failed
            slot = placed[0][1]
            self.l1.pin([keys[i]])
            self._pending[keys[i]] = self._pending.get(keys[i], 0) + 1
            slots.append(slot)
            load_keys.append(keys[i])
            l2_keys.append(keys[i])
        # Blocks we could not reserve get slot -1: the worker reports them as
        # load errors and vLLM recomputes them.
        n_planned = end - start
        missing = n_planned - len(slots)
        self.counters.hit_tokens_l1 += l1_part * self.B
        self.counters.hit_tokens_l2 += (len(slots) - l1_part) * self.B
        tr.load = _Load(slots=list(slots), keys=load_keys, pending_from=l1_part)
        self._meta.loads.append(
            LoadSpec(
                req_id=request.request_id,
                slots=slots + [-1] * missing,
                block_ids=tr.block_ids[start:end],
                l2_keys=l2_keys + [None] * missing,
                is_async=self.config.load_async,
            )
        )
        tr.next_store_block = max(tr.next_store_block, end)

    # ------------------------------------------------------------ the plan
    def build_connector_meta(self, so: SchedulerOutput) -> AIBrixConnectorMetadata:
        """Turn this step's scheduling into store/offload/L2 plans."""
        self._building = True
        try:
            for new in so.scheduled_new_reqs:
                tr = self._trackers.get(new.req_id)
                if tr is None:
                    continue
                tr.block_ids = list(new.block_ids[0])
                self._plan_stores(tr, new.num_computed_tokens + so.num_scheduled_tokens[new.req_id])
            cached = so.scheduled_cached_reqs
            for i, req_id in enumerate(cached.req_ids):
                tr = self._trackers.get(req_id)
                if tr is None:
                    continue
                nb = cached.new_block_ids[i]
                if req_id in cached.resumed_req_ids:
                    tr.block_ids = list(nb[0]) if nb else []
                elif nb:
                    tr.block_ids.extend(nb[0])
                self._plan_stores(
                    tr, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)
                )
        finally:
            self._building = False
            self.l1.unpin_slots(self._step_pins)
            self._step_pins = []
        meta, self._meta = self._meta, AIBrixConnectorMetadata()
        return meta

    def _plan_stores(self, tr: _Tracker, computed_after: int) -> None:
        tokens = tr.request.all_token_ids
        full = min(computed_after, len(tokens), len(tr.block_ids) * self.B) // self.B
        if full <= tr.next_store_block:
            return
        keys = tr.hasher.update(tokens[: full * self.B])
        slots: list[int] = []
        block_ids: list[int] = []
        for i in range(tr.next_store_block, full):
            k = keys[i]
            if k in self.l1:
                continue
            placed = self.l1.insert([k], parent=keys[i - 1] if i else None)
            if not placed:
                self.counters.store_skipped_blocks += 1
                continue
            slot = placed[0][1]
            self._l2_bad.pop(k, None)
            self.l1.pin([k])
            self._step_pins.append(slot)
            slots.append(slot)
            block_ids.append(tr.block_ids[i])
            if self.config.ingestion == IngestionType.ALL and self.l2 is not None:
                self._meta.l2_puts.append((k, slot))
        tr.next_store_block = full
        if slots:
            self.counters.stored_blocks += len(slots)
            self._meta.stores.append(StoreSpec(tr.request.request_id, slots, block_ids))

    # ---------------------------------------------------------- L1 events
    def on_hot(self, key: Hashable, slot: int) -> None:
        hot_ingest = self.l2 is not None and self.config.ingestion == IngestionType.HOT
        if hot_ingest and key not in self._pending:
            assert isinstance(key, bytes)
            self._meta.l2_puts.append((key, slot))

    def on_evicted(self, key: Hashable, slot: int) -> None:
        self.counters.l1_evictions += 1
        if self.l2 is not None and self.config.ingestion == IngestionType.EVICTED:
            assert isinstance(key, bytes)
            self._meta.offloads.append((key, slot))

    # ------------------------------------------------------ worker reports
    def update_connector_output(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if not isinstance(meta, AIBrixWorkerMetadata):
            return
        for req_id, per_rank in meta.loaded.items():
            tr = self._trackers.get(req_id)
            if tr is None or tr.load is None:
                continue
            tr.load.reports.update(per_rank)
            if len(tr.load.reports) == len(self.ranks):
                self._finish_load(req_id, tr)

    def _finish_load(self, req_id: str, tr: _Tracker) -> None:
        load = tr.load
        assert load is not None
        agreed = min(load.reports.values())
        planned = len(load.slots)
        if agreed < planned:
            self.counters.load_failed_blocks += planned - agreed
            self.counters.load_failures += 1
        self.l1.unpin_slots(load.slots)
        for i, key in enumerate(load.keys[load.pending_from :], start=load.pending_from):
            left = self._pending[key] - 1
            if left:
                self._pending[key] = left
            else:
                del self._pending[key]
            if i >= agreed:
                self._remember_bad(key)
                if key not in self._pending:
                    # Not every rank has good bytes in this slot: forget it.
                    self.l1.remove(key)
        tr.load = None
        if tr.finished:
            del self._trackers[req_id]

    def _remember_bad(self, key: Key) -> None:
        self._l2_bad[key] = None
        self._l2_bad.move_to_end(key)
        while len(self._l2_bad) > _MAX_BAD_KEYS:
            self._l2_bad.popitem(last=False)

    def request_finished(self, request: Request) -> None:
        tr = self._trackers.get(request.request_id)
        if tr is None:
            return
        if tr.load is not None:
            tr.finished = True  # cleaned up when the workers report the load
            return
        del self._trackers[request.request_id]

    # ------------------------------------------------------------- misc
    def num_trackers(self) -> int:
        return len(self._trackers)

    def take_counters(self) -> dict[str, float]:
        delta = self.counters.take()
        for k, v in delta.items():
            self.totals[k] = self.totals.get(k, 0) + v
        return delta

    def pool_state(self) -> dict[str, int]:
        """Slot/pin/tracker counts; all zero-pins and no trackers when idle."""
        return {
            "slots_used": self.l1.allocator.num_used,
            "slots_pinned": self.l1.allocator.num_pinned,
            "pending_keys": len(self._pending),
            "trackers": len(self._trackers),
        }

    def reset_cache(self) -> bool:
        self.l1.clear()
        return True

    def shutdown(self) -> None:
        if self.l2 is not None:
            self.l2.close()
