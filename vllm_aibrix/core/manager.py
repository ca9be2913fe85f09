"""KVCacheManager: the tiered cache for single-process users.

Puts KV for a token sequence, finds the longest cached prefix, and copies it
back into caller-provided tensors. No vLLM here: tests, benchmarks and other
engines use it directly; the vLLM connector uses the same pieces (keys, L1
index, slot buffers) split across its scheduler and worker processes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Key, Namespace, chain_hashes
from vllm_aibrix.core.l1 import L1Index, L1Listener
from vllm_aibrix.core.memory import SlotBuffer


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
    """L1 (and, once configured, L2) cache of KV blocks keyed by token prefix."""

    def __init__(
        self,
        config: CacheConfig,
        namespace: Namespace,
        block_bytes: int,
        *,
        num_slots: int | None = None,
        listener: L1Listener | None = None,
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
        self.l1 = L1Index(
            num_slots,
            config.l1_cache_eviction_policy,
            policy_params=policy_params(config),
            prefix_aware=config.l1_prefix_aware_eviction,
            listener=listener,
        )
        self.buffer = SlotBuffer(num_slots, block_bytes)
        self._lock = threading.Lock()

    # -- keys --------------------------------------------------------------------
    def keys_for(
        self, tokens: Sequence[int] | np.ndarray, cache_salt: str | None = None
    ) -> list[Key]:
        ns = self.namespace.with_salt(cache_salt)
        return chain_hashes(ns.digest, tokens, self.block_tokens)

    # -- API -----------------------------------------------------------------------
    def put(self, tokens: Sequence[int] | np.ndarray, kv: torch.Tensor) -> int:
        """Cache the full blocks of ``tokens`` whose KV is ``kv[i]``.

        ``kv`` has one leading entry per full block (extra entries are
        ignored). Returns how many blocks were newly stored.
        """
        keys = self.keys_for(tokens)
        src = as_block_bytes(kv, self.block_bytes)
        if src.shape[0] < len(keys):
            keys = keys[: src.shape[0]]
        with self._lock:
            index: dict[object, int] = {k: i for i, k in enumerate(keys)}
            placed = self.l1.insert(keys)
            copy_rows(
                self.buffer.tensor, [slot for _, slot in placed], src, [index[k] for k, _ in placed]
            )
            return len(placed)

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Number of leading tokens whose KV is cached (whole blocks)."""
        keys = self.keys_for(tokens)
        return self.l1.prefix_length(keys) * self.block_tokens

    def get(self, tokens: Sequence[int] | np.ndarray, out: torch.Tensor) -> int:
        """Copy the longest cached prefix into ``out[:n_blocks]``; returns tokens loaded."""
        keys = self.keys_for(tokens)
        dst = as_block_bytes(out, self.block_bytes)
        with self._lock:
            n = min(self.l1.lookup(keys), dst.shape[0])
            if n == 0:
                return 0
            slots = self.l1.pin(keys[:n])
        try:
            copy_rows(dst, range(n), self.buffer.tensor, slots)
        finally:
            self.l1.unpin_slots(slots)
        return n * self.block_tokens

    def close(self) -> None:
        """Release resources (L2 connections once there are any)."""


def policy_params(config: CacheConfig) -> dict[str, object]:
    """Constructor parameters of the configured policy taken from the config."""
    if config.l1_cache_eviction_policy.upper() == "S3FIFO":
        return {
            "small_ratio": config.s3fifo_small_queue_ratio,
            "move_to_main_threshold": config.s3fifo_move_to_main_threshold,
        }
    return {}
