"""The connector's worker half, executing hand-built plans on CPU KV tensors."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import torch

from tests.unit.held_executor import HeldExecutor, HeldJobs
from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Namespace
from vllm_aibrix.core.l2.store import L2Store
from vllm_aibrix.vllm.engine_info import EngineInfo
from vllm_aibrix.vllm.faults import LoadFaults
from vllm_aibrix.vllm.metadata import AIBrixConnectorMetadata, LoadSpec, StoreSpec
from vllm_aibrix.vllm.worker import AIBrixWorker

NUM_BLOCKS, HEADS, BLOCK, HEAD = 16, 2, 4, 8
LAYERS = ("layer.0", "layer.1")
SLOT_BYTES = len(LAYERS) * HEADS * BLOCK * 2 * HEAD * 4  # float32
NS = Namespace(model="m", block_size=BLOCK)
_names = itertools.count()


def make_worker(
    rank: int = 0,
    *,
    tp: int = 1,
    replicated: bool = False,
    store: str | None = None,
    **kw: Any,
) -> AIBrixWorker:
    extra: dict[str, Any] = {"l2_cache_backend": "MEMORY", **kw}
    extra["memory_store_name"] = store or f"worker-{next(_names)}"
    cfg = CacheConfig.from_sources(extra, environ={})
    info = EngineInfo(BLOCK, SLOT_BYTES, 8, tp, NS, kv_replicated=replicated)
    w = AIBrixWorker(cfg, info, rank)
    caches = {
        name: torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * HEAD, dtype=torch.float32)
        for name in LAYERS
    }
    w.register_kv_caches(caches, NUM_BLOCKS)
    return w


def engine_blocks(w: AIBrixWorker, block_ids: list[int]) -> list[torch.Tensor]:
    assert w.layout is not None
    return [torch.stack([lv.tensor[b].clone() for lv in w.layout.layers]) for b in block_ids]


def fill_engine(w: AIBrixWorker, block_ids: list[int], seed: int) -> None:
    assert w.layout is not None
    for i, b in enumerate(block_ids):
        for j, lv in enumerate(w.layout.layers):
            lv.tensor[b].fill_(float(seed * 100 + i * 10 + j))


def l2(w: AIBrixWorker) -> L2Store:
    assert w.l2 is not None
    return w.l2


def slot(w: AIBrixWorker, i: int) -> torch.Tensor:
    assert w.buffer is not None
    return w.buffer.slot(i)


def store_blocks(w: AIBrixWorker, block_ids: list[int], slots: list[int], seed: int) -> None:
    fill_engine(w, block_ids, seed)
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("src", slots, block_ids)]))
    w.store_jobs.wait_all()


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_a_load_mixing_l1_and_l2_blocks_copies_all_of_them_into_the_engine() -> None:
    w = make_worker()
    store_blocks(w, [0, 1, 2], [0, 1, 2], seed=1)
    want = engine_blocks(w, [0, 1, 2])
    # Slots 0 and 2 go to L2 under keys 0 and 2; the plan fetches them into
    # fresh slots 5 and 7, while slot 1 is an L1 hit in between.
    l2(w).put_blocks([key(0), key(2)], 0, [slot(w, 0), slot(w, 2)])
    spec = LoadSpec(7, "r", [5, 1, 7], [10, 11, 12], [key(0), None, key(2)], is_async=False)
    w.start_load(AIBrixConnectorMetadata(loads=[spec]))
    got = engine_blocks(w, [10, 11, 12])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert w.take_load_errors() == set()
    meta = w.take_worker_meta()
    assert meta is not None and meta.loaded == {7: {0: 3}}


def test_a_block_missing_in_l2_ends_the_loaded_prefix_and_the_rest_are_errors() -> None:
    w = make_worker()
    store_blocks(w, [0, 1], [0, 1], seed=1)
    l2(w).put_blocks([key(0)], 0, [slot(w, 0)])
    spec = LoadSpec(1, "r", [5, 6, 1], [10, 11, 12], [key(0), key(1), None], is_async=False)
    w.start_load(AIBrixConnectorMetadata(loads=[spec]))
    assert w.take_load_errors() == {11, 12}
    meta = w.take_worker_meta()
    assert meta is not None and meta.loaded == {1: {0: 1}}


def test_an_unreserved_slot_ends_the_loaded_prefix() -> None:
    w = make_worker()
    store_blocks(w, [0, 1], [0, 1], seed=1)
    spec = LoadSpec(2, "r", [0, -1, 1], [10, 11, 12], [None, None, None], is_async=False)
    w.start_load(AIBrixConnectorMetadata(loads=[spec]))
    assert w.take_load_errors() == {11, 12}


def test_an_async_load_past_its_deadline_is_failed_and_never_writes_late() -> None:
    w = make_worker(load_deadline_s=0.01)
    manual = HeldExecutor()
    w.executor = manual
    store_blocks(w, [0], [0], seed=3)
    spec = LoadSpec(4, "r", [0], [9], [None], is_async=True)
    w.start_load(AIBrixConnectorMetadata(loads=[spec]))
    threading.Event().wait(0.05)
    assert w.poll_finished() == {"r"}
    assert w.take_load_errors() == {9}
    manual.run_all()  # the load finally runs: it must not touch the engine block
    assert all(float(t.abs().sum()) == 0.0 for t in engine_blocks(w, [9]))


def test_a_fault_limit_truncates_one_ranks_load() -> None:
    class StopAfterOne(LoadFaults):
        def loaded_limit(self, rank: int, req_id: str, planned: int) -> int:
            return min(planned, 1)

    w = make_worker()
    w.faults = StopAfterOne()
    store_blocks(w, [0, 1], [0, 1], seed=1)
    w.start_load(
        AIBrixConnectorMetadata(loads=[LoadSpec(5, "r", [0, 1], [10, 11], [None, None], False)])
    )
    assert w.take_load_errors() == {11}


def test_replicated_kv_is_written_to_l2_by_rank_0_only_and_read_by_every_rank() -> None:
    store = f"mla-{next(_names)}"
    r0 = make_worker(0, tp=2, replicated=True, store=store)
    r1 = make_worker(1, tp=2, replicated=True, store=store)
    for w in (r0, r1):
        store_blocks(w, [0], [0], seed=5)
        w.save(AIBrixConnectorMetadata(l2_after=[(key(42), 0)]))
        w.store_jobs.wait_all()
        l2(w).flush(5.0)
    assert l2(r0).exists_prefix([key(42)], (0,)) == 1
    assert l2(r0).exists_prefix([key(42)], (1,)) == 0
    want = engine_blocks(r1, [0])
    r1.start_load(
        AIBrixConnectorMetadata(loads=[LoadSpec(1, "r", [3], [7], [key(42)], is_async=False)])
    )
    assert r1.take_load_errors() == set()
    assert torch.equal(engine_blocks(r1, [7])[0], want[0])


# ------------------------------------------------------- background stores
def held_worker(**kw: Any) -> tuple[AIBrixWorker, HeldJobs]:
    w = make_worker(**kw)
    jobs = HeldJobs()
    w.store_jobs.close()
    w.store_jobs = jobs
    return w, jobs


def test_a_store_is_left_to_the_background_and_the_step_returns_at_once() -> None:
    w, jobs = held_worker()
    fill_engine(w, [3], seed=1)
    slot(w, 0).fill_(7)
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("r", [0], [3])]))
    assert len(jobs.queue) == 1
    assert bool((slot(w, 0) == 7).all())  # not copied yet
    jobs.run()
    assert torch.equal(slot(w, 0).view(torch.float32).view(-1), engine_blocks(w, [3])[0].view(-1))


def test_a_load_from_a_slot_waits_for_the_store_still_writing_it() -> None:
    w, jobs = held_worker()
    fill_engine(w, [3], seed=2)
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("r", [0], [3])]))
    spec = LoadSpec(1, "q", [0], [7], [None], is_async=False)
    w.start_load(AIBrixConnectorMetadata(loads=[spec]))
    assert not jobs.queue
    assert torch.equal(engine_blocks(w, [7])[0], engine_blocks(w, [3])[0])


def test_a_load_of_other_slots_does_not_wait_for_a_store() -> None:
    w, jobs = held_worker()
    store_blocks(w, [1], [1], seed=3)
    fill_engine(w, [3], seed=4)
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("r", [0], [3])]))
    w.start_load(AIBrixConnectorMetadata(loads=[LoadSpec(1, "q", [1], [7], [None], False)]))
    assert len(jobs.queue) == 1


def test_a_freed_requests_store_finishes_before_the_forward_may_reuse_its_blocks() -> None:
    w, jobs = held_worker()
    fill_engine(w, [3], seed=5)
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("r", [0], [3])]))
    w.handle_preemptions(AIBrixConnectorMetadata(freed=["other"]))
    assert len(jobs.queue) == 1
    w.handle_preemptions(AIBrixConnectorMetadata(freed=["r"]))
    assert not jobs.queue


def test_start_load_also_orders_stores_before_a_freed_requests_blocks_are_reused() -> None:
    w, jobs = held_worker()
    fill_engine(w, [3], seed=6)
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("r", [0], [3])]))
    w.start_load(AIBrixConnectorMetadata(freed=["r"]))
    assert not jobs.queue


def test_a_failed_background_store_stops_the_next_step() -> None:
    w, jobs = held_worker()
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("r", [0], [NUM_BLOCKS + 5])]))
    jobs.run()
    try:
        w.start_load(AIBrixConnectorMetadata())
    except RuntimeError as e:
        assert "background copy job failed" in str(e)
    else:
        raise AssertionError("a failed store must not be ignored")


def test_synchronous_stores_are_done_when_save_returns() -> None:
    w, jobs = held_worker(store_async=False)
    fill_engine(w, [3], seed=7)
    w.save(AIBrixConnectorMetadata(stores=[StoreSpec("r", [0], [3])]))
    assert not jobs.queue
    assert torch.equal(slot(w, 0).view(torch.float32).view(-1), engine_blocks(w, [3])[0].view(-1))
