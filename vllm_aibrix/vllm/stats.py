"""Connector counters, their transport through vLLM's stats path, and Prometheus.

Both halves count: the scheduler (lookups, hits per tier, evictions, load
failures) and every worker (bytes and seconds of copies, L2 traffic). vLLM
collects ``get_kv_connector_stats()`` from both, aggregates worker stats
across ranks with :meth:`AIBrixKVStats.aggregate`, and hands the result to
:class:`AIBrixPromMetrics`, which is what shows up on ``/metrics``.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from vllm_aibrix.core.counters import COUNTERS


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


class AIBrixPromMetrics(KVConnectorPromMetrics):
    """Registers one Prometheus counter per entry of :data:`COUNTERS`."""

    def __init__(self, vllm_config: Any, metric_types: Any, labelnames: Any, per_engine: Any):
        super().__init__(vllm_config, metric_types, labelnames, per_engine)
        self._counters: dict[str, dict[int, Any]] = {}
        for name, doc in COUNTERS.items():
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
