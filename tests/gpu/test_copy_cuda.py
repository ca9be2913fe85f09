"""KVLayout on CUDA: engine tensors on the device, slots in pinned host memory.

The same round trips as tests/unit/test_copy_layouts.py, plus the stream
ordering the CUDA path promises: copies queue after the compute stream's
work, and work queued after a ``scatter`` sees the loaded blocks without a
host sync. Skipped without a CUDA device.
"""

from __future__ import annotations

import threading

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (torch.cuda.is_available() is false)", allow_module_level=True)

from tests.unit.test_copy_layouts import (
    DST,
    LAYOUTS,
    NB,
    SLOTS,
    SRC,
    KVCacheLayout,
    fill_random,
    legacy_tensor,
    manager_blocks,
    raw,
    vllm_kv_caches,
)
from vllm_aibrix.vllm.copy import KVLayout


def pinned_slots(lay: KVLayout, num_slots: int = 40) -> torch.Tensor:
    buf = torch.empty((num_slots, lay.slot_bytes), dtype=torch.uint8, pin_memory=True)
    buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8))
    return buf


def cuda_round_trip(kv: dict[str, torch.Tensor], slots_t: torch.Tensor | None = None) -> None:
    lay = KVLayout(kv, NB)
    buf = pinned_slots(lay) if slots_t is None else slots_t
    expect = {lv.name: manager_blocks(lay, lv.name, SRC).clone() for lv in lay.layers}
    lay.gather(SRC, buf, SLOTS).wait()
    for t in kv.values():
        t.zero_()
    lay.scatter(buf, SLOTS, DST)  # the current stream waits for it, the host does not
    for lv in lay.layers:
        assert torch.equal(manager_blocks(lay, lv.name, DST), expect[lv.name]), lv.name


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_cuda_vllm_layout_round_trips_through_pinned_slots(layout: KVCacheLayout) -> None:
    cuda_round_trip(vllm_kv_caches(layout, device="cuda"))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.name)
def test_cuda_slot_bytes_equal_cpu_slot_bytes(layout: KVCacheLayout) -> None:
    # The CUDA path (staging or direct) writes the slot format the CPU path does.
    gpu = KVLayout(vllm_kv_caches(layout, device="cuda", seed=9), NB)
    cpu = KVLayout(vllm_kv_caches(layout, device="cpu", seed=9), NB)
    a, b = pinned_slots(gpu), pinned_slots(cpu)
    b.copy_(a)
    gpu.gather(SRC, a, SLOTS).wait()
    cpu.gather(SRC, b, SLOTS)
    assert torch.equal(a, b)


@pytest.mark.parametrize("ratio", [2, 4])
def test_cuda_kernel_blocks_round_trip(ratio: int) -> None:
    cuda_round_trip(
        vllm_kv_caches(KVCacheLayout.LBNHC, device="cuda", kernel_block_size=16 // ratio)
    )


@pytest.mark.parametrize("kind", ["flash_attn_hnd", "flashinfer_hnd", "mla"])
def test_cuda_legacy_layout_round_trips(kind: str) -> None:
    kv = {f"l{i}": legacy_tensor(kind).cuda() for i in range(3)}
    fill_random(kv)
    cuda_round_trip(kv)


def test_cuda_slots_in_pageable_memory_round_trip() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBHNC, device="cuda")
    lay = KVLayout(kv, NB)
    cuda_round_trip(kv, torch.zeros((40, lay.slot_bytes), dtype=torch.uint8))


def test_cuda_slot_rows_with_a_gap_round_trip() -> None:
    kv = vllm_kv_caches(KVCacheLayout.BLHNC, device="cuda")
    lay = KVLayout(kv, NB)
    wide = torch.zeros((40, lay.slot_bytes + 64), dtype=torch.uint8, pin_memory=True)
    cuda_round_trip(kv, wide[:, : lay.slot_bytes])


def test_gather_sees_writes_queued_before_it() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBHNC, device="cuda")
    lay = KVLayout(kv, NB)
    buf = pinned_slots(lay)
    torch.cuda._sleep(50_000_000)  # keep the compute stream busy
    for t in kv.values():
        raw(t)[SRC] = 7  # queued behind the sleep
    lay.gather(SRC, buf, SLOTS).wait()
    assert bool((buf[SLOTS].view(torch.int16) == 7).all())  # bf16 KV: int16 view


def test_work_queued_after_scatter_sees_the_loaded_blocks() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBNHC, device="cuda")
    lay = KVLayout(kv, NB)
    buf = pinned_slots(lay)
    lay.gather(SRC, buf, SLOTS).wait()
    expect = {n: raw(t)[SRC].clone() for n, t in kv.items()}
    for t in kv.values():
        t.zero_()
    assert lay._stream is not None
    with torch.cuda.stream(lay._stream):
        torch.cuda._sleep(50_000_000)  # hold the copy stream: a missing wait shows
    lay.scatter(buf, SLOTS, DST)
    seen = {n: raw(t)[DST].clone() for n, t in kv.items()}  # queued, no host sync between
    torch.cuda.synchronize()
    assert all(torch.equal(seen[n], expect[n]) for n in kv)


def test_copies_from_another_thread_are_ordered_by_a_fence() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LHBNC, device="cuda")
    lay = KVLayout(kv, NB)
    buf = pinned_slots(lay)
    lay.gather(SRC, buf, SLOTS).wait()
    expect = {n: raw(t)[SRC].clone() for n, t in kv.items()}
    torch.cuda._sleep(50_000_000)
    for t in kv.values():
        t.zero_()  # queued on the compute stream behind the sleep
    fence = lay.fence()

    def load() -> None:
        lay.scatter(buf, SLOTS, DST, after=fence).wait()

    th = threading.Thread(target=load)
    th.start()
    th.join()
    # The load ran after the zeroing (the fence), so the blocks hold the data.
    for n, t in kv.items():
        assert torch.equal(raw(t)[DST], expect[n]), n


def test_handle_is_done_after_wait() -> None:
    kv = vllm_kv_caches(KVCacheLayout.LBHNC, device="cuda")
    lay = KVLayout(kv, NB)
    h = lay.gather(SRC, pinned_slots(lay), SLOTS)
    h.wait()
    assert h.done()
    lay.synchronize()
