"""Block copies between vLLM's paged KV tensors and L1 slots.

What a connector is handed
==========================

vLLM 0.32 allocates one flat int8 buffer (``allocate_kv_cache``,
``vllm/v1/worker/utils.py``) and views it per layer as a *logical*
``[B, H, N, C]`` tensor (``create_kv_cache_views``,
``vllm/v1/kv_cache_interface.py``): blocks, head slots, tokens, content (K and
V of one head and token side by side, ``head_size + head_size_v`` elements; MLA
has ``H = 1`` and ``C`` = the latent). The strides come from the resolved
``KVCacheLayout`` (``vllm/v1/kv_cache_layout.py``), a stride permutation of the
logical ``[L, B, H, N, C]``: ``LBHNC`` (the default; the CPU backend's only
one) is contiguous per layer, ``LBNHC`` (the old "NHD") swaps tokens and heads
inside a block, ``LHBNC`` puts heads outside the blocks, and ``BLHNC`` /
``BHLNC`` interleave the layers inside a block. Every layout but ``LBHNC``
therefore hands over non-contiguous views.

``register_kv_caches`` receives the *manager* views (``kv_caches`` as
``initialize_kv_cache_tensors`` returns them, not the kernel-block views of
``map_kv_caches_to_kernel_blocks``). When the backend needs kernel blocks
smaller than the KV manager's, dim 0 has ``num_blocks * ratio`` kernel blocks
and manager block ``b`` is kernel blocks ``b * ratio ... b * ratio + ratio - 1``
(``create_kv_cache_views`` divides the block stride by ``ratio``;
``group_kernel_blocks`` in ``kv_cache_interface.py`` undoes it). Layers that
reuse another layer's KV (``shared_kv_cache_layers``) are the very same tensor
under a second name.

Older vLLM handed per-layer tensors such as ``[2, B, N, H, D]``
(FlashAttention), ``[B, 2, N, H, D]`` (FlashInfer), ``[B, H, N, 2 * D]`` (CPU)
or ``[B, N, D]`` (MLA), possibly ``.permute``-d views of an HND allocation. The
code below never relies on one of these shapes: it reads shapes and strides.

Slot format
===========

A slot holds one manager block of every layer. Layers are concatenated in
memory order (byte offset inside their storage, then name; in vLLM 0.32 that is
the model's layer order), an aliased layer counted once. One layer's part is
that block's bytes in the tensor's *physical* (memory) order: the block's
dimensions sorted by stride, outermost first. So a block stored as one
contiguous run (``LBHNC``, ``LBNHC``) is copied as one run, and under
``BLHNC`` a block of all layers is one run. The bytes depend on the physical
layout, which is why the layout is part of the cache namespace; two engines
with the same layout agree byte for byte, and any layout round-trips exactly.

Copies
======

A call's ``(block, slot)`` pairs are first merged into runs of consecutive
blocks going to consecutive slots. Layers sharing a storage, block geometry
and a constant distance between them form a *stack* that is moved as one
strided view (in vLLM 0.32 all layers of a group are one stack). On the CPU
each (run, stack) is one copy straight between the engine's storage and the
slot rows, through numpy views built once (see ``TORCH_MIN_BYTES``): no index
tensors, no temporaries.

On CUDA the slots live in (pinned) host memory and the copies run on a stream
of their own. A strided host-device ``copy_`` would make torch allocate
contiguous temporaries itself (on the host too, with a synchronous copy), so
each run is first packed on the device into a contiguous staging tensor (one
kernel per stack) and then moved with one ``non_blocking`` copy into or out of
the slot rows. Where a run is already one contiguous range on both sides it is
copied directly. ``gather`` and ``scatter`` return a :class:`CopyHandle`; see
their docstrings for when the bytes are valid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import as_strided

# Version of the slot byte format described above. It is not derived from the
# tensors: bump it whenever the format changes, so that a cache namespace that
# includes it never mixes bytes written in two formats.
SLOT_FORMAT = "physical-v1"

# Upper bound of one device staging tensor on CUDA. Staging comes from the
# caching allocator; bounding it keeps a large store from needing GPU memory
# that vLLM has already handed to the KV cache.
STAGE_BYTES = 64 << 20

# CPU copies go through views built once, in numpy: slicing one costs ~0.2 us
# where building a torch ``as_strided`` view costs ~1 us, numpy's strided copy
# is a memcpy per contiguous run (at plain memcpy speed, measured), and it
# runs on the calling thread alone with the GIL released. Torch would split a
# large copy over its intra-op threads, up to ~1.5x faster on idle cores, but
# on a loaded machine (or next to a CPU engine's own OpenMP threads) a split
# copy waits for descheduled workers: measured 20x slower here. Set this to a
# byte count to send copies at least that large to torch when it has threads.
TORCH_MIN_BYTES: int | None = None

# (size, byte stride) of one dimension
_Dim = tuple[int, int]


@dataclass(frozen=True)
class LayerView:
    """How one layer's engine tensor maps onto slot bytes.

    ``tensor`` is the engine tensor exactly as registered and ``block_dim`` its
    block dimension. When kernel blocks are smaller than manager blocks
    (``ratio > 1``) that dimension indexes kernel blocks; :attr:`manager_blocks`
    is a view of the same memory whose ``block_dim`` indexes manager blocks.
    """

    name: str
    tensor: torch.Tensor
    block_dim: int
    ratio: int  # kernel blocks per manager block
    num_blocks: int  # manager blocks
    slot_offset: int  # byte offset of this layer inside a slot
    block_bytes: int  # bytes of one manager block of this layer
    aliases: tuple[str, ...] = ()  # other names registered for this tensor

    @property
    def manager_blocks(self) -> torch.Tensor:
        """``tensor`` with ``block_dim`` indexing manager blocks (a view).

        E.g. fault injection: ``v.index_add_(lv.block_dim, ids, ones)``.
        """
        if self.ratio == 1:
            return self.tensor
        return self.tensor.unflatten(self.block_dim, (self.num_blocks, self.ratio))


class CopyHandle:
    """Completion of one :meth:`KVLayout.gather` or :meth:`KVLayout.scatter`.

    CPU copies are complete when the call returns; the handle is then inert.
    On CUDA it wraps an event recorded on the copy stream after the copies.
    """

    __slots__ = ("_device", "_event")

    def __init__(
        self, event: torch.cuda.Event | None = None, device: torch.device | None = None
    ) -> None:
        self._event = event
        self._device = device

    def done(self) -> bool:
        """Whether the copies have completed (never blocks)."""
        return self._event is None or bool(self._event.query())

    def wait(self) -> None:
        """Block the calling host thread until the copies have completed."""
        if self._event is not None:
            self._event.synchronize()

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make ``stream`` (default: this thread's current one) wait for the copies.

        Orders later GPU work after the copies without blocking the host.
        """
        if self._event is not None:
            (stream or torch.cuda.current_stream(self._device)).wait_event(self._event)


_DONE = CopyHandle()


# ---------------------------------------------------------------- planning
def _find_block_dim(shape: Sequence[int], num_blocks: int, name: str, hint: int | None) -> int:
    """The block dimension of one layer's tensor.

    vLLM 0.32 views are ``[B, H, N, C]`` (B possibly ``num_blocks * ratio``);
    older ones put the blocks at dim 0, or at dim 1 behind a K/V dim of size 2
    (FlashAttention ``[2, B, N, H, D]``). Only a 5-D tensor with size 2 in both
    leading dims cannot be told apart; it needs ``block_dim``.
    """
    ndim = len(shape)
    if hint is not None:
        if not 0 <= hint < ndim or shape[hint] < num_blocks or shape[hint] % num_blocks:
            raise ValueError(
                f"layer {name}: block_dim={hint} of shape {tuple(shape)} does not hold "
                f"a multiple of num_blocks={num_blocks}"
            )
        return hint
    cands = [d for d in range(min(2, ndim)) if shape[d] >= num_blocks and not shape[d] % num_blocks]
    if not cands:
        raise ValueError(
            f"layer {name}: neither of the leading dims of {tuple(shape)} is a multiple of "
            f"num_blocks={num_blocks}; the KV tensors disagree with the KV manager's "
            "block count"
        )
    if len(cands) == 1 or ndim != 5:
        return cands[0]
    if shape[1] == 2 and shape[0] != 2:
        return 0  # [B, 2, N, H, D]
    if shape[0] == 2 and shape[1] != 2:
        return 1  # [2, B, N, H, D]
    raise ValueError(
        f"layer {name}: block dimension of {tuple(shape)} is ambiguous with "
        f"num_blocks={num_blocks}; pass block_dim"
    )


def _physical(dims: list[_Dim], what: str) -> list[_Dim]:
    """``dims`` outermost first, checked to address every byte at most once.

    With dims sorted by stride, each stride at least the extent of everything
    inside it makes the map from indices to offsets injective (mixed radix).
    """
    out = sorted((d for d in dims if d[0] > 1), key=lambda d: -d[1])
    extent = 1  # bytes spanned by the dims inside the current one
    for size, stride in reversed(out):
        if stride < extent:
            raise ValueError(f"{what}: elements overlap (dims {out})")
        extent += (size - 1) * stride
    return out


def _coalesce(dims: list[_Dim]) -> list[_Dim]:
    """Merge neighbours (outermost first) that are one contiguous dimension."""
    out: list[_Dim] = []
    for size, stride in dims:
        if out and out[-1][1] == size * stride:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out or [(1, 1)]


@dataclass(frozen=True)
class _LayerGeom:
    """One layer in bytes of its storage."""

    view: LayerView
    flat: torch.Tensor  # uint8 over the whole engine storage
    storage_ptr: int
    base: int  # byte offset of manager block 0
    block_stride: int  # bytes between manager blocks
    dims: tuple[_Dim, ...]  # one block's bytes, physical order, coalesced


class _Stack:
    """Layers moved together: layer ``i`` sits ``i * layer_step`` bytes past the first."""

    def __init__(self, layers: list[_LayerGeom], num_blocks: int) -> None:
        first = layers[0]
        self.flat = first.flat
        self.base = first.base
        self.block_stride = first.block_stride
        self.count = len(layers)
        self.layer_step = layers[1].base - first.base if self.count > 1 else 0
        self.block_bytes = first.view.block_bytes
        self.slot_offset = first.view.slot_offset
        self.nbytes = self.count * self.block_bytes  # in one slot
        sizes = tuple(s for s, _ in first.dims)
        # Engine side: [k blocks, layers, *block dims]; slot side: the same
        # shape, densely packed inside a slot row.
        self.shape = (self.count, *sizes)
        self.eng_strides = (self.layer_step, *(st for _, st in first.dims))
        self.slot_strides = (self.block_bytes, *_dense_strides(sizes))
        # All layers of a block are one run, the next block's right after it:
        # then k consecutive blocks are one contiguous byte range.
        tile = _coalesce(_physical(list(zip(self.shape, self.eng_strides, strict=True)), "stack"))
        self.dense = tile == [(self.nbytes, 1)] and self.block_stride == self.nbytes
        # CPU: every block as one numpy view, ``[num_blocks, *shape]``.
        self.np_engine: np.ndarray | None = None
        if self.flat.device.type == "cpu":
            self.np_engine = as_strided(
                self.flat.numpy()[self.base :],
                (num_blocks, *self.shape),
                (self.block_stride, *self.eng_strides),
            )

    def engine(self, block: int, k: int) -> torch.Tensor:
        """Bytes of manager blocks ``block .. block + k - 1``: ``[k, *shape]``."""
        return self.flat.as_strided(
            (k, *self.shape),
            (self.block_stride, *self.eng_strides),
            self.base + block * self.block_stride,
        )

    def engine_range(self, block: int, k: int) -> torch.Tensor:
        """The same bytes as one 1-D range (only when ``dense``)."""
        start = self.base + block * self.block_stride
        return self.flat[start : start + k * self.nbytes]

    def np_slots(self, buf: np.ndarray) -> np.ndarray:
        """This stack's bytes in every row of ``buf`` (numpy): ``[num_slots, *shape]``."""
        return as_strided(
            buf[:, self.slot_offset :],
            (buf.shape[0], *self.shape),
            (buf.strides[0], *self.slot_strides),
        )

    def slots(self, buf: torch.Tensor, slot: int, k: int) -> torch.Tensor:
        """This stack's bytes in rows ``slot .. slot + k - 1`` of ``buf``: ``[k, *shape]``."""
        row = buf.stride(0)
        return buf.as_strided(
            (k, *self.shape),
            (row, *self.slot_strides),
            buf.storage_offset() + slot * row + self.slot_offset,
        )


def _dense_strides(sizes: Sequence[int]) -> tuple[int, ...]:
    strides: list[int] = []
    acc = 1
    for s in reversed(sizes):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _stackable(a: _LayerGeom, b: _LayerGeom) -> bool:
    """Same allocation and block geometry, ``b`` after ``a``."""
    return (
        a.storage_ptr == b.storage_ptr
        and a.flat.device == b.flat.device
        and a.block_stride == b.block_stride
        and a.dims == b.dims
        and b.base > a.base
    )


def _disjoint_stack(layers: list[_LayerGeom], step: int) -> bool:
    """Whether ``layers`` as one ``[L, *block dims]`` view address distinct bytes."""
    try:
        _physical([(len(layers), step), *layers[0].dims], "stack")
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- layout
class KVLayout:
    """Slot layout over one TP rank's engine KV tensors, and the copies.

    ``num_blocks`` is the KV manager's block count; a tensor's block dim may
    hold a multiple of it (kernel blocks smaller than manager blocks).
    ``block_dim`` forces the block dimension of every tensor (only needed for
    tensors where it is ambiguous; see ``_find_block_dim``).
    """

    def __init__(
        self,
        kv_caches: Mapping[str, torch.Tensor],
        num_blocks: int,
        *,
        block_dim: int | None = None,
    ) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors registered")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        self.num_blocks = num_blocks
        geoms = self._plan_layers(kv_caches, num_blocks, block_dim)
        self.layers: list[LayerView] = [g.view for g in geoms]
        self.slot_bytes = sum(lv.block_bytes for lv in self.layers)
        self.device = self.layers[0].tensor.device
        if any(lv.tensor.device != self.device for lv in self.layers):
            raise ValueError("KV tensors are on different devices")
        self._stacks = self._plan_stacks(geoms, num_blocks)
        self._cuda = self.device.type == "cuda"
        # One stream for all copies of this rank: copies are ordered among
        # themselves (a store into a slot after a load from it is safe) and
        # overlap with the compute stream.
        self._stream = torch.cuda.Stream(device=self.device) if self._cuda else None
        # On CUDA a run is also one staging tensor: bound its size.
        self._max_run = max(1, STAGE_BYTES // self.slot_bytes) if self._cuda else 1 << 62
        self._host_cache: tuple[torch.Tensor, tuple[int, int], list[np.ndarray]] | None = None

    # -------------------------------------------------------- planning
    @staticmethod
    def _plan_layers(
        kv_caches: Mapping[str, torch.Tensor], num_blocks: int, hint: int | None
    ) -> list[_LayerGeom]:
        kernel_blocks = {name: -1 for name in kv_caches}
        # Names registered for the same memory (cross-layer KV sharing): such a
        # layer has no KV of its own, so it is copied once, under its first name.
        same: dict[tuple[object, ...], list[str]] = {}
        for name in sorted(kv_caches):
            t = kv_caches[name]
            if t.dim() == 0:
                raise ValueError(f"layer {name}: KV tensor is a scalar")
            bd = _find_block_dim(t.shape, num_blocks, name, hint)
            kernel_blocks[name] = int(t.shape[bd])
            key = (
                t.untyped_storage().data_ptr(),
                t.device,
                t.storage_offset() * t.element_size(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
            same.setdefault(key, []).append(name)
        if len(set(kernel_blocks.values())) > 1:
            raise ValueError(
                "KV tensors disagree on the number of blocks along their block dim: "
                + ", ".join(f"{n}={b}" for n, b in sorted(kernel_blocks.items()))
            )
        raw: list[tuple[int, str, tuple[str, ...], torch.Tensor, int, int, tuple[_Dim, ...]]] = []
        for names in same.values():
            name, t = names[0], kv_caches[names[0]]
            bd = _find_block_dim(t.shape, num_blocks, name, hint)
            ratio = int(t.shape[bd]) // num_blocks
            es = t.element_size()
            inner: list[_Dim] = [
                (int(t.shape[d]), int(t.stride(d)) * es) for d in range(t.dim()) if d != bd
            ]
            if ratio > 1:
                # Kernel blocks of one manager block: an inner dimension.
                inner.append((ratio, int(t.stride(bd)) * es))
            inner.append((es, 1))  # the bytes of one element
            block_stride = int(t.stride(bd)) * es * ratio
            _physical([*inner, (num_blocks, block_stride)], f"layer {name}")
            dims = tuple(_coalesce(_physical(inner, f"layer {name}")))
            base = int(t.storage_offset()) * es
            raw.append((base, name, tuple(names[1:]), t, bd, block_stride, dims))
        # Memory order: consecutive layers of one allocation are then also
        # consecutive in the slot, which is what lets them form a stack.
        raw.sort(key=lambda r: (r[0], r[1]))
        geoms: list[_LayerGeom] = []
        flats: dict[int, torch.Tensor] = {}
        offset = 0
        for base, name, aliases, t, bd, block_stride, dims in raw:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            flat = flats.get(ptr)
            if flat is None:
                flat = torch.empty(0, dtype=torch.uint8, device=t.device)
                flat.set_(storage, 0, (storage.nbytes(),), (1,))
                flats[ptr] = flat
            nbytes = math.prod(s for s, _ in dims)
            view = LayerView(
                name=name,
                tensor=t,
                block_dim=bd,
                ratio=int(t.shape[bd]) // num_blocks,
                num_blocks=num_blocks,
                slot_offset=offset,
                block_bytes=nbytes,
                aliases=aliases,
            )
            geoms.append(_LayerGeom(view, flat, ptr, base, block_stride, dims))
            offset += nbytes
        return geoms

    @staticmethod
    def _plan_stacks(geoms: list[_LayerGeom], num_blocks: int) -> list[_Stack]:
        """Greedy: extend a stack while the next layer continues its arithmetic."""
        stacks: list[_Stack] = []
        group = [geoms[0]]
        for g in geoms[1:]:
            step = group[1].base - group[0].base if len(group) > 1 else g.base - group[0].base
            if _stackable(group[-1], g) and g.base - group[-1].base == step:
                candidate = [*group, g]
                if _disjoint_stack(candidate, step):
                    group = candidate
                    continue
            stacks.append(_Stack(group, num_blocks))
            group = [g]
        stacks.append(_Stack(group, num_blocks))
        return stacks

    # -------------------------------------------------------- runs
    def _host(self, buf: torch.Tensor) -> list[np.ndarray]:
        """Check a slot tensor; on the CPU, also its per-stack numpy views.

        Cached for the last tensor: the worker passes the same one every call.
        """
        key = (buf.data_ptr(), buf.shape[0])
        cached = self._host_cache
        if cached is not None and cached[0] is buf and cached[1] == key:
            return cached[2]
        if buf.dtype != torch.uint8 or buf.dim() != 2 or buf.shape[1] != self.slot_bytes:
            raise ValueError(
                f"slot tensor must be uint8 [num_slots, {self.slot_bytes}], got "
                f"{buf.dtype} {tuple(buf.shape)}"
            )
        if buf.stride(1) != 1:
            raise ValueError("slot rows must be contiguous")
        if buf.device.type != "cpu":
            raise ValueError(f"slot tensor must be in host memory, got {buf.device}")
        views: list[np.ndarray] = []
        if not self._cuda:
            arr = buf.numpy()
            views = [st.np_slots(arr) for st in self._stacks]
        self._host_cache = (buf, key, views)
        return views

    def _runs(
        self, block_ids: Sequence[int], slots: Sequence[int], num_slots: int
    ) -> list[tuple[int, int, int]]:
        """``(first block, first slot, count)`` runs, in call order."""
        n = len(block_ids)
        if len(slots) != n:
            raise ValueError(f"{n} block ids but {len(slots)} slots")
        if n == 0:
            return []
        # as_strided views do not bounds-check against the tensor, only the
        # storage: a bad id would silently hit another layer's memory.
        if min(block_ids) < 0 or max(block_ids) >= self.num_blocks:
            raise IndexError(f"block id out of range [0, {self.num_blocks})")
        if min(slots) < 0 or max(slots) >= num_slots:
            raise IndexError(f"slot out of range [0, {num_slots})")
        runs: list[tuple[int, int, int]] = []
        b0, s0, k = int(block_ids[0]), int(slots[0]), 1
        cap = self._max_run
        for b, s in zip(block_ids[1:], slots[1:], strict=True):
            if b == b0 + k and s == s0 + k and k < cap:
                k += 1
            else:
                runs.append((b0, s0, k))
                b0, s0, k = int(b), int(s), 1
        runs.append((b0, s0, k))
        return runs

    def _cpu_copy(
        self,
        runs: list[tuple[int, int, int]],
        buf: torch.Tensor,
        views: list[np.ndarray],
        *,
        to_slots: bool,
    ) -> None:
        torch_min = 1 << 62
        if TORCH_MIN_BYTES is not None and torch.get_num_threads() > 1:
            torch_min = TORCH_MIN_BYTES
        for b, s, k in runs:
            for st, sv in zip(self._stacks, views, strict=True):
                ev = st.np_engine
                assert ev is not None
                if k * st.nbytes < torch_min:
                    if to_slots:
                        sv[s : s + k] = ev[b : b + k]
                    else:
                        ev[b : b + k] = sv[s : s + k]
                elif to_slots:
                    st.slots(buf, s, k).copy_(st.engine(b, k))
                else:
                    st.engine(b, k).copy_(st.slots(buf, s, k))

    # -------------------------------------------------------- API
    @property
    def on_device(self) -> bool:
        """True when the KV lives on a CUDA device (copies are queued, not done on return)."""
        return self._cuda

    def fence(self) -> torch.cuda.Event | None:
        """An event on this thread's current CUDA stream (None on the CPU).

        Copies started from another thread (whose current stream is not the
        compute stream) pass it as ``after`` to be ordered after the GPU work
        queued so far.
        """
        if not self._cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def gather(
        self,
        block_ids: Sequence[int],
        dst: torch.Tensor,
        slots: Sequence[int],
        *,
        after: torch.cuda.Event | None = None,
    ) -> CopyHandle:
        """Copy engine blocks ``block_ids[i]`` into rows ``slots[i]`` of ``dst``.

        ``dst`` is the ``[num_slots, slot_bytes]`` uint8 slot tensor in host
        memory. Pairs are applied in order (a repeated slot gets the last block).

        On CUDA the copies are queued after the GPU work on this thread's
        current stream (or after ``after``, a :meth:`fence`), and, when
        ``after`` is None, that stream waits for them, so a later forward pass
        cannot overwrite a block before it is read. The slot bytes are valid
        only once the returned handle is done: call ``wait()`` before the host
        reads them. On the CPU the copy is complete on return.
        """
        views = self._host(dst)
        runs = self._runs(block_ids, slots, dst.shape[0])
        if not runs:
            return _DONE
        if not self._cuda:
            self._cpu_copy(runs, dst, views, to_slots=True)
            return _DONE
        return self._cuda_copy(runs, dst, after, to_slots=True)

    def scatter(
        self,
        src: torch.Tensor,
        slots: Sequence[int],
        block_ids: Sequence[int],
        *,
        after: torch.cuda.Event | None = None,
    ) -> CopyHandle:
        """Copy rows ``slots[i]`` of ``src`` into engine blocks ``block_ids[i]``.

        Pairs are applied in order (a repeated block gets the last slot).

        On CUDA the copies are queued after the GPU work on this thread's
        current stream (or after ``after``, a :meth:`fence`): earlier kernels
        still using the blocks finish first. When ``after`` is None, that
        stream then waits for the copies: call it from the forward thread and
        the forward pass sees the loaded blocks with no host sync. From any
        other thread pass ``after`` and ``wait()`` on the handle before
        reporting the load done. Either way the host must not write the
        ``src`` rows until the handle is done (:meth:`synchronize` waits for
        all). On the CPU the copy is complete on return.
        """
        views = self._host(src)
        runs = self._runs(block_ids, slots, src.shape[0])
        if not runs:
            return _DONE
        if not self._cuda:
            self._cpu_copy(runs, src, views, to_slots=False)
            return _DONE
        return self._cuda_copy(runs, src, after, to_slots=False)

    def synchronize(self) -> None:
        """Block until every copy this layout has queued is complete."""
        if self._stream is not None:
            self._stream.synchronize()

    # -------------------------------------------------------- CUDA
    def _cuda_copy(
        self,
        runs: list[tuple[int, int, int]],
        host: torch.Tensor,
        after: torch.cuda.Event | None,
        *,
        to_slots: bool,
    ) -> CopyHandle:
        stream = self._stream
        assert stream is not None
        compute = torch.cuda.current_stream(self.device)
        if after is None:
            stream.wait_stream(compute)
        else:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            # Staging is allocated on the copy stream, so the caching
            # allocator hands its memory out again only to work queued after
            # these copies on the same stream.
            for b, s, k in runs:
                if to_slots:
                    self._out(b, host, s, k)
                else:
                    self._in(host, s, b, k)
        ev = torch.cuda.Event()
        ev.record(stream)
        handle = CopyHandle(ev, self.device)
        if after is None:
            handle.wait_stream(compute)
        return handle

    def _out(self, block: int, host: torch.Tensor, slot: int, k: int) -> None:
        """Queue one run device -> host (on the current stream)."""
        if len(self._stacks) == 1 and self._stacks[0].dense and host.stride(0) == self.slot_bytes:
            host[slot : slot + k].view(-1).copy_(
                self._stacks[0].engine_range(block, k), non_blocking=True
            )
            return
        stage = self._pack(block, k)
        if host.stride(0) == self.slot_bytes:
            host[slot : slot + k].copy_(stage, non_blocking=True)
        else:
            for i in range(k):
                host[slot + i].copy_(stage[i], non_blocking=True)

    def _in(self, host: torch.Tensor, slot: int, block: int, k: int) -> None:
        """Queue one run host -> device (on the current stream)."""
        if len(self._stacks) == 1 and self._stacks[0].dense and host.stride(0) == self.slot_bytes:
            self._stacks[0].engine_range(block, k).copy_(
                host[slot : slot + k].view(-1), non_blocking=True
            )
            return
        stage = torch.empty((k, self.slot_bytes), dtype=torch.uint8, device=self.device)
        if host.stride(0) == self.slot_bytes:
            stage.copy_(host[slot : slot + k], non_blocking=True)
        else:
            for i in range(k):
                stage[i].copy_(host[slot + i], non_blocking=True)
        self._unpack(stage, block, k)

    def _pack(self, block: int, k: int) -> torch.Tensor:
        """Blocks ``block .. block + k - 1`` as contiguous ``[k, slot_bytes]`` (device)."""
        stage = torch.empty((k, self.slot_bytes), dtype=torch.uint8, device=self.device)
        for st in self._stacks:
            st.slots(stage, 0, k).copy_(st.engine(block, k))
        return stage

    def _unpack(self, stage: torch.Tensor, block: int, k: int) -> None:
        """Inverse of :meth:`_pack`."""
        for st in self._stacks:
            st.engine(block, k).copy_(st.slots(stage, 0, k))
