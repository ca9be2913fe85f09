"""L1 store/load bandwidth of :class:`KVCacheManager` vs a plain torch copy.

For each block size, ``--total-mib`` of KV is ``put`` into (store) and ``get``
from (load) a manager whose L1 holds exactly that many blocks; in the same
run a single ``torch.Tensor.copy_`` of the same number of bytes between two
preallocated tensors is the reference. ``ratio = manager GB/s / copy GB/s``.

Two slot layouts are measured: ``fresh`` (an empty pool hands out
consecutive slots, so a request's blocks are adjacent) and ``scattered``
(slots assigned in random order, the state of a pool after churn). The store
includes hashing and indexing (the whole ``put``): each timed store starts
from an empty index, whose ``clear`` is not timed.
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from vllm_aibrix.bench._common import add_output_args, best_of, machine
from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Namespace
from vllm_aibrix.core.manager import KVCacheManager

KIB = 1024
DEFAULT_BLOCK_KIB = (64, 256, 1024, 4096)
BLOCK_TOKENS = 16


def _scatter_free_list(manager: KVCacheManager, seed: int) -> None:
    """Make the allocator hand out slots in a random order (as after churn)."""
    alloc = manager.l1.allocator
    free = list(alloc._free)  # the allocator's free stack; bench-only peek
    random.Random(seed).shuffle(free)
    alloc._free[:] = free


def measure(block_bytes: int, total_bytes: int, layout: str, repeats: int) -> dict[str, Any]:
    """One row: store/load GB/s of the manager and of the reference copy."""
    n = max(1, total_bytes // block_bytes)
    nbytes = n * block_bytes
    ns = Namespace(model="bench", block_size=BLOCK_TOKENS)
    cfg = CacheConfig(l1_cache_eviction_policy="LRU")
    mgr = KVCacheManager(cfg, ns, block_bytes, num_slots=n)
    tokens = list(range(n * BLOCK_TOKENS))
    src = torch.randint(0, 256, (n, block_bytes), dtype=torch.uint8)
    out = torch.zeros((n, block_bytes), dtype=torch.uint8)
    mgr.buffer.tensor.fill_(0)  # commit the pages before timing

    def store() -> float:
        mgr.l1.clear()
        if layout == "scattered":
            _scatter_free_list(mgr, seed=len(mgr.l1.allocator._free))
        t0 = time.perf_counter()
        assert mgr.put(tokens, src) == n
        return time.perf_counter() - t0

    store()
    store_s = min(store() for _ in range(repeats))
    load_s = best_of(lambda: mgr.get(tokens, out), repeats)
    assert torch.equal(out, src), "round trip corrupted the bytes"
    ref_s = best_of(lambda: out.copy_(src), repeats)
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    return {
        "block_kib": block_bytes // KIB,
        "layout": layout,
        "blocks": n,
        "bytes": nbytes,
        "store_gbps": gbs(store_s),
        "load_gbps": gbs(load_s),
        "torch_copy_gbps": gbs(ref_s),
        "store_ratio": ref_s / store_s,
        "load_ratio": ref_s / load_s,
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [
        measure(kib * KIB, args.total_mib << 20, layout, args.repeats)
        for layout in args.layouts
        for kib in args.block_kib
    ]
    return {
        "benchmark": "l1-bandwidth",
        "total_mib": args.total_mib,
        "repeats": args.repeats,
        "machine": machine(),
        "results": rows,
    }


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``l1-bandwidth`` subcommand."""
    p = subparsers.add_parser("l1-bandwidth", help="KVCacheManager put/get vs torch copy")
    p.add_argument("--block-kib", nargs="+", type=int, default=list(DEFAULT_BLOCK_KIB))
    p.add_argument("--total-mib", type=int, default=256, help="bytes moved per timed operation")
    p.add_argument("--layouts", nargs="+", default=["fresh", "scattered"])
    p.add_argument("--repeats", type=int, default=5, help="best of this many timed runs")
    add_output_args(p)
    p.set_defaults(func=_run)
