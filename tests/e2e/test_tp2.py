"""Tensor parallelism (TP=2) end to end on the real vLLM CPU build.

Every engine runs in its own process (two worker processes each, one core per
rank). Engine A fills L1 and Redis; engine B (fresh process, empty L1) reads
Redis with faults injected into rank 1 only; a TP=1 engine on the same Redis
must see nothing of the TP=2 shards. Every output is compared with an engine
of the same TP size without any cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    BLOCK,
    Completion,
    prompt_tokens,
    run_engine_process,
    same_output,
    tiny_model,
)
from tests.integration.conftest import RedisServer
from vllm_aibrix.core.keys import chain_hashes, rank_key

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SHARED = prompt_tokens(21, 3 * BLOCK + 10)
FAULT = prompt_tokens(22, 5 * BLOCK + 3)  # rank 1 loses block FAULT_K mid-load
FAULT_K = 2
SANITY = prompt_tokens(23, 4 * BLOCK + 7)  # rank 1's block SANITY_K is gone before lookup
SANITY_K = 1
STALL = prompt_tokens(24, 2 * BLOCK + 50)  # rank 1's load stalls past the timeout
AFTER_STALL = prompt_tokens(25, BLOCK + 10)  # carries the stalled load's late report
PROMPTS = [SHARED, FAULT, SANITY, STALL]
TIMEOUT_S = 4.0


@pytest.fixture(scope="module", autouse=True)
def _bind_one_core_per_rank(monkeypatch_module: pytest.MonkeyPatch) -> None:
    monkeypatch_module.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _extra(redis: RedisServer) -> dict[str, Any]:
    return {
        "l2_cache_backend": "REDIS",
        "redis_url": redis.url,
        "l2_cache_ingestion_type": "ALL",
        "l1_cache_capacity_gb": 0.25,
        "load_deadline_s": TIMEOUT_S,
    }


def _run(workdir: Path, **spec: Any) -> dict[str, Any]:
    return run_engine_process({"model": tiny_model(), **spec}, workdir, timeout=900)


def _by_prompt(
    prompts: list[list[int]], outs: list[Completion]
) -> dict[tuple[int, ...], Completion]:
    return {tuple(p): o for p, o in zip(prompts, outs, strict=True)}


@pytest.fixture(scope="module")
def baseline_tp2(workdir: Path) -> dict[tuple[int, ...], Completion]:
    out = _run(workdir, prompts=PROMPTS, extra=None, tp=2)
    return _by_prompt(PROMPTS, out["rounds"][0])


@pytest.fixture(scope="module")
def engine_a(workdir: Path, redis: RedisServer, baseline_tp2: Any) -> dict[str, Any]:
    return _run(workdir, prompts=PROMPTS, extra=_extra(redis), tp=2, rounds=2)


def _storage_key(namespace_hex: str, prompt: list[int], block: int, rank: int) -> bytes:
    return rank_key(chain_hashes(bytes.fromhex(namespace_hex), prompt, BLOCK)[block], rank)


@pytest.fixture(scope="module")
def engine_b(workdir: Path, redis: RedisServer, engine_a: dict[str, Any]) -> dict[str, Any]:
    ns = engine_a["namespace"]
    # Lookup sanity: rank 1's shard of SANITY block k is gone before B looks.
    assert redis.client().delete(_storage_key(ns, SANITY, SANITY_K, 1)) == 1
    doomed = _storage_key(ns, FAULT, FAULT_K, 1).hex()
    return _run(
        workdir,
        extra=_extra(redis),
        tp=2,
        prompts=[],
        rounds=0,
        batches=[
            {"prompts": [SHARED]},
            {"prompts": [FAULT], "hooks": {"delete_l2_keys": [doomed]}},
            {"prompts": [SANITY]},
            {"prompts": [STALL], "hooks": {"stall_s": 3 * TIMEOUT_S, "fail_rank": 1}},
            # The stalled fetch writes into its L1 slots, so the planner hears of
            # the failure (and frees them) only once it ends; the next step says so.
            {"prompts": [AFTER_STALL], "sleep_s": 2 * TIMEOUT_S + 1},
        ],
    )


def _delta(b: dict[str, Any], i: int, name: str) -> float:
    before = b["batches"][i - 1]["totals"].get(name, 0) if i else 0
    return b["batches"][i]["totals"].get(name, 0) - before


def test_tp2_reuse_within_engine_matches_tp2_baseline(
    engine_a: dict[str, Any], baseline_tp2: dict[tuple[int, ...], Completion]
) -> None:
    for p, o in zip(PROMPTS, engine_a["rounds"][1], strict=True):
        assert o.num_cached_tokens == (len(p) - 1) // BLOCK * BLOCK
        assert same_output(o, baseline_tp2[tuple(p)])
    assert engine_a["pool"]["slots_pinned"] == 0


def test_tp2_engine_writes_one_shard_per_rank(engine_a: dict[str, Any], redis: RedisServer) -> None:
    client = redis.client()
    for block in range(len(SHARED) // BLOCK):
        for rank in (0, 1):
            assert client.exists(_storage_key(engine_a["namespace"], SHARED, block, rank))


def test_second_tp2_engine_loads_from_l2_and_matches(
    engine_b: dict[str, Any], baseline_tp2: dict[tuple[int, ...], Completion]
) -> None:
    out = engine_b["batches"][0]["outs"][0]
    assert out.num_cached_tokens == (len(SHARED) - 1) // BLOCK * BLOCK
    assert same_output(out, baseline_tp2[tuple(SHARED)])
    assert _delta(engine_b, 0, "hit_tokens_l2") > 0


def test_rank1_shard_lost_mid_load_truncates_both_ranks_at_that_block(
    engine_b: dict[str, Any], baseline_tp2: dict[tuple[int, ...], Completion]
) -> None:
    out = engine_b["batches"][1]["outs"][0]
    planned = (len(FAULT) - 1) // BLOCK
    assert _delta(engine_b, 1, "load_failures") == 1
    assert _delta(engine_b, 1, "load_failed_blocks") == planned - FAULT_K
    assert same_output(out, baseline_tp2[tuple(FAULT)])


def test_lookup_stops_at_the_block_one_rank_is_missing(
    engine_b: dict[str, Any], baseline_tp2: dict[tuple[int, ...], Completion]
) -> None:
    out = engine_b["batches"][2]["outs"][0]
    assert out.num_cached_tokens == SANITY_K * BLOCK
    assert same_output(out, baseline_tp2[tuple(SANITY)])


def test_stalled_rank_leads_to_recompute_not_a_hang(
    engine_b: dict[str, Any], baseline_tp2: dict[tuple[int, ...], Completion]
) -> None:
    out = engine_b["batches"][3]["outs"][0]
    assert _delta(engine_b, 3, "load_failures") + _delta(engine_b, 4, "load_failures") == 1
    assert same_output(out, baseline_tp2[tuple(STALL)])
    assert engine_b["pool"]["slots_pinned"] == 0
    assert engine_b["pool"]["pending_keys"] == 0


def test_tp1_engine_on_the_same_l2_sees_no_tp2_shards(
    workdir: Path, redis: RedisServer, engine_b: dict[str, Any]
) -> None:
    base = _run(workdir, prompts=[SHARED], extra=None)
    tp1 = _run(workdir, prompts=[SHARED], extra=_extra(redis))
    assert tp1["totals"].get("hit_tokens_l2", 0) == 0
    assert same_output(tp1["rounds"][0][0], base["rounds"][0][0])
