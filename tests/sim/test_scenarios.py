"""Hand-built scenarios through the simulation harness, one behaviour each.

Every step of every scenario runs the harness's checks (the KV the engine
reads is its own prefix's, L1 and L2 hold their keys' bytes, nothing leaks
at idle); the assertions here add what the scenario is about.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from vllm.v1.request import RequestStatus

from tests.sim import fakes
from tests.sim.harness import Sim, SimConfig, SimViolation, random_tokens
from vllm_aibrix.core.keys import chain_hashes, rank_key
from vllm_aibrix.core.l2 import codec

B = 16
_names = itertools.count()


@pytest.fixture
def sims() -> Iterator[list[Sim]]:
    """Simulations a test builds; shut down afterwards."""
    made: list[Sim] = []
    yield made
    for s in made:
        s.shutdown()


def make(sims: list[Sim], l2_name: str | None = None, **kw: object) -> Sim:
    sim = Sim(SimConfig(**kw), l2_name=l2_name)  # type: ignore[arg-type]
    sims.append(sim)
    return sim


def prompt(seed: int, blocks: int, extra: int = 3) -> list[int]:
    return random_tokens(random.Random(seed), blocks * B + extra)


def serve(sim: Sim, tokens: list[int], max_tokens: int = 1) -> str:
    rid = sim.add_request(tokens, max_tokens)
    sim.run_until_idle()
    return rid


def computed_only_the_tail(sim: Sim, rid: str, cached_blocks: int, max_tokens: int = 1) -> bool:
    st = sim.requests[rid]
    return st.forward_tokens == st.prompt_len - cached_blocks * B + (max_tokens - 1)


# ------------------------------------------------------------------ L1 reuse
def test_a_block_reloaded_from_l1_after_vllms_prefix_cache_was_reset_holds_its_own_prefixs_kv(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=2, l2=False)
    p, q = prompt(1, 5), prompt(2, 3)
    serve(sim, p)
    serve(sim, q)  # other KV goes through the same engine blocks and slots
    assert sim.reset_prefix_cache()
    rid = serve(sim, p, max_tokens=3)
    (load,) = sim.loads_of(rid)
    assert len(load.block_ids) == 5 and not any(load.from_l2)
    assert computed_only_the_tail(sim, rid, 5, max_tokens=3)


def test_two_prompts_sharing_a_prefix_each_get_their_own_blocks_from_l1(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=1, l2=False, load_async=False)
    head = prompt(3, 2, extra=0)
    a, b = head + prompt(4, 2), head + prompt(5, 1)
    serve(sim, a)
    serve(sim, b)
    assert sim.reset_prefix_cache()
    ra = sim.add_request(a, 2)
    rb = sim.add_request(b, 2)
    sim.run_until_idle()
    # b's first two blocks come from a's load (through vLLM's prefix cache), its third from L1.
    assert [len(x.block_ids) for x in sim.loads_of(ra) + sim.loads_of(rb)] == [4, 1]
    assert computed_only_the_tail(sim, ra, 4, max_tokens=2)
    assert computed_only_the_tail(sim, rb, 3, max_tokens=2)


# ------------------------------------------------------------- failed loads
def test_a_load_failing_on_rank_1_partway_is_recomputed_and_the_recomputed_blocks_stored_again(
    sims: list[Sim],
) -> None:
    name = f"scenario-{next(_names)}"
    first = make(sims, name, tp=2, ingestion="ALL")
    p = prompt(6, 4)
    serve(first, p)  # every block of p is in L2 now, both ranks' shards
    second = make(sims, name, tp=2, ingestion="ALL")
    second.faults.fail_once(rank=1, ok_blocks=1)
    rid = serve(second, p)
    (load,) = second.loads_of(rid)
    assert all(load.from_l2) and len(load.block_ids) == 4
    assert computed_only_the_tail(second, rid, 1)  # blocks 1..3 recomputed on both ranks
    # The recomputed blocks were stored again: all four are L1 hits now.
    assert second.reset_prefix_cache()
    again = serve(second, p)
    (reload,) = second.loads_of(again)
    assert len(reload.block_ids) == 4 and not any(reload.from_l2)
    assert computed_only_the_tail(second, again, 4)


def test_an_l2_value_that_vanishes_before_rank_0_fetches_it_is_recomputed_on_every_rank(
    sims: list[Sim],
) -> None:
    name = f"scenario-{next(_names)}"
    p = prompt(7, 4)
    serve(make(sims, name, tp=2, ingestion="ALL"), p)
    second = make(sims, name, tp=2, ingestion="ALL")
    second.faults.drop_once(rank=0, index=2)
    rid = serve(second, p)
    assert computed_only_the_tail(second, rid, 2)


def test_a_load_that_fails_on_one_rank_while_the_other_is_still_loading_is_agreed_on(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=2, l2=False)
    p = prompt(8, 4)
    serve(sim, p)
    assert sim.reset_prefix_cache()
    sim.faults.fail_once(rank=0, ok_blocks=2)
    rid = sim.add_request(p, 1)
    sim.timing.hold(rid, {1})  # rank 1 finishes its part of the load much later
    for _ in range(4):
        sim.step()
    assert sim.requests[rid].req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    sim.timing.release(rid)
    sim.run_until_idle()
    assert computed_only_the_tail(sim, rid, 2)


def test_a_load_abandoned_at_its_deadline_never_writes_into_blocks_given_to_another_request(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=2, l2=False, num_gpu_blocks=12, load_deadline_steps=3)
    p = prompt(60, 5)
    serve(sim, p)
    assert sim.reset_prefix_cache()
    late = sim.add_request(p, 2)
    sim.timing.hold(late, {1})  # rank 1 stalls; rank 0 is done at once
    while not sim.scheduler.finished_recving_kv_req_ids:
        sim.step()  # until rank 1 gives up at the deadline and the load is reported failed
    sim.abort(late)  # its blocks go back to the pool at once
    other = sim.add_request(prompt(61, 9), 4)  # takes nearly every block, those among them
    sim.step()
    sim.timing.release(late)  # the stalled load ends now; it must write nothing
    sim.run_until_idle()  # every later read of the other request is checked
    assert sim.requests[other].req.is_finished()
    assert len(sim.loads_of(late)) == 1


def test_an_l2_fetch_abandoned_at_its_deadline_never_writes_into_slots_given_to_other_blocks(
    sims: list[Sim],
) -> None:
    name = f"scenario-{next(_names)}"
    p = prompt(62, 4)
    serve(make(sims, name, ingestion="ALL"), p)
    sim = make(sims, name, ingestion="ALL", l1_slots=6, num_gpu_blocks=16, load_deadline_steps=3)
    late = sim.add_request(p, 2)
    sim.timing.hold(late)  # the L2 fetch stalls on every rank
    sim.step()
    for _ in range(10):  # until the deadline: the load is reported failed, vLLM recomputes
        if sim.requests[late].req.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
            break
        sim.step()
    assert sim.requests[late].req.status != RequestStatus.WAITING_FOR_REMOTE_KVS
    sim.abort(late)
    others = [sim.add_request(prompt(63 + i, 3), 12) for i in range(2)]
    for _ in range(4):
        sim.step()  # the other requests want L1 slots, those of the stalled load among them
    sim.timing.release(late)  # the fetch ends now, writing into the slots it was given
    sim.run_until_idle()  # every L1 slot is checked against its key after each step
    assert all(sim.requests[r].req.is_finished() for r in others)
    assert all(sim.loads_of(late)[0].from_l2)


# --------------------------------------------------------- aborts and leaks
@pytest.mark.parametrize("ranks", [None, {1}], ids=["both-ranks-loading", "rank1-loading"])
def test_a_request_aborted_while_its_async_load_is_in_flight_leaks_no_pins(
    sims: list[Sim], ranks: set[int] | None
) -> None:
    sim = make(sims, tp=2, ingestion="EVICTED", l1_slots=8)
    p = prompt(9, 5)
    serve(sim, p)
    assert sim.reset_prefix_cache()
    rid = sim.add_request(p, 4)
    sim.timing.hold(rid, ranks)
    sim.step()
    assert sim.requests[rid].req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert fakes.pool_state(sim.sched_conn)["slots_pinned"] > 0
    sim.abort(rid)
    for _ in range(3):
        sim.step()  # the load is still running: its blocks and pins stay
    assert rid in sim.scheduler.requests
    # Other requests keep going meanwhile and may evict around the pinned slots.
    other = sim.add_request(prompt(10, 6), 2)
    for _ in range(3):
        sim.step()
    sim.timing.release(rid)
    sim.run_until_idle()  # checks: no pins, pending fills, trackers or jobs left
    assert sim.requests[other].req.is_finished()


def test_a_request_aborted_while_the_model_runs_its_sync_load_step_leaks_nothing(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=2, load_async=False)
    p = prompt(11, 4)
    serve(sim, p)
    assert sim.reset_prefix_cache()
    rid = sim.add_request(p, 3)
    sim.step(abort_during=lambda so: [rid] if rid in so.num_scheduled_tokens else [])
    assert sim.requests[rid].aborted
    sim.run_until_idle()


# -------------------------------------------------------------------- resets
def test_after_reset_cache_nothing_computed_before_it_is_served(sims: list[Sim]) -> None:
    sim = make(sims, tp=2, ingestion="ALL")
    p = prompt(12, 4)
    serve(sim, p)  # in L1 and in L2
    assert sim.reset_connector()
    assert sim.reset_prefix_cache()
    rid = serve(sim, p, max_tokens=2)
    assert sim.loads_of(rid) == []
    assert computed_only_the_tail(sim, rid, 0, max_tokens=2)


def test_after_a_weight_update_no_kv_of_the_old_weights_is_served(sims: list[Sim]) -> None:
    # new_epoch: every prefix has new KV from now on, so a stale block read by
    # the engine fails the harness's content check, whatever tier it came from.
    sim = make(sims, tp=1, ingestion="ALL")
    p = prompt(13, 4)
    serve(sim, p)
    assert len(fakes.l2_items(sim.l2_backend)) > 0  # type: ignore[arg-type]
    sim.new_epoch()
    rid = serve(sim, p)
    assert sim.loads_of(rid) == []


def test_a_load_in_flight_at_reset_cache_completes_and_nothing_from_before_is_served_after(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=2, ingestion="ALL")
    p = prompt(14, 4)
    serve(sim, p)
    assert sim.reset_prefix_cache()
    rid = sim.add_request(p + prompt(15, 1), 2)
    sim.timing.hold(rid)
    sim.step()
    assert sim.reset_connector()  # while the load planned before it is in flight
    sim.timing.release(rid)
    sim.run_until_idle()
    assert computed_only_the_tail(sim, rid, 4, max_tokens=2)  # its own load still counts
    assert sim.reset_prefix_cache()
    late = serve(sim, p)
    assert sim.loads_of(late) == []


# ---------------------------------------------------------- hits across tiers
def test_one_resident_block_in_the_middle_of_an_l2_hit_does_not_void_the_rest(
    sims: list[Sim],
) -> None:
    name = f"scenario-{next(_names)}"
    p = prompt(16, 4)
    serve(make(sims, name, tp=1, ingestion="ALL"), p)  # another engine put p in L2
    sim = make(sims, name, tp=1, ingestion="ALL", l1_slots=4, policy="LRU", prefix_aware=False)
    serve(sim, p)  # p's four blocks come into this engine's L1
    serve(sim, prompt(17, 2))  # two more blocks evict p's first two from L1
    assert sim.reset_prefix_cache()
    rid = serve(sim, p)
    load = sim.loads_of(rid)[-1]
    assert load.from_l2 == (True, True, False, False)
    assert computed_only_the_tail(sim, rid, 4)


def _l1_holds_the_tail_of_a_5_block_l2_hit(sims: list[Sim], seed: int, **kw: object) -> Sim:
    """An engine whose 4-slot L1 holds blocks 1..4 of ``prompt(seed, 5)``, all 5 in L2."""
    name = f"scenario-{next(_names)}"
    p = prompt(seed, 5, extra=0)
    serve(make(sims, name, tp=1, ingestion="ALL"), p + prompt(seed + 1, 0, extra=2))
    cfg = {"l1_slots": 4, "policy": "FIFO", "prefix_aware": False, **kw}
    sim = make(sims, name, tp=1, ingestion="ALL", **cfg)
    # Loads blocks 0..3 from L2, recomputes block 4 (no fifth slot) and stores
    # it, which evicts block 0.
    serve(sim, p + prompt(seed + 2, 0, extra=2))
    assert sim.reset_prefix_cache()
    return sim


def test_a_request_whose_hit_cannot_be_placed_in_l1_still_completes(sims: list[Sim]) -> None:
    # L1 holds blocks 1-4 of a 5-block L2 hit and has no other slot: the
    # lookup caps the hit at what can be placed (it once looped load -> fail).
    sim = _l1_holds_the_tail_of_a_5_block_l2_hit(sims, 31, load_async=True)
    sim.add_request(prompt(31, 5, extra=0) + prompt(40, 0, extra=5), 1)
    sim.run_until_idle(max_steps=60)


def test_a_hit_longer_than_l1_can_place_at_once_still_loads_the_part_that_fits(
    sims: list[Sim],
) -> None:
    sim = _l1_holds_the_tail_of_a_5_block_l2_hit(sims, 35, load_async=False)
    rid = serve(sim, prompt(35, 5, extra=0) + prompt(41, 0, extra=5))
    assert sim.requests[rid].forward_tokens <= B + 5


# ------------------------------------------------ failed sync loads and vLLM
def test_kv_computed_over_a_sync_load_that_fails_in_the_same_step_is_never_stored(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=1, l2=False, load_async=False)
    p = prompt(18, 3, extra=0)
    serve(sim, p + prompt(19, 1))
    assert sim.reset_prefix_cache()
    sim.faults.fail_once(rank=None, ok_blocks=0)
    b = sim.add_request(p + prompt(20, 0, extra=5), 2)  # sync-loads p's 3 blocks
    c = sim.add_request(p + prompt(21, 1, extra=4), 2)  # hits them in vLLM's prefix cache
    sim.step()  # the L1 check fails here: C's block 3 was stored from a discarded step
    sim.run_until_idle()
    assert sim.requests[b].req.is_finished() and sim.requests[c].req.is_finished()


def test_blocks_a_failed_sync_load_left_unfilled_are_never_stored_for_a_request_sharing_them(
    sims: list[Sim],
) -> None:
    sim = _l1_holds_the_tail_of_a_5_block_l2_hit(sims, 26, load_async=False)
    p = prompt(26, 5, extra=0)
    sim.add_request(p + prompt(29, 0, extra=5), 2)  # B: the load finds no slot for block 0
    sim.add_request(p + prompt(30, 0, extra=6), 2)  # C: B's blocks via vLLM's prefix cache
    sim.run_until_idle()


def test_on_stock_vllm_the_unfilled_blocks_of_a_failed_sync_load_are_not_served_to_the_next_request(
    sims: list[Sim],
) -> None:
    # vLLM 0.32 with kv_load_failure_policy=recompute keeps a failed sync
    # load's blocks (and those computed over them) in its prefix cache and
    # counts on the request recomputing them; aborted first, they would be
    # served as hits. The connector drops them from vLLM's prefix cache.
    sim = make(sims, tp=1, l2=False, load_async=False, vllm_evicts_invalid_blocks=False)
    _failed_sync_load_then_abort(sim)


def test_a_vllm_that_evicts_invalid_blocks_serves_the_next_request_from_l1(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=1, l2=False, load_async=False, vllm_evicts_invalid_blocks=True)
    nxt = _failed_sync_load_then_abort(sim)
    (load,) = sim.loads_of(nxt)
    assert len(load.block_ids) == 3


def _failed_sync_load_then_abort(sim: Sim) -> str:
    p = prompt(22, 3)
    serve(sim, p)
    assert sim.reset_prefix_cache()
    sim.faults.fail_once(rank=None, ok_blocks=0)
    first = sim.add_request(p, 4)
    sim.step()  # the sync load fails; vLLM will recompute all of it
    sim.abort(first)  # ... but the client goes away first
    sim.run_until_idle()
    return serve(sim, p)


# vLLM 0.32: after an async load fails with nothing usable, the request frees
# its blocks but stays in _inflight_prefills (its own reservation counts against
# its re-admission) and at the head of kv_holding_waiting. When the connector
# promised the same hit again, a request needing more than half the cache, or
# one behind which another holds the blocks it needs, was never admitted again.
# The connector now never promises a request more than its failed load
# delivered, and these stock-vLLM runs complete; the "forgets" variants emulate
# a vLLM without that state.


def test_on_stock_vllm_a_large_request_whose_async_load_failed_is_readmitted(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=1, num_gpu_blocks=16, l1_slots=16, vllm_forgets_failed_async_loads=False)
    _failed_async_load_of_a_large_request(sim)


def test_a_vllm_that_forgets_failed_async_loads_readmits_the_large_request(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=1, num_gpu_blocks=16, l1_slots=16, vllm_forgets_failed_async_loads=True)
    _failed_async_load_of_a_large_request(sim)


def _failed_async_load_of_a_large_request(sim: Sim) -> None:
    p = prompt(50, 9)  # 10 of the engine's 15 blocks
    serve(sim, p)
    assert sim.reset_prefix_cache()
    sim.faults.fail_once(rank=None, ok_blocks=0)
    sim.add_request(p, 1)
    sim.run_until_idle(max_steps=60)


def test_on_stock_vllm_a_failed_async_load_under_memory_pressure_does_not_deadlock(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=1, num_gpu_blocks=16, l1_slots=16, vllm_forgets_failed_async_loads=False)
    _failed_async_load_then_pressure(sim)


def test_a_vllm_that_forgets_failed_async_loads_finishes_both_requests(
    sims: list[Sim],
) -> None:
    sim = make(sims, tp=1, num_gpu_blocks=16, l1_slots=16, vllm_forgets_failed_async_loads=True)
    _failed_async_load_then_pressure(sim)


def _failed_async_load_then_pressure(sim: Sim) -> None:
    a_prompt, q = prompt(42, 4), prompt(43, 3, extra=0)
    serve(sim, a_prompt)
    serve(sim, q + prompt(44, 0))
    assert sim.reset_prefix_cache()
    sim.faults.fail_once(rank=None, ok_blocks=0)
    sim.add_request(a_prompt, 1)  # A: its load fails
    b = sim.add_request(q + prompt(45, 3, extra=8), 1)  # B: a 3-block hit, 56 new tokens
    sim.timing.hold(b)
    for _ in range(3):
        sim.step()
    sim.timing.release(b)
    sim.run_until_idle(max_steps=80)


# --------------------------------------------------- the harness can see faults
def test_the_harness_catches_a_load_that_writes_wrong_kv(sims: list[Sim]) -> None:
    sim = make(sims, tp=2, l2=False)
    p = prompt(23, 3)
    serve(sim, p)
    assert sim.reset_prefix_cache()
    sim.faults.corrupt_rate = 1.0  # the load perturbs what it wrote, reports success
    with pytest.raises(SimViolation, match="CORE"):
        serve(sim, p)


def test_the_harness_catches_a_wrong_value_in_l2(sims: list[Sim]) -> None:
    sim = make(sims, tp=1, ingestion="ALL")
    p = prompt(24, 3)
    serve(sim, p)
    assert sim.l2_backend is not None
    keys = chain_hashes(sim.ns_digest, p, B)
    good = dict(fakes.l2_items(sim.l2_backend))
    # Block 2's bytes under block 1's key, with a valid header and checksum.
    payload = bytes(good[rank_key(keys[2], 0)])[codec.HEADER_SIZE :]  # uncompressed
    skey = rank_key(keys[1], 0)
    enc = codec.encode(sim.ns_digest, skey, memoryview(payload))
    sim.l2_backend.raw_set(skey, enc.joined())
    with pytest.raises(SimViolation, match="L2"):
        serve(sim, prompt(25, 1))
