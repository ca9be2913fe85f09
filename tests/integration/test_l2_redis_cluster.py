"""L2 on a real 3-master Redis Cluster: keys of one request span slots and nodes."""

from __future__ import annotations

import os

import pytest
import torch
from redis.cluster import key_slot

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import rank_key
from vllm_aibrix.core.l2.redis import RedisBackend
from vllm_aibrix.core.l2.store import L2Store

pytestmark = pytest.mark.integration

NS = b"C" * 16


def cfg(url: str) -> CacheConfig:
    return CacheConfig(
        l2_cache_backend="REDIS", redis_url=url, redis_cluster=True, l2_cache_op_timeout_ms=3000
    )


@pytest.fixture(scope="module")
def store(redis_cluster):
    s = L2Store(cfg(redis_cluster.url), NS)
    assert s.available
    yield s
    s.close()


def test_one_request_spans_several_nodes() -> None:
    ks = [rank_key(os.urandom(16), 0) for _ in range(64)]
    slots = {key_slot(k) for k in ks}
    # 3 masters own 3 slot ranges; 64 random keys land in more than one of them.
    assert len({s * 3 // 16384 for s in slots}) > 1


def test_batch_roundtrip_across_slots(store: L2Store) -> None:
    ks = [os.urandom(16) for _ in range(64)]
    src = [torch.randint(0, 256, (8192,), dtype=torch.uint8) for _ in ks]
    store.put_blocks(ks, 0, src)
    dst = [torch.zeros(8192, dtype=torch.uint8) for _ in ks]
    assert store.get_blocks(ks, 0, dst) == 64
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))


def test_values_really_live_on_different_nodes(store: L2Store, redis_cluster) -> None:
    ks = [os.urandom(16) for _ in range(32)]
    store.put_blocks(ks, 0, [torch.zeros(64, dtype=torch.uint8) for _ in ks])
    per_node = [n.client().dbsize() for n in redis_cluster.nodes]
    assert sum(1 for c in per_node if c > 0) >= 2


def test_exists_prefix_across_slots_and_ranks(store: L2Store) -> None:
    ks = [os.urandom(16) for _ in range(20)]
    store.put_blocks(ks, 0, [torch.zeros(64, dtype=torch.uint8) for _ in ks])
    store.put_blocks(ks[:12], 1, [torch.zeros(64, dtype=torch.uint8) for _ in ks[:12]])
    assert store.exists_prefix(ks, ranks=(0,)) == 20
    assert store.exists_prefix(ks, ranks=(0, 1)) == 12


def test_async_ingestion_into_cluster(store: L2Store) -> None:
    ks = [os.urandom(16) for _ in range(48)]
    assert store.submit_put(ks, 0, [torch.ones(1024, dtype=torch.uint8) for _ in ks]) == 48
    assert store.flush(10)
    assert store.exists_prefix(ks) == 48


def test_delete_across_slots(store: L2Store) -> None:
    ks = [os.urandom(16) for _ in range(16)]
    store.put_blocks(ks, 0, [torch.zeros(64, dtype=torch.uint8) for _ in ks])
    store.delete(ks)
    assert store.exists_prefix(ks) == 0
    assert not any(store.backend.exists([rank_key(k, 0) for k in ks]))  # type: ignore[union-attr]


def test_backend_reports_cluster_mode(redis_cluster) -> None:
    b = RedisBackend(cfg(redis_cluster.url))
    try:
        assert b.cluster and b.ping()
    finally:
        b.close()
