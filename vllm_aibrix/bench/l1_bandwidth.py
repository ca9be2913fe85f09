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

``--suite kv-copy`` (part of ``all``, the default) measures the engine side:
:class:`~vllm_aibrix.vllm.copy.KVLayout` ``gather`` (store) and ``scatter``
(load) between engine KV tensors and slot rows, against one copy of the
same number of bytes between two contiguous buffers, timed interleaved in the
same loop so that both see the same machine load. Two engine layouts:
``cpu`` is vLLM's CPU backend (per-layer ``[num_blocks, H, block, 2*D]``
views of one allocation, what vLLM 0.32 hands a connector on the CPU) and
``cuda-like`` the older FlashAttention layout ``[2, num_blocks, block, H, D]``
per layer (K and V of a block apart), views of one allocation as well.
``cuda-like-per-layer`` (not in the default grid) allocates each layer
separately, as vLLM before 0.32 did: layers then cannot be moved together and
every layer costs a copy call per run. ``consecutive`` calls copy consecutive
blocks into consecutive slots, ``scattered`` ones random blocks into random
slots. The reference is a plain memcpy of the same bytes (numpy ``copyto``,
single-threaded, like the copies it is compared with); a ``Tensor.copy_``
(split over torch's threads) is timed too, for information. Calls cycle
through enough disjoint blocks and slots that the data is not cache-resident.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import numpy as np
import torch

from vllm_aibrix.bench._common import add_output_args, best_of, machine
from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Namespace
from vllm_aibrix.core.manager import KVCacheManager
from vllm_aibrix.vllm.copy import KVLayout

KIB = 1024
DEFAULT_BLOCK_KIB = (64, 256, 1024, 4096)
BLOCK_TOKENS = 16
COLD_BYTES = 64 << 20  # kv-copy: data touched between two calls on the same bytes


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


def _kv_tensors(
    engine: str, num_blocks: int, block_tokens: int, layers: int, heads: int, head_size: int
) -> dict[str, torch.Tensor]:
    """Engine KV tensors (bf16, random bytes) of one of the benchmarked layouts."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16).view(torch.bfloat16)

    if engine == "cpu":
        buf = rand(layers, num_blocks, heads, block_tokens, 2 * head_size)
        return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}
    if engine == "cuda-like":
        buf = rand(layers, 2, num_blocks, block_tokens, heads, head_size)
        return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}
    if engine == "cuda-like-per-layer":
        return {
            f"model.layers.{i}.self_attn.attn": rand(2, num_blocks, block_tokens, heads, head_size)
            for i in range(layers)
        }
    raise ValueError(f"unknown engine layout {engine!r}")


def measure_kv_copy(
    engine: str, block_tokens: int, n: int, pattern: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: KVLayout gather/scatter of ``n`` blocks vs a memcpy of the same bytes.

    Successive calls cycle through ``patterns`` disjoint sets of blocks and
    slots (and the reference through as many disjoint ranges), so that every
    call moves at least ``COLD_BYTES`` away from the last one's data: what is
    measured is memory bandwidth, not a cache-resident loop.
    """
    slot_bytes = args.kv_layers * args.kv_heads * block_tokens * 2 * args.kv_head_size * 2
    nbytes = n * slot_bytes
    patterns = min(16, -(-COLD_BYTES // nbytes))
    num_blocks = num_slots = patterns * n
    kv = _kv_tensors(
        engine, num_blocks, block_tokens, args.kv_layers, args.kv_heads, args.kv_head_size
    )
    layout = KVLayout(kv, num_blocks)
    assert layout.slot_bytes == slot_bytes
    slots_t = torch.zeros((num_slots, slot_bytes), dtype=torch.uint8)
    rng = random.Random(block_tokens * 1000 + n)
    block_order, slot_order = list(range(num_blocks)), list(range(num_slots))
    slot_order = slot_order[n:] + slot_order[:n]  # block chunk i -> slot chunk i + 1
    if pattern == "scattered":
        rng.shuffle(block_order)
        rng.shuffle(slot_order)
    calls = [
        (block_order[i * n : (i + 1) * n], slot_order[i * n : (i + 1) * n]) for i in range(patterns)
    ]
    src = torch.randint(0, 256, (patterns, nbytes), dtype=torch.uint8)
    out = torch.zeros((patterns, nbytes), dtype=torch.uint8)
    turn = [0]

    def nxt() -> int:
        turn[0] = (turn[0] + 1) % patterns
        return turn[0]

    src_np, out_np = src.numpy(), out.numpy()

    def copy() -> None:
        i = nxt()
        out[i].copy_(src[i])

    def memcpy() -> None:
        i = nxt()
        np.copyto(out_np[i], src_np[i])

    def gather() -> None:
        blocks, slots = calls[nxt()]
        layout.gather(blocks, slots_t, slots)

    def scatter() -> None:
        blocks, slots = calls[nxt()]
        layout.scatter(slots_t, slots, blocks)

    ops = {"copy": copy, "memcpy": memcpy, "gather": gather, "scatter": scatter}
    # Enough calls per sample that one sample is >= ~1 ms, and many samples,
    # each round timing all three back to back: on a shared machine the load
    # changes between rounds, so the ratio is the median of per-round ratios
    # (GB/s from the fastest samples).
    inner = max(patterns, int(1e-3 * 10e9 / nbytes))
    times: dict[str, list[float]] = {name: [] for name in ops}
    for fn in ops.values():
        for _ in range(patterns):
            fn()  # commit every page before timing
    for _ in range(args.kv_rounds):
        for name, fn in ops.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    best = {name: min(ts) for name, ts in times.items()}

    def ratio(op: str) -> float:
        return statistics.median(r / t for r, t in zip(times["memcpy"], times[op], strict=True))

    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    return {
        "engine": engine,
        "block_tokens": block_tokens,
        "blocks": n,
        "pattern": pattern,
        "bytes": nbytes,
        "stacks": len(layout._stacks),
        "store_gbps": gbs(best["gather"]),
        "load_gbps": gbs(best["scatter"]),
        "torch_copy_gbps": gbs(best["copy"]),
        "memcpy_gbps": gbs(best["memcpy"]),
        "store_ratio": ratio("gather"),
        "load_ratio": ratio("scatter"),
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "l1-bandwidth",
        "total_mib": args.total_mib,
        "repeats": args.repeats,
        "machine": machine(),
    }
    if args.suite in ("manager", "all"):
        result["results"] = [
            measure(kib * KIB, args.total_mib << 20, layout, args.repeats)
            for layout in args.layouts
            for kib in args.block_kib
        ]
    if args.suite in ("kv-copy", "all"):
        if args.kv_threads:
            torch.set_num_threads(args.kv_threads)
        result["kv_copy_threads"] = torch.get_num_threads()
        result["kv_copy_model"] = {
            "layers": args.kv_layers,
            "kv_heads": args.kv_heads,
            "head_size": args.kv_head_size,
            "dtype": "bfloat16",
        }
        result["kv_copy"] = [
            measure_kv_copy(engine, tokens, n, pattern, args)
            for engine in args.kv_engines
            for tokens in args.kv_block_tokens
            for n in args.kv_blocks
            for pattern in args.kv_patterns
        ]
    return result


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``l1-bandwidth`` subcommand."""
    p = subparsers.add_parser("l1-bandwidth", help="KVCacheManager put/get vs torch copy")
    p.add_argument("--block-kib", nargs="+", type=int, default=list(DEFAULT_BLOCK_KIB))
    p.add_argument("--total-mib", type=int, default=256, help="bytes moved per timed operation")
    p.add_argument("--layouts", nargs="+", default=["fresh", "scattered"])
    p.add_argument("--repeats", type=int, default=5, help="best of this many timed runs")
    p.add_argument("--suite", choices=["manager", "kv-copy", "all"], default="all")
    p.add_argument("--kv-engines", nargs="+", default=["cpu", "cuda-like"])
    p.add_argument("--kv-block-tokens", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--kv-blocks", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--kv-patterns", nargs="+", default=["consecutive", "scattered"])
    p.add_argument(
        "--kv-threads", type=int, default=0, help="torch threads for kv-copy (0: unchanged)"
    )
    p.add_argument("--kv-rounds", type=int, default=21, help="timed rounds per kv-copy row")
    # Default model: a Qwen2.5-0.5B-like shard (24 layers, 2 KV heads of 64).
    p.add_argument("--kv-layers", type=int, default=24)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--kv-head-size", type=int, default=64)
    add_output_args(p)
    p.set_defaults(func=_run)
