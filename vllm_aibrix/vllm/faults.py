"""Load fault injection for tests: an object the worker consults, not globals.

Production workers hold a :class:`NoFaults` whose hooks do nothing. Tests
either hand a worker their own :class:`LoadFaults` (in-process engines and the
scheduler simulation) or, for engines in other processes, set the config
field ``debug_fault_file`` so that every worker builds a :class:`FileFaults`
that reads its instructions from a JSON file the test rewrites between
batches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


class LoadFaults:
    """Hooks around one load on one rank. Subclass and override what you need."""

    def l2_keys_to_drop(self, rank: int, l2_keys: Sequence[bytes]) -> list[bytes]:
        """Keys of this load to delete from L2 right before it fetches them."""
        return []

    def loaded_limit(self, rank: int, req_id: str, planned: int) -> int:
        """How many leading blocks of the load may succeed (may also stall)."""
        return planned

    def corrupt(self, rank: int, req_id: str) -> bool:
        """Whether to perturb the KV this load wrote while reporting success."""
        return False


class NoFaults(LoadFaults):
    """The production default: nothing injected."""


@dataclass
class FileFaults(LoadFaults):
    """Faults read from a JSON file, once per load.

    Format: ``{"fail_after_blocks": k, "fail_rank": r, "corrupt": true,
    "stall_s": s, "delete_l2_keys": [hex storage key, ...]}``; every entry is
    optional and ``fail_rank`` (absent = every rank) limits the others.
    ``delete_l2_keys`` names per-rank storage keys (``keys.rank_key``).
    """

    path: str
    _current: dict[str, Any] = field(default_factory=dict, repr=False)

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as f:
                self._current = dict(json.load(f))
        except (OSError, ValueError):
            self._current = {}
        return self._current

    def _applies(self, rank: int) -> bool:
        return self._current.get("fail_rank") in (None, rank)

    def l2_keys_to_drop(self, rank: int, l2_keys: Sequence[bytes]) -> list[bytes]:
        # First hook of every load: (re)read the file here, once.
        from vllm_aibrix.core.keys import rank_key

        doomed = set(self._read().get("delete_l2_keys") or [])
        return [k for k in l2_keys if rank_key(k, rank).hex() in doomed]

    def loaded_limit(self, rank: int, req_id: str, planned: int) -> int:
        if not self._applies(rank):
            return planned
        stall = float(self._current.get("stall_s", 0) or 0)
        if stall:
            time.sleep(stall)
        if "fail_after_blocks" in self._current:
            return min(planned, int(self._current["fail_after_blocks"]))
        return planned

    def corrupt(self, rank: int, req_id: str) -> bool:
        return bool(self._current.get("corrupt")) and self._applies(rank)


def perturb_blocks(layers: Sequence[Any], block_ids: Sequence[int]) -> None:
    """Add 1.0 to every KV element of ``block_ids`` in every layer (tests only).

    ``layers`` are :class:`~vllm_aibrix.vllm.copy.LayerView` objects; their
    ``manager_blocks`` view indexes the engine's (manager) blocks along
    ``block_dim``. Float8 KV has no arithmetic: its bytes are flipped instead.
    """
    if not block_ids:
        return
    for lv in layers:
        t: torch.Tensor = lv.manager_blocks
        if t.element_size() == 1:
            t = t.view(torch.uint8)
            idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=t.device)
            t.index_copy_(lv.block_dim, idx, t.index_select(lv.block_dim, idx) ^ 0x40)
            continue
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=t.device)
        t.index_add_(lv.block_dim, idx, torch.ones_like(t.index_select(lv.block_dim, idx)))
