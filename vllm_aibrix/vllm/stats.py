"""Connector counters, their transport through vLLM's stats path, and Prometheus.

Both halves count: the scheduler (lookups, hits per tier, evictions, load
failures) and every worker (bytes and seconds of copies, L2 traffic). vLLM
collects ``get_kv_connector_stats()`` from both, aggregates worker stats
across ranks with :meth:`AIBrixKVStats.aggregate`, and hands the result to
:class:`AIBrixPromMetrics`, which is what shows up on ``/metrics``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)


@dataclass
class ConnectorCounters:
    """Monotonic counters; the connector ships deltas each step."""

    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens_l1: int = 0
    hit_tokens_l2: int = 0
    stored_blocks: int = 0
    store_skipped_blocks: int = 0
    l1_evictions: int = 0
    load_failures: int = 0
    load_failed_blocks: int = 0
    load_timeouts: int = 0
    load_blocks: int = 0
    load_bytes: int = 0
    load_seconds: float = 0.0
    store_bytes: int = 0
    store_seconds: float = 0.0
    l2_get_blocks: int = 0
    l2_put_blocks: int = 0
    l2_errors: int = 0
    l2_corrupt: int = 0
    l2_ingest_dropped_blocks: int = 0

    def take(self) -> dict[str, float]:
        """The non-zero counts since the last call; resets them."""
        out = {k: v for k, v in asdict(self).items() if v}
        for f in fields(self):
            setattr(self, f.name, type(getattr(self, f.name))())
        return out


class AIBrixKVStats(KVConnectorStats):
    """Counter deltas travelling from the connector halves to the stats logger."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = dict(self.data)
        for k, v in other.data.items():
            merged[k] = merged.get(k, 0) + v
        return AIBrixKVStats(data=merged)

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not self.data


# counter name -> help text; every one becomes vllm:aibrix_kv_<name>_total
PROM_COUNTERS: dict[str, str] = {
    "lookups": "Prefix lookups made by the scheduler",
    "lookup_tokens": "Prompt tokens looked up",
    "hit_tokens_l1": "Tokens served from the L1 (CPU memory) tier",
    "hit_tokens_l2": "Tokens served from the L2 (remote) tier",
    "stored_blocks": "Blocks written to L1",
    "store_skipped_blocks": "Blocks not stored because L1 had no free slot",
    "l1_evictions": "Blocks evicted from L1",
    "load_failures": "Loads where at least one block failed (recomputed)",
    "load_failed_blocks": "Blocks that failed to load (recomputed)",
    "load_timeouts": "Loads abandoned by a rank after load_deadline_s (recomputed)",
    "load_blocks": "Block shards copied into the engine",
    "load_bytes": "Bytes copied into the engine",
    "load_seconds": "Seconds spent loading",
    "store_bytes": "Bytes copied from the engine into L1",
    "store_seconds": "Seconds spent storing",
    "l2_get_blocks": "Block shards fetched from L2",
    "l2_put_blocks": "Block shards submitted to L2",
    "l2_errors": "Failed or timed-out L2 operations",
    "l2_corrupt": "L2 values rejected by the integrity check",
    "l2_ingest_dropped_blocks": "L2 writes dropped because the ingestion queue was full",
}


class AIBrixPromMetrics(KVConnectorPromMetrics):
    """Registers one Prometheus counter per entry of :data:`PROM_COUNTERS`."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: Any, per_engine: Any):
        super().__init__(vllm_config, metric_types, labelnames, per_engine)
        self._counters: dict[str, dict[int, Any]] = {}
        for name, doc in PROM_COUNTERS.items():
            counter = self._counter_cls(
                name=f"vllm:aibrix_kv_{name}", documentation=doc, labelnames=labelnames
            )
            self._counters[name] = {
                idx: counter.labels(*values) for idx, values in per_engine.items()
            }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            per_engine = self._counters.get(name)
            if per_engine is not None and value > 0:
                per_engine[engine_idx].inc(value)
