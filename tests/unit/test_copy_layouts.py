"""KVLayout over every KV layout vLLM hands a connector.

vLLM 0.32 tensors are built by vLLM itself (``allocate_kv_cache`` with a
``KVCacheConfig`` placed as ``get_kv_cache_config_from_groups`` places it), so
shapes, strides and offsets are exactly what ``register_kv_caches`` receives.
Older vLLM layouts (per-backend ``get_kv_cache_shape`` /
``get_kv_cache_stride_order``, gone from 0.32) are hard-coded below with the
shapes those backends returned.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from vllm_aibrix.vllm import copy as copy_mod
from vllm_aibrix.vllm.copy import KVLayout

vllm_kv = pytest.importorskip("vllm.v1.kv_cache_interface")
from vllm.v1.core.kv_cache_utils import _get_kv_cache_bytes_per_block  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

LAYOUTS = list(KVCacheLayout)
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.float8_e4m3fn]
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(12)]  # "10" sorts before "2"
NB = 23  # manager blocks


# ---------------------------------------------------------------- builders
def fill_random(kv: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Random bytes over every storage behind ``kv`` (padding included)."""
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for t in kv.values():
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
        flat.copy_(torch.randint(0, 256, (st.nbytes(),), dtype=torch.uint8, generator=gen))


def vllm_kv_caches(
    layout: KVCacheLayout,
    *,
    dtype: torch.dtype = torch.bfloat16,
    num_blocks: int = NB,
    layers: int = 5,
    kernel_block_size: int | None = None,
    mla: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The tensors vLLM 0.32 registers with a connector, allocated by vLLM.

    Placement mirrors ``get_kv_cache_config_from_groups``
    (vllm/v1/core/kv_cache_utils.py) for one KV cache group.
    """
    if mla:
        spec: object = vllm_kv.MLAAttentionSpec(
            block_size=16, num_kv_heads=1, head_size=24, dtype=dtype
        )
    else:
        spec = vllm_kv.FullAttentionSpec(block_size=16, num_kv_heads=4, head_size=8, dtype=dtype)
    names = NAMES[:layers]
    groups = [vllm_kv.KVCacheGroupSpec(list(names), spec)]
    per_block = _get_kv_cache_bytes_per_block(groups, layout)
    interleaved = per_block if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = vllm_kv.compute_layout_strides(
        spec, num_blocks, len(names), layout, fixed_strides=(None, interleaved, None, None, None)
    )
    tensor = vllm_kv.KVCacheTensor(
        size=per_block * num_blocks,
        layers=list(names),
        layer_stride=layer_stride,
        block_stride=block_stride,
    )
    cfg = vllm_kv.KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[tensor], kv_cache_groups=groups
    )
    kv = allocate_kv_cache(
        cfg,
        torch.device(device),
        layout,
        [kernel_block_size] if kernel_block_size is not None else None,
    )
    fill_random(kv, seed)
    return kv


# Older vLLM (before 0.32): one tensor per layer, logical shape from the
# backend's get_kv_cache_shape, allocated in physical order and permuted back
# with the inverse of get_kv_cache_stride_order (HND: heads before tokens).
# FlashAttention (vllm/v1/attention/backends/flash_attn.py, <= 0.11):
#   [2, num_blocks, block_size, num_kv_heads, head_size]
# FlashInfer / Triton (flashinfer.py, triton_attn.py, <= 0.11):
#   [num_blocks, 2, block_size, num_kv_heads, head_size]
# CPU (cpu_attn.py): [num_blocks, num_kv_heads, block_size, 2 * head_size]
# MLA (mla/common.py): [num_blocks, block_size, head_size]
LEGACY = {
    "flash_attn_nhd": ((2, NB, 16, 4, 8), (0, 1, 2, 3, 4)),
    "flash_attn_hnd": ((2, NB, 16, 4, 8), (0, 1, 3, 2, 4)),
    "flashinfer_nhd": ((NB, 2, 16, 4, 8), (0, 1, 2, 3, 4)),
    "flashinfer_hnd": ((NB, 2, 16, 4, 8), (0, 1, 3, 2, 4)),
    "triton": ((NB, 2, 16, 4, 8), (0, 1, 2, 3, 4)),
    "cpu": ((NB, 4, 16, 16), (0, 1, 2, 3)),
    "mla": ((NB, 16, 24), (0, 1, 2)),
}


def legacy_tensor(kind: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """One layer's tensor: allocated in physical order, viewed in logical order."""
    shape, order = LEGACY[kind]
    raw = torch.empty([shape[i] for i in order], dtype=dtype)
    inverse = [order.index(i) for i in range(len(order))]
    return raw.permute(*inverse)


def legacy_kv_caches(
    kind: str, *, layers: int = 4, shared: bool = False, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Per-layer tensors; ``shared``: views of one allocation (a leading L dim)."""
    if shared:
        shape, order = LEGACY[kind]
        raw = torch.empty([layers, *(shape[i] for i in order)], dtype=dtype)
        inverse = [0, *(1 + order.index(i) for i in range(len(order)))]
        full = raw.permute(*inverse)
        kv = {NAMES[i]: full[i] for i in range(layers)}
    else:
        kv = {NAMES[i]: legacy_tensor(kind, dtype) for i in range(layers)}
    fill_random(kv)
    return kv


# ---------------------------------------------------------------- helpers
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw(t: torch.Tensor) -> torch.Tensor:
    """The same elements as integers: bit-exact comparisons (NaN-proof, fp8-proof)."""
    return t.view(_INT[t.element_size()])


def manager_blocks(lay: KVLayout, name: str, ids: Sequence[int]) -> torch.Tensor:
    """Logical content of manager blocks ``ids`` of one layer, as integers."""
    lv = next(lv for lv in lay.layers if lv.name == name)
    v = raw(lv.manager_blocks)
    return v.index_select(lv.block_dim, torch.tensor(list(ids), dtype=torch.long, device=v.device))


def snapshot(kv: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: raw(t).clone() for n, t in kv.items()}


def slots_for(lay: KVLayout, num_slots: int = 40, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_slots, lay.slot_bytes), dtype=torch.uint8, generator=gen)


def assert_round_trip(
    kv: dict[str, torch.Tensor],
    src_blocks: Sequence[int],
    slots: Sequence[int],
    dst_blocks: Sequence[int],
    **kw: object,
) -> None:
    """gather(src_blocks) then scatter into dst_blocks: dst holds src's content."""
    lay = KVLayout(kv, kw.pop("num_blocks", NB), **kw)  # type: ignore[arg-type]
    buf = slots_for(lay)
    expect = {lv.name: manager_blocks(lay, lv.name, src_blocks) for lv in lay.layers}
    lay.gather(src_blocks, buf, slots)
    lay.scatter(buf, slots, dst_blocks)
    for lv in lay.layers:
        assert torch.equal(manager_blocks(lay, lv.name, dst_blocks), expect[lv.name]), lv.name


SRC, SLOTS, DST = [0, 3, 4, 5, 9, 17], [30, 2, 3, 4, 11, 0], [22, 12, 13, 14, 1, 7]


# ---------------------------------------------------------------- vLLM 0.32
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_vllm_layout_round_trips_bit_exactly(layout: KVCacheLayout, dtype: torch.dtype) -> None:
    kv = vllm_kv_caches(layout, dtype=dtype)
    assert_round_trip(kv, SRC, SLOTS, DST)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_vllm_layout_slot_bytes_equal_page_size_times_layers(layout: KVCacheLayout) -> None:
    # The worker checks this against the scheduler's plan.
    kv = vllm_kv_caches(layout, layers=5)
    spec = vllm_kv.FullAttentionSpec(
        block_size=16, num_kv_heads=4, head_size=8, dtype=torch.bfloat16
    )
    assert KVLayout(kv, NB).slot_bytes == spec.page_size_bytes * 5


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_layers_of_one_vllm_allocation_are_copied_together(layout: KVCacheLayout) -> None:
    lay = KVLayout(vllm_kv_caches(layout, layers=12), NB)
    assert len(lay._stacks) == 1


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC], ids=str)
@pytest.mark.parametrize("ratio", [2, 4])
def test_kernel_blocks_smaller_than_manager_blocks_round_trip(
    layout: KVCacheLayout, ratio: int
) -> None:
    # vLLM splits a manager block into kernel blocks only for dense pages
    # (create_kv_cache_views raises otherwise), i.e. these two layouts.
    kv = vllm_kv_caches(layout, kernel_block_size=16 // ratio)
    assert next(iter(kv.values())).shape[0] == NB * ratio
    lay = KVLayout(kv, NB)
    assert {lv.ratio for lv in lay.layers} == {ratio}
    assert_round_trip(kv, SRC, SLOTS, DST)


def test_kernel_block_split_changes_no_slot_byte() -> None:
    # A block split into kernel blocks is still the same dense page.
    whole = vllm_kv_caches(KVCacheLayout.LBHNC, seed=5)
    split = vllm_kv_caches(KVCacheLayout.LBHNC, kernel_block_size=4, seed=5)
    a, b = KVLayout(whole, NB), KVLayout(split, NB)
    buf_a, buf_b = slots_for(a), slots_for(b)
    a.gather(SRC, buf_a, SLOTS)
    b.gather(SRC, buf_b, SLOTS)
    assert torch.equal(buf_a, buf_b)


@pytest.mark.parametrize("layout", [KVCacheLayout.LBHNC, KVCacheLayout.BLHNC], ids=str)
def test_mla_layout_round_trips(layout: KVCacheLayout) -> None:
    kv = vllm_kv_caches(layout, mla=True)
    assert next(iter(kv.values())).shape[1] == 1  # one latent "head"
    assert_round_trip(kv, SRC, SLOTS, DST)


def test_same_logical_content_round_trips_in_every_physical_layout() -> None:
    ref = vllm_kv_caches(KVCacheLayout.LBHNC, seed=3)
    slot_images = set()
    for layout in LAYOUTS:
        kv = vllm_kv_caches(layout, seed=4)
        for name, t in kv.items():
            t.copy_(ref[name])  # same logical content, other physical order
        lay = KVLayout(kv, NB)
        buf = torch.zeros((len(SRC), lay.slot_bytes), dtype=torch.uint8)
        lay.gather(SRC, buf, list(range(len(SRC))))
        slot_images.add(bytes(buf.numpy()))
        for t in kv.values():
            t.zero_()
        lay.scatter(buf, list(range(len(SRC))), SRC)
        for name, t in kv.items():
            assert torch.equal(raw(t)[SRC], raw(ref[name])[SRC]), (layout.name, name)
    # The slot bytes follow the physical order (hence the layout in the namespace).
    assert len(slot_images) > 1


@pytest.mark.parametrize(
    "layout", [KVCacheLayout.LBHNC, KVCacheLayout.LBNHC, KVCacheLayout.BLHNC], ids=str
)
def test_slot_holds_each_block_in_memory_order(layout: KVCacheLayout) -> None:
    # Block-compact layouts: a layer's block is one run of memory, so its slot
    # part is exactly that run, layers in memory (= model layer) order.
    kv = vllm_kv_caches(layout, layers=12)
    lay = KVLayout(kv, NB)
    assert [lv.name for lv in lay.layers] == NAMES[:12]
    buf = slots_for(lay)
    lay.gather([7], buf, [5])
    for lv in lay.layers:
        t = lv.tensor
        flat = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        start = (t.storage_offset() + 7 * t.stride(0)) * t.element_size()
        run = flat[start : start + lv.block_bytes]
        assert torch.equal(buf[5, lv.slot_offset : lv.slot_offset + lv.block_bytes], run)


# ---------------------------------------------------------------- older layouts
@pytest.mark.parametrize("shared", [False, True], ids=["per-layer", "one-allocation"])
@pytest.mark.parametrize("kind", sorted(LEGACY))
def test_legacy_layout_round_trips(kind: str, shared: bool) -> None:
    assert_round_trip(legacy_kv_caches(kind, shared=shared), SRC, SLOTS, DST)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_legacy_hnd_flash_attn_round_trips_in_every_dtype(dtype: torch.dtype) -> None:
    assert_round_trip(legacy_kv_caches("flash_attn_hnd", dtype=dtype), SRC, SLOTS, DST)


def test_block_dim_is_found_behind_a_kv_dim() -> None:
    lay = KVLayout(legacy_kv_caches("flash_attn_hnd"), NB)
    assert {lv.block_dim for lv in lay.layers} == {1}
    lay = KVLayout(legacy_kv_caches("flashinfer_hnd"), NB)
    assert {lv.block_dim for lv in lay.layers} == {0}


def test_ambiguous_block_dim_needs_a_hint() -> None:
    t = torch.zeros(2, 2, 16, 4, 8)
    with pytest.raises(ValueError, match="ambiguous"):
        KVLayout({"a": t}, 2)
    assert KVLayout({"a": t}, 2, block_dim=1).layers[0].block_dim == 1


# ---------------------------------------------------------------- what is not named
def test_scatter_leaves_blocks_not_named_untouched() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LHBNC)
    lay = KVLayout(kv, NB)
    before = snapshot(kv)
    lay.scatter(slots_for(lay), SLOTS, DST)
    others = [b for b in range(NB) if b not in DST]
    for name, t in kv.items():
        assert torch.equal(raw(t)[others], before[name][others])
        assert not torch.equal(raw(t)[DST], before[name][DST])


def test_scatter_leaves_padding_and_foreign_bytes_untouched() -> None:
    # Every byte of the allocation outside the named blocks stays as it was.
    kv = vllm_kv_caches(KVCacheLayout.BHLNC)
    t0 = next(iter(kv.values()))
    flat = torch.empty(0, dtype=torch.uint8).set_(t0.untyped_storage())
    before = flat.clone()
    lay = KVLayout(kv, NB)
    buf = torch.zeros((40, lay.slot_bytes), dtype=torch.uint8)
    lay.scatter(buf, [0, 1], [4, 5])
    changed = (flat != before).nonzero().flatten()
    page = t0.stride(0) * t0.element_size()  # BHLNC: a block is one tile of all layers
    assert changed.numel() > 0
    assert set((changed // page).tolist()) <= {4, 5}


def test_gather_leaves_slot_rows_not_named_untouched() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBNHC)
    lay = KVLayout(kv, NB)
    buf = slots_for(lay)
    before = buf.clone()
    lay.gather(SRC, buf, SLOTS)
    others = [s for s in range(buf.shape[0]) if s not in SLOTS]
    assert torch.equal(buf[others], before[others])
    assert not torch.equal(buf[SLOTS], before[SLOTS])


def test_slot_rows_with_a_gap_round_trip() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBNHC)
    lay = KVLayout(kv, NB)
    wide = torch.zeros((40, lay.slot_bytes + 24), dtype=torch.uint8)
    buf = wide[:, : lay.slot_bytes]
    expect = {lv.name: manager_blocks(lay, lv.name, SRC) for lv in lay.layers}
    lay.gather(SRC, buf, SLOTS)
    assert not wide[:, lay.slot_bytes :].any()
    lay.scatter(buf, SLOTS, DST)
    for lv in lay.layers:
        assert torch.equal(manager_blocks(lay, lv.name, DST), expect[lv.name])


def test_gather_leaves_engine_untouched() -> None:
    kv = vllm_kv_caches(KVCacheLayout.BLNHC)
    before = snapshot(kv)
    lay = KVLayout(kv, NB)
    lay.gather(SRC, slots_for(lay), SLOTS)
    assert all(torch.equal(raw(t), before[n]) for n, t in kv.items())


# ---------------------------------------------------------------- call patterns
def one_by_one(
    lay: KVLayout, blocks: Sequence[int], buf: torch.Tensor, slots: Sequence[int]
) -> None:
    for b, s in zip(blocks, slots, strict=True):
        lay.gather([b], buf, [s])


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_runs_and_scattered_pairs_give_the_same_slots_as_single_copies(
    layout: KVCacheLayout,
) -> None:
    # Consecutive runs, a repeated run, singletons, a run broken only on the
    # slot side, and one broken only on the block side.
    blocks = [2, 3, 4, 5, 2, 3, 4, 5, 11, 0, 7, 8, 9, 15, 16]
    slots = [0, 1, 2, 3, 10, 11, 12, 13, 7, 39, 20, 22, 23, 30, 31]
    kv = vllm_kv_caches(layout)
    lay = KVLayout(kv, NB)
    a, b = slots_for(lay), slots_for(lay)
    lay.gather(blocks, a, slots)
    one_by_one(lay, blocks, b, slots)
    assert torch.equal(a, b)


def test_repeated_block_in_scatter_gets_the_last_slot() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBHNC)
    lay = KVLayout(kv, NB)
    buf = slots_for(lay)
    lay.scatter(buf, [4, 5, 6, 9], [10, 11, 12, 11])
    lay2 = KVLayout(vllm_kv_caches(KVCacheLayout.LBHNC), NB)
    lay2.scatter(buf, [4, 9, 6], [10, 11, 12])
    for lv, lv2 in zip(lay.layers, lay2.layers, strict=True):
        got = manager_blocks(lay, lv.name, [10, 11, 12])
        assert torch.equal(got, manager_blocks(lay2, lv2.name, [10, 11, 12]))


def test_repeated_slot_in_gather_gets_the_last_block() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LHBNC)
    lay = KVLayout(kv, NB)
    a, b = slots_for(lay), slots_for(lay)
    lay.gather([1, 2, 3], a, [5, 6, 5])
    lay.gather([3, 2], b, [5, 6])
    assert torch.equal(a, b)


def test_empty_call_copies_nothing() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBHNC)
    lay = KVLayout(kv, NB)
    buf = slots_for(lay)
    before = buf.clone()
    assert lay.gather([], buf, []).done()
    assert lay.scatter(buf, [], []).done()
    assert torch.equal(buf, before)


def test_torch_and_numpy_copy_paths_give_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    kv = vllm_kv_caches(KVCacheLayout.LHBNC, layers=3)
    lay = KVLayout(kv, NB)
    blocks, slots = list(range(2, 12)), list(range(20, 30))
    a, b = slots_for(lay), slots_for(lay)
    lay.gather(blocks, a, slots)  # numpy (small copies)
    threads = torch.get_num_threads()
    monkeypatch.setattr(copy_mod, "TORCH_MIN_BYTES", 0)
    torch.set_num_threads(2)
    try:
        lay.gather(blocks, b, slots)  # torch
        assert torch.equal(a, b)
        before = snapshot(kv)
        lay.scatter(b, slots, [b_ + 1 for b_ in blocks])
        for name, t in kv.items():
            assert torch.equal(raw(t)[3:13], before[name][2:12])
    finally:
        torch.set_num_threads(threads)


def test_cuda_staging_path_gives_the_same_bytes_on_cpu() -> None:
    # The CUDA path packs a run into a contiguous [k, slot_bytes] tensor on the
    # device and unpacks the reverse way; the same code runs on CPU tensors.
    kv = vllm_kv_caches(KVCacheLayout.BHLNC)
    lay = KVLayout(kv, NB)
    direct = slots_for(lay)
    lay.gather([6, 7, 8], direct, [0, 1, 2])
    staged = lay._pack(6, 3)
    assert torch.equal(staged, direct[:3])
    before = snapshot(kv)
    lay._unpack(staged, 10, 3)
    for name, t in kv.items():
        assert torch.equal(raw(t)[10:13], before[name][6:9])


class _FakeEvent:
    def __init__(self, log: list[tuple[str, ...]]) -> None:
        self.log = log
        self.id = str(len([e for e in log if e[0] == "record"]))

    def record(self, stream: _FakeStream) -> None:
        self.log.append(("record", stream.name, self.id))

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.log.append(("host_wait", self.id))


class _FakeStream:
    def __init__(self, name: str, log: list[tuple[str, ...]]) -> None:
        self.name, self.log = name, log

    def wait_stream(self, other: _FakeStream) -> None:
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, ev: _FakeEvent) -> None:
        self.log.append(("wait_event", self.name, ev.id))

    def synchronize(self) -> None:
        self.log.append(("stream_sync", self.name))


@pytest.mark.parametrize(
    "layout", [KVCacheLayout.LBNHC, KVCacheLayout.BLHNC, KVCacheLayout.LHBNC], ids=str
)
@pytest.mark.parametrize("gap", [False, True], ids=["packed-rows", "rows-with-gap"])
def test_cuda_code_path_orders_its_streams_and_moves_the_right_bytes(
    layout: KVCacheLayout, gap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No GPU here: run the CUDA branch with stand-in streams and events over
    # CPU tensors (staging then lives on the CPU too), recording the protocol.
    log: list[tuple[str, ...]] = []
    compute = _FakeStream("compute", log)

    @contextlib.contextmanager
    def use(stream: _FakeStream) -> Iterator[None]:
        log.append(("enter", stream.name))
        yield
        log.append(("exit", stream.name))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "Event", lambda: _FakeEvent(log))
    kv = vllm_kv_caches(layout)
    lay = KVLayout(kv, NB)
    lay._cuda, lay._stream, lay._max_run = True, _FakeStream("copy", log), 2  # type: ignore[assignment]
    wide = slots_for(lay, num_slots=40)
    if gap:
        wide = torch.zeros((40, lay.slot_bytes + 8), dtype=torch.uint8)[:, : lay.slot_bytes]
    ref = KVLayout(vllm_kv_caches(layout), NB)  # plain CPU layout, same bytes
    ref_buf = wide.clone()
    ref.gather(SRC, ref_buf, SLOTS)

    lay.gather(SRC, wide, SLOTS).wait()
    assert torch.equal(wide, ref_buf)
    assert log == [
        ("wait_stream", "copy", "compute"),  # after the forward's writes
        ("enter", "copy"),
        ("exit", "copy"),
        ("record", "copy", "0"),
        ("wait_event", "compute", "0"),  # later kernels cannot overwrite mid-copy
        ("host_wait", "0"),
    ]
    log.clear()
    expect = {lv.name: manager_blocks(lay, lv.name, SRC).clone() for lv in lay.layers}
    fence = lay.fence()
    lay.scatter(wide, SLOTS, DST, after=fence)  # type: ignore[arg-type]
    for lv in lay.layers:
        assert torch.equal(manager_blocks(lay, lv.name, DST), expect[lv.name])
    assert log == [
        ("record", "compute", "0"),  # the fence
        ("wait_event", "copy", "0"),  # after what preceded the fence
        ("enter", "copy"),
        ("exit", "copy"),
        ("record", "copy", "1"),  # no compute-stream wait: caller waits on the handle
    ]


def test_cpu_copies_are_complete_on_return() -> None:
    lay = KVLayout(vllm_kv_caches(KVCacheLayout.LBHNC), NB)
    h = lay.gather([1], slots_for(lay), [1])
    assert h.done()
    h.wait()
    h.wait_stream()
    assert lay.fence() is None
    lay.synchronize()


# ---------------------------------------------------------------- layer views
def test_layer_view_is_the_registered_tensor_with_its_block_dim() -> None:
    kv = legacy_kv_caches("flash_attn_hnd")
    lay = KVLayout(kv, NB)
    for lv in lay.layers:
        assert lv.tensor is kv[lv.name]
        assert lv.block_dim == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: vllm_kv_caches(KVCacheLayout.LBNHC, dtype=torch.float32, kernel_block_size=4),
        lambda: legacy_kv_caches("flash_attn_hnd", dtype=torch.float32),
    ],
    ids=["vllm-kernel-blocks", "legacy-kv-first"],
)
def test_perturbing_manager_blocks_changes_exactly_those_blocks(
    make: Callable[[], dict[str, torch.Tensor]],
) -> None:
    # How fault injection uses LayerView: index_add_ along block_dim.
    kv = make()
    lay = KVLayout(kv, NB)
    ids = torch.tensor([3, 8])
    before = {lv.name: manager_blocks(lay, lv.name, range(NB)) for lv in lay.layers}
    for lv in lay.layers:
        v = lv.manager_blocks
        v.index_add_(lv.block_dim, ids, torch.ones_like(v.index_select(lv.block_dim, ids)))
    for lv in lay.layers:
        after = manager_blocks(lay, lv.name, range(NB))
        diff = (after != before[lv.name]).flatten(lv.block_dim + 1).any(-1)
        changed = sorted(set(diff.nonzero()[:, lv.block_dim].tolist()))
        assert changed == [3, 8]


def test_layer_sharing_another_layers_kv_is_copied_once() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBHNC, layers=3)
    kv["model.layers.3.self_attn.attn"] = kv[NAMES[1]]  # shared_kv_cache_layers
    lay = KVLayout(kv, NB)
    assert len(lay.layers) == 3
    assert lay.layers[1].aliases == ("model.layers.3.self_attn.attn",)
    assert lay.slot_bytes == KVLayout(vllm_kv_caches(KVCacheLayout.LBHNC, layers=3), NB).slot_bytes


# ---------------------------------------------------------------- errors
def test_tensors_disagreeing_on_num_blocks_raise() -> None:
    kv = {"a": torch.zeros(NB, 4, 16, 16), "b": torch.zeros(2 * NB, 4, 16, 16)}
    with pytest.raises(ValueError, match="disagree on the number of blocks"):
        KVLayout(kv, NB)


def test_block_dim_not_a_multiple_of_num_blocks_raises() -> None:
    with pytest.raises(ValueError, match="num_blocks=23"):
        KVLayout({"a": torch.zeros(NB + 1, 4, 16, 16)}, NB)


def test_overlapping_elements_raise() -> None:
    t = torch.zeros(NB, 4, 16).unsqueeze(2).expand(NB, 4, 3, 16)  # stride 0
    with pytest.raises(ValueError, match="overlap"):
        KVLayout({"a": t}, NB)


def test_out_of_range_ids_raise_before_copying() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBHNC)
    lay = KVLayout(kv, NB)
    buf = slots_for(lay)
    before = buf.clone()
    with pytest.raises(IndexError):
        lay.gather([1, NB], buf, [0, 1])
    with pytest.raises(IndexError):
        lay.gather([1, 2], buf, [0, buf.shape[0]])
    with pytest.raises(IndexError):
        lay.scatter(buf, [0, 1], [-1, 2])
    assert torch.equal(buf, before)


def test_mismatched_lengths_and_slot_tensors_raise() -> None:
    lay = KVLayout(vllm_kv_caches(KVCacheLayout.LBHNC), NB)
    with pytest.raises(ValueError, match="slots"):
        lay.gather([1, 2], slots_for(lay), [0])
    with pytest.raises(ValueError, match="uint8"):
        lay.gather([1], torch.zeros((4, lay.slot_bytes + 1), dtype=torch.uint8), [0])


def test_layers_at_uneven_distances_in_one_allocation_round_trip() -> None:
    # Not an arithmetic progression: must not be moved as one strided stack.
    full = torch.empty(6, NB, 4, 16, 16, dtype=torch.bfloat16)
    kv = {NAMES[i]: full[j] for i, j in enumerate([0, 1, 3, 4, 5])}
    fill_random(kv)
    assert len(KVLayout(kv, NB)._stacks) == 2
    assert_round_trip(kv, SRC, SLOTS, DST)


def test_layout_of_random_shapes_round_trips() -> None:
    # Arbitrary permutations of a 5-D allocation with the blocks at dim 0.
    rng = random.Random(7)
    for _ in range(20):
        sizes = [rng.choice([1, 2, 3, 5]) for _ in range(4)]
        order = list(range(5))
        rng.shuffle(order)
        full = [NB, *sizes]
        raw_t = torch.empty([full[i] for i in order], dtype=torch.float16)
        t = raw_t.permute(*[order.index(i) for i in range(5)])
        kv = {"x": t}
        fill_random(kv, rng.randrange(1000))
        assert_round_trip(kv, SRC, SLOTS, DST)
