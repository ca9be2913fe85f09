"""Our eviction policies give exactly libCacheSim's miss counts.

Both sides see the same request sequence of unit-size objects; ours is driven
through :meth:`EvictionPolicy.access`, libCacheSim's through ``Cache.get``.
Equality is exact (miss counts), not approximate.

S3FIFO: libCacheSim ships two variants. ``S3FIFOv0`` is the SOSP'23 algorithm
(our default); ``S3FIFO`` (2024) additionally sends new keys to main while the
small queue is full before the first eviction (our ``warmup_to_main=True``).
libCacheSim sizes the ghost queue as ``ghost_size_ratio * cache_size``; the
paper (and we) size it as main's capacity, so the ratio is configured to give
exactly ``capacity - int(capacity * small_ratio)`` entries.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

lcs = pytest.importorskip("libcachesim")
from libcachesim.libcachesim_python import (  # noqa: E402
    CommonCacheParams,
    Request,
    S3FIFOv0_init,
)

from vllm_aibrix.core.policy import resolve_policy  # noqa: E402

# shared/ lies beside the checkout (CI clones elsewhere and copies it there too).
MOONCAKE = (
    Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
)

ZIPF_REQUESTS = 1_000_000
ZIPF_OBJECTS = 100_000
SMALL_RATIO = 0.1
_TTL = 86400 * 300
_HASHPOWER = 20  # 1M buckets: plenty for 100k-200k distinct ids, and fast to allocate


@pytest.fixture(scope="module")
def zipf_trace() -> list[int]:
    """1e6 requests over 1e5 objects, P(rank k) proportional to 1/k (Zipf alpha=1.0)."""
    rng = np.random.default_rng(20240601)
    weights = 1.0 / np.arange(1, ZIPF_OBJECTS + 1)
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(ZIPF_REQUESTS), side="right")
    # Scatter ranks over ids so popularity is not correlated with id order.
    ids = rng.permutation(ZIPF_OBJECTS)
    return [int(x) for x in ids[np.minimum(ranks, ZIPF_OBJECTS - 1)]]


@pytest.fixture(scope="module")
def mooncake_trace() -> list[int]:
    """Every hash_id of every request of the Mooncake conversation trace, in order."""
    if not MOONCAKE.exists():
        pytest.fail(f"{MOONCAKE} is missing: the exactness tests need ../shared/traces/")
    ids: list[int] = []
    with MOONCAKE.open() as f:
        for line in f:
            ids.extend(json.loads(line)["hash_ids"])
    return ids


def _params(capacity: int) -> CommonCacheParams:
    return CommonCacheParams(
        cache_size=capacity, default_ttl=_TTL, hashpower=_HASHPOWER, consider_obj_metadata=False
    )


def _ghost_ratio(capacity: int) -> float:
    """A ratio for which libCacheSim's int(capacity * ratio) is main's capacity."""
    main = capacity - int(capacity * SMALL_RATIO)
    return (main + 0.5) / capacity


def _s3fifo_v0(capacity: int) -> Any:
    spec = (
        f"small-size-ratio={SMALL_RATIO}, ghost-size-ratio={_ghost_ratio(capacity)}, "
        "move-to-main-threshold=2"
    )
    return lcs.CacheBase(S3FIFOv0_init(_params(capacity), spec))


def _s3fifo_2024(capacity: int) -> Any:
    return lcs.S3FIFO(
        capacity,
        hashpower=_HASHPOWER,
        small_size_ratio=SMALL_RATIO,
        ghost_size_ratio=_ghost_ratio(capacity),
        move_to_main_threshold=2,
    )


# our policy name + constructor parameters -> libCacheSim cache factory
CASES: dict[str, tuple[str, dict[str, Any], Callable[[int], Any]]] = {
    "LRU": ("LRU", {}, lambda c: lcs.LRU(c, hashpower=_HASHPOWER)),
    "FIFO": ("FIFO", {}, lambda c: lcs.FIFO(c, hashpower=_HASHPOWER)),
    "SIEVE": ("SIEVE", {}, lambda c: lcs.Sieve(c, hashpower=_HASHPOWER)),
    "S3FIFO": ("S3FIFO", {"small_ratio": SMALL_RATIO}, _s3fifo_v0),
    "S3FIFO-2024": (
        "S3FIFO",
        {"small_ratio": SMALL_RATIO, "warmup_to_main": True},
        _s3fifo_2024,
    ),
}


def our_misses(policy: str, params: dict[str, Any], capacity: int, trace: list[int]) -> int:
    access = resolve_policy(policy)(capacity, **params).access
    return sum(1 for key in trace if not access(key))


def libcachesim_misses(cache: Any, trace: list[int]) -> int:
    req = Request()
    req.obj_size = 1
    get = cache.get
    misses = 0
    for key in trace:
        req.obj_id = key
        if not get(req):
            misses += 1
    return misses


@pytest.mark.parametrize("capacity", [1_000, 10_000])
@pytest.mark.parametrize("case", list(CASES))
def test_miss_count_equals_libcachesim_on_zipf(
    case: str, capacity: int, zipf_trace: list[int]
) -> None:
    policy, params, make = CASES[case]
    expected = libcachesim_misses(make(capacity), zipf_trace)
    assert our_misses(policy, params, capacity, zipf_trace) == expected


@pytest.mark.parametrize("capacity", [1_800, 18_000])  # ~1% and ~10% of 182,790 distinct ids
@pytest.mark.parametrize("case", list(CASES))
def test_miss_count_equals_libcachesim_on_mooncake(
    case: str, capacity: int, mooncake_trace: list[int]
) -> None:
    policy, params, make = CASES[case]
    expected = libcachesim_misses(make(capacity), mooncake_trace)
    assert our_misses(policy, params, capacity, mooncake_trace) == expected


def test_the_two_traces_make_the_policies_disagree(
    zipf_trace: list[int], mooncake_trace: list[int]
) -> None:
    """Guards the comparison's power: identical numbers for all policies would prove nothing."""
    for trace, capacity in ((zipf_trace, 1_000), (mooncake_trace, 18_000)):
        counts = {our_misses(p, kw, capacity, trace) for p, kw, _ in CASES.values()}
        assert len(counts) == len(CASES)
