"""S3FIFO (Yang et al., SOSP'23): small FIFO + main FIFO + ghost FIFO.

* New keys go to the small FIFO (``small_ratio`` of capacity, 10% default),
  or straight to main when the ghost queue remembers them.
* Evicting from small: a key with ``freq >= move_to_main_threshold`` (2 = more
  than one hit, the paper's rule) moves to main; otherwise it is dropped and
  remembered in the ghost FIFO.
* Evicting from main: a key with ``freq > 0`` is reinserted at main's head
  with ``freq - 1``; the first with ``freq == 0`` is dropped.
* ``freq`` is a 2-bit counter (saturates at 3).
* The ghost FIFO holds at most as many keys as main's capacity.

Hot = the key was promoted into main (or came back from the ghost queue).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from vllm_aibrix.core.policy.base import EvictionPolicy, Skip

_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    """See the module docstring."""

    name = "S3FIFO"

    def __init__(
        self,
        capacity: int,
        *,
        small_ratio: float = 0.1,
        move_to_main_threshold: int = 2,
        **kw: object,
    ) -> None:
        super().__init__(capacity, **kw)  # type: ignore[arg-type]
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio}")
        if move_to_main_threshold < 1:
            raise ValueError(f"move_to_main_threshold must be >= 1, got {move_to_main_threshold}")
        self.small_capacity = max(1, int(capacity * small_ratio))
        self.main_capacity = max(1, capacity - self.small_capacity)
        self.move_to_main_threshold = move_to_main_threshold
        self._small: OrderedDict[Hashable, int] = OrderedDict()  # key -> freq; oldest first
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._small or key in self._main

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def on_hit(self, key: Hashable) -> None:
        q = self._small if key in self._small else self._main
        if q[key] < _MAX_FREQ:
            q[key] += 1

    def on_insert(self, key: Hashable) -> None:
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
            self._hot(key)
        else:
            self._small[key] = 0

    def evict(self, skip: Skip | None = None) -> Hashable | None:
        if len(self._main) > self.main_capacity or not self._small:
            victim = self._evict_main(skip)
            return victim if victim is not None else self._evict_small(skip)
        victim = self._evict_small(skip)
        return victim if victim is not None else self._evict_main(skip)

    def remove(self, key: Hashable) -> None:
        if key in self._small:
            del self._small[key]
        else:
            del self._main[key]

    # -- internals -------------------------------------------------------------
    def _evict_small(self, skip: Skip | None) -> Hashable | None:
        passes = len(self._small)
        while self._small and passes > 0:
            passes -= 1
            key, freq = self._small.popitem(last=False)
            if freq >= self.move_to_main_threshold:
                self._main[key] = 0
                self._hot(key)
                continue
            if skip is not None and skip(key):
                self._small[key] = freq  # pinned: back to the head, try the next
                continue
            self._remember(key)
            return key
        return None

    def _evict_main(self, skip: Skip | None) -> Hashable | None:
        # Every key can be reinserted at most _MAX_FREQ times before its freq
        # reaches 0, plus one pass for pinned keys.
        passes = len(self._main) * (_MAX_FREQ + 1) + 1
        while self._main and passes > 0:
            passes -= 1
            key, freq = self._main.popitem(last=False)
            if freq > 0:
                self._main[key] = freq - 1
                continue
            if skip is not None and skip(key):
                self._main[key] = 0
                continue
            return key
        return None

    def _remember(self, key: Hashable) -> None:
        self._ghost[key] = None
        while len(self._ghost) > self.main_capacity:
            self._ghost.popitem(last=False)
