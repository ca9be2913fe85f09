"""L2 ingestion modes (``l2_cache_ingestion_type``) under L1 pressure, across engines.

Engine A (its own process) has an L1 of :data:`SLOTS` blocks and serves
:data:`ROUNDS` batches: the :data:`REPEATED` prompts in every batch, plus
prompts seen in one batch only (:data:`ONCE`); vLLM's prefix cache is
emptied before each batch, so reuse goes through our tiers. 24 distinct
blocks go through 12 slots, so L1 must evict. A records which keys its
planner sent to L2 in each step (``trace_l2`` in run_engine.py) and which
prompt blocks L1 still holds at the end.

* EVICTED: a block reaches L2 only when L1 evicts it. Redis holds exactly the
  keys the planner shipped in ``l2_before``, one per L1 eviction; blocks
  still in L1 at the end (never evicted) are not in Redis.
* HOT: only blocks accessed again (promoted by S3FIFO, the default policy)
  are written: Redis holds blocks of REPEATED prompts only, none of a prompt
  seen once.
* Both write fewer blocks than ALL on the same workload (an in-process
  engine with ALL writes every distinct full block).

Then engine B (another engine, empty L1, same Redis DB, same mode) serves
every prompt once: each prompt is served from L2 for exactly the leading
blocks Redis holds (counted in ``hit_tokens_l2``), and every output equals
the no-connector baseline. Each mode has its own Redis DB (ALL: a third).

Engine memory: ``VLLM_CPU_KVCACHE_SPACE=1`` (the harness default) is the
smallest value the variable can express (whole GiB); the resets between
batches make vLLM's own cache irrelevant, so the pressure that matters is
L1's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    BLOCK,
    Completion,
    block_bytes,
    connector_config,
    engine,
    generate,
    prompt_tokens,
    run_engine_process,
    same_output,
    scheduler_half,
    tiny_model,
)
from tests.integration.conftest import HOST, RedisServer
from vllm_aibrix.core.keys import chain_hashes, rank_key

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SLOTS = 12  # engine A's L1, in blocks
ROUNDS = 3
LEN = 2 * BLOCK + 40  # two full blocks each; + 6 generated tokens stays below 3 blocks
MAX_TOKENS = 6
REPEATED = [prompt_tokens(500 + i, LEN) for i in range(3)]  # 6 blocks, every batch
ONCE = [[prompt_tokens(600 + 10 * r + i, LEN) for i in range(3)] for r in range(ROUNDS)]
BATCHES = [REPEATED + ONCE[r] for r in range(ROUNDS)]
PROMPTS = REPEATED + [p for batch in ONCE for p in batch]
DB = {"EVICTED": 1, "HOT": 2, "ALL": 3}


def _keys(ns: bytes, prompt: list[int]) -> list[bytes]:
    return chain_hashes(ns, prompt, BLOCK)


def _extra(redis: RedisServer, mode: str, slots: int | None) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "l2_cache_backend": "REDIS",
        "redis_url": f"redis://{HOST}:{redis.port}/{DB[mode]}",
        "l2_cache_ingestion_type": mode,
        "l1_cache_capacity_gb": 0.25,
    }
    if slots is not None:
        extra["l1_cache_capacity_gb"] = slots * block_bytes(tiny_model()) / (1 << 30)
    return extra


def _client(redis: RedisServer, mode: str) -> Any:
    import redis as redis_py

    return redis_py.Redis(host=HOST, port=redis.port, db=DB[mode])


@pytest.fixture(scope="module")
def baseline() -> dict[tuple[int, ...], Completion]:
    """Every prompt on the same engine settings without a connector."""
    with engine(tiny_model()) as llm:
        outs = generate(llm, PROMPTS, max_tokens=MAX_TOKENS)
    return {tuple(p): o for p, o in zip(PROMPTS, outs, strict=True)}


@pytest.fixture(scope="module")
def all_mode(redis: RedisServer, baseline: Any) -> dict[str, Any]:
    """Engine A's workload with ALL ingestion (in-process): what ALL writes."""
    _client(redis, "ALL").flushdb()
    with engine(
        tiny_model(), kv_transfer_config=connector_config(_extra(redis, "ALL", SLOTS))
    ) as llm:
        for batch in BATCHES:
            assert llm.reset_prefix_cache()
            generate(llm, batch, max_tokens=MAX_TOKENS)
        sched = scheduler_half(llm)
        sched.take_counters()
        totals, ns = dict(sched.totals), sched.info.namespace.digest
    return {"keys": set(_client(redis, "ALL").keys()), "totals": totals, "ns": ns}


@pytest.fixture(scope="module", params=["EVICTED", "HOT"])
def engine_a(
    request: pytest.FixtureRequest, redis: RedisServer, workdir: Path, baseline: Any
) -> dict[str, Any]:
    mode = str(request.param)
    client = _client(redis, mode)
    client.flushdb()
    out = run_engine_process(
        {
            "model": tiny_model(),
            "prompts": [],
            "rounds": 0,
            "max_tokens": MAX_TOKENS,
            "extra": _extra(redis, mode, SLOTS),
            "trace_l2": True,
            "batches": [{"prompts": b, "reset": True} for b in BATCHES],
        },
        workdir,
    )
    # What A left in Redis (A's process has exited, its write queue drained),
    # before B writes anything.
    out["mode"] = mode
    out["redis_keys"] = set(client.keys())
    out["ns"] = bytes.fromhex(out["namespace"])
    return out


@pytest.fixture(scope="module")
def engine_b(redis: RedisServer, engine_a: dict[str, Any]) -> dict[str, Any]:
    """A fresh engine (empty, roomy L1) on A's Redis DB and mode serves every prompt once."""
    mode = engine_a["mode"]
    with engine(
        tiny_model(), kv_transfer_config=connector_config(_extra(redis, mode, None))
    ) as llm:
        outs = generate(llm, PROMPTS, max_tokens=MAX_TOKENS)
        sched = scheduler_half(llm)
        sched.take_counters()
        totals, ns = dict(sched.totals), sched.info.namespace.digest
    return {"outs": outs, "totals": totals, "ns": ns}


def _stored(engine_a: dict[str, Any], prompt: list[int]) -> list[bool]:
    """Which of the prompt's full blocks A left in Redis."""
    return [rank_key(k, 0) in engine_a["redis_keys"] for k in _keys(engine_a["ns"], prompt)]


def test_baseline_prompts_give_different_outputs(baseline: dict[Any, Completion]) -> None:
    assert len({o.token_ids for o in baseline.values()}) > len(baseline) // 2


def test_engine_a_is_under_l1_pressure_and_matches_baseline(
    engine_a: dict[str, Any], baseline: dict[tuple[int, ...], Completion]
) -> None:
    distinct = {k for p in PROMPTS for k in _keys(engine_a["ns"], p)}
    assert len(distinct) == 24 > SLOTS
    assert engine_a["pool"]["slots_used"] == SLOTS  # L1 full ...
    assert engine_a["totals"]["l1_evictions"] > 0  # ... and evicting
    for i, (batch, b) in enumerate(zip(BATCHES, engine_a["batches"], strict=True)):
        for p, o in zip(batch, b["outs"], strict=True):
            assert same_output(o, baseline[tuple(p)]), (engine_a["mode"], i)
    # Reuse within A (through L1 or L2): the REPEATED prompts hit in later batches.
    assert all(o.num_cached_tokens > 0 for o in engine_a["batches"][-1]["outs"][: len(REPEATED)])
    assert engine_a["pool"]["slots_pinned"] == 0


def test_ingestion_mode_decides_what_reaches_l2(engine_a: dict[str, Any]) -> None:
    mode, totals, sent = engine_a["mode"], engine_a["totals"], engine_a["l2_sent"]
    redis_keys = engine_a["redis_keys"]
    shipped = sent["before"] if mode == "EVICTED" else sent["after"]
    # Redis holds exactly what the planner shipped (A's only rank: 0), all of it.
    assert redis_keys == {rank_key(bytes.fromhex(k), 0) for k in shipped}
    assert totals["l2_offload_blocks"] == len(shipped) > 0
    assert totals.get("l2_ingest_dropped_blocks", 0) == 0
    resident = {bytes.fromhex(k) for k in engine_a["l1_resident"]}
    if mode == "EVICTED":
        assert sent["after"] == []
        # Every L1 eviction, and nothing else, was shipped ...
        assert len(sent["before"]) == totals["l1_evictions"]
        # ... and here no block was evicted twice (a REPEATED block never
        # leaves L1: it is pinned by its own load whenever the ONCE prompts
        # beside it are stored), so the key count is the eviction count. In
        # general it is the number of distinct evicted keys, a re-evicted
        # block overwriting its own key.
        assert len(redis_keys) == len(set(sent["before"])) == totals["l1_evictions"]
        # Blocks L1 still holds and never evicted did not reach L2.
        never_evicted = resident - {bytes.fromhex(k) for k in sent["before"]}
        assert never_evicted
        assert not {rank_key(k, 0) for k in never_evicted} & redis_keys
    else:
        assert sent["before"] == []
        repeated = {rank_key(k, 0) for p in REPEATED for k in _keys(engine_a["ns"], p)}
        # Only blocks accessed again: REPEATED ones, never one of a prompt seen once.
        assert redis_keys <= repeated
        assert redis_keys


def test_selective_ingestion_writes_fewer_blocks_than_all(
    engine_a: dict[str, Any], all_mode: dict[str, Any]
) -> None:
    assert all_mode["ns"] == engine_a["ns"]  # same keys: the DBs are comparable
    every_block = {rank_key(k, 0) for p in PROMPTS for k in _keys(all_mode["ns"], p)}
    # ALL writes every block L1 stores (each distinct block exactly once here).
    assert all_mode["keys"] == every_block
    assert all_mode["totals"]["l2_offload_blocks"] == all_mode["totals"]["stored_blocks"]
    assert len(engine_a["redis_keys"]) < len(all_mode["keys"])
    assert engine_a["totals"]["l2_offload_blocks"] < all_mode["totals"]["l2_offload_blocks"]
    if engine_a["mode"] == "HOT":
        once = {rank_key(k, 0) for b in ONCE for p in b for k in _keys(all_mode["ns"], p)}
        assert once <= all_mode["keys"]
        assert not once & engine_a["redis_keys"]


def test_engine_b_loads_what_l2_holds_and_matches_baseline(
    engine_a: dict[str, Any],
    engine_b: dict[str, Any],
    baseline: dict[tuple[int, ...], Completion],
) -> None:
    assert engine_b["ns"] == engine_a["ns"]
    expected_hit_blocks = 0
    for p, o in zip(PROMPTS, engine_b["outs"], strict=True):
        stored = _stored(engine_a, p)[: (len(p) - 1) // BLOCK]
        leading = stored.index(False) if False in stored else len(stored)
        assert o.num_cached_tokens == leading * BLOCK, (engine_a["mode"], PROMPTS.index(p))
        assert same_output(o, baseline[tuple(p)]), (engine_a["mode"], PROMPTS.index(p))
        expected_hit_blocks += leading
    totals = engine_b["totals"]
    assert expected_hit_blocks > 0
    assert totals.get("hit_tokens_l2", 0) == expected_hit_blocks * BLOCK
    assert totals.get("hit_tokens_l1", 0) == 0
    hits = [o.num_cached_tokens > 0 for o in engine_b["outs"]]
    if engine_a["mode"] == "HOT":
        # Only the prompts A saw again were worth writing.
        assert not any(hits[len(REPEATED) :])
        assert any(hits[: len(REPEATED)])
    else:
        # B hits only the prompts whose blocks A's L1 evicted.
        evicted = {bytes.fromhex(k) for k in engine_a["l2_sent"]["before"]}
        for p, hit in zip(PROMPTS, hits, strict=True):
            assert hit == (_keys(engine_a["ns"], p)[0] in evicted)
