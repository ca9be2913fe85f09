"""AIBrixOffloadingConnector: the vLLM KV-connector facade.

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector":"AIBrixOffloadingConnector",
        "kv_connector_module_path":"vllm_aibrix.vllm.connector","kv_role":"kv_both",
        "kv_load_failure_policy":"recompute","kv_connector_extra_config":{...}}'

vLLM builds one instance in the scheduler process (role SCHEDULER) and one
per worker (role WORKER); this class only routes each call to
:class:`~vllm_aibrix.vllm.scheduler.AIBrixScheduler` or
:class:`~vllm_aibrix.vllm.worker.AIBrixWorker`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.vllm.engine_info import engine_info
from vllm_aibrix.vllm.metadata import AIBrixConnectorMetadata
from vllm_aibrix.vllm.stats import AIBrixKVStats, AIBrixPromMetrics

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class AIBrixOffloadingConnector(KVConnectorBase_V1):
    """Tiered KV-cache offloading (L1 CPU memory + optional shared L2).

    It does not declare ``SupportsHMA``: vLLM then serves sliding-window
    models with a single KV cache group (every layer keeps every block),
    which is exactly what a prefix cache of whole blocks can store and load.
    """

    _cache_hit_source = CacheHitSource.HOST

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a dropped store is a future miss, never an error.
        return False

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.cache_config = CacheConfig.from_sources(ktc.kv_connector_extra_config)
        self.info = engine_info(self.cache_config, vllm_config, kv_cache_config)
        self._num_blocks = int(kv_cache_config.num_blocks)
        self._scheduler: Any = None
        self._worker: Any = None
        if role == KVConnectorRole.SCHEDULER:
            if ktc.kv_load_failure_policy != "recompute":
                # For a cache, a failed load is a miss: recompute, never fail
                # the user's request. vLLM reads this right after building us.
                logger.warning(
                    "aibrix: kv_load_failure_policy=%r -> 'recompute' (a cache load "
                    "failure must cost time, not the request)",
                    ktc.kv_load_failure_policy,
                )
                ktc.kv_load_failure_policy = "recompute"
            from vllm_aibrix.vllm.scheduler import AIBrixScheduler

            self._scheduler = AIBrixScheduler(self.cache_config, self.info)
            logger.info(
                "aibrix scheduler: block=%d tokens, %d L1 slots x %d B per rank, policy=%s, "
                "L2=%s (%s)",
                self.info.block_tokens,
                self.info.num_slots,
                self.info.slot_bytes,
                self.cache_config.l1_cache_eviction_policy,
                self.cache_config.l2_cache_backend,
                self.cache_config.l2_cache_ingestion_type,
            )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from vllm_aibrix.vllm.worker import AIBrixWorker

            self._worker = AIBrixWorker(
                self.cache_config, self.info, int(get_tensor_model_parallel_rank())
            )

    # ============================================================ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches, self._num_blocks)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, AIBrixConnectorMetadata)
        self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        # Stores happen once per step in wait_for_save: whole blocks, all layers.
        return

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, AIBrixConnectorMetadata)
        self._worker.save(meta)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, AIBrixConnectorMetadata)
        self._worker.handle_preemptions(kv_connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = self._worker.poll_finished()
        return None, (done or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set(self._worker.take_load_errors())

    def build_connector_worker_meta(self) -> Any:
        return self._worker.take_worker_meta()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        part = self._worker if self._worker is not None else self._scheduler
        data = part.take_counters() if part is not None else {}
        return AIBrixKVStats(data=data) if data else None

    def shutdown(self) -> None:
        for part in (self._worker, self._scheduler):
            if part is not None:
                part.shutdown()

    # ========================================================= scheduler side
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        block_ids = blocks.get_block_ids()[0]
        self._scheduler.update_state_after_alloc(request, block_ids, num_external_tokens)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[CacheHitSource, int]:
        if num_external_tokens == 0:
            return {}
        return {CacheHitSource.HOST: num_external_tokens}

    def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
        # Lets the scheduler half drop the blocks of a failed load from
        # vLLM's prefix cache (see AIBrixScheduler._evict_from_vllm).
        if self._scheduler is not None:
            self._scheduler.block_pool = gpu_block_pool

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Never delays the free: a store still reading the blocks is ordered
        # before the next forward that could reuse them (see AIBrixWorker).
        self._scheduler.request_finished(request)
        return False, None

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset_cache() if self._scheduler is not None else None

    # ============================================================ stats plumbing
    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVConnectorStats | None:
        return AIBrixKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: Any,
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> Any:
        return AIBrixPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
