"""Build the configured L2 backend."""

from __future__ import annotations

from vllm_aibrix.core.config import CacheConfig, L2Backend
from vllm_aibrix.core.l2.backend import L2BackendBase


def create_backend(config: CacheConfig) -> L2BackendBase | None:
    """The backend named by ``config.l2_backend``; None for ``NONE``.

    Optional client libraries are imported only for the backend in use, so a
    deployment without e.g. Mooncake never needs its package. Constructors may
    raise (unreachable cluster seed, missing package); :class:`L2Store` treats
    that as "L2 down" and retries.
    """
    kind = config.l2_backend
    if kind == L2Backend.NONE:
        return None
    if kind == L2Backend.MEMORY:
        from vllm_aibrix.core.l2.memory import MemoryBackend, shared_memory_backend

        if config.memory_store_name:
            return shared_memory_backend(config.memory_store_name)
        return MemoryBackend(config)
    if kind == L2Backend.REDIS:
        from vllm_aibrix.core.l2.redis import RedisBackend

        return RedisBackend(config)
    if kind == L2Backend.DISK:
        from vllm_aibrix.core.l2.disk import DiskBackend

        return DiskBackend(config)
    if kind == L2Backend.MOONCAKE:
        from vllm_aibrix.core.l2.mooncake import MooncakeBackend

        return MooncakeBackend(config)
    if kind == L2Backend.INFINISTORE:
        from vllm_aibrix.core.l2.infinistore import InfiniStoreBackend

        return InfiniStoreBackend(config)
    raise ValueError(f"unknown L2 backend {kind!r}")  # pragma: no cover - enum is closed
