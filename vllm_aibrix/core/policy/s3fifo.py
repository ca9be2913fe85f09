"""S3FIFO (Yang et al., SOSP'23): small FIFO + main FIFO + ghost FIFO.

* New keys go to the small FIFO (``small_ratio`` of capacity, 10% default),
  or straight to main when the ghost queue remembers them. Whether a key is
  remembered is decided when it *misses* (:meth:`on_miss`), before room is
  made for it: the evictions that make room push keys into the ghost queue
  and could otherwise push the returning key out of it first.
* Evicting from small: a key with ``freq >= move_to_main_threshold`` (2 = more
  than one hit, the paper's rule) moves to main with ``freq = 0``; the first
  key below the threshold is dropped and remembered in the ghost FIFO.
* Evicting from main: a key with ``freq > 0`` is reinserted at main's head
  with ``freq - 1``; the first with ``freq == 0`` is dropped.
* Which queue gives the victim: main when it holds more than its share or
  small is empty, otherwise small.
* ``freq`` is a 2-bit counter (saturates at 3).
* The ghost FIFO holds at most as many keys as main's capacity (in entries).

This is the paper's algorithm, and it gives exactly the miss counts of
libCacheSim's ``S3FIFOv0`` (the original SOSP'23 implementation) configured
with a ghost of main's size. ``warmup_to_main=True`` selects libCacheSim's
2024 ``S3FIFO`` variant instead: until the first eviction, a new key that
finds the small FIFO full goes to main (the cache is filled faster through
main rather than overfilling small).

Hot = the key was promoted into main (or came back from the ghost queue).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from vllm_aibrix.core.policy.base import EvictionPolicy, Skip

_MAX_FREQ = 3  # a 2-bit counter


class S3FIFOPolicy(EvictionPolicy):
    """See the module docstring."""

    name = "S3FIFO"

    def __init__(
        self,
        capacity: int,
        *,
        small_ratio: float = 0.1,
        move_to_main_threshold: int = 2,
        warmup_to_main: bool = False,
        **kw: object,
    ) -> None:
        super().__init__(capacity, **kw)  # type: ignore[arg-type]
        if not 0.0 < small_ratio < 1.0:
            raise ValueError(f"small_ratio must be in (0, 1), got {small_ratio}")
        if not 1 <= move_to_main_threshold <= _MAX_FREQ:
            # The counter is 2 bits: a larger threshold could never be reached.
            raise ValueError(
                f"move_to_main_threshold must be in [1, {_MAX_FREQ}], got {move_to_main_threshold}"
            )
        self.small_capacity = max(1, int(capacity * small_ratio))
        self.main_capacity = max(1, capacity - self.small_capacity)
        self.move_to_main_threshold = move_to_main_threshold
        self.warmup_to_main = warmup_to_main
        self._has_evicted = False
        self._small: OrderedDict[Hashable, int] = OrderedDict()  # key -> freq; oldest first
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        # Keys that missed while the ghost remembered them, waiting for their
        # on_insert. Bounded like the ghost: an owner that fails to insert a
        # key after on_miss must not make this grow.
        self._returning: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._small or key in self._main

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def on_hit(self, key: Hashable) -> None:
        q = self._small if key in self._small else self._main
        if q[key] < _MAX_FREQ:
            q[key] += 1

    def on_miss(self, key: Hashable) -> None:
        if key in self._ghost:
            del self._ghost[key]
            self._returning[key] = None
            while len(self._returning) > self.main_capacity:
                self._returning.popitem(last=False)

    def on_insert(self, key: Hashable) -> None:
        if key in self._returning:
            del self._returning[key]
            self._main[key] = 0
            self._hot(key)
        elif (
            self.warmup_to_main
            and not self._has_evicted
            and len(self._small) >= self.small_capacity
        ):
            self._main[key] = 0
        else:
            self._small[key] = 0

    def evict(self, skip: Skip | None = None) -> Hashable | None:
        self._has_evicted = True
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
                self._small[key] = freq  # pinned: to the newest end, try the next
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
