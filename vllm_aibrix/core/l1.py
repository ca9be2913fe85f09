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
from dataclasses import dataclass
from typing import Any

from vllm_aibrix.core.memory import SlotAllocator
from vllm_aibrix.core.policy.base import EvictionPolicy
from vllm_aibrix.core.policy.registry import resolve_policy

Key = Hashable


@dataclass
class L1Stats:
    """Counters of one L1 index (monotonic)."""

    lookups: int = 0
    hit_blocks: int = 0
    inserts: int = 0
    evictions: int = 0
    cascade_evictions: int = 0
    insert_failures: int = 0


class L1Listener:
    """Receives L1 events. Default methods do nothing; override what you need.

    ``on_evicted`` is called before the slot is handed to anyone else, so the
    listener may still copy the bytes out (ingestion type EVICTED).
    """

    def on_inserted(self, key: Key, slot: int) -> None:
        pass

    def on_hot(self, key: Key, slot: int) -> None:
        pass

    def on_evicted(self, key: Key, slot: int) -> None:
        pass


class L1Index:
    """Thread-safe index of cached blocks. See the module docstring."""

    def __init__(
        self,
        num_slots: int,
        policy: str | type[EvictionPolicy] = "S3FIFO",
        *,
        policy_params: dict[str, Any] | None = None,
        prefix_aware: bool = True,
        listener: L1Listener | None = None,
    ) -> None:
        cls = resolve_policy(policy) if isinstance(policy, str) else policy
        self.allocator = SlotAllocator(num_slots)
        self.policy: EvictionPolicy = cls(
            num_slots, on_hot=self._policy_hot, **(policy_params or {})
        )
        self.prefix_aware = prefix_aware
        self.listener = listener or L1Listener()
        self.stats = L1Stats()
        self._slot: dict[Key, int] = {}
        self._parent: dict[Key, Key | None] = {}
        self._children: dict[Key, set[Key]] = {}
        self._lock = threading.RLock()
        self._inserting: set[Key] = set()
        # While insert() runs, hot events wait here so listeners always see a
        # key's on_inserted before its on_hot (S3FIFO reports a key coming
        # back from its ghost queue as hot at insertion).
        self._deferred_hot: list[Key] | None = None

    # -- queries ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: Key) -> bool:
        return key in self._slot

    @property
    def num_slots(self) -> int:
        return self.allocator.num_slots

    def prefix_length(self, keys: Sequence[Key]) -> int:
        """Number of leading ``keys`` present. Does not touch the policy."""
        with self._lock:
            n = 0
            for k in keys:
                if k not in self._slot:
                    break
                n += 1
            return n

    def lookup(self, keys: Sequence[Key]) -> int:
        """Leading hit count; the hits count as accesses for the policy."""
        with self._lock:
            n = self.prefix_length(keys)
            self.stats.lookups += 1
            self.stats.hit_blocks += n
            self.touch(keys[:n])
            return n

    def touch(self, keys: Sequence[Key]) -> None:
        """Record an access to resident ``keys`` (a chain, head first)."""
        with self._lock:
            order = reversed(keys) if self.prefix_aware else keys
            for k in order:
                if k in self._slot:
                    self.policy.on_hit(k)

    def slots_of(self, keys: Sequence[Key]) -> list[int]:
        """Slots of resident keys (KeyError for a missing one)."""
        with self._lock:
            return [self._slot[k] for k in keys]

    def slot_of(self, key: Key) -> int | None:
        return self._slot.get(key)

    # -- pins ------------------------------------------------------------------
    def pin(self, keys: Sequence[Key]) -> list[int]:
        """Pin resident keys so they cannot be evicted; returns their slots."""
        with self._lock:
            slots = [self._slot[k] for k in keys]
            self.allocator.pin_many(slots)
            return slots

    def unpin_slots(self, slots: Sequence[int]) -> None:
        with self._lock:
            self.allocator.unpin_many(slots)

    # -- mutation ----------------------------------------------------------------
    def insert(self, keys: Sequence[Key], parent: Key | None = None) -> list[tuple[Key, int]]:
        """Give slots to the keys of a chain that are not resident yet.

        ``keys`` is a chain, head first; ``parent`` is the key before
        ``keys[0]`` (None for the first block of a sequence). Resident keys are
        left alone (the lookup already counted their access); new ones get a
        slot, evicting as the policy says (pinned slots and the chain itself
        are never victims). Stops at the first key that
        cannot be placed, since a later block without it could never hit.
        Returns the new ``(key, slot)`` pairs, head first.
        """
        with self._lock:
            self._deferred_hot = []
            try:
                placed = self._place(keys, parent)
            finally:
                hot, self._deferred_hot = self._deferred_hot, None
            self.stats.inserts += len(placed)
            for k, slot in placed:
                self.listener.on_inserted(k, slot)
            for k in hot:
                self._policy_hot(k)
            return placed

    def _place(self, keys: Sequence[Key], parent: Key | None) -> list[tuple[Key, int]]:
        placed: list[tuple[Key, int]] = []
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

    def remove(self, key: Key) -> bool:
        """Drop a key (e.g. its bytes turned out bad). False if absent or pinned."""
        with self._lock:
            slot = self._slot.get(key)
            if slot is None or self.allocator.is_pinned(slot):
                return False
            self.policy.remove(key)
            self._drop(key, notify=False)
            return True

    def clear(self) -> None:
        """Drop every unpinned key."""
        with self._lock:
            for k in list(self._slot):
                self.remove(k)

    # -- internals ---------------------------------------------------------------
    def _policy_hot(self, key: Hashable) -> None:
        if self._deferred_hot is not None:
            self._deferred_hot.append(key)
            return
        slot = self._slot.get(key)
        if slot is not None:
            self.listener.on_hot(key, slot)

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

    def _drop(self, key: Key, *, notify: bool) -> None:
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

    def _unlink(self, key: Key, *, notify: bool) -> set[Key]:
        """Forget ``key`` and free its slot; returns its (now parentless) children."""
        slot = self._slot.pop(key)
        parent = self._parent.pop(key, None)
        if parent is not None and parent in self._children:
            self._children[parent].discard(key)
            if not self._children[parent]:
                del self._children[parent]
        children = self._children.pop(key, set())
        if notify:
            self.listener.on_evicted(key, slot)
        self.allocator.free(slot)
        for child in children:
            self._parent[child] = None
        return children
