"""Property tests: SlotAllocator and L1Index keep their invariants under any op sequence.

A hypothesis state machine drives random insert / lookup / pin / unpin /
remove / clear sequences and checks, after every step, against a model built
only from the events L1 operations return:

* capacity is never exceeded and no slot leaks (used slots == resident keys);
* a pinned slot is never evicted;
* every evicted key was resident and is reported once per residency;
* hot events name resident keys with their current slot.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from vllm_aibrix.core.l1 import L1Events, L1Index
from vllm_aibrix.core.memory import SlotAllocator

KEYS = st.integers(min_value=0, max_value=40)
SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class EventModel:
    """Keeps the model of what is resident from events alone, and checks each event."""

    def __init__(self, index: L1Index) -> None:
        self.index = index
        self.live: dict[object, int] = {}
        self.errors: list[str] = []

    def record(self, events: L1Events) -> None:
        for key, slot in events.evicted:
            if self.live.get(key) != slot:
                self.errors.append(f"evicted {key!r} from slot {slot} which it does not hold")
            if self.index.allocator.is_pinned(slot) and self.index.slot_of(key) is None:
                self.errors.append(f"evicted {key!r} from pinned slot {slot}")
            self.live.pop(key, None)
        for key, slot in events.placed:
            if key in self.live:
                self.errors.append(f"inserted {key!r} twice")
            self.live[key] = slot
        for key in events.removed:
            self.live.pop(key, None)
        for key in events.hot:
            if key not in self.live or self.index.slot_of(key) != self.live[key]:
                self.errors.append(f"hot {key!r} is not resident")


class L1Machine(RuleBasedStateMachine):
    """Random operations on one L1Index (policy and mode drawn per run)."""

    @initialize(
        num_slots=st.integers(min_value=1, max_value=12),
        policy=st.sampled_from(["LRU", "FIFO", "S3FIFO", "SIEVE"]),
        prefix_aware=st.booleans(),
    )
    def setup(self, num_slots: int, policy: str, prefix_aware: bool) -> None:
        self.l1 = L1Index(num_slots, policy, prefix_aware=prefix_aware)
        self.listener = EventModel(self.l1)
        self.pins: list[list[int]] = []  # outstanding pin() results
        self.pinned_keys: Counter[object] = Counter()

    @rule(chain=st.lists(KEYS, min_size=1, max_size=8, unique=True), parent=st.none() | KEYS)
    def insert(self, chain: list[int], parent: int | None) -> None:
        if parent in chain:
            parent = None
        events = self.l1.insert(chain, parent=parent)
        self.listener.record(events)
        placed = events.placed
        new = {k for k, _ in placed}
        assert [k for k, _ in placed] == [k for k in chain if k in new], "head-first order"
        for k, slot in placed:
            assert self.l1.slot_of(k) == slot

    @rule(chain=st.lists(KEYS, min_size=1, max_size=8, unique=True))
    def lookup(self, chain: list[int]) -> None:
        n, events = self.l1.lookup(chain)
        self.listener.record(events)
        assert n == self.l1.prefix_length(chain)
        assert all(k in self.l1 for k in chain[:n])
        assert n == len(chain) or chain[n] not in self.l1

    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        resident = sorted(self.listener.live, key=repr)
        if not resident:
            return
        keys = data.draw(st.lists(st.sampled_from(resident), max_size=4, unique=True))
        slots = self.l1.pin(keys)
        self.pins.append(slots)
        self.pinned_keys.update(keys)

    @precondition(lambda self: bool(self.pins))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        slots = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1)))
        keys = [k for k in self.pinned_keys if self.l1.slot_of(k) in slots]
        self.l1.unpin_slots(slots)
        for k in keys:
            if self.l1.slot_of(k) in slots:
                self.pinned_keys[k] -= 1
        self.pinned_keys = +self.pinned_keys

    @rule(key=KEYS)
    def remove(self, key: int) -> None:
        slot = self.l1.slot_of(key)
        events = self.l1.remove(key)
        removed = key in events.removed
        if slot is not None and self.l1.allocator.is_pinned(slot):
            assert not removed, "a pinned key was removed"
        self.listener.record(events)

    @rule()
    def clear(self) -> None:
        before = dict(self.listener.live)
        self.l1.clear()
        for k in before:
            if k not in self.l1:
                self.listener.live.pop(k, None)

    @invariant()
    def events_are_consistent(self) -> None:
        assert not self.listener.errors, self.listener.errors

    @invariant()
    def capacity_never_exceeded_and_no_slot_leaked(self) -> None:
        alloc = self.l1.allocator
        assert len(self.l1) <= self.l1.num_slots
        assert alloc.num_used == len(self.l1)
        assert alloc.num_used + alloc.num_free == alloc.num_slots
        slots = [self.l1.slot_of(k) for k in self.listener.live]
        assert len(set(slots)) == len(slots)
        assert all(s is not None and alloc.is_allocated(s) for s in slots)

    @invariant()
    def model_from_events_matches_index(self) -> None:
        assert set(self.listener.live) == {k for k in self.listener.live if k in self.l1}
        assert len(self.listener.live) == len(self.l1)

    @invariant()
    def pinned_keys_stay_resident(self) -> None:
        for slots in self.pins:
            for s in slots:
                assert self.l1.allocator.is_allocated(s)
                assert self.l1.allocator.is_pinned(s)

    @invariant()
    def policy_tracks_exactly_the_resident_keys(self) -> None:
        assert len(self.l1.policy) == len(self.l1)


TestL1IndexProperties = L1Machine.TestCase
TestL1IndexProperties.settings = SETTINGS


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / free / pin / unpin against a plain-set model."""

    @initialize(num_slots=st.integers(min_value=1, max_value=16))
    def setup(self, num_slots: int) -> None:
        self.alloc = SlotAllocator(num_slots)
        self.used: set[int] = set()
        self.pins: Counter[int] = Counter()

    @rule()
    def allocate(self) -> None:
        slot = self.alloc.allocate()
        if len(self.used) == self.alloc.num_slots:
            assert slot is None
        else:
            assert slot is not None and slot not in self.used
            self.used.add(slot)

    @precondition(lambda self: bool(self.used))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.used)))
        if self.pins[slot]:
            with pytest.raises(RuntimeError):
                self.alloc.free(slot)
        else:
            self.alloc.free(slot)
            self.used.discard(slot)

    @precondition(lambda self: bool(self.used))
    @rule(data=st.data(), many=st.booleans())
    def pin(self, data: st.DataObject, many: bool) -> None:
        slots = data.draw(st.lists(st.sampled_from(sorted(self.used)), min_size=1, max_size=3))
        if many:
            self.alloc.pin_many(slots)
        else:
            for s in slots:
                self.alloc.pin(s)
        self.pins.update(slots)

    @precondition(lambda self: bool(+self.pins))
    @rule(data=st.data(), many=st.booleans())
    def unpin(self, data: st.DataObject, many: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(+self.pins)))
        if many:
            self.alloc.unpin_many([slot])
        else:
            self.alloc.unpin(slot)
        self.pins[slot] -= 1

    @rule(slot=st.integers(min_value=-1, max_value=17))
    def unpin_of_an_unpinned_slot_is_refused(self, slot: int) -> None:
        if self.pins[slot] == 0:
            with pytest.raises(RuntimeError):
                self.alloc.unpin(slot)

    @invariant()
    def matches_model(self) -> None:
        assert self.alloc.num_used == len(self.used)
        assert self.alloc.num_free == self.alloc.num_slots - len(self.used)
        assert self.alloc.num_pinned == sum(1 for c in self.pins.values() if c > 0)
        for s in range(self.alloc.num_slots):
            assert self.alloc.is_allocated(s) == (s in self.used)
            assert self.alloc.is_pinned(s) == (self.pins[s] > 0)


TestSlotAllocatorProperties = AllocatorMachine.TestCase
TestSlotAllocatorProperties.settings = SETTINGS


def test_unpin_many_is_all_or_nothing() -> None:
    alloc = SlotAllocator(2)
    a = alloc.allocate()
    b = alloc.allocate()
    assert a is not None and b is not None
    alloc.pin(a)
    with pytest.raises(RuntimeError):
        alloc.unpin_many([a, b])  # b is not pinned: nothing changes
    assert alloc.is_pinned(a)
