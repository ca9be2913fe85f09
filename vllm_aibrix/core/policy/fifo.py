"""First in, first out."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from vllm_aibrix.core.policy.base import EvictionPolicy, Skip


class FIFOPolicy(EvictionPolicy):
    """Evicts in insertion order; hits change nothing. Hot = first re-access."""

    name = "FIFO"

    def __init__(self, capacity: int, **kw: object) -> None:
        super().__init__(capacity, **kw)  # type: ignore[arg-type]
        self._order: OrderedDict[Hashable, bool] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def on_hit(self, key: Hashable) -> None:
        if not self._order[key]:
            self._order[key] = True
            self._hot(key)

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = False

    def evict(self, skip: Skip | None = None) -> Hashable | None:
        for key in self._order:
            if skip is None or not skip(key):
                del self._order[key]
                return key
        return None

    def remove(self, key: Hashable) -> None:
        del self._order[key]
