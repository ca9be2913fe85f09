"""Paged-block gather/scatter between vLLM's KV tensors and L1 slots.

vLLM's attention backends lay a layer's KV out differently:

* CPU: ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
* CUDA flash-attn style: ``[2, num_blocks, block_size, num_kv_heads, head_size]``
* others put the block dimension first with K/V inside.

All of them have exactly one dimension of size ``num_blocks``. We view each
layer as ``[pre, num_blocks, post]`` around that dimension, so one engine
block of one layer is ``pre`` contiguous runs of ``post`` elements. A slot
holds, for every layer in a fixed order, those ``pre * post`` elements of one
block. The slot bytes therefore depend on the layout, which is why the layout
is part of the key namespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerView:
    """How one layer's KV tensor maps onto slot bytes."""

    name: str
    tensor: torch.Tensor  # [pre, num_blocks, post] view of the engine tensor
    slot_offset: int  # byte offset of this layer inside a slot
    block_bytes: int  # bytes of one block of this layer

    @property
    def pre(self) -> int:
        return int(self.tensor.shape[0])


def _block_dim(shape: Sequence[int], num_blocks: int, name: str) -> int:
    dims = [i for i, s in enumerate(shape) if s == num_blocks]
    if not dims:
        raise ValueError(f"layer {name}: no dimension of size num_blocks={num_blocks} in {shape}")
    # Ambiguity (e.g. num_blocks == 2 for the K/V dim) resolves to the last
    # candidate among the first two dims, which is where every known layout
    # keeps the block dimension.
    cands = [d for d in dims if d <= 1]
    return cands[-1] if cands else dims[0]


class KVLayout:
    """Slot layout over a set of engine KV tensors (one TP rank)."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        self.num_blocks = num_blocks
        self.layers: list[LayerView] = []
        offset = 0
        # Sorted by name so every process (and every engine) agrees on order.
        for name in sorted(kv_caches):
            t = kv_caches[name]
            d = _block_dim(t.shape, num_blocks, name)
            pre = 1
            for s in t.shape[:d]:
                pre *= int(s)
            view = t.reshape(pre, num_blocks, -1) if t.is_contiguous() else None
            if view is None or view.data_ptr() != t.data_ptr():
                raise ValueError(f"layer {name}: KV tensor must be contiguous")
            bb = pre * int(view.shape[2]) * t.element_size()
            self.layers.append(LayerView(name, view, offset, bb))
            offset += bb
        self.slot_bytes = offset
        self.device = self.layers[0].tensor.device
        self.description = (
            ";".join(f"{tuple(lv.tensor.shape)}:{lv.tensor.dtype}" for lv in self.layers[:1])
            + f"x{len(self.layers)}"
        )

    def gather(self, block_ids: Sequence[int], dst: torch.Tensor, slots: Sequence[int]) -> None:
        """Copy engine blocks ``block_ids`` into slot rows ``slots`` of ``dst``.

        ``dst`` is the ``[num_slots, slot_bytes]`` uint8 slot buffer.
        """
        if not block_ids:
            return
        bidx = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        sidx = torch.as_tensor(slots, dtype=torch.long, device=dst.device)
        n = len(block_ids)
        for lv in self.layers:
            src = lv.tensor.index_select(1, bidx)  # [pre, n, post]
            rows = src.transpose(0, 1).reshape(n, -1).view(torch.uint8)
            if rows.device != dst.device:
                rows = rows.to(dst.device, non_blocking=True)
            dst[:, lv.slot_offset : lv.slot_offset + lv.block_bytes].index_copy_(0, sidx, rows)

    def scatter(self, src: torch.Tensor, slots: Sequence[int], block_ids: Sequence[int]) -> None:
        """Copy slot rows ``slots`` of ``src`` into engine blocks ``block_ids``."""
        if not block_ids:
            return
        sidx = torch.as_tensor(slots, dtype=torch.long, device=src.device)
        bidx = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        n = len(block_ids)
        for lv in self.layers:
            rows = src[:, lv.slot_offset : lv.slot_offset + lv.block_bytes].index_select(0, sidx)
            if rows.device != self.device:
                rows = rows.to(self.device, non_blocking=True)
            data = rows.view(lv.tensor.dtype).reshape(n, lv.pre, -1).transpose(0, 1)
            lv.tensor.index_copy_(1, bidx, data)
