"""Fixed-size slot memory.

Two halves, because vLLM splits them across processes:

* :class:`SlotAllocator` -- slot ids, free list and pin counts. Pure
  bookkeeping; the scheduler owns one (it decides what goes where).
* :class:`SlotBuffer` -- the bytes: one large uint8 tensor carved into equal
  slots (pinned host memory when CUDA is present, so device copies are async).
  Every worker (TP rank) owns one with the same number of slots.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch


class SlotAllocator:
    """O(1) allocate/free of slot ids with pin (reference) counts.

    A pinned slot is being read or written and must not be reused; ``free``
    on a pinned slot is refused. The allocator never hands out more than
    ``num_slots`` ids, so capacity cannot be exceeded.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        self.num_slots = num_slots
        # Stack of free ids; low ids first so fresh pools fill from the front.
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._in_use = bytearray(num_slots)
        self._pins = [0] * num_slots
        self._num_pinned = 0
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def num_pinned(self) -> int:
        """Slots with a pin count above zero."""
        return self._num_pinned

    def allocate(self) -> int | None:
        """A free slot id, or None when the pool is full."""
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
            self._in_use[slot] = 1
            return slot

    def free(self, slot: int) -> None:
        """Return ``slot`` to the pool. It must be allocated and unpinned."""
        with self._lock:
            self._check(slot)
            if self._pins[slot]:
                raise RuntimeError(f"slot {slot} is pinned ({self._pins[slot]}x); cannot free")
            self._in_use[slot] = 0
            self._free.append(slot)

    def pin(self, slot: int) -> None:
        with self._lock:
            self._check(slot)
            if self._pins[slot] == 0:
                self._num_pinned += 1
            self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        with self._lock:
            self._check(slot)
            if self._pins[slot] == 0:
                raise RuntimeError(f"slot {slot} is not pinned")
            self._pins[slot] -= 1
            if self._pins[slot] == 0:
                self._num_pinned -= 1

    def pin_many(self, slots: Sequence[int]) -> None:
        """:meth:`pin` every slot, under one lock acquisition (all or nothing)."""
        with self._lock:
            for slot in slots:
                self._check(slot)
            pins = self._pins
            for slot in slots:
                if pins[slot] == 0:
                    self._num_pinned += 1
                pins[slot] += 1

    def unpin_many(self, slots: Sequence[int]) -> None:
        """:meth:`unpin` every slot, under one lock acquisition (all or nothing)."""
        with self._lock:
            need: dict[int, int] = {}
            for slot in slots:
                self._check(slot)
                need[slot] = need.get(slot, 0) + 1
            for slot, count in need.items():
                if self._pins[slot] < count:
                    raise RuntimeError(f"slot {slot} is not pinned {count}x")
            pins = self._pins
            for slot in slots:
                pins[slot] -= 1
                if pins[slot] == 0:
                    self._num_pinned -= 1

    def is_pinned(self, slot: int) -> bool:
        return self._pins[slot] > 0

    def is_allocated(self, slot: int) -> bool:
        return bool(self._in_use[slot])

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or not self._in_use[slot]:
            raise RuntimeError(f"slot {slot} is not allocated")


def _cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken driver installs
        return False


class SlotBuffer:
    """The bytes behind the slots: a ``[num_slots, slot_bytes]`` uint8 tensor."""

    def __init__(self, num_slots: int, slot_bytes: int, *, pin_memory: bool | None = None) -> None:
        if num_slots <= 0 or slot_bytes <= 0:
            raise ValueError(
                f"need num_slots > 0 and slot_bytes > 0, got {num_slots}, {slot_bytes}"
            )
        if pin_memory is None:
            pin_memory = _cuda_available()
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.pinned = pin_memory
        # torch.empty: pages are committed lazily by the OS on first touch, so a
        # large L1 costs nothing until it is used.
        self.tensor = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, pin_memory=pin_memory)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def slot(self, slot: int) -> torch.Tensor:
        """A view of one slot's bytes."""
        return self.tensor[slot]

    def slots(self, ids: list[int]) -> torch.Tensor:
        """A copy of several slots, stacked (uses index_select)."""
        return self.tensor.index_select(0, torch.as_tensor(ids, dtype=torch.long))
