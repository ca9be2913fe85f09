"""The connector's scheduler half, driven with hand-built vLLM scheduler outputs.

Each test is one rule of vllm_aibrix/core/planner.py, in the form of a defect
it prevents: a slot named for an L2 write must hold that key's bytes when
the workers copy it, and a load or store must never pair a key with bytes of
another block.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput

from tests.unit.held_executor import HeldExecutor
from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Namespace, chain_hashes
from vllm_aibrix.core.planner import TierPlanner
from vllm_aibrix.vllm.engine_info import EngineInfo
from vllm_aibrix.vllm.metadata import AIBrixConnectorMetadata, AIBrixWorkerMetadata
from vllm_aibrix.vllm.scheduler import AIBrixScheduler

B = 4  # tokens per block
NS = Namespace(model="m", block_size=B)
_ids = itertools.count()


@dataclass
class Req:
    """The attributes of vllm.v1.request.Request the scheduler half reads."""

    all_token_ids: list[int]
    request_id: str = field(default_factory=lambda: f"r{next(_ids)}")
    num_computed_tokens: int = 0
    cache_salt: str | None = None
    lora_request: Any = None
    prompt_embeds: Any = None
    mm_features: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def toks(seed: int, blocks: int, extra: int = 1) -> list[int]:
    return [(seed * 1000 + i) % 50000 for i in range(blocks * B + extra)]


def make(
    num_slots: int = 8, *, ingestion: str = "ALL", l2: bool = False, tp: int = 1, **kw: Any
) -> AIBrixScheduler:
    extra: dict[str, Any] = {
        "l2_cache_ingestion_type": ingestion,
        "l2_lookup_async": False,
        **kw,
    }
    if l2:
        extra.update(l2_cache_backend="MEMORY", memory_store_name=f"sched-{next(_ids)}")
    info = EngineInfo(B, 64, num_slots, tp, NS)
    return AIBrixScheduler(CacheConfig.from_sources(extra, environ={}), info)


def new_req_output(req: Req, block_ids: list[int], computed: int, scheduled: int) -> Any:
    so = SchedulerOutput.make_empty()
    so.scheduled_new_reqs = [
        NewRequestData(
            req_id=req.request_id,
            prompt_token_ids=req.all_token_ids,
            mm_features=[],
            sampling_params=None,
            pooling_params=None,
            block_ids=(block_ids,),
            num_computed_tokens=computed,
            lora_request=None,
        )
    ]
    so.num_scheduled_tokens = {req.request_id: scheduled}
    return so


def admit(
    s: AIBrixScheduler, req: Req, *, computed: int = 0, block_base: int = 0
) -> tuple[int, list[int]]:
    """Lookup + allocation as vLLM's scheduler does it; returns (external tokens, block ids)."""
    ext, _ = s.get_num_new_matched_tokens(req, computed)
    blocks = list(range(block_base, block_base + len(req.all_token_ids) // B + 1))
    s.update_state_after_alloc(req, blocks, ext)
    return ext, blocks


def step(s: AIBrixScheduler, *runs: tuple[Req, list[int], int, int]) -> AIBrixConnectorMetadata:
    """One scheduler step with the given (request, block ids, computed, scheduled) prefills."""
    so = SchedulerOutput.make_empty()
    for req, blocks, computed, scheduled in runs:
        part = new_req_output(req, blocks, computed, scheduled)
        so.scheduled_new_reqs += part.scheduled_new_reqs
        so.num_scheduled_tokens.update(part.num_scheduled_tokens)
    return s.build_connector_meta(so)


def report(s: AIBrixScheduler, loaded: dict[int, dict[int, int]]) -> None:
    s.update_connector_output(
        KVConnectorOutput(kv_connector_worker_meta=AIBrixWorkerMetadata(loaded))
    )


def store_all(s: AIBrixScheduler, req: Req) -> AIBrixConnectorMetadata:
    """Admit ``req`` with nothing cached and compute its whole prompt in one step."""
    _, blocks = admit(s, req)
    return step(s, (req, blocks, 0, len(req.all_token_ids)))


def slot_writers(meta: AIBrixConnectorMetadata, s: AIBrixScheduler) -> dict[int, bytes]:
    """slot -> the key whose bytes the step's stores and loads leave in it."""
    out: dict[int, bytes] = {}
    for st in meta.stores:
        keys = chain_hashes(NS.digest, s._requests[st.req_id].all_token_ids, B)
        by_block = {b: i for i, b in enumerate(s._block_ids[st.req_id])}
        for slot, bid in zip(st.slots, st.block_ids, strict=True):
            out[slot] = keys[by_block[bid]]
    for ld in meta.loads:
        for slot, key in zip(ld.slots, ld.l2_keys, strict=True):
            if key is not None:
                out[slot] = key
    return out


def test_hot_write_is_dropped_when_its_slot_is_reused_in_the_same_step() -> None:
    s = make(2, ingestion="HOT", l2=True, l1_cache_eviction_policy="LRU")
    a = Req(toks(1, 2))
    step_meta = store_all(s, a)
    assert not step_meta.l2_after
    # Second access (vLLM's own prefix cache had it: nothing to load): LRU calls it hot.
    again = Req(toks(1, 2))
    _, blocks = admit(s, again, computed=2 * B)
    # ...and in the same step another prompt's stores take both slots.
    c = Req(toks(2, 2))
    _, cblocks = admit(s, c, block_base=100)
    meta = step(s, (again, blocks, 2 * B, 1), (c, cblocks, 0, len(c.all_token_ids)))
    writers = slot_writers(meta, s)
    for key, slot in meta.l2_after:
        assert writers.get(slot, key) == key, "an L2 write names a slot another block fills"
        assert s.planner.l1.slot_of(key) == slot


def test_hot_write_never_names_a_slot_still_being_filled_from_l2() -> None:
    s = make(4, ingestion="HOT", l2=True, s3fifo_small_queue_ratio=0.25)
    a = Req(toks(1, 1))
    store_all(s, a)
    s.l2.put_blocks([chain_hashes(NS.digest, a.all_token_ids, B)[0]], 0, [bytes(64)])
    # Push a's block out of S3FIFO's small queue into its ghost.
    for seed in range(2, 8):
        store_all(s, Req(toks(seed, 1)))
    assert s.planner.l1.prefix_length(chain_hashes(NS.digest, a.all_token_ids, B)) == 0
    back = Req(toks(1, 1))
    ext, _ = admit(s, back)
    assert ext == B  # from L2; S3FIFO calls a ghost key hot when it comes back
    meta = step(s)
    filling = {k for ld in meta.loads for k in ld.l2_keys if k is not None}
    assert filling
    assert not filling & {k for k, _ in meta.l2_after}


def test_failed_load_does_not_offload_its_unfilled_slots_under_evicted() -> None:
    s = make(8, ingestion="EVICTED", l2=True)
    a = Req(toks(1, 3))
    keys = chain_hashes(NS.digest, a.all_token_ids, B)
    s.l2.put_blocks(keys, 0, [bytes(64)] * 3)
    ext, _ = admit(s, a)
    assert ext == 3 * B
    meta = step(s)
    (ld,) = meta.loads
    report(s, {ld.load_id: {0: 1}})  # block 0 arrived, blocks 1 and 2 did not
    after = step(s)
    assert not {k for k, _ in after.l2_before} & set(keys[1:])


def test_blocks_recomputed_after_a_failed_load_are_stored_again() -> None:
    s = make(8, l2=True)
    a = Req(toks(1, 3))
    keys = chain_hashes(NS.digest, a.all_token_ids, B)
    s.l2.put_blocks(keys, 0, [bytes(64)] * 3)
    _, blocks = admit(s, a)
    (ld,) = step(s).loads
    report(s, {ld.load_id: {0: 1}})
    # vLLM recomputes from block 1 on: the whole prompt is computed after this step.
    so = SchedulerOutput.make_empty()
    so.scheduled_cached_reqs.req_ids = [a.request_id]
    so.scheduled_cached_reqs.new_block_ids = [None]
    so.scheduled_cached_reqs.num_computed_tokens = [B]
    so.num_scheduled_tokens = {a.request_id: len(a.all_token_ids) - B}
    meta = s.build_connector_meta(so)
    stored = [b for st in meta.stores for b in st.block_ids]
    assert stored == blocks[1:3]


def test_a_block_already_in_l1_inside_an_l2_hit_is_loaded_not_recomputed() -> None:
    s = make(8, l2=True, l1_prefix_aware_eviction=False)
    a = Req(toks(1, 3))
    keys = chain_hashes(NS.digest, a.all_token_ids, B)
    store_all(s, a)
    s.l2.put_blocks(keys, 0, [bytes(64)] * 3)
    s.planner.l1.remove(keys[0])  # L1 keeps blocks 1 and 2, L2 has all three
    ext, _ = admit(s, Req(toks(1, 3)))
    assert ext == 3 * B
    (ld,) = step(s).loads
    assert all(slot >= 0 for slot in ld.slots)
    assert ld.l2_keys == [keys[0], None, None]


def test_a_second_load_of_a_request_does_not_drop_the_first() -> None:
    s = make(8)
    store_all(s, Req(toks(1, 3)))
    r = Req(toks(1, 3))
    admit(s, r)
    first = step(s).loads
    # Preempted and resumed before the first load's reports came back.
    admit(s, r)
    second = step(s).loads
    assert s.pool_state()["slots_pinned"] > 0
    report(s, {first[0].load_id: {0: 3}, second[0].load_id: {0: 3}})
    s.request_finished(r)  # type: ignore[arg-type]
    assert s.pool_state()["slots_pinned"] == 0
    assert s.pool_state()["loads"] == 0
    assert s.pool_state()["trackers"] == 1  # the request that stored, never finished


@pytest.mark.parametrize(
    "attr", [{"prompt_embeds": object()}, {"mm_features": [object()]}], ids=["embeds", "mm"]
)
def test_requests_whose_kv_is_not_a_function_of_token_ids_are_neither_served_nor_stored(
    attr: dict[str, Any],
) -> None:
    s = make(8)
    store_all(s, Req(toks(1, 3)))
    odd = Req(toks(1, 3), **attr)
    ext, blocks = admit(s, odd)
    assert ext == 0
    meta = step(s, (odd, blocks, 0, len(odd.all_token_ids)))
    assert not meta.stores
    assert s.take_counters().get("uncacheable_requests") == 1


def test_after_reset_nothing_stored_before_is_found_in_l1_or_l2() -> None:
    s = make(8, l2=True)
    a = Req(toks(1, 3))
    store_all(s, a)
    s.l2.put_blocks(chain_hashes(NS.digest, a.all_token_ids, B), 0, [bytes(64)] * 3)
    assert s.get_num_new_matched_tokens(Req(toks(1, 3)), 0)[0] == 3 * B
    assert s.reset_cache()
    assert s.get_num_new_matched_tokens(Req(toks(1, 3)), 0)[0] == 0


def test_a_load_in_flight_at_reset_leaves_nothing_in_l1() -> None:
    s = make(8)
    store_all(s, Req(toks(1, 3)))
    r = Req(toks(1, 3))
    admit(s, r)
    (ld,) = step(s).loads
    s.reset_cache()
    report(s, {ld.load_id: {0: 3}})
    assert len(s.planner.l1) == 0
    assert s.pool_state()["slots_pinned"] == 0


def test_tp2_load_is_agreed_on_the_shortest_rank_prefix() -> None:
    s = make(8, l2=True, tp=2)
    a = Req(toks(1, 3))
    keys = chain_hashes(NS.digest, a.all_token_ids, B)
    for rank in (0, 1):
        s.l2.put_blocks(keys, rank, [bytes(64)] * 3)
    admit(s, a)
    (ld,) = step(s).loads
    report(s, {ld.load_id: {0: 3}})
    assert s.pool_state()["loads"] == 1  # rank 1 has not reported
    report(s, {ld.load_id: {1: 1}})
    assert s.pool_state()["loads"] == 0
    assert s.planner.l1.prefix_length(keys) == 1
    assert s.take_counters().get("load_failed_blocks") == 2


def test_lookup_counts_a_tp2_block_only_when_every_rank_has_its_shard() -> None:
    s = make(8, l2=True, tp=2)
    a = Req(toks(1, 3))
    keys = chain_hashes(NS.digest, a.all_token_ids, B)
    s.l2.put_blocks(keys, 0, [bytes(64)] * 3)
    s.l2.put_blocks(keys[:1], 1, [bytes(64)])
    assert s.get_num_new_matched_tokens(a, 0)[0] == B


def test_stores_wait_while_the_request_has_a_sync_load_in_flight() -> None:
    s = make(8, load_async=False)
    store_all(s, Req(toks(1, 2)))
    r = Req(toks(1, 2) + toks(9, 2))  # 2 cached blocks, then 2 new ones
    _, blocks = admit(s, r)
    meta = step(s, (r, blocks, 2 * B, len(r.all_token_ids) - 2 * B))
    assert meta.loads and not meta.stores


def test_a_request_admitted_before_a_reset_neither_loads_nor_stores_after_it() -> None:
    s = make(8, l2=True)
    a = Req(toks(1, 3))
    store_all(s, a)
    s.l2.put_blocks(chain_hashes(NS.digest, a.all_token_ids, B), 0, [bytes(64)] * 3)
    old = Req(toks(1, 3) + toks(5, 2))
    _, blocks = admit(s, old, computed=len(old.all_token_ids) - 1)  # nothing to load
    s.reset_cache()
    # Preempted and resumed: its old keys would find the pre-reset L2 entries.
    assert s.get_num_new_matched_tokens(old, 0)[0] == 0
    meta = step(s, (old, blocks, 0, len(old.all_token_ids)))
    assert not meta.stores


def test_a_block_that_came_from_l2_is_not_written_back_when_evicted() -> None:
    s = make(3, ingestion="EVICTED", l2=True, l1_cache_eviction_policy="LRU")
    a = Req(toks(1, 3))
    keys = chain_hashes(NS.digest, a.all_token_ids, B)
    s.l2.put_blocks(keys, 0, [bytes(64)] * 3)
    admit(s, a)
    (ld,) = step(s).loads
    report(s, {ld.load_id: {0: 3}})
    meta = store_all(s, Req(toks(2, 3)))  # evicts all three
    assert s.take_counters().get("l1_evictions") == 3
    assert not {k for k, _ in meta.l2_before} & set(keys)


def test_a_request_sharing_blocks_with_an_unresolved_sync_load_stores_nothing() -> None:
    s = make(8, load_async=False)
    store_all(s, Req(toks(1, 2)))
    loader = Req(toks(1, 2))
    _, lblocks = admit(s, loader, block_base=20)
    # vLLM's prefix cache hands the blocks being loaded to a second request
    # in the same step; if the load fails, what it computes over them is wrong.
    sharer = Req(toks(1, 2) + toks(7, 2))
    sharer_blocks = [*lblocks[:2], 40, 41, 42]
    admit(s, sharer, computed=2 * B)
    meta = step(s, (sharer, sharer_blocks, 2 * B, len(sharer.all_token_ids) - 2 * B))
    assert meta.loads and not meta.stores
    report(s, {meta.loads[0].load_id: {0: 2}})
    so = SchedulerOutput.make_empty()
    so.scheduled_cached_reqs.req_ids = [sharer.request_id]
    so.scheduled_cached_reqs.new_block_ids = [None]
    so.scheduled_cached_reqs.num_computed_tokens = [len(sharer.all_token_ids) - 1]
    so.num_scheduled_tokens = {sharer.request_id: 1}
    assert [b for st in s.build_connector_meta(so).stores for b in st.block_ids] == [40, 41]


def _async_lookup_scheduler(clock: list[float]) -> tuple[AIBrixScheduler, HeldExecutor]:
    s = make(8, l2=True, l2_lookup_async=True, l2_lookup_max_wait_ms=100)
    held = HeldExecutor()
    s.planner = TierPlanner(
        s.config,
        num_slots=8,
        block_tokens=B,
        l2=s.l2,
        lookup_executor=held,
        clock=lambda: clock[0],
    )
    return s, held


def test_an_l2_lookup_in_flight_makes_vllm_ask_again_instead_of_waiting() -> None:
    clock = [0.0]
    s, held = _async_lookup_scheduler(clock)
    a = Req(toks(1, 3))
    s.l2.put_blocks(chain_hashes(NS.digest, a.all_token_ids, B), 0, [bytes(64)] * 3)
    assert s.get_num_new_matched_tokens(a, 0) == (None, False)
    assert s.get_num_new_matched_tokens(a, 0) == (None, False)  # still one lookup
    assert len(held.pending) == 1
    held.run_all()
    assert s.get_num_new_matched_tokens(a, 0)[0] == 3 * B


def test_an_unanswered_l2_lookup_gives_up_after_the_wait_and_serves_l1() -> None:
    clock = [0.0]
    s, _held = _async_lookup_scheduler(clock)
    a = Req(toks(1, 3))
    s.l2.put_blocks(chain_hashes(NS.digest, a.all_token_ids, B), 0, [bytes(64)] * 3)
    assert s.get_num_new_matched_tokens(a, 0)[0] is None
    clock[0] = 0.5  # past l2_lookup_max_wait_ms
    assert s.get_num_new_matched_tokens(a, 0) == (0, False)
    assert s.take_counters().get("l2_lookup_timeouts") == 1


def test_asking_again_for_an_unanswered_lookup_is_not_counted_as_a_lookup() -> None:
    clock = [0.0]
    s, held = _async_lookup_scheduler(clock)
    a = Req(toks(1, 3))
    for _ in range(3):
        assert s.get_num_new_matched_tokens(a, 0)[0] is None
    held.run_all()
    s.get_num_new_matched_tokens(a, 0)
    counts = s.take_counters()
    assert counts.get("lookups") == 1
    assert counts.get("lookup_tokens") == 3 * B


def test_the_plan_names_the_requests_whose_blocks_vllm_freed_since_the_last_one() -> None:
    s = make(8)
    so = SchedulerOutput.make_empty()
    so.finished_req_ids = {"done", "aborted"}
    so.preempted_req_ids = {"preempted"}
    assert s.build_connector_meta(so).freed == ["aborted", "done", "preempted"]
