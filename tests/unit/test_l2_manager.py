"""KVCacheManager with an L2 tier (in-memory backend shared like a remote store)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Namespace, rank_key
from vllm_aibrix.core.l2.memory import MemoryBackend
from vllm_aibrix.core.manager import KVCacheManager

BT = 4  # tokens per block
BB = 256  # bytes per block
NS = Namespace(model="tiny", block_size=BT)


def cfg(ingestion: str, policy: str = "LRU", **kw) -> CacheConfig:
    return CacheConfig(
        l2_cache_backend="MEMORY",
        l2_cache_ingestion_type=ingestion,
        l1_cache_eviction_policy=policy,
        l2_cache_op_timeout_ms=500,
        **kw,
    )


def tokens(n_blocks: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n_blocks * BT)


def kv(n_blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_blocks, BB), dtype=torch.uint8, generator=g)


def manager(ingestion: str, backend: MemoryBackend, slots: int = 64, **kw) -> KVCacheManager:
    return KVCacheManager(cfg(ingestion, **kw), NS, BB, num_slots=slots, l2_backend=backend)


def in_l2(m: KVCacheManager, backend: MemoryBackend, toks: np.ndarray) -> list[bool]:
    m.flush(5)
    return backend.exists([rank_key(k, 0) for k in m.keys_for(toks)])


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


def test_all_writes_every_inserted_block(backend: MemoryBackend) -> None:
    m = manager("ALL", backend)
    t = tokens(6, 1)
    m.put(t, kv(6, 1))
    assert all(in_l2(m, backend, t))
    m.close()


def test_second_engine_finds_and_loads_the_prefix_from_l2(backend: MemoryBackend) -> None:
    a, b = manager("ALL", backend), manager("ALL", backend)
    t, data = tokens(6, 2), kv(6, 2)
    a.put(t, data)
    a.flush(5)
    assert b.lookup(t) == 6 * BT
    out = torch.zeros(6, BB, dtype=torch.uint8)
    assert b.get(t, out) == 6 * BT
    assert torch.equal(out, data)
    a.close()
    b.close()


def test_l2_hits_are_promoted_into_l1(backend: MemoryBackend) -> None:
    a, b = manager("ALL", backend), manager("ALL", backend)
    t = tokens(3, 3)
    a.put(t, kv(3, 3))
    a.flush(5)
    b.get(t, torch.zeros(3, BB, dtype=torch.uint8))
    assert b.l1.prefix_length(b.keys_for(t)) == 3
    a.close()
    b.close()


def test_lookup_continues_into_l2_where_l1_ends(backend: MemoryBackend) -> None:
    a = manager("ALL", backend)
    t, data = tokens(6, 4), kv(6, 4)
    a.put(t, data)
    a.flush(5)
    b = manager("ALL", backend)
    b.put(t[: 2 * BT], data[:2])  # L1 holds the first 2 blocks
    b.flush(5)
    assert b.lookup(t) == 6 * BT
    out = torch.zeros(6, BB, dtype=torch.uint8)
    assert b.get(t, out) == 6 * BT
    assert torch.equal(out, data)
    a.close()
    b.close()


def test_get_returns_only_the_intact_contiguous_prefix(backend: MemoryBackend) -> None:
    a = manager("ALL", backend)
    t, data = tokens(5, 5), kv(5, 5)
    a.put(t, data)
    a.flush(5)
    backend.raw_set(rank_key(a.keys_for(t)[3], 0), b"corrupt")
    b = manager("ALL", backend)
    out = torch.zeros(5, BB, dtype=torch.uint8)
    assert b.get(t, out) == 3 * BT
    assert torch.equal(out[:3], data[:3])
    assert (out[3:] == 0).all()
    assert b.l2 is not None and b.l2.stats.corrupt == 1
    a.close()
    b.close()


def test_hot_writes_only_blocks_accessed_again(backend: MemoryBackend) -> None:
    m = manager("HOT", backend)
    t1, t2 = tokens(3, 6), tokens(3, 7)
    m.put(t1, kv(3, 6))
    m.put(t2, kv(3, 7))
    assert not any(in_l2(m, backend, t1))
    m.get(t1, torch.zeros(3, BB, dtype=torch.uint8))  # second access: LRU calls it hot
    assert all(in_l2(m, backend, t1))
    assert not any(in_l2(m, backend, t2))
    m.close()


def test_evicted_writes_blocks_leaving_l1_with_their_bytes(backend: MemoryBackend) -> None:
    m = manager("EVICTED", backend, slots=4)
    t1, d1 = tokens(4, 8), kv(4, 8)
    m.put(t1, d1)
    assert not any(in_l2(m, backend, t1))
    m.put(tokens(4, 9), kv(4, 9))  # pushes every block of t1 out of L1
    assert all(in_l2(m, backend, t1))
    other = manager("EVICTED", MemoryBackend())
    other.close()
    out = torch.zeros(4, BB, dtype=torch.uint8)
    assert m.get(t1, out) == 4 * BT
    assert torch.equal(out, d1)
    m.close()


def test_hot_event_during_insert_writes_the_new_bytes(backend: MemoryBackend) -> None:
    # S3FIFO readmits a key its ghost queue remembers straight into main and
    # calls it hot *inside* insert, before the manager copied the bytes in.
    m = manager("HOT", backend, slots=10, policy="S3FIFO")
    t, d = tokens(1, 10), kv(1, 10)
    m.put(t, d)
    seed = 11
    while m.l1.prefix_length(m.keys_for(t)):  # one-hit wonders push t out (into the ghost)
        m.put(tokens(1, seed), kv(1, seed))
        seed += 1
    assert not any(in_l2(m, backend, t))
    fresh = kv(1, 99)
    m.put(t, fresh)  # ghost hit -> hot during insert, before the copy
    assert all(in_l2(m, backend, t))
    probe = manager("HOT", backend)
    out = torch.zeros(1, BB, dtype=torch.uint8)
    assert probe.l2 is not None
    assert probe.l2.get_blocks(m.keys_for(t), 0, [out[0]]) == 1
    assert torch.equal(out, fresh)
    m.close()
    probe.close()


def test_l2_only_mode_puts_and_gets_through_l2(backend: MemoryBackend) -> None:
    m = manager("ALL", backend, l1_cache_enabled=False)
    t, data = tokens(3, 11), kv(3, 11)
    assert m.put(t, data) == 3
    m.flush(5)
    out = torch.zeros(3, BB, dtype=torch.uint8)
    assert m.get(t, out) == 3 * BT
    assert torch.equal(out, data)
    m.close()


def test_manager_without_l2_has_no_store() -> None:
    m = KVCacheManager(CacheConfig(), NS, BB, num_slots=4)
    assert m.l2 is None
    t = tokens(2, 12)
    m.put(t, kv(2, 12))
    assert m.lookup(t) == 2 * BT
    m.close()
