"""SIEVE (Zhang et al., NSDI'24): a FIFO with a moving hand and visited bits."""

from __future__ import annotations

from collections.abc import Hashable

from vllm_aibrix.core.policy.base import EvictionPolicy, Skip


class SievePolicy(EvictionPolicy):
    """New keys enter at the head; the hand walks from the tail towards the
    head, clearing visited bits, and evicts the first unvisited key. Survivors
    keep their position (no reordering on hit). Hot = first hit of a residency.
    """

    name = "SIEVE"

    def __init__(self, capacity: int, **kw: object) -> None:
        super().__init__(capacity, **kw)  # type: ignore[arg-type]
        # Doubly linked list as dicts: towards_head[k] is the newer neighbour.
        self._towards_head: dict[Hashable, Hashable | None] = {}
        self._towards_tail: dict[Hashable, Hashable | None] = {}
        self._visited: dict[Hashable, bool] = {}
        self._reported: set[Hashable] = set()
        self._head: Hashable | None = None
        self._tail: Hashable | None = None
        self._hand: Hashable | None = None

    def __contains__(self, key: Hashable) -> bool:
        return key in self._visited

    def __len__(self) -> int:
        return len(self._visited)

    def on_hit(self, key: Hashable) -> None:
        self._visited[key] = True
        if key not in self._reported:
            self._reported.add(key)
            self._hot(key)

    def on_insert(self, key: Hashable) -> None:
        self._visited[key] = False
        self._towards_head[key] = None
        self._towards_tail[key] = self._head
        if self._head is not None:
            self._towards_head[self._head] = key
        self._head = key
        if self._tail is None:
            self._tail = key

    def evict(self, skip: Skip | None = None) -> Hashable | None:
        if not self._visited:
            return None
        obj = self._hand if self._hand is not None else self._tail
        # Each key is passed over at most twice (once to clear its bit, once
        # skipped), so bound the walk to stop when everything is skipped.
        for _ in range(2 * len(self._visited) + 1):
            assert obj is not None
            if self._visited[obj]:
                self._visited[obj] = False
            elif skip is None or not skip(obj):
                self._hand = self._towards_head[obj]
                self._unlink(obj)
                return obj
            nxt = self._towards_head[obj]
            obj = nxt if nxt is not None else self._tail
        return None

    def remove(self, key: Hashable) -> None:
        if self._hand == key:
            self._hand = self._towards_head[key]
        self._unlink(key)

    def _unlink(self, key: Hashable) -> None:
        newer = self._towards_head.pop(key)
        older = self._towards_tail.pop(key)
        if newer is not None:
            self._towards_tail[newer] = older
        else:
            self._head = older
        if older is not None:
            self._towards_head[older] = newer
        else:
            self._tail = newer
        del self._visited[key]
        self._reported.discard(key)
