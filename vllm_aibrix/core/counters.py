"""The connector's counters: the one place that lists their names and meanings.

The scheduler half (planner) and every worker count into a :class:`Counters`
and ship the deltas each step; ``vllm/stats.py`` turns every name below into
the Prometheus counter ``vllm:aibrix_kv_<name>_total``.
"""

from __future__ import annotations

# name -> help text
COUNTERS: dict[str, str] = {
    "lookups": "Prefix lookups made by the scheduler",
    "lookup_tokens": "Prompt tokens looked up",
    "hit_tokens_l1": "Tokens served from the L1 (CPU memory) tier",
    "hit_tokens_l2": "Tokens served from the L2 (remote) tier",
    "l2_lookup_timeouts": "Background L2 lookups not answered within l2_lookup_max_wait_ms "
    "(the request went ahead with what L1 holds)",
    "uncacheable_requests": "Requests not cached: their KV depends on more than token ids "
    "(multimodal inputs, prompt embeddings)",
    "stored_blocks": "Blocks written to L1",
    "store_skipped_blocks": "Blocks not stored because L1 had no free slot",
    "l1_evictions": "Blocks evicted from L1",
    "l2_offload_blocks": "Blocks the planner sent to L2 (ingestion: ALL, HOT or EVICTED)",
    "load_failures": "Loads where at least one block failed (recomputed)",
    "load_failed_blocks": "Blocks that failed to load (recomputed)",
    "load_timeouts": "Loads abandoned by a rank after load_deadline_s (recomputed)",
    "cache_resets": "reset_cache calls (a new key epoch each time)",
    "load_blocks": "Block shards copied into the engine",
    "load_bytes": "Bytes copied into the engine",
    "load_seconds": "Seconds spent loading",
    "store_bytes": "Bytes copied from the engine into L1",
    "store_seconds": "Seconds spent storing",
    "store_wait_seconds": "Seconds the forward thread waited for background stores "
    "(a slot or a freed block they still use was needed)",
    "l2_get_blocks": "Block shards fetched from L2",
    "l2_put_blocks": "Block shards submitted to L2",
    "l2_errors": "Failed or timed-out L2 operations",
    "l2_corrupt": "L2 values rejected by the integrity check",
    "l2_ingest_dropped_blocks": "L2 writes dropped because the ingestion queue was full",
}


class Counters:
    """Monotonic counters by name; :meth:`take` hands out the deltas."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, float] = {}

    def add(self, name: str, value: float = 1) -> None:
        """Count ``value`` more under ``name`` (a key of :data:`COUNTERS`)."""
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name!r}; add it to core/counters.py")
        if value:
            self._values[name] = self._values.get(name, 0) + value

    def take(self) -> dict[str, float]:
        """The non-zero counts since the last call; resets them."""
        out, self._values = self._values, {}
        return out
