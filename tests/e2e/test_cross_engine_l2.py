"""Cross-engine reuse through L2 on a real redis-server.

Engine A (its own process) serves prompts and writes their blocks to Redis.
Engine B (this process, empty L1) serves the same prompts and must load them
from Redis; outputs must equal an engine without any cache. Then values in
Redis are corrupted behind B's back: B must notice, recompute, and count it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    BLOCK,
    Completion,
    connector_config,
    generate,
    make_llm,
    prompt_tokens,
    run_engine_process,
    same_output,
    scheduler_half,
    shutdown,
    tiny_model,
)
from tests.integration.conftest import RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SHARED = [prompt_tokens(11, 4 * BLOCK + 30), prompt_tokens(12, 2 * BLOCK + 5)]
CORRUPTED = [prompt_tokens(13, 3 * BLOCK + 9)]
PROMPTS = SHARED + CORRUPTED


@pytest.fixture(scope="module")
def baseline(workdir: Path) -> dict[tuple[int, ...], Completion]:
    out = run_engine_process({"model": tiny_model(), "prompts": PROMPTS, "extra": None}, workdir)
    return {tuple(p): c for p, c in zip(PROMPTS, out["rounds"][0], strict=True)}


def _l2_extra(redis: RedisServer) -> dict[str, Any]:
    return {
        "l2_cache_backend": "REDIS",
        "redis_url": redis.url,
        "l2_cache_ingestion_type": "ALL",
        "l1_cache_capacity_gb": 0.25,
    }


@pytest.fixture(scope="module")
def engine_a(redis: RedisServer, workdir: Path, baseline: Any) -> dict[str, Any]:
    return run_engine_process(
        {"model": tiny_model(), "prompts": PROMPTS, "extra": _l2_extra(redis)}, workdir
    )


@pytest.fixture(scope="module")
def engine_b(redis: RedisServer, engine_a: Any) -> Iterator[Any]:
    llm = make_llm(tiny_model(), kv_transfer_config=connector_config(_l2_extra(redis)))
    yield llm
    shutdown(llm)


def test_engine_a_writes_every_full_block_to_redis(
    engine_a: dict[str, Any], redis: RedisServer
) -> None:
    full_blocks = sum(len(p) // BLOCK for p in PROMPTS)
    # Full prompt blocks (plus any decode blocks) of one rank (TP=1).
    assert redis.client().dbsize() >= full_blocks


def test_engine_b_loads_from_l2_and_matches_baseline(
    engine_b: Any, baseline: dict[tuple[int, ...], Completion]
) -> None:
    outs = generate(engine_b, SHARED)
    for p, o in zip(SHARED, outs, strict=True):
        assert o.num_cached_tokens == (len(p) - 1) // BLOCK * BLOCK
        assert same_output(o, baseline[tuple(p)])
    sched = scheduler_half(engine_b)
    sched.take_counters()
    assert sched.totals.get("hit_tokens_l2", 0) > 0
    assert sched.totals.get("hit_tokens_l1", 0) == 0


def test_corrupted_l2_values_are_recomputed_and_counted(
    engine_b: Any, redis: RedisServer, baseline: dict[tuple[int, ...], Completion]
) -> None:
    client = redis.client()
    for key in client.scan_iter():
        value = bytearray(client.get(key))
        value[-1] ^= 0xFF  # last payload byte: the checksum must catch it
        client.set(key, bytes(value))
    sched = scheduler_half(engine_b)
    sched.take_counters()
    failures = sched.totals.get("load_failures", 0)
    outs = generate(engine_b, CORRUPTED)
    assert same_output(outs[0], baseline[tuple(CORRUPTED[0])])
    sched.take_counters()
    assert sched.totals.get("load_failures", 0) > failures
    assert sched.l2.stats.corrupt == 0  # the scheduler's store only checks existence
    assert sched.pool_state()["slots_pinned"] == 0
    assert sched.pool_state()["pending_keys"] == 0
