"""Behaviour of vLLM's BlockPool with the eviction-listener patch (patch 0001).

The installed ``vllm/v1/core/block_pool.py`` is copied to a temp dir, patched
there with scripts/apply_patches.sh and loaded under another module name; it
imports the rest of vLLM normally. The installed vLLM is never patched.

In a process whose ``vllm`` is another release's overlay (see overlay.py),
"installed" means that release: test_overlay_033.py runs this module that way
for 0.33.0.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from vllm import SamplingParams
from vllm.distributed.kv_events import BlockRemoved
from vllm.utils.hashing import sha256
from vllm.v1.core import block_pool as stock_module
from vllm.v1.core.kv_cache_utils import (
    BlockHashWithGroupId,
    KVCacheBlock,
    get_block_hash,
    get_group_id,
    get_request_block_hasher,
    init_none_hash,
    make_block_hash_with_group_id,
    maybe_convert_block_hash,
)
from vllm.v1.request import Request

from tests.upstream.conftest import installed_version, run_apply
from vllm_aibrix.vllm import patch_support

BLOCK_SIZE = 4
NUM_BLOCKS = 9  # block 0 is vLLM's null block: 8 usable


@pytest.fixture(scope="module")
def patched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The patched block_pool module (loaded as ``aibrix_patched_block_pool``)."""
    source = Path(stock_module.__file__ or "")
    version = installed_version()
    root = tmp_path_factory.mktemp("patched-block-pool")
    dest = root / "vllm" / "v1" / "core" / "block_pool.py"
    dest.parent.mkdir(parents=True)
    shutil.copy2(source, dest)
    proc = run_apply("--target", root, "--version", version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = "aibrix_patched_block_pool"
    spec = importlib.util.spec_from_file_location(name, dest)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and typing look the module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


class Recorder:
    """A listener that records its calls and checks they come before reuse."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.pool: Any = None
        # Block ids the caller of get_new_blocks has already received.
        self.handed_out: set[int] = set()

    def on_cached_blocks_evicted(
        self, block_ids: list[int], block_hashes: list[BlockHashWithGroupId]
    ) -> None:
        assert len(block_ids) == len(block_hashes)
        for block_id, key in zip(block_ids, block_hashes, strict=True):
            # Before reuse: the caller does not have the block yet, and the
            # pool no longer serves this block under that key (another block
            # may, vLLM does not de-duplicate), so no new request can hit it.
            assert block_id not in self.handed_out
            assert self.pool.blocks[block_id].block_hash is None
            assert not self.pool.cached_block_hash_to_block.contain(key, block_id)
            assert 0 <= get_group_id(key) < 1
        self.calls.append(("evicted", list(zip(block_ids, block_hashes, strict=True))))

    def on_prefix_cache_cleared(self) -> None:
        self.calls.append(("cleared", None))

    def take(self) -> list[tuple[str, Any]]:
        calls, self.calls = self.calls, []
        return calls


def _request(req_id: str, tokens: list[int]) -> Request:
    init_none_hash(sha256)
    return Request(
        request_id=req_id,
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(max_tokens=1),
        pooling_params=None,
        block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
    )


def _pool(module: ModuleType, events: bool = True, caching: bool = True) -> Any:
    return module.BlockPool(
        num_gpu_blocks=NUM_BLOCKS,
        enable_caching=caching,
        hash_block_size=BLOCK_SIZE,
        enable_kv_cache_events=events,
    )


def _alloc(pool: Any, rec: Recorder | None, n: int) -> list[KVCacheBlock]:
    blocks: list[KVCacheBlock] = pool.get_new_blocks(n)
    if rec is not None:
        rec.handed_out.update(b.block_id for b in blocks)
    return blocks


def _cache(pool: Any, req: Request, blocks: list[KVCacheBlock]) -> None:
    n = len(req.block_hashes)
    pool.cache_full_blocks(req, blocks, 0, n, BLOCK_SIZE, 0)


def _free(pool: Any, rec: Recorder | None, blocks: list[KVCacheBlock]) -> None:
    # As the scheduler frees a request: tail first, so it is evicted first.
    pool.free_blocks(reversed(blocks))
    if rec is not None:
        rec.handed_out.difference_update(b.block_id for b in blocks)


def _key(req: Request, i: int) -> bytes:
    return make_block_hash_with_group_id(req.block_hashes[i], 0)


def test_marker_and_patch_support(patched: ModuleType) -> None:
    assert patched.KV_EVICTION_LISTENER_VERSION == patch_support.KV_EVICTION_LISTENER_VERSION
    assert hasattr(patched.BlockPool, "set_kv_eviction_listener")
    # The connector's listener type (what mypy checks it against) fits the pool.
    listener: patch_support.KVEvictionListener = Recorder()
    _pool(patched).set_kv_eviction_listener(listener)


def test_get_new_blocks_reports_evicted_blocks_once_before_reuse(patched: ModuleType) -> None:
    pool = _pool(patched)
    rec = Recorder()
    rec.pool = pool
    pool.set_kv_eviction_listener(rec)

    req = _request("a", list(range(16)))  # 4 full blocks
    assert len(req.block_hashes) == 4
    a = _alloc(pool, rec, 4)
    _cache(pool, req, a)
    assert rec.take() == []  # fresh blocks had no hash: nothing evicted
    _free(pool, rec, a)
    pool.take_events()

    # 4 never-used blocks come first, then a's tail (freed first): 6 blocks
    # evict a's last two blocks, in one call.
    b = _alloc(pool, rec, 6)
    calls = rec.take()
    assert calls == [("evicted", [(a[3].block_id, _key(req, 3)), (a[2].block_id, _key(req, 2))])]
    assert {a[3].block_id, a[2].block_id} <= {blk.block_id for blk in b}
    # The listener saw exactly what vLLM's own BlockRemoved events report.
    removed = [h for ev in pool.take_events() for h in ev.block_hashes]
    assert removed == [maybe_convert_block_hash(get_block_hash(key)) for _, key in calls[0][1]]
    # a's head is still cached and hits.
    assert pool.get_cached_block(req.block_hashes[0], [0]) == [a[0]]

    # Allocating uncached blocks reports nothing.
    _free(pool, rec, b)
    assert rec.take() == []


def test_evict_blocks_and_direct_evictions(patched: ModuleType) -> None:
    pool = _pool(patched, events=False)
    rec = Recorder()
    rec.pool = pool
    pool.set_kv_eviction_listener(rec)
    req = _request("a", list(range(100, 116)))
    a = _alloc(pool, rec, 4)
    _cache(pool, req, a)
    _free(pool, rec, a)

    # The scheduler's evict_blocks (invalid blocks from a failed load): one
    # call for the set; an uncached id is ignored.
    uncached = next(i for i in range(1, NUM_BLOCKS) if i not in {blk.block_id for blk in a})
    pool.evict_blocks({a[0].block_id, a[1].block_id, uncached})
    calls = rec.take()
    assert len(calls) == 1 and calls[0][0] == "evicted"
    assert sorted(calls[0][1]) == sorted(
        [(a[0].block_id, _key(req, 0)), (a[1].block_id, _key(req, 1))]
    )
    pool.evict_blocks({a[0].block_id})  # already evicted: no call
    assert rec.take() == []

    # A direct call (the Mamba manager's path) reports that block at once.
    assert pool._maybe_evict_cached_block(a[2]) is True
    assert rec.take() == [("evicted", [(a[2].block_id, _key(req, 2))])]


def test_reset_prefix_cache_reports_clear_only_when_it_succeeds(patched: ModuleType) -> None:
    pool = _pool(patched)
    rec = Recorder()
    rec.pool = pool
    pool.set_kv_eviction_listener(rec)
    req = _request("a", list(range(200, 208)))
    a = _alloc(pool, rec, 2)
    _cache(pool, req, a)
    assert pool.reset_prefix_cache() is False  # blocks in use: refused
    assert rec.take() == []
    _free(pool, rec, a)
    assert pool.reset_prefix_cache() is True
    assert rec.take() == [("cleared", None)]
    # Nothing is cached any more, so reusing the blocks evicts nothing.
    _alloc(pool, rec, NUM_BLOCKS - 1)
    assert rec.take() == []


def test_listener_removed_and_caching_off(patched: ModuleType) -> None:
    rec = Recorder()
    pool = _pool(patched)
    rec.pool = pool
    pool.set_kv_eviction_listener(rec)
    pool.set_kv_eviction_listener(None)
    req = _request("a", list(range(8)))
    a = _alloc(pool, None, 2)
    _cache(pool, req, a)
    _free(pool, None, a)
    _alloc(pool, None, NUM_BLOCKS - 1)
    assert pool.reset_prefix_cache() is False
    assert rec.take() == []

    off = _pool(patched, caching=False)
    off.set_kv_eviction_listener(rec)
    blocks = _alloc(off, None, 3)
    off.free_blocks(blocks)
    _alloc(off, None, NUM_BLOCKS - 1)
    assert rec.take() == []


def _random_op(pool: Any, live: list[list[KVCacheBlock]], step: int, rng: random.Random) -> Any:
    # Everything random is drawn before touching the pool, from a per-step
    # seed, so the stock and the patched pool get the very same operation.
    op = rng.random()
    n = rng.randint(1, 3)
    tokens = [rng.randrange(3) for _ in range(n * BLOCK_SIZE)]  # few values: many repeats
    victim = rng.random()
    evict_id = rng.randrange(1, NUM_BLOCKS)
    req = _request(f"r{step}", tokens)
    if op < 0.5 and pool.get_num_free_blocks() >= n:
        hit = pool.get_cached_block(req.block_hashes[0], [0])
        blocks = pool.get_new_blocks(n)
        _cache(pool, req, blocks)
        live.append(blocks)
        outcome: Any = ("alloc", hit and hit[0].block_id, [b.block_id for b in blocks])
    elif op < 0.85 and live:
        blocks = live.pop(int(victim * len(live)))
        pool.free_blocks(reversed(blocks))
        outcome = ("free", [b.block_id for b in blocks])
    elif op < 0.9:
        pool.evict_blocks({evict_id})
        outcome = ("evict", evict_id)
    elif op < 0.93:
        outcome = ("reset", pool.reset_prefix_cache())
    else:
        outcome = ("noop",)
    return outcome, pool.take_events()


@pytest.mark.parametrize("with_listener", [False, True])
def test_same_behaviour_as_stock(patched: ModuleType, with_listener: bool) -> None:
    # A random sequence of the pool operations the scheduler uses, run on the
    # stock and on the patched pool: same block ids handed out, same hits,
    # same KV events. With a listener, it saw exactly the BlockRemoved events.
    pools = [_pool(stock_module), _pool(patched)]
    rec = Recorder()
    rec.pool = pools[1]
    if with_listener:
        pools[1].set_kv_eviction_listener(rec)
    live: list[list[list[KVCacheBlock]]] = [[], []]
    removed: list[Any] = []  # event hashes: bytes or ints (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
    resets = 0
    for step in range(400):
        results = [
            _random_op(pool, live[side], step, random.Random(step))
            for side, pool in enumerate(pools)
        ]
        assert repr(results[0]) == repr(results[1]), f"step {step}"
        outcome, events = results[1]
        removed.extend(h for ev in events if isinstance(ev, BlockRemoved) for h in ev.block_hashes)
        resets += outcome == ("reset", True)
    if with_listener:
        reported = [
            maybe_convert_block_hash(get_block_hash(key))
            for kind, pairs in rec.calls
            if kind == "evicted"
            for _, key in pairs
        ]
        assert reported == removed
        assert len(removed) > 20, "the workload hardly evicted cached blocks"
        assert [kind for kind, _ in rec.calls if kind == "cleared"] == ["cleared"] * resets
        assert resets > 0, "the workload never reset the prefix cache"
    else:
        assert rec.calls == []
