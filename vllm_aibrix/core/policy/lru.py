"""Least recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from vllm_aibrix.core.policy.base import EvictionPolicy, Skip


class LRUPolicy(EvictionPolicy):
    """Evicts the least recently used key. Hot = first re-access while resident."""

    name = "LRU"

    def __init__(self, capacity: int, **kw: object) -> None:
        super().__init__(capacity, **kw)  # type: ignore[arg-type]
        # value: has the key already been reported hot during this residency?
        self._order: OrderedDict[Hashable, bool] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def on_hit(self, key: Hashable) -> None:
        self._order.move_to_end(key)
        if not self._order[key]:
            self._order[key] = True
            self._hot(key)

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = False

    def evict(self, skip: Skip | None = None) -> Hashable | None:
        for key in self._order:  # oldest first
            if skip is None or not skip(key):
                del self._order[key]
                return key
        return None

    def remove(self, key: Hashable) -> None:
        del self._order[key]
