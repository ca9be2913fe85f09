"""Policy registry: built-in names plus ``module:Class`` import paths."""

from __future__ import annotations

import importlib

from vllm_aibrix.core.policy.base import EvictionPolicy
from vllm_aibrix.core.policy.fifo import FIFOPolicy
from vllm_aibrix.core.policy.lru import LRUPolicy
from vllm_aibrix.core.policy.s3fifo import S3FIFOPolicy
from vllm_aibrix.core.policy.sieve import SievePolicy

_REGISTRY: dict[str, type[EvictionPolicy]] = {}


def register_policy(cls: type[EvictionPolicy], name: str | None = None) -> type[EvictionPolicy]:
    """Make ``cls`` available by ``name`` (default: ``cls.name``). Usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise TypeError(f"{cls!r} is not an EvictionPolicy subclass")
    _REGISTRY[(name or cls.name).upper()] = cls
    return cls


for _cls in (LRUPolicy, FIFOPolicy, S3FIFOPolicy, SievePolicy):
    register_policy(_cls)


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


def resolve_policy(name: str) -> type[EvictionPolicy]:
    """The policy class for a registered name or a ``package.module:Class`` path."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
            raise TypeError(f"{name} is not an EvictionPolicy subclass")
        return cls
    try:
        return _REGISTRY[name.upper()]
    except KeyError:
        raise KeyError(
            f"unknown eviction policy {name!r}; choose one of {', '.join(available_policies())} "
            "or give a 'module:Class' import path"
        ) from None
