"""The eviction-policy interface.

A policy sees keys only, never bytes, and counts capacity in entries (one
entry = one cache block). It reports two events to its owner:

* ``on_hot(key)``: the key proved it is reused (second access under
  LRU/FIFO/SIEVE, promotion to the main queue under S3FIFO). Selective
  offloading with ingestion type ``HOT`` writes such blocks to L2.
* eviction: :meth:`EvictionPolicy.evict` returns the victim; the owner (L1)
  turns it into an ``evicted`` event with the slot attached.

The simulator-facing entry point is :meth:`access` (hit -> refresh, miss ->
note the miss, evict until there is room, insert), which has exactly
libCacheSim's semantics for unit-size objects, so miss ratios can be compared
1:1 (tests/unit/test_policy_exactness.py does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

Skip = Callable[[Hashable], bool]
HotCallback = Callable[[Hashable], None]


class EvictionPolicy(ABC):
    """Decides which resident key leaves when room is needed."""

    name: ClassVar[str] = "abstract"

    def __init__(self, capacity: int, *, on_hot: HotCallback | None = None, **params: Any) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if params:
            raise TypeError(f"{type(self).__name__} got unknown parameters: {sorted(params)}")
        self.capacity = capacity
        self._on_hot = on_hot

    # -- bookkeeping the owner drives --------------------------------------
    @abstractmethod
    def __contains__(self, key: Hashable) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def on_hit(self, key: Hashable) -> None:
        """A resident key was accessed."""

    def on_miss(self, key: Hashable) -> None:
        """A key that is not resident was requested and is about to be inserted.

        Called *before* the owner makes room (evicts) for it. Policies that
        remember evicted keys (S3FIFO's ghost queue) must decide here whether
        the key is a returning one: the evictions that make room could
        otherwise push it out of that memory first. Default: nothing.
        """
        return None

    @abstractmethod
    def on_insert(self, key: Hashable) -> None:
        """A new key became resident. The owner made room first (len < capacity)."""

    @abstractmethod
    def evict(self, skip: Skip | None = None) -> Hashable | None:
        """Choose a victim, forget it and return it.

        Keys for which ``skip(key)`` is true (pinned by the owner) are passed
        over. Returns None when every resident key is skipped or none exists.
        """

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """Forget a resident key without it being a victim (invalidation)."""

    # -- shared --------------------------------------------------------------
    def access(self, key: Hashable) -> bool:
        """One request, simulator style. Returns True on a hit."""
        if key in self:
            self.on_hit(key)
            return True
        self.on_miss(key)
        while len(self) >= self.capacity:
            if self.evict() is None:  # pragma: no cover - cannot happen without skip
                break
        self.on_insert(key)
        return False

    def _hot(self, key: Hashable) -> None:
        if self._on_hot is not None:
            self._on_hot(key)
