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

import threading
from collections.abc import Hashable, Sequence
from typing import cast

import numpy as np
import torch

from vllm_aibrix.core.config import CacheConfig, IngestionType, L2Backend
from vllm_aibrix.core.keys import Key, Namespace, chain_hashes
from vllm_aibrix.core.l1 import L1Index, L1Listener
from vllm_aibrix.core.l2.backend import L2BackendBase
from vllm_aibrix.core.l2.store import L2Store
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


class _IngestionListener(L1Listener):
    """Turns L1 policy events into L2 writes, then forwards them to the user's listener.

    ``ALL`` is not handled here: ``on_inserted`` fires inside ``L1Index.insert``,
    before the manager has copied the block's bytes into the slot, so the
    manager writes inserted blocks itself once they are filled.
    """

    def __init__(self, manager: KVCacheManager, inner: L1Listener | None) -> None:
        self._manager = manager
        self._inner = inner or L1Listener()

    def on_inserted(self, key: Hashable, slot: int) -> None:
        self._inner.on_inserted(key, slot)

    def on_hot(self, key: Hashable, slot: int) -> None:
        if self._manager.ingestion == IngestionType.HOT:
            self._manager._ingest_slot(key, slot)
        self._inner.on_hot(key, slot)

    def on_evicted(self, key: Hashable, slot: int) -> None:
        # Called before the slot is freed: the bytes are still the victim's.
        if self._manager.ingestion == IngestionType.EVICTED:
            self._manager._ingest_slot(key, slot)
        self._inner.on_evicted(key, slot)


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
        self.ingestion = config.ingestion
        # L2 exists before the L1 index can emit events.
        self.l2: L2Store | None = None
        if config.l2_backend != L2Backend.NONE or l2_backend is not None:
            self.l2 = L2Store(config, namespace.digest, backend=l2_backend)
        self.l1 = L1Index(
            num_slots,
            config.l1_cache_eviction_policy,
            policy_params=policy_params(config),
            prefix_aware=config.l1_prefix_aware_eviction,
            listener=_IngestionListener(self, listener) if self.l2 is not None else listener,
        )
        self.buffer = SlotBuffer(num_slots, block_bytes)
        self._lock = threading.Lock()
        # Keys given a slot by the insert in progress whose bytes are not copied
        # in yet; an ingestion event for one of them is deferred until they are.
        self._unfilled: set[Hashable] = set()
        self._deferred: list[Hashable] = []

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
        if not self.l1_enabled:
            if self.l2 is None:
                return 0
            return self.l2.submit_put(keys, 0, [src[i] for i in range(len(keys))])
        with self._lock:
            return len(self._insert_filled(keys, None, src, from_l2=False))

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Number of leading tokens whose KV is cached (whole blocks), L1 then L2."""
        keys = self.keys_for(tokens)
        n = self.l1.prefix_length(keys) if self.l1_enabled else 0
        if self.l2 is not None and n < len(keys):
            n += self.l2.exists_prefix(keys[n:], (0,))
        return n * self.block_tokens

    def get(self, tokens: Sequence[int] | np.ndarray, out: torch.Tensor) -> int:
        """Copy the longest cached prefix into ``out[:n_blocks]``; returns tokens loaded.

        L1 first; where L1's prefix ends the rest comes from L2 (verified),
        and L2 hits are promoted into L1. The result is the longest contiguous
        prefix that actually arrived.
        """
        keys = self.keys_for(tokens)
        dst = as_block_bytes(out, self.block_bytes)
        cap = min(len(keys), dst.shape[0])
        n = 0
        if self.l1_enabled:
            with self._lock:
                n = min(self.l1.lookup(keys), cap)
                slots = self.l1.pin(keys[:n]) if n else []
            try:
                copy_rows(dst, range(n), self.buffer.tensor, slots)
            finally:
                self.l1.unpin_slots(slots)
        if self.l2 is None or n >= cap:
            return n * self.block_tokens
        # L2 I/O runs without the manager lock: other requests keep using L1.
        m = self.l2.get_blocks(keys[n:cap], 0, [dst[i] for i in range(n, cap)])
        if m and self.l1_enabled:
            with self._lock:
                parent = keys[n - 1] if n else None
                self._insert_filled(keys[n : n + m], parent, dst[n : n + m], from_l2=True)
        return (n + m) * self.block_tokens

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued L2 writes (True at once without L2)."""
        return self.l2.flush(timeout) if self.l2 is not None else True

    def close(self) -> None:
        """Release resources: writes what is queued for L2 (bounded), closes L2."""
        if self.l2 is not None:
            self.l2.close()

    # -- L2 ingestion ------------------------------------------------------------------
    def _insert_filled(
        self, keys: list[Key], parent: Key | None, rows: torch.Tensor, *, from_l2: bool
    ) -> list[tuple[Hashable, int]]:
        """Insert a chain into L1 and copy ``rows[i]`` (the bytes of ``keys[i]``) in.

        Call with ``self._lock`` held. Ingestion events raised for the new keys
        during the insert are deferred until their bytes are in the slots;
        blocks that came from L2 are not written back to it.
        """
        index: dict[object, int] = {k: i for i, k in enumerate(keys)}
        self._unfilled = {k for k in keys if k not in self.l1} if self.l2 is not None else set()
        self._deferred = []
        try:
            placed = self.l1.insert(keys, parent)
            dst_rows = [slot for _, slot in placed]
            copy_rows(self.buffer.tensor, dst_rows, rows, [index[k] for k, _ in placed])
        finally:
            self._unfilled = set()
            deferred, self._deferred = self._deferred, []
        if self.l2 is not None and not from_l2:
            if self.ingestion == IngestionType.ALL:
                write = [k for k, _ in placed]
            else:
                placed_keys = {k for k, _ in placed}
                write = [k for k in deferred if k in placed_keys]
            if write:
                rows_out = [self.buffer.slot(s) for s in self.l1.slots_of(write)]
                self.l2.submit_put(cast(list[bytes], write), 0, rows_out)
        return placed

    def _ingest_slot(self, key: Hashable, slot: int) -> None:
        """Queue the block in ``slot`` for L2 (copies its bytes now)."""
        if self.l2 is None:
            return
        if key in self._unfilled:
            self._deferred.append(key)
            return
        self.l2.submit_put([cast(bytes, key)], 0, [self.buffer.slot(slot)])


def policy_params(config: CacheConfig) -> dict[str, object]:
    """Constructor parameters of the configured policy taken from the config."""
    if config.l1_cache_eviction_policy.upper() == "S3FIFO":
        return {
            "small_ratio": config.s3fifo_small_queue_ratio,
            "move_to_main_threshold": config.s3fifo_move_to_main_threshold,
        }
    return {}
