"""The scheduler half of the connector: a translator between vLLM and the planner.

Every caching decision is made by :class:`~vllm_aibrix.core.planner.TierPlanner`
(see its docstring for why no wrong byte can reach the engine or L2). This
class only turns vLLM's objects (``Request``, ``SchedulerOutput``,
``KVConnectorOutput``) into planner calls, maps request block indices to
vLLM's block ids, and packs the planner's step plan into the metadata the
workers execute.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm_aibrix.core.config import CacheConfig, L2Backend
from vllm_aibrix.core.planner import StepPlan, TierPlanner
from vllm_aibrix.vllm.engine_info import EngineInfo
from vllm_aibrix.vllm.metadata import (
    AIBrixConnectorMetadata,
    AIBrixWorkerMetadata,
    LoadSpec,
    StoreSpec,
)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _cacheable(request: Request) -> bool:
    """Whether the request's KV is a function of its token ids alone.

    Multimodal placeholders are the same token for different images, and
    prompt-embeds requests have placeholder token ids only: keying those on
    token ids would share KV between different inputs (across tenants).
    """
    if getattr(request, "prompt_embeds", None) is not None:
        return False
    return not getattr(request, "mm_features", None)


class AIBrixScheduler:
    """Scheduler-side logic. See the module docstring."""

    def __init__(self, config: CacheConfig, info: EngineInfo) -> None:
        self.config = config
        self.info = info
        self.B = info.block_tokens
        self.l2: Any = None
        if config.l2_backend != L2Backend.NONE:
            from vllm_aibrix.core.l2.store import L2Store

            self.l2 = L2Store(config, info.namespace.digest)
        self.planner = TierPlanner(
            config,
            num_slots=info.num_slots,
            block_tokens=self.B,
            ranks=info.l2_ranks,
            l2=self.l2,
        )
        self.totals: dict[str, float] = {}  # cumulative, for tests and the demo
        self._block_ids: dict[str, list[int]] = {}  # request -> its engine block ids
        self._start_block: dict[str, int] = {}  # request -> first block of its lookup
        self._requests: dict[str, Request] = {}  # live vLLM requests (their tokens grow)
        # Engine blocks that loads not yet reported by every rank write into.
        # vLLM's prefix cache may share them with other requests at once (sync
        # loads); if the load fails, vLLM rolls those requests back too and
        # discards what they computed over the bad blocks. So no request whose
        # block table holds such a block stores anything until the load is
        # resolved: it might store KV computed from wrong context.
        self._loading_blocks: dict[int, list[int]] = {}  # load id -> block ids
        self._loading_count: dict[int, int] = {}  # block id -> loads writing it
        self.block_pool: Any = None  # vLLM's BlockPool, bound by the connector

    def _open(self, request: Request) -> None:
        if self.planner.is_open(request.request_id):
            return
        self._requests[request.request_id] = request
        lora = getattr(request, "lora_request", None)
        ns = self.info.namespace.with_salt(
            getattr(request, "cache_salt", None),
            getattr(lora, "lora_name", None) if lora is not None else None,
        )
        self.planner.open_request(request.request_id, ns.digest, cacheable=_cacheable(request))

    # ------------------------------------------------------------ lookups
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """How many tokens past ``num_computed_tokens`` the cache can supply.

        None while the background L2 lookup is not answered: vLLM skips the
        request this step and asks again.
        """
        self._open(request)
        # At least one token must be computed so the engine can sample.
        max_blocks = max(0, (request.num_tokens - 1) // self.B)
        start = num_computed_tokens // self.B
        hit = self.planner.lookup(request.request_id, request.all_token_ids, max_blocks, start)
        if hit is None:
            return None, False
        self._start_block[request.request_id] = start
        ext = hit * self.B - num_computed_tokens
        if hit <= start or ext <= 0 or ext < self.config.min_hit_tokens:
            return 0, False
        return ext, self.config.load_async

    def update_state_after_alloc(
        self, request: Request, block_ids: list[int], num_external_tokens: int
    ) -> None:
        """The engine admitted the request (and committed to skip ``num_external_tokens``)."""
        self._open(request)
        req_id = request.request_id
        self._block_ids[req_id] = list(block_ids)
        start = self._start_block.pop(req_id, request.num_computed_tokens // self.B)
        end = start + max(0, num_external_tokens) // self.B
        plan = self.planner.prepare_load(req_id, start, end)
        if plan is not None:
            ids = list(block_ids[plan.first_block : plan.first_block + len(plan.slots)])
            self._loading_blocks[plan.load_id] = ids
            for b in ids:
                self._loading_count[b] = self._loading_count.get(b, 0) + 1

    # ------------------------------------------------------------ the plan
    def build_connector_meta(self, so: SchedulerOutput) -> AIBrixConnectorMetadata:
        """Turn this step's scheduling into the workers' plan."""
        for new in so.scheduled_new_reqs:
            if not self.planner.is_open(new.req_id):
                continue
            self._block_ids[new.req_id] = list(new.block_ids[0])
            computed = new.num_computed_tokens + so.num_scheduled_tokens[new.req_id]
            self._plan_stores(new.req_id, computed)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if not self.planner.is_open(req_id):
                continue
            nb = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self._block_ids[req_id] = list(nb[0]) if nb else []
            elif nb:
                self._block_ids.setdefault(req_id, []).extend(nb[0])
            self._plan_stores(
                req_id, cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)
            )
        meta = self._translate(self.planner.finish_step())
        # Blocks freed since the last plan may be reused by this step's
        # forward; the workers finish background stores reading them first.
        meta.freed = sorted(set(so.finished_req_ids) | set(so.preempted_req_ids or ()))
        return meta

    def _plan_stores(self, req_id: str, computed_after: int) -> None:
        request = self._requests.get(req_id)
        if request is None:
            return
        block_ids = self._block_ids.get(req_id, [])
        if self._loading_count and any(b in self._loading_count for b in block_ids):
            return  # see _loading_blocks
        self.planner.prepare_stores(req_id, request.all_token_ids, computed_after, len(block_ids))

    def _translate(self, step: StepPlan) -> AIBrixConnectorMetadata:
        meta = AIBrixConnectorMetadata(l2_before=step.l2_before, l2_after=step.l2_after)
        for ld in step.loads:
            meta.loads.append(
                LoadSpec(
                    load_id=ld.load_id,
                    req_id=ld.req_id,
                    slots=ld.slots,
                    block_ids=self._loading_blocks[ld.load_id],
                    l2_keys=ld.l2_keys,
                    is_async=self.config.load_async,
                )
            )
        for st in step.stores:
            ids = self._block_ids[st.req_id]
            meta.stores.append(StoreSpec(st.req_id, st.slots, [ids[b] for b in st.blocks]))
        return meta

    # ------------------------------------------------------ worker reports
    def update_connector_output(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if not isinstance(meta, AIBrixWorkerMetadata):
            return
        for load_id, per_rank in meta.loaded.items():
            for rank, n in per_rank.items():
                outcome = self.planner.report_load(load_id, rank, n)
                if outcome is not None:
                    self._load_resolved(load_id, outcome.agreed)

    def _load_resolved(self, load_id: int, agreed: int) -> None:
        blocks = self._loading_blocks.pop(load_id, [])
        if agreed < len(blocks):
            self._evict_from_vllm(set(blocks[agreed:]))
        for b in blocks:
            left = self._loading_count[b] - 1
            if left:
                self._loading_count[b] = left
            else:
                del self._loading_count[b]

    def _evict_from_vllm(self, failed: set[int]) -> None:
        """Drop blocks a failed load left unfilled from vLLM's prefix cache.

        With ``kv_load_failure_policy=recompute`` vLLM 0.32 keeps them cached
        (sync loads cache their blocks at allocation) and counts on the
        requests recomputing them; a request aborted or preempted first would
        leave them to be served as prefix hits. Blocks that requests computed
        after them, over them, go too. Requests still holding them recompute
        as before; only the cache entry is dropped.
        """
        if self.block_pool is None:
            return
        doomed = set(failed)
        for ids in self._block_ids.values():
            for i, b in enumerate(ids):
                if b in failed:
                    doomed.update(ids[i:])
                    break
        self.block_pool.evict_blocks(doomed)

    def request_finished(self, request: Request) -> None:
        req_id = request.request_id
        self.planner.finish_request(req_id)
        self._block_ids.pop(req_id, None)
        self._start_block.pop(req_id, None)
        self._requests.pop(req_id, None)

    # ------------------------------------------------------------- misc
    def take_counters(self) -> dict[str, float]:
        delta = self.planner.counters.take()
        for k, v in delta.items():
            self.totals[k] = self.totals.get(k, 0) + v
        return delta

    def pool_state(self) -> dict[str, int]:
        """Slot/pin/load/request counts; no pins, loads or trackers when idle."""
        return self.planner.pool_state()

    def reset_cache(self) -> bool:
        self.planner.reset()
        return True

    def shutdown(self) -> None:
        self.planner.close()
        if self.l2 is not None:
            self.l2.close()
