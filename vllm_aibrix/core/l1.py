"""L1 index: key -> slot over a :class:`SlotAllocator`, driven by a policy.

The index holds no bytes. In vLLM it lives in the scheduler process and each
TP worker holds a :class:`~vllm_aibrix.core.memory.SlotBuffer` of the same
size; a block is written to the same slot on every rank, so all ranks agree
on what L1 holds without talking to each other.

Prefix awareness (``prefix_aware=True``): a prefix lookup stops at the first
missing block, so a block whose parent is gone cannot hit. Two measures
follow from that (see docs/benchmarks.md for what they buy):

* chains are touched/inserted tail first, so under recency policies a
  prefix's head is the most recent entry and is evicted last;
* evicting a block also drops its cached descendants (unreachable now), so
  their slots go to blocks that can still hit.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_aibrix.core.memory import SlotAllocator
from vllm_aibrix.core.policy.base import EvictionPolicy
from vllm_aibrix.core.policy.registry import resolve_policy

# Any hashable: the planner uses 16-byte block keys, the replay simulator ints.
IndexKey = Hashable


@dataclass
class L1Stats:
    """Counters of one L1 index (monotonic)."""

    lookups: int = 0
    hit_blocks: int = 0
    inserts: int = 0
    evictions: int = 0
    cascade_evictions: int = 0
    insert_failures: int = 0


@dataclass
class L1Events:
    """What one L1 operation did, returned as data for the caller to act on.

    The index never calls out while it mutates itself: the caller (the tier
    planner) decides what an event means once it knows which slots hold which
    bytes (e.g. a hot key whose slot is still being filled is not written to
    L2).

    * ``placed``: keys given a slot by this operation, head of chain first.
    * ``evicted``: keys that lost their slot to make room (policy victims and
      their now-unreachable descendants). The slot is free again but its bytes
      are still the victim's until something writes into it.
    * ``hot``: resident keys the policy now considers reused.
    * ``removed``: keys the caller asked to drop (invalidation, not eviction).
    """

    placed: list[tuple[IndexKey, int]] = field(default_factory=list)
    evicted: list[tuple[IndexKey, int]] = field(default_factory=list)
    hot: list[IndexKey] = field(default_factory=list)
    removed: list[IndexKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.placed or self.evicted or self.hot or self.removed)


class L1Index:
    """Thread-safe index of cached blocks. See the module docstring."""

    def __init__(
        self,
        num_slots: int,
        policy: str | type[EvictionPolicy] = "S3FIFO",
        *,
        policy_params: dict[str, Any] | None = None,
        prefix_aware: bool = True,
    ) -> None:
        cls = resolve_policy(policy) if isinstance(policy, str) else policy
        self.allocator = SlotAllocator(num_slots)
        self.policy: EvictionPolicy = cls(
            num_slots, on_hot=self._policy_hot, **(policy_params or {})
        )
        self.prefix_aware = prefix_aware
        self.stats = L1Stats()
        self._slot: dict[IndexKey, int] = {}
        self._parent: dict[IndexKey, IndexKey | None] = {}
        self._children: dict[IndexKey, set[IndexKey]] = {}
        self._lock = threading.RLock()
        self._inserting: set[IndexKey] = set()
        # The events of the operation in progress (the policy reports hot keys
        # through a callback; they are collected here, not passed on).
        self._events = L1Events()

    # -- queries ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: IndexKey) -> bool:
        return key in self._slot

    @property
    def num_slots(self) -> int:
        return self.allocator.num_slots

    def prefix_length(self, keys: Sequence[IndexKey]) -> int:
        """Number of leading ``keys`` present. Does not touch the policy."""
        with self._lock:
            n = 0
            for k in keys:
                if k not in self._slot:
                    break
                n += 1
            return n

    def lookup(self, keys: Sequence[IndexKey]) -> tuple[int, L1Events]:
        """Leading hit count; the hits count as accesses for the policy."""
        with self._lock:
            n = self.prefix_length(keys)
            self.stats.lookups += 1
            self.stats.hit_blocks += n
            return n, self.touch(keys[:n])

    def touch(self, keys: Sequence[IndexKey]) -> L1Events:
        """Record an access to resident ``keys`` (a chain, head first)."""
        with self._lock:
            self._events = L1Events()
            order = reversed(keys) if self.prefix_aware else keys
            for k in order:
                if k in self._slot:
                    self.policy.on_hit(k)
            return self._take_events()

    def slots_of(self, keys: Sequence[IndexKey]) -> list[int]:
        """Slots of resident keys (KeyError for a missing one)."""
        with self._lock:
            return [self._slot[k] for k in keys]

    def slot_of(self, key: IndexKey) -> int | None:
        return self._slot.get(key)

    # -- pins ------------------------------------------------------------------
    def pin(self, keys: Sequence[IndexKey]) -> list[int]:
        """Pin resident keys so they cannot be evicted; returns their slots."""
        with self._lock:
            slots = [self._slot[k] for k in keys]
            self.allocator.pin_many(slots)
            return slots

    def unpin_slots(self, slots: Sequence[int]) -> None:
        with self._lock:
            self.allocator.unpin_many(slots)

    # -- mutation ----------------------------------------------------------------
    def insert(self, keys: Sequence[IndexKey], parent: IndexKey | None = None) -> L1Events:
        """Give slots to the keys of a chain that are not resident yet.

        ``keys`` is a chain, head first; ``parent`` is the key before
        ``keys[0]`` (None for the first block of a sequence). Resident keys are
        left alone (the lookup already counted their access); new ones get a
        slot, evicting as the policy says (pinned slots and the chain itself
        are never victims). Stops at the first key that
        cannot be placed, since a later block without it could never hit.
        The new ``(key, slot)`` pairs are the result's ``placed``, head first.
        """
        with self._lock:
            self._events = L1Events()
            placed = self._place(keys, parent)
            self.stats.inserts += len(placed)
            events = self._take_events()
            events.placed = placed
            # S3FIFO reports a key coming back from its ghost queue as hot
            # while inserting it; a hot key must be resident to mean anything.
            events.hot = [k for k in events.hot if k in self._slot]
            return events

    def _place(
        self, keys: Sequence[IndexKey], parent: IndexKey | None
    ) -> list[tuple[IndexKey, int]]:
        placed: list[tuple[IndexKey, int]] = []
        self._inserting = set(keys)
        try:
            prev = parent
            for k in keys:
                if k in self._slot:
                    prev = k
                    continue
                # Before making room: S3FIFO decides here whether the key
                # is one its ghost queue remembers.
                self.policy.on_miss(k)
                slot = self._allocate()
                if slot is None:
                    self.stats.insert_failures += 1
                    break
                self._slot[k] = slot
                self._parent[k] = prev
                if prev is not None and prev in self._slot:
                    self._children.setdefault(prev, set()).add(k)
                placed.append((k, slot))
                if not self.prefix_aware:
                    # Plain mode: exactly the policy's own miss sequence.
                    self.policy.on_insert(k)
                prev = k
        finally:
            self._inserting = set()
        if self.prefix_aware:
            # Tail first, so the chain's head is the most recent entry.
            for k, _ in reversed(placed):
                self.policy.on_insert(k)
        return placed

    def remove(self, key: IndexKey) -> L1Events:
        """Drop a key (e.g. its bytes turned out bad); nothing if absent or pinned.

        ``removed`` holds the key if it was dropped; descendants that became
        unreachable are ``evicted`` (their bytes are still good).
        """
        with self._lock:
            self._events = L1Events()
            slot = self._slot.get(key)
            if slot is None or self.allocator.is_pinned(slot):
                return self._take_events()
            self.policy.remove(key)
            self._drop(key, notify=False)
            self._events.removed.append(key)
            return self._take_events()

    def clear(self) -> None:
        """Drop every unpinned key (no events: nothing of them is wanted)."""
        with self._lock:
            for k in list(self._slot):
                self.remove(k)
            self._events = L1Events()

    # -- internals ---------------------------------------------------------------
    def _policy_hot(self, key: Hashable) -> None:
        self._events.hot.append(key)

    def _take_events(self) -> L1Events:
        events, self._events = self._events, L1Events()
        return events

    def _skip(self, key: Hashable) -> bool:
        slot = self._slot.get(key)
        return key in self._inserting or slot is None or self.allocator.is_pinned(slot)

    def _allocate(self) -> int | None:
        slot = self.allocator.allocate()
        while slot is None:
            victim = self.policy.evict(self._skip)
            if victim is None:
                return None
            self.stats.evictions += 1
            self._drop(victim, notify=True)
            slot = self.allocator.allocate()
        return slot

    def _drop(self, key: IndexKey, *, notify: bool) -> None:
        orphans = self._unlink(key, notify=notify)
        if not self.prefix_aware:
            return
        # Drop the now unreachable descendants. Iterative: a chain can be
        # thousands of blocks long (128K tokens / 16), far past Python's
        # recursion limit.
        stack = list(orphans)
        while stack:
            child = stack.pop()
            if child in self._slot and not self._skip(child):
                self.policy.remove(child)
                self.stats.cascade_evictions += 1
                stack.extend(self._unlink(child, notify=True))

    def _unlink(self, key: IndexKey, *, notify: bool) -> set[IndexKey]:
        """Forget ``key`` and free its slot; returns its (now parentless) children."""
        slot = self._slot.pop(key)
        parent = self._parent.pop(key, None)
        if parent is not None and parent in self._children:
            self._children[parent].discard(key)
            if not self._children[parent]:
                del self._children[parent]
        children = self._children.pop(key, set())
        if notify:
            self._events.evicted.append((key, slot))
        self.allocator.free(slot)
        for child in children:
            self._parent[child] = None
        return children
