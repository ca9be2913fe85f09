"""The tier planner: every caching decision, once, with no engine types.

The planner owns the L1 index (which key lives in which slot), the pins, the
loads in flight, the memory of L2 keys that failed, and the ingestion
decisions. An engine adapter (the vLLM scheduler half, or the standalone
:class:`~vllm_aibrix.core.manager.KVCacheManager`) asks it a few questions and
executes the plans it returns as data:

* :meth:`TierPlanner.lookup` - how many leading blocks L1, then L2, hold;
* :meth:`TierPlanner.prepare_load` - reserve and pin slots for the blocks the
  engine will skip; a :class:`LoadPlan` says which slots already hold them and
  which must first be fetched from L2;
* :meth:`TierPlanner.prepare_stores` - slots for newly computed blocks;
* :meth:`TierPlanner.finish_step` - the step's L2 traffic, decided from the
  L1 events of the whole step once every slot's content is known;
* :meth:`TierPlanner.report_load` - per-rank results; when every rank has
  reported, the ranks' agreed prefix (MIN) decides which slots are good;
* :meth:`TierPlanner.finish_request` and :meth:`TierPlanner.reset`.

Why no wrong byte can sit under a right key (each rule is a line below):

1. A slot whose bytes are not yet the key's - being filled from L2
   (``_filling``) or written by this step's stores - is pinned: it can be
   neither evicted (and offloaded) nor read by another load. A lookup stops
   at a key that is being filled.
2. L2 writes are decided in :meth:`finish_step`, after all of the step's
   inserts: a hot key is written only if it is still resident and not being
   filled; an evicted key's slot is copied out before anything in the step
   writes into slots (workers run ``l2_before`` first). Bytes that came from
   a failed load are invalidated (``removed``), never offloaded.
3. A request's stores wait while it has a load in flight, so KV computed in
   the same step as a load that later fails (and so computed over bad
   context) is never stored; after a failure the store cursor moves back so
   the recomputed blocks are stored again.
4. :meth:`reset` moves to a new key epoch: no key computed before the reset
   can be produced by a lookup after it, in L1 or in L2.

The workers copy every slot an L2 write names during the same step's
execution, and a worker executes steps in order, so a slot is never reused
before its bytes left: pins need not outlive the plan for that.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import xxhash

from vllm_aibrix.core.config import CacheConfig, IngestionType
from vllm_aibrix.core.counters import Counters
from vllm_aibrix.core.keys import Key, PrefixHasher
from vllm_aibrix.core.l1 import L1Events, L1Index

_MAX_BAD_KEYS = 1 << 16


class L2Lookup(Protocol):
    """The one L2 call the planner makes (``L2Store.exists_prefix``)."""

    def exists_prefix(self, keys: Sequence[bytes], ranks: Sequence[int] = (0,)) -> int: ...


@dataclass(frozen=True)
class LoadPlan:
    """Copy cached blocks ``first_block ..`` of a request into the engine.

    ``slots[i]`` is -1 when no slot could be reserved: that block and every
    later one fail (a load is a prefix). ``l2_keys[i]`` is None when the slot
    already holds the block (L1 hit), else the key to fetch from L2 first.
    """

    load_id: int
    req_id: str
    first_block: int
    slots: list[int]
    l2_keys: list[bytes | None]


@dataclass(frozen=True)
class StorePlan:
    """Copy the request's blocks ``blocks[i]`` (request block indices) into ``slots[i]``."""

    req_id: str
    blocks: list[int]
    slots: list[int]


@dataclass
class StepPlan:
    """Everything the workers do for one step, in this order: ``l2_before``,
    ``loads``, the forward pass, ``stores``, ``l2_after``."""

    loads: list[LoadPlan] = field(default_factory=list)
    stores: list[StorePlan] = field(default_factory=list)
    l2_before: list[tuple[bytes, int]] = field(default_factory=list)
    l2_after: list[tuple[bytes, int]] = field(default_factory=list)


@dataclass(frozen=True)
class LoadOutcome:
    """A load every rank has reported: ``agreed`` leading blocks are good."""

    load_id: int
    req_id: str
    planned: int
    agreed: int


@dataclass
class _Load:
    plan: LoadPlan
    keys: list[Key]  # of the reserved blocks (slots[i] >= 0)
    epoch: int
    reports: dict[int, int] = field(default_factory=dict)


@dataclass
class _L2Probe:
    """A background L2 existence check of a request's keys from ``first`` on."""

    first: int
    future: Future[int]
    deadline: float


@dataclass
class _Request:
    hasher: PrefixHasher
    cacheable: bool
    next_store_block: int = 0
    loads: dict[int, _Load] = field(default_factory=dict)
    finished: bool = False
    # After a failed load, never promise more than it delivered: otherwise a
    # hit that keeps failing (e.g. no slot to place it) is retried forever.
    max_hit_blocks: int | None = None
    probe: _L2Probe | None = None


class TierPlanner:
    """See the module docstring."""

    def __init__(
        self,
        config: CacheConfig,
        *,
        num_slots: int,
        block_tokens: int,
        ranks: Sequence[int] = (0,),
        l2: L2Lookup | None = None,
        lookup_executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.B = block_tokens
        self.ranks = tuple(ranks)
        self.l1 = L1Index(
            num_slots,
            config.l1_cache_eviction_policy,
            policy_params=policy_params(config),
            prefix_aware=config.l1_prefix_aware_eviction,
        )
        self.l2 = l2
        # Background L2 lookups (l2_lookup_async): the scheduling path never
        # waits on the network. Tests substitute an executor they step.
        self._probe_pool: Executor | None = None
        if l2 is not None and config.l2_lookup_async:
            self._probe_pool = lookup_executor or ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="aibrix-lookup"
            )
        self._clock = clock
        self.ingestion = config.ingestion
        self.counters = Counters()
        self._requests: dict[str, _Request] = {}
        self._filling: set[Key] = set()  # being filled from L2 by a load in flight
        # slot -> 1 while it holds bytes that came from L2: writing those back
        # would only spend bandwidth (selective offloading is about saving it).
        self._from_l2 = bytearray(num_slots)
        # L2 keys a load failed on: a lookup stops there, so a value that
        # exists but is corrupt is recomputed instead of looping load -> fail.
        # Forgotten when this engine stores the block again (rewriting L2).
        self._l2_bad: OrderedDict[Key, None] = OrderedDict()
        self._next_load_id = 0
        self._load_owner: dict[int, str] = {}  # load id -> request id
        self._epoch = 0
        self._epoch_salt = b""
        # The step being planned.
        self._plan = StepPlan()
        self._step_pins: list[int] = []
        self._step_stored: list[Key] = []
        self._evicted: list[tuple[Key, int]] = []
        self._hot: list[Key] = []

    # ------------------------------------------------------------ requests
    def open_request(self, req_id: str, seed: bytes, *, cacheable: bool = True) -> None:
        """Start tracking a request whose keys chain from ``seed`` (its namespace digest).

        ``cacheable=False``: its KV depends on more than its token ids; it is
        neither looked up nor stored.
        """
        if req_id in self._requests:
            return
        if self._epoch:
            seed = xxhash.xxh3_128_digest(seed + self._epoch_salt)
        if not cacheable:
            self.counters.add("uncacheable_requests")
        self._requests[req_id] = _Request(PrefixHasher(seed, self.B), cacheable)

    def is_open(self, req_id: str) -> bool:
        return req_id in self._requests

    def finish_request(self, req_id: str) -> None:
        """The request is done; forgotten once its loads in flight are reported."""
        req = self._requests.get(req_id)
        if req is None:
            return
        req.probe = None  # an answer nobody waits for any more
        if req.loads:
            req.finished = True
        else:
            del self._requests[req_id]

    # ------------------------------------------------------------ lookups
    def lookup(
        self, req_id: str, tokens: Sequence[int], max_blocks: int, start_block: int = 0
    ) -> int | None:
        """Leading blocks of ``tokens[: max_blocks * B]`` held by L1, then L2.

        ``start_block``: blocks before it the engine has already; they count
        for the prefix but need no slot. The hit is capped at what L1 can
        place now (a load goes through slots), and after a failed load at what
        that load delivered. No side effects on the cache: the policy sees the
        access in :meth:`prepare_load`, when the engine admits the request.

        With background L2 lookups, None means "not known yet, ask again"; past
        ``l2_lookup_max_wait_ms`` the answer is what L1 holds.
        """
        req = self._requests[req_id]
        if not req.cacheable or max_blocks <= 0:
            return 0
        keys = req.hasher.update(tokens[: max_blocks * self.B])[:max_blocks]
        n1 = self._l1_prefix(keys)
        n = n1
        if self.l2 is not None and n1 < len(keys):
            end = n1
            bad, filling = self._l2_bad, self._filling
            while end < len(keys) and keys[end] not in bad and keys[end] not in filling:
                end += 1
            if end > n1:
                got = self._l2_prefix(req, keys, n1, end)
                if got is None:
                    return None
                n = got
        n = self._placeable(keys, start_block, n)
        if req.max_hit_blocks is not None:
            n = min(n, req.max_hit_blocks)
        # Counted once per answer ("ask again" calls are not lookups).
        self.counters.add("lookups")
        self.counters.add("lookup_tokens", max_blocks * self.B)
        return n

    def _l2_prefix(self, req: _Request, keys: Sequence[Key], n1: int, end: int) -> int | None:
        """End of the hit when L2 continues L1's prefix ``[0, n1)`` over ``keys[n1:end]``."""
        assert self.l2 is not None
        if self._probe_pool is None:
            return n1 + self.l2.exists_prefix(keys[n1:end], self.ranks)
        probe = req.probe
        if probe is None:
            span = list(keys[n1:end])
            future = self._probe_pool.submit(self.l2.exists_prefix, span, self.ranks)
            wait_s = self.config.l2_lookup_max_wait_ms / 1000.0
            probe = req.probe = _L2Probe(n1, future, self._clock() + wait_s)
        if not probe.future.done():
            if self._clock() < probe.deadline:
                return None
            req.probe = None
            self.counters.add("l2_lookup_timeouts")
            return n1
        req.probe = None
        try:
            present = int(probe.future.result())
        except Exception:
            present = 0
        # The answer covers keys[probe.first : probe.first + present]; it extends
        # the hit only where it joins what L1 holds now.
        if probe.first > n1:
            return n1
        return max(n1, probe.first + present)

    def _placeable(self, keys: Sequence[Key], start: int, n: int) -> int:
        """The longest prefix ``<= n`` whose blocks from ``start`` on fit in L1 at once.

        Every block of a load holds its own slot, pinned: one resident and
        already pinned costs nothing new, any other block takes one of the
        slots not pinned now.
        """
        room = self.l1.num_slots - self.l1.allocator.num_pinned
        alloc = self.l1.allocator
        for i in range(start, n):
            slot = self.l1.slot_of(keys[i])
            if slot is not None and alloc.is_pinned(slot):
                continue
            room -= 1
            if room < 0:
                return i
        return n

    def _l1_prefix(self, keys: Sequence[Key]) -> int:
        i = 0
        while i < len(keys) and keys[i] in self.l1 and keys[i] not in self._filling:
            i += 1
        return i

    # -------------------------------------------------------------- loads
    def prepare_load(self, req_id: str, start_block: int, end_block: int) -> LoadPlan | None:
        """The engine admitted the request and skips blocks ``[start_block, end_block)``.

        Records the access of the request's L1 prefix for the policy, then
        reserves a pinned slot for every skipped block: resident blocks are
        read from their slot, the others are fetched from L2 into a new one.
        Returns None when nothing is skipped.
        """
        req = self._requests[req_id]
        keys = req.hasher.keys
        resident = self._l1_prefix(keys)
        self._absorb(self.l1.touch(keys[:resident]))
        if end_block <= start_block:
            return None
        end_block = min(end_block, len(keys))
        # Pin what is resident first, so reserving slots for the rest can
        # never evict a block this very load reads.
        resident_slots: dict[int, int] = {}
        for i in range(start_block, end_block):
            k = keys[i]
            if k in self.l1 and k not in self._filling:
                resident_slots[i] = self.l1.pin([k])[0]
        slots: list[int] = []
        l2_keys: list[bytes | None] = []
        load_keys: list[Key] = []
        for i in range(start_block, end_block):
            k = keys[i]
            if i in resident_slots:
                slot = resident_slots.pop(i)
                l2_keys.append(None)
            else:
                placed = self._insert(k, keys[i - 1] if i else None) if k not in self.l1 else None
                if placed is None:
                    # Being filled by another load, or no slot free: this
                    # block and the rest are recomputed.
                    break
                slot = placed
                self.l1.pin([k])
                self._filling.add(k)
                l2_keys.append(k)
            slots.append(slot)
            load_keys.append(k)
        # Pins taken for blocks after a break are not part of the load.
        self.l1.unpin_slots(list(resident_slots.values()))
        missing = end_block - start_block - len(slots)
        n_l2 = sum(1 for k in l2_keys if k is not None)
        self.counters.add("hit_tokens_l1", (len(slots) - n_l2) * self.B)
        self.counters.add("hit_tokens_l2", n_l2 * self.B)
        plan = LoadPlan(
            load_id=self._next_load_id,
            req_id=req_id,
            first_block=start_block,
            slots=slots + [-1] * missing,
            l2_keys=l2_keys + [None] * missing,
        )
        self._next_load_id += 1
        req.loads[plan.load_id] = _Load(plan, load_keys, self._epoch)
        self._load_owner[plan.load_id] = req_id
        req.next_store_block = max(req.next_store_block, end_block)
        self._plan.loads.append(plan)
        return plan

    def report_load(self, load_id: int, rank: int, loaded: int) -> LoadOutcome | None:
        """Rank ``rank`` copied ``loaded`` leading blocks of the load into the engine.

        When every rank has reported: the agreed prefix is the MIN; blocks
        past it that were filled from L2 are invalidated (some rank may not
        have their bytes), the store cursor moves back to the first block
        the engine recomputes, and the outcome is returned.
        """
        req_id = self._load_owner.get(load_id, "")
        req = self._requests.get(req_id)
        load = req.loads.get(load_id) if req is not None else None
        if req is None or load is None:
            return None
        load.reports[rank] = loaded
        if len(load.reports) < len(self.ranks):
            return None
        return self._complete(req_id, req, load)

    def _complete(self, req_id: str, req: _Request, load: _Load) -> LoadOutcome:
        plan = load.plan
        agreed = min(min(load.reports.values()), len(load.keys))
        planned = len(plan.slots)
        self.l1.unpin_slots(plan.slots[: len(load.keys)])
        stale = load.epoch != self._epoch
        # Past the agreed prefix some rank may lack a filled slot's bytes; and
        # after a reset nothing of the old epoch may stay.
        invalid = [
            k
            for i, k in enumerate(load.keys)
            if stale or (i >= agreed and plan.l2_keys[i] is not None)
        ]
        if agreed < len(load.keys) and plan.l2_keys[agreed] is not None and not stale:
            self._remember_bad(load.keys[agreed])
        # Invalidate while the keys still count as filling, so that none of
        # them is offloaded as a cascade eviction of another.
        dropped = set(invalid)
        for k in invalid:
            self._absorb(self.l1.remove(k), skip=dropped)
        for i, k in enumerate(load.keys):
            if plan.l2_keys[i] is not None:
                self._filling.discard(k)
                if i < agreed and not stale:
                    self._from_l2[plan.slots[i]] = 1
        if agreed < planned:
            self.counters.add("load_failures")
            self.counters.add("load_failed_blocks", planned - agreed)
            req.next_store_block = min(req.next_store_block, plan.first_block + agreed)
            cap = plan.first_block + agreed
            req.max_hit_blocks = cap if req.max_hit_blocks is None else min(req.max_hit_blocks, cap)
        del req.loads[plan.load_id]
        del self._load_owner[plan.load_id]
        if req.finished and not req.loads:
            del self._requests[req_id]
        return LoadOutcome(plan.load_id, req_id, planned, agreed)

    def _remember_bad(self, key: Key) -> None:
        self._l2_bad[key] = None
        self._l2_bad.move_to_end(key)
        while len(self._l2_bad) > _MAX_BAD_KEYS:
            self._l2_bad.popitem(last=False)

    # ------------------------------------------------------------- stores
    def prepare_stores(
        self, req_id: str, tokens: Sequence[int], computed_tokens: int, engine_blocks: int
    ) -> StorePlan | None:
        """Slots for the request's full blocks computed by the end of this step.

        ``computed_tokens``: tokens whose KV exists after this step's forward;
        ``engine_blocks``: blocks the engine holds for the request. Blocks
        already in L1 are skipped. Nothing while a load of the request is in
        flight (see rule 3 of the module docstring).
        """
        req = self._requests.get(req_id)
        if req is None or not req.cacheable or req.loads:
            return None
        full = min(computed_tokens, len(tokens), engine_blocks * self.B) // self.B
        if full <= req.next_store_block:
            return None
        keys = req.hasher.update(tokens[: full * self.B])
        blocks: list[int] = []
        slots: list[int] = []
        for i in range(req.next_store_block, full):
            k = keys[i]
            if k in self.l1:
                continue
            slot = self._insert(k, keys[i - 1] if i else None)
            if slot is None:
                # No free slot; a later block could never hit without this one.
                self.counters.add("store_skipped_blocks", full - i)
                break
            self._l2_bad.pop(k, None)
            self.l1.pin([k])
            self._step_pins.append(slot)
            self._step_stored.append(k)
            blocks.append(i)
            slots.append(slot)
        req.next_store_block = full
        if not slots:
            return None
        self.counters.add("stored_blocks", len(slots))
        store = StorePlan(req_id, blocks, slots)
        self._plan.stores.append(store)
        return store

    # --------------------------------------------------------------- steps
    def finish_step(self) -> StepPlan:
        """The step's plan, with the L2 traffic its L1 events call for."""
        plan, self._plan = self._plan, StepPlan()
        if self.l2 is not None:
            if self.ingestion == IngestionType.EVICTED:
                plan.l2_before = self._evicted
            else:
                if self.ingestion == IngestionType.ALL:
                    cands = self._step_stored
                else:
                    cands = list(dict.fromkeys(self._hot))
                for k in cands:
                    slot = self.l1.slot_of(k)
                    if slot is not None and k not in self._filling and not self._from_l2[slot]:
                        plan.l2_after.append((k, slot))
            self.counters.add("l2_offload_blocks", len(plan.l2_before) + len(plan.l2_after))
        self.l1.unpin_slots(self._step_pins)
        self._step_pins, self._step_stored, self._evicted, self._hot = [], [], [], []
        return plan

    def reset(self) -> None:
        """Forget everything cached: from now on no lookup finds KV computed before.

        Keys move to a new epoch (a random salt in their seed), so neither L1
        nor L2 entries written before can match again; requests already open
        stop caching; L1 is emptied and the slots of loads in flight are
        dropped when those loads report. L2 entries of earlier epochs are left
        for the store to age out.
        """
        self.counters.add("cache_resets")
        self._epoch += 1
        self._epoch_salt = os.urandom(16)
        # A request admitted before the reset may hold KV computed before it
        # (and vLLM may preempt and resume it): it neither stores nor looks
        # up from now on, under any epoch.
        for req in self._requests.values():
            req.cacheable = False
        self.l1.clear()
        self._l2_bad.clear()
        # Events from before the reset name slots whose keys nobody wants.
        self._evicted, self._hot = [], []
        self._step_stored = []

    # ----------------------------------------------------------- internals
    def _insert(self, key: Key, parent: Key | None) -> int | None:
        events = self.l1.insert([key], parent=parent)
        self._absorb(events)  # reads the victim's from-L2 flag before it is reused
        if not events.placed:
            return None
        slot = events.placed[0][1]
        # A new key's bytes come from the engine or from a fill not yet
        # reported good; _complete sets the flag once it is.
        self._from_l2[slot] = 0
        return slot

    def _absorb(self, events: L1Events, skip: set[Key] | None = None) -> None:
        for ik, slot in events.evicted:
            k = cast(Key, ik)
            self.counters.add("l1_evictions")
            # A slot being filled is pinned and so never a victim; checked
            # anyway, since offloading its bytes would poison L2.
            if k in self._filling or (skip is not None and k in skip):
                continue
            if self._from_l2[slot]:
                continue  # L2 has it already
            self._evicted.append((k, slot))
        self._hot.extend(cast(list[Key], events.hot))

    def close(self) -> None:
        """Stop the background lookup thread."""
        if self._probe_pool is not None:
            self._probe_pool.shutdown(wait=False, cancel_futures=True)

    def pool_state(self) -> dict[str, int]:
        """Slot/pin/load/request counts; pins, filling and loads are 0 when idle."""
        return {
            "slots_used": self.l1.allocator.num_used,
            "slots_pinned": self.l1.allocator.num_pinned,
            "pending_keys": len(self._filling),
            "loads": sum(len(r.loads) for r in self._requests.values()),
            "trackers": len(self._requests),
        }


def fill_prefix(
    slots: Sequence[int],
    l2_keys: Sequence[bytes | None],
    fetch: Callable[[int, int], int],
) -> int:
    """Run a load plan's L2 fetches; returns how many leading blocks are good.

    ``fetch(lo, hi)`` fetches blocks ``lo .. hi-1`` (a run of L2 keys) into
    their slots and returns how many leading ones arrived. The good prefix ends
    at the first unreserved slot (-1) or the first block a fetch missed; L1
    blocks (key None) in between are good as they are.
    """
    n = 0
    while n < len(slots) and slots[n] >= 0:
        n += 1
    ok = 0
    while ok < n:
        if l2_keys[ok] is None:
            ok += 1
            continue
        hi = ok
        while hi < n and l2_keys[hi] is not None:
            hi += 1
        ok += fetch(ok, hi)
        if ok < hi:
            break
    return ok


def policy_params(config: CacheConfig) -> dict[str, Any]:
    """Constructor parameters of the configured policy taken from the config."""
    if config.l1_cache_eviction_policy.upper() == "S3FIFO":
        return {
            "small_ratio": config.s3fifo_small_queue_ratio,
            "move_to_main_threshold": config.s3fifo_move_to_main_threshold,
        }
    return {}
