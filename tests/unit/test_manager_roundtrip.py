"""KVCacheManager (L1 only): put / lookup / get round trip."""

from __future__ import annotations

import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Namespace
from vllm_aibrix.core.manager import KVCacheManager, copy_rows

BLOCK = 4
BYTES = 96


def make(num_slots: int = 16, policy: str = "LRU") -> KVCacheManager:
    cfg = CacheConfig(l1_cache_eviction_policy=policy)
    return KVCacheManager(cfg, Namespace(model="m", block_size=BLOCK), BYTES, num_slots=num_slots)


def kv_for(n_blocks: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n_blocks, BYTES), dtype=torch.uint8, generator=g)


def test_put_then_get_returns_the_same_bytes() -> None:
    m = make()
    tokens = list(range(40))
    kv = kv_for(10, 1)
    assert m.put(tokens, kv) == 10
    out = torch.zeros_like(kv)
    assert m.get(tokens, out) == 40
    assert torch.equal(out, kv)


def test_lookup_counts_whole_cached_blocks_of_the_prefix() -> None:
    m = make()
    m.put(list(range(40)), kv_for(10, 1))
    assert m.lookup(list(range(22))) == 20  # 5 full blocks, the partial one does not count
    assert m.lookup(list(range(12)) + [999] * 20) == 12
    assert m.lookup([5] * 40) == 0


def test_shared_prefix_loads_only_the_common_blocks() -> None:
    m = make()
    kv = kv_for(10, 2)
    m.put(list(range(40)), kv)
    other = list(range(16)) + [7] * 24
    out = torch.zeros_like(kv)
    assert m.get(other, out) == 16
    assert torch.equal(out[:4], kv[:4])


def test_second_put_of_the_same_tokens_stores_nothing_new() -> None:
    m = make()
    m.put(list(range(40)), kv_for(10, 3))
    assert m.put(list(range(40)), kv_for(10, 4)) == 0


def test_full_l1_stores_only_what_fits_and_keeps_it_correct() -> None:
    m = make(num_slots=6)
    kv = kv_for(10, 5)
    assert m.put(list(range(40)), kv) == 6
    out = torch.zeros_like(kv)
    assert m.get(list(range(40)), out) == 24
    assert torch.equal(out[:6], kv[:6])


def test_get_stops_at_the_out_tensor_size() -> None:
    m = make()
    kv = kv_for(10, 6)
    m.put(list(range(40)), kv)
    out = torch.zeros((3, BYTES), dtype=torch.uint8)
    assert m.get(list(range(40)), out) == 12
    assert torch.equal(out, kv[:3])


def test_get_leaves_no_slot_pinned() -> None:
    m = make()
    m.put(list(range(40)), kv_for(10, 7))
    m.get(list(range(40)), torch.zeros((10, BYTES), dtype=torch.uint8))
    assert m.l1.allocator.num_pinned == 0


def test_copy_rows_matches_a_row_by_row_copy_for_any_row_order() -> None:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (12, 64), dtype=torch.uint8, generator=g)
    dst_rows = [3, 4, 5, 0, 9, 10, 1]
    src_rows = [0, 1, 2, 7, 8, 9, 11]
    got = torch.zeros((12, 64), dtype=torch.uint8)
    copy_rows(got, dst_rows, src, src_rows)
    want = torch.zeros((12, 64), dtype=torch.uint8)
    for d, s in zip(dst_rows, src_rows, strict=True):
        want[d] = src[s]
    assert torch.equal(got, want)
