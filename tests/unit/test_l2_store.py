"""L2Store over the in-memory backend and over failing/slow fakes."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import rank_key
from vllm_aibrix.core.l2 import codec
from vllm_aibrix.core.l2.backend import BackendError, Buffer
from vllm_aibrix.core.l2.memory import MemoryBackend
from vllm_aibrix.core.l2.store import L2Store

NS = b"S" * 16
SIZE = 2048
SENTINEL = 0x5A

CFG = CacheConfig(
    l2_cache_backend="MEMORY",
    l2_cache_op_timeout_ms=200,
    l2_cache_retry_interval_s=0.05,
    l2_cache_ingestion_batch_size=4,
)


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def blocks(n: int, size: int = SIZE) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(n)]


def empty(n: int, size: int = SIZE) -> list[torch.Tensor]:
    return [torch.full((size,), SENTINEL, dtype=torch.uint8) for _ in range(n)]


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def store(backend: MemoryBackend):
    s = L2Store(CFG, NS, backend=backend)
    yield s
    s.close()


class Switchable(MemoryBackend):
    """A memory backend that can be made to fail or hang."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"  # ok | fail | hang
        self.release = threading.Event()

    def _gate(self) -> None:
        if self.mode == "fail":
            raise BackendError("connection refused")
        if self.mode == "hang":
            self.release.wait(5)

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        self._gate()
        return super().exists(keys)

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        self._gate()
        return super().get_many(keys)

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        self._gate()
        super().put_many(items)

    def ping(self) -> bool:
        return self.mode == "ok"


def wait_for(cond, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


# -- happy path -----------------------------------------------------------------------
def test_put_then_get_returns_identical_bytes(store: L2Store) -> None:
    ks, src, dst = keys(5), blocks(5), empty(5)
    store.put_blocks(ks, 0, src)
    assert store.get_blocks(ks, 0, dst) == 5
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    assert store.stats.get_hits == 5 and store.stats.puts == 5


def test_get_stops_at_the_first_hole(store: L2Store) -> None:
    ks, src, dst = keys(5), blocks(5), empty(5)
    store.put_blocks(ks[:2] + ks[3:], 0, src[:2] + src[3:])
    assert store.get_blocks(ks, 0, dst) == 2
    assert all((d == SENTINEL).all() for d in dst[2:])  # nothing past the hole is written
    assert store.stats.get_misses == 3


def test_ranks_are_stored_separately(store: L2Store) -> None:
    ks = keys(2)
    r0, r1 = blocks(2), blocks(2)
    store.put_blocks(ks, 0, r0)
    store.put_blocks(ks, 1, r1)
    dst = empty(2)
    assert store.get_blocks(ks, 1, dst) == 2
    assert all(torch.equal(a, b) for a, b in zip(r1, dst, strict=True))


def test_exists_prefix_needs_every_rank(store: L2Store) -> None:
    ks = keys(4)
    store.put_blocks(ks, 0, blocks(4))
    store.put_blocks(ks[:2], 1, blocks(2))
    assert store.exists_prefix(ks, ranks=(0,)) == 4
    assert store.exists_prefix(ks, ranks=(0, 1)) == 2


def test_exists_prefix_is_one_backend_call(backend: MemoryBackend, store: L2Store) -> None:
    calls = []
    orig = backend.exists
    backend.exists = lambda k: calls.append(len(k)) or orig(k)  # type: ignore[method-assign]
    store.exists_prefix(keys(128), ranks=(0, 1))
    assert calls == [256]


def test_delete_removes_all_ranks(store: L2Store) -> None:
    ks = keys(2)
    store.put_blocks(ks, 0, blocks(2))
    store.put_blocks(ks, 1, blocks(2))
    store.delete(ks, ranks=(0, 1))
    assert store.exists_prefix(ks, ranks=(0,)) == 0
    assert store.exists_prefix(ks, ranks=(1,)) == 0


def test_submit_put_copies_the_source_immediately(store: L2Store) -> None:
    ks, src = keys(3), blocks(3)
    expected = [s.clone() for s in src]
    assert store.submit_put(ks, 0, src) == 3
    for s in src:
        s.zero_()  # the caller reuses its memory at once
    assert store.flush(5)
    dst = empty(3)
    assert store.get_blocks(ks, 0, dst) == 3
    assert all(torch.equal(a, b) for a, b in zip(expected, dst, strict=True))


def test_compressed_values_roundtrip() -> None:
    s = L2Store(CFG.replace(l2_cache_compression="ZSTD"), NS, backend=MemoryBackend())
    try:
        ks = keys(2)
        zeros = [torch.zeros(SIZE, dtype=torch.uint8) for _ in ks]
        s.put_blocks(ks, 0, zeros)
        dst = empty(2)
        assert s.get_blocks(ks, 0, dst) == 2
        assert all((d == 0).all() for d in dst)
    finally:
        s.close()


# -- corruption fuzz (memory backend) --------------------------------------------------
def _corruptions(value: bytes, rng: torch.Generator) -> list[bytes]:
    out = []
    for _ in range(20):
        pos = int(torch.randint(0, len(value), (1,), generator=rng))
        b = bytearray(value)
        b[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=rng))
        out.append(bytes(b))
    for _ in range(5):
        out.append(value[: int(torch.randint(0, len(value), (1,), generator=rng))])
    return out


def test_fuzzed_values_are_never_used_and_always_counted(
    backend: MemoryBackend, store: L2Store
) -> None:
    rng = torch.Generator().manual_seed(1)
    (k,) = keys(1)
    store.put_blocks([k], 0, blocks(1))
    good = bytes(backend.get_many([rank_key(k, 0)])[0])  # type: ignore[arg-type]
    other_ns = codec.encode(b"X" * 16, rank_key(k, 0), blocks(1)[0]).joined()
    other_key = codec.encode(NS, rank_key(os.urandom(16), 0), blocks(1)[0]).joined()
    bad_values = [*_corruptions(good, rng), other_ns, other_key]
    for bad in bad_values:
        backend.raw_set(rank_key(k, 0), bad)
        dst = empty(1)
        assert store.get_blocks([k], 0, dst) == 0
        assert (dst[0] == SENTINEL).all()
    assert store.stats.corrupt == len(bad_values)
    assert store.stats.get_hits == 0
    assert sum(store.stats.corrupt_reasons.values()) == len(bad_values)


def test_corrupt_value_ends_the_prefix(backend: MemoryBackend, store: L2Store) -> None:
    ks = keys(3)
    store.put_blocks(ks, 0, blocks(3))
    backend.raw_set(rank_key(ks[1], 0), b"garbage")
    assert store.get_blocks(ks, 0, empty(3)) == 1
    assert store.stats.corrupt == 1


# -- failures --------------------------------------------------------------------------------
def test_unreachable_at_start_warns_once_and_answers_misses(caplog) -> None:
    b = Switchable()
    b.mode = "fail"
    with caplog.at_level(logging.WARNING, logger="vllm_aibrix.core.l2.store"):
        s = L2Store(CFG.replace(l2_cache_retry_interval_s=0.02), NS, backend=b)
        try:
            assert not s.available
            ks = keys(2)
            assert s.exists_prefix(ks) == 0
            assert s.get_blocks(ks, 0, empty(2)) == 0
            time.sleep(0.15)  # several retries happen, silently
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert "unavailable" in warnings[0].getMessage()
        finally:
            s.close()


def test_recovers_when_the_backend_comes_back() -> None:
    b = Switchable()
    b.mode = "fail"
    s = L2Store(CFG, NS, backend=b)
    try:
        b.mode = "ok"
        assert wait_for(lambda: s.available)
        ks, src = keys(1), blocks(1)
        s.put_blocks(ks, 0, src)
        assert s.get_blocks(ks, 0, empty(1)) == 1
        assert s.stats.recovered == 1
    finally:
        s.close()


def test_failure_mid_run_marks_down_and_later_ops_return_at_once() -> None:
    b = Switchable()
    s = L2Store(CFG.replace(l2_cache_retry_interval_s=10.0), NS, backend=b)
    try:
        ks = keys(2)
        s.put_blocks(ks, 0, blocks(2))
        b.mode = "fail"
        assert s.get_blocks(ks, 0, empty(2)) == 0
        assert not s.available
        t0 = time.perf_counter()
        assert s.get_blocks(ks, 0, empty(2)) == 0
        assert time.perf_counter() - t0 < 0.05
        assert s.stats.errors == 1 and s.stats.down_skips >= 1
    finally:
        s.close()


def test_hanging_backend_times_out_within_the_deadline() -> None:
    b = Switchable()
    s = L2Store(CFG.replace(l2_cache_retry_interval_s=10.0), NS, backend=b)
    try:
        ks = keys(1)
        s.put_blocks(ks, 0, blocks(1))
        b.mode = "hang"
        t0 = time.perf_counter()
        assert s.get_blocks(ks, 0, empty(1)) == 0
        assert time.perf_counter() - t0 < 0.5  # deadline is 200 ms
        assert s.stats.timeouts == 1
        assert not s.available
    finally:
        b.release.set()
        s.close()


def test_late_answer_after_timeout_never_reaches_the_destination() -> None:
    b = Switchable()
    s = L2Store(CFG.replace(l2_cache_retry_interval_s=10.0), NS, backend=b)
    try:
        ks = keys(1)
        s.put_blocks(ks, 0, blocks(1))
        b.mode = "hang"
        dst = empty(1)
        assert s.get_blocks(ks, 0, dst) == 0
        b.release.set()  # the backend answers now, too late
        time.sleep(0.1)
        assert (dst[0] == SENTINEL).all()
    finally:
        s.close()


def test_submit_put_while_down_is_dropped_and_counted() -> None:
    b = Switchable()
    b.mode = "fail"
    s = L2Store(CFG.replace(l2_cache_retry_interval_s=10.0), NS, backend=b)
    try:
        assert s.submit_put(keys(3), 0, blocks(3)) == 0
        assert s.stats.ingest_dropped_blocks == 3
        assert s.stats.ingest_dropped_bytes == 3 * SIZE
    finally:
        s.close()


def test_backend_that_cannot_be_created_is_down_not_fatal() -> None:
    cfg = CFG.replace(l2_cache_backend="REDIS", redis_url="redis://127.0.0.1:1/0")
    s = L2Store(cfg, NS)
    try:
        assert not s.available
        assert s.get_blocks(keys(1), 0, empty(1)) == 0
    finally:
        s.close()


def test_ingestion_flood_stays_bounded_and_releases_everything() -> None:
    b = Switchable()
    cfg = CFG.replace(l2_cache_ingestion_max_inflight_mb=0.05)  # ~51 KiB
    s = L2Store(cfg, NS, backend=b)
    try:
        b.mode = "hang"
        for _ in range(10):
            s.submit_put(keys(10), 0, blocks(10))
            assert s.stats.ingest_pending_bytes <= int(0.05 * (1 << 20))
        b.release.set()
        b.mode = "ok"
        assert s.flush(5)
        st = s.stats
        assert st.ingest_pending_bytes == 0
        written = st.puts
        assert written + st.ingest_dropped_blocks + st.ingest_failed_blocks == 100
        assert st.ingest_dropped_blocks > 0
    finally:
        s.close()
