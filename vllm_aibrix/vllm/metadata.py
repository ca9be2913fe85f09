"""What the scheduler half tells the workers each step, and what they answer.

Plain dataclasses of ints and bytes: they are pickled from the scheduler
process to every worker process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class LoadSpec:
    """Load cache blocks into a request's engine blocks.

    ``l2_keys[i]`` is None when slot ``slots[i]`` already holds the block
    (L1 hit); otherwise the worker first fetches its rank's shard of that key
    from L2 into the slot. ``slots[i]`` is -1 for a block that could not be
    reserved. Blocks form a prefix: a failure at ``i`` makes every later
    block a failure too. Reports name the load by ``load_id``.
    """

    load_id: int
    req_id: str
    slots: list[int]
    block_ids: list[int]
    l2_keys: list[bytes | None]
    is_async: bool


@dataclass
class StoreSpec:
    """Copy freshly computed engine blocks into L1 slots (after the forward)."""

    req_id: str
    slots: list[int]
    block_ids: list[int]


@dataclass
class AIBrixConnectorMetadata(KVConnectorMetadata):
    """One step's plan (a translation of :class:`~vllm_aibrix.core.planner.StepPlan`).

    Workers execute it in this order: ``l2_before`` (slots -> L2, before
    anything in the step writes slots: evicted blocks), ``loads``, the forward
    pass, ``stores``, then ``l2_after`` (slots -> L2: inserted or hot blocks).
    With asynchronous stores the last two run in the background, in step
    order; ``freed`` names the requests whose blocks vLLM freed since the
    previous plan (finished, aborted or preempted): this step's forward may
    overwrite those blocks, so stores still reading them must finish first.
    """

    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    l2_before: list[tuple[bytes, int]] = field(default_factory=list)
    l2_after: list[tuple[bytes, int]] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)


@dataclass
class AIBrixWorkerMetadata(KVConnectorWorkerMetadata):
    """Per-rank load outcomes: ``loaded[load_id][rank]`` = leading blocks loaded."""

    loaded: dict[int, dict[int, int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, AIBrixWorkerMetadata)
        merged = {k: dict(v) for k, v in self.loaded.items()}
        for load_id, per_rank in other.loaded.items():
            merged.setdefault(load_id, {}).update(per_rank)
        return AIBrixWorkerMetadata(loaded=merged)
