"""KVCacheManager: the tiered cache for single-process users.

Puts KV for a token sequence, finds the longest cached prefix, and copies it
back into caller-provided tensors. No vLLM here: tests, benchmarks and other
engines use it directly; the vLLM connector uses the same pieces (keys, L1
index, slot buffers, L2 store) split across its scheduler and worker processes.

With an L2 backend configured the manager owns an :class:`L2Store` (TP rank 0
only: a standalone manager holds whole blocks). Which L1 event writes a block
to L2 is the ingestion type: ``ALL`` (every L1 insert), ``HOT`` (the policy's
hot event) or ``EVICTED`` (the block leaves L1; its bytes are copied out
before the slot is reused). Lookups continue into L2 where L1's prefix ends;
``get`` promotes L2 hits into L1.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from vllm_aibrix.core.config import CacheConfig, L2Backend
from vllm_aibrix.core.keys import Key, Namespace, chain_hashes
from vllm_aibrix.core.l2.backend import L2BackendBase
from vllm_aibrix.core.l2.store import L2Store
from vllm_aibrix.core.memory import SlotBuffer
from vllm_aibrix.core.planner import LoadPlan, TierPlanner, fill_prefix


def as_block_bytes(kv: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """View ``kv`` (leading dim = blocks) as ``[n_blocks, block_bytes]`` uint8."""
    if not kv.is_contiguous():
        raise ValueError("KV tensor must be contiguous")
    flat = kv.view(torch.uint8).reshape(kv.shape[0], -1)
    if flat.shape[1] != block_bytes:
        raise ValueError(f"each block must be {block_bytes} bytes, got {flat.shape[1]}")
    return flat


# Runs at least this long are copied by torch, which splits a large copy over
# its intra-op threads; shorter ones go through numpy, whose per-call overhead
# is a fraction of torch's (it dominates for 64 KiB blocks).
_TORCH_RUN_BYTES = 1 << 20


def copy_rows(
    dst: torch.Tensor, dst_rows: Sequence[int], src: torch.Tensor, src_rows: Sequence[int]
) -> None:
    """``dst[dst_rows[i]] = src[src_rows[i]]`` for every i (2-D uint8 tensors).

    Consecutive pairs (both row numbers ascending by one) are merged into one
    slice copy: a fresh slot pool hands out consecutive slots, so a whole
    request usually moves in a single copy.
    """
    n = len(dst_rows)
    if n == 0:
        return
    on_cpu = dst.device.type == "cpu" and src.device.type == "cpu"
    dst_np = dst.detach().numpy() if on_cpu else None
    src_np = src.detach().numpy() if on_cpu else None
    max_np_rows = max(1, _TORCH_RUN_BYTES // max(1, dst.shape[1]))
    i = 0
    while i < n:
        d0, s0 = dst_rows[i], src_rows[i]
        j = i + 1
        while j < n and dst_rows[j] == d0 + (j - i) and src_rows[j] == s0 + (j - i):
            j += 1
        k = j - i
        if dst_np is not None and src_np is not None and k < max_np_rows:
            dst_np[d0 : d0 + k] = src_np[s0 : s0 + k]
        else:
            dst[d0 : d0 + k].copy_(src[s0 : s0 + k])
        i = j


class KVCacheManager:
    """L1 (and, once configured, L2) cache of KV blocks keyed by token prefix.

    A thin executor of :class:`~vllm_aibrix.core.planner.TierPlanner` plans
    in one process (TP rank 0 holds whole blocks): the tiering rules live in
    the planner, shared with the vLLM connector.
    """

    def __init__(
        self,
        config: CacheConfig,
        namespace: Namespace,
        block_bytes: int,
        *,
        num_slots: int | None = None,
        l2_backend: L2BackendBase | None = None,
    ) -> None:
        if block_bytes <= 0:
            raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
        self.config = config
        self.namespace = namespace
        self.block_tokens = namespace.block_size
        self.block_bytes = block_bytes
        if num_slots is None:
            num_slots = config.l1_capacity_bytes // block_bytes
        if num_slots <= 0:
            raise ValueError(
                f"l1_cache_capacity_gb={config.l1_cache_capacity_gb} holds no block of "
                f"{block_bytes} bytes"
            )
        self.l1_enabled = config.l1_cache_enabled
        if not self.l1_enabled:
            num_slots = 1  # L2-only: keep the (unused) L1 objects tiny
        self.l2: L2Store | None = None
        if config.l2_backend != L2Backend.NONE or l2_backend is not None:
            self.l2 = L2Store(config, namespace.digest, backend=l2_backend)
        # The standalone API answers synchronously: its lookups wait for L2.
        self.planner = TierPlanner(
            config.replace(l2_lookup_async=False),
            num_slots=num_slots,
            block_tokens=self.block_tokens,
            l2=self.l2,
        )
        self.l1 = self.planner.l1
        self.buffer = SlotBuffer(num_slots, block_bytes)
        self._lock = threading.Lock()
        self._ids = itertools.count()

    # -- keys --------------------------------------------------------------------
    def keys_for(
        self, tokens: Sequence[int] | np.ndarray, cache_salt: str | None = None
    ) -> list[Key]:
        ns = self.namespace.with_salt(cache_salt)
        return chain_hashes(ns.digest, tokens, self.block_tokens)

    def _open(self, tokens: Sequence[int] | np.ndarray) -> tuple[str, list[int]]:
        req_id = f"m{next(self._ids)}"
        toks = [int(t) for t in tokens]
        self.planner.open_request(req_id, self.namespace.digest)
        return req_id, toks

    # -- API -----------------------------------------------------------------------
    def put(self, tokens: Sequence[int] | np.ndarray, kv: torch.Tensor) -> int:
        """Cache the full blocks of ``tokens`` whose KV is ``kv[i]``.

        ``kv`` has one leading entry per full block (extra entries are
        ignored). Returns how many blocks were newly stored.
        """
        src = as_block_bytes(kv, self.block_bytes)
        if not self.l1_enabled:
            if self.l2 is None:
                return 0
            keys = self.keys_for(tokens)[: src.shape[0]]
            return self.l2.submit_put(keys, 0, [src[i] for i in range(len(keys))])
        with self._lock:
            req_id, toks = self._open(tokens)
            try:
                n = min(len(toks) // self.block_tokens, src.shape[0])
                store = self.planner.prepare_stores(req_id, toks, n * self.block_tokens, n)
                step = self.planner.finish_step()
                self._l2_out(step.l2_before)
                if store is not None:
                    copy_rows(self.buffer.tensor, store.slots, src, store.blocks)
                self._l2_out(step.l2_after)
                return len(store.slots) if store is not None else 0
            finally:
                self.planner.finish_request(req_id)

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Number of leading tokens whose KV is cached (whole blocks), L1 then L2."""
        if not self.l1_enabled:
            keys = self.keys_for(tokens)
            return self.l2.exists_prefix(keys, (0,)) * self.block_tokens if self.l2 else 0
        with self._lock:
            req_id, toks = self._open(tokens)
            try:
                n = len(toks) // self.block_tokens
                found = self.planner.lookup(req_id, toks, n)
                assert found is not None  # synchronous planner
                return found * self.block_tokens
            finally:
                self.planner.finish_request(req_id)

    def get(self, tokens: Sequence[int] | np.ndarray, out: torch.Tensor) -> int:
        """Copy the longest cached prefix into ``out[:n_blocks]``; returns tokens loaded.

        L1 first; where L1's prefix ends the rest comes from L2 (verified)
        through L1 slots, so L2 hits are promoted into L1. The result is the
        longest contiguous prefix that actually arrived.
        """
        dst = as_block_bytes(out, self.block_bytes)
        if not self.l1_enabled:
            if self.l2 is None:
                return 0
            keys = self.keys_for(tokens)[: dst.shape[0]]
            got = self.l2.get_blocks(keys, 0, [dst[i] for i in range(len(keys))])
            return got * self.block_tokens
        with self._lock:
            req_id, toks = self._open(tokens)
            try:
                cap = min(len(toks) // self.block_tokens, dst.shape[0])
                hit = self.planner.lookup(req_id, toks, cap)
                assert hit is not None  # synchronous planner
                plan = self.planner.prepare_load(req_id, 0, hit)
                step = self.planner.finish_step()
                self._l2_out(step.l2_before)
                if plan is None:
                    self._l2_out(step.l2_after)
                    return 0
                ok = self._fill(plan)
                copy_rows(dst, range(ok), self.buffer.tensor, plan.slots[:ok])
                self._l2_out(step.l2_after)
                self.planner.report_load(plan.load_id, 0, ok)
                # Invalidations of a failed fetch may evict; ship those now.
                self._l2_out(self.planner.finish_step().l2_before)
                return ok * self.block_tokens
            finally:
                self.planner.finish_request(req_id)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued L2 writes (True at once without L2)."""
        return self.l2.flush(timeout) if self.l2 is not None else True

    def close(self) -> None:
        """Release resources: writes what is queued for L2 (bounded), closes L2."""
        if self.l2 is not None:
            self.l2.close()

    # -- plan execution ------------------------------------------------------------------
    def _fill(self, plan: LoadPlan) -> int:
        """Fetch the plan's L2 blocks into their slots; returns the good leading count."""

        def fetch(lo: int, hi: int) -> int:
            if self.l2 is None:
                return 0
            keys = cast(list[bytes], plan.l2_keys[lo:hi])
            return self.l2.get_blocks(keys, 0, [self.buffer.slot(s) for s in plan.slots[lo:hi]])

        return fill_prefix(plan.slots, plan.l2_keys, fetch)

    def _l2_out(self, writes: list[tuple[bytes, int]]) -> None:
        if writes and self.l2 is not None:
            self.l2.submit_put([k for k, _ in writes], 0, [self.buffer.slot(s) for _, s in writes])
