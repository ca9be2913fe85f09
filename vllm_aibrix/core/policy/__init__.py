"""Eviction policies (keys only, capacity in entries)."""

from vllm_aibrix.core.policy.base import EvictionPolicy
from vllm_aibrix.core.policy.fifo import FIFOPolicy
from vllm_aibrix.core.policy.lru import LRUPolicy
from vllm_aibrix.core.policy.registry import available_policies, register_policy, resolve_policy
from vllm_aibrix.core.policy.s3fifo import S3FIFOPolicy
from vllm_aibrix.core.policy.sieve import SievePolicy

__all__ = [
    "EvictionPolicy",
    "FIFOPolicy",
    "LRUPolicy",
    "S3FIFOPolicy",
    "SievePolicy",
    "available_policies",
    "register_policy",
    "resolve_policy",
]
