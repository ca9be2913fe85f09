"""Facts about the running engine that both connector halves must agree on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm_aibrix.core.config import CacheConfig, ConfigError
from vllm_aibrix.core.keys import Namespace
from vllm_aibrix.vllm.copy import SLOT_FORMAT

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True)
class EngineInfo:
    """Block geometry, parallelism and key namespace of one engine."""

    block_tokens: int  # tokens per cache block (= engine block size)
    slot_bytes: int  # bytes of one block, all layers, one TP rank
    num_slots: int  # L1 slots per rank
    tp_size: int
    namespace: Namespace
    # MLA: every TP rank holds the same latent KV, so L2 keeps one copy
    # (rank 0's) that every rank reads.
    kv_replicated: bool = False

    @property
    def l2_ranks(self) -> tuple[int, ...]:
        """The ranks whose shards make up a block in L2."""
        return (0,) if self.kv_replicated else tuple(range(self.tp_size))


def _attention_group(kv_cache_config: KVCacheConfig) -> Any:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        # The connector does not declare SupportsHMA, so vLLM merges
        # sliding-window layers into one group; several groups mean a model
        # (e.g. a hybrid SSM) vLLM cannot serve without its hybrid manager.
        raise NotImplementedError(
            "AIBrixOffloadingConnector supports models whose KV fits one KV cache "
            f"group; this model has {len(groups)} groups"
        )
    return groups[0]


def engine_info(
    config: CacheConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig
) -> EngineInfo:
    """Derive the geometry from vLLM's configs; validate the cache config against it."""
    from vllm.platforms import current_platform

    group = _attention_group(kv_cache_config)
    spec = group.kv_cache_spec
    engine_block = int(spec.block_size)
    if config.block_size_tokens not in (0, engine_block):
        raise ConfigError(
            f"block_size_tokens={config.block_size_tokens}: the connector currently "
            f"needs cache blocks equal to the engine block size ({engine_block}); use 0"
        )
    # Slots hold the KV bytes only, not the padding some specs add to a page.
    page = int(getattr(spec, "real_page_size_bytes", spec.page_size_bytes))
    slot_bytes = page * len(group.layer_names)
    num_slots = config.l1_capacity_bytes // slot_bytes
    if num_slots < 1:
        raise ConfigError(
            f"l1_cache_capacity_gb={config.l1_cache_capacity_gb} is smaller than one "
            f"block ({slot_bytes} bytes)"
        )
    tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
    layout = "/".join(
        [
            str(current_platform.device_type),
            str(kv_cache_config.kv_cache_layout),
            f"h{spec.num_kv_heads}x{spec.head_size}",
            f"L{len(group.layer_names)}",
            SLOT_FORMAT,  # byte order of a slot: a new format never reads an old one
        ]
    )
    ns = Namespace(
        model=str(vllm_config.model_config.model),
        kv_dtype=str(spec.dtype),
        kv_layout=layout,
        block_size=engine_block,
        tp_size=tp_size,
        model_fingerprint=config.model_fingerprint,
        user_namespace=config.namespace,
    )
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    replicated = isinstance(spec, MLAAttentionSpec)
    return EngineInfo(engine_block, slot_bytes, num_slots, tp_size, ns, kv_replicated=replicated)
