"""Local disk L2: atomic files, capacity + LRU eviction, restart, torn/corrupt files."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import rank_key
from vllm_aibrix.core.l2 import codec
from vllm_aibrix.core.l2.disk import DiskBackend
from vllm_aibrix.core.l2.store import L2Store

pytestmark = pytest.mark.integration

NS = b"D" * 16
SIZE = 4096
SENTINEL = 0x77
VALUE = codec.HEADER_SIZE + SIZE


def cfg(path: str) -> CacheConfig:
    return CacheConfig(l2_cache_backend="DISK", disk_path=path, l2_cache_op_timeout_ms=2000)


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def blocks(n: int) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (SIZE,), dtype=torch.uint8) for _ in range(n)]


def empty(n: int) -> list[torch.Tensor]:
    return [torch.full((SIZE,), SENTINEL, dtype=torch.uint8) for _ in range(n)]


def store_at(path: str, capacity_values: int | None = None) -> L2Store:
    cap = None if capacity_values is None else capacity_values * VALUE
    return L2Store(cfg(path), NS, backend=DiskBackend(cfg(path), capacity_bytes=cap))


def test_roundtrip(tmp_path) -> None:
    s = store_at(str(tmp_path))
    try:
        ks, src, dst = keys(5), blocks(5), empty(5)
        s.put_blocks(ks, 0, src)
        assert s.get_blocks(ks, 0, dst) == 5
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        s.close()


def test_values_survive_a_restart(tmp_path) -> None:
    ks, src = keys(4), blocks(4)
    s = store_at(str(tmp_path))
    s.put_blocks(ks, 0, src)
    s.close()
    s2 = store_at(str(tmp_path))
    try:
        dst = empty(4)
        assert s2.exists_prefix(ks) == 4
        assert s2.get_blocks(ks, 0, dst) == 4
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        s2.close()


def test_capacity_is_never_exceeded(tmp_path) -> None:
    b = DiskBackend(cfg(str(tmp_path)), capacity_bytes=10 * VALUE)
    s = L2Store(cfg(str(tmp_path)), NS, backend=b)
    try:
        for _ in range(5):
            s.put_blocks(keys(4), 0, blocks(4))
            assert b.nbytes <= 10 * VALUE
        on_disk = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path) for f in fs
        )
        assert on_disk <= 10 * VALUE
        assert len(b) == 10
    finally:
        s.close()


def test_least_recently_read_value_is_evicted_first(tmp_path) -> None:
    s = store_at(str(tmp_path), capacity_values=3)
    try:
        a, b, c, d = keys(4)
        s.put_blocks([a, b, c], 0, blocks(3))
        s.get_blocks([a], 0, empty(1))  # a is now more recent than b
        s.put_blocks([d], 0, blocks(1))
        assert s.exists_prefix([b]) == 0
        assert s.exists_prefix([a]) == 1 and s.exists_prefix([c, d]) == 2
    finally:
        s.close()


def test_lru_order_survives_a_restart(tmp_path) -> None:
    s = store_at(str(tmp_path), capacity_values=3)
    a, b, c, d = keys(4)
    s.put_blocks([a], 0, blocks(1))
    s.put_blocks([b], 0, blocks(1))
    s.put_blocks([c], 0, blocks(1))
    os.utime(s.backend._path(rank_key(a, 0)), (1e9 + 10, 1e9 + 10))  # type: ignore[union-attr]
    os.utime(s.backend._path(rank_key(b, 0)), (1e9, 1e9))  # type: ignore[union-attr]
    s.close()
    s2 = store_at(str(tmp_path), capacity_values=3)
    try:
        s2.put_blocks([d], 0, blocks(1))
        assert s2.exists_prefix([b]) == 0  # oldest by mtime went first
        assert s2.exists_prefix([a]) == 1
    finally:
        s2.close()


def test_restart_with_smaller_capacity_trims_the_directory(tmp_path) -> None:
    s = store_at(str(tmp_path))
    s.put_blocks(keys(6), 0, blocks(6))
    s.close()
    b = DiskBackend(cfg(str(tmp_path)), capacity_bytes=2 * VALUE)
    assert len(b) == 2 and b.nbytes <= 2 * VALUE


def test_leftover_temp_files_are_removed_at_start(tmp_path) -> None:
    s = store_at(str(tmp_path))
    (k,) = keys(1)
    s.put_blocks([k], 0, blocks(1))
    path = s.backend._path(rank_key(k, 0))  # type: ignore[union-attr]
    s.close()
    tmp = path + ".deadbeef.tmp"
    with open(tmp, "wb") as f:
        f.write(b"half a value")
    DiskBackend(cfg(str(tmp_path)))
    assert not os.path.exists(tmp)


def test_torn_and_corrupt_files_are_misses_and_counted(tmp_path) -> None:
    s = store_at(str(tmp_path))
    try:
        rng = torch.Generator().manual_seed(3)
        (k,) = keys(1)
        s.put_blocks([k], 0, blocks(1))
        path = s.backend._path(rank_key(k, 0))  # type: ignore[union-attr]
        with open(path, "rb") as f:
            good = f.read()
        bad_values = []
        for _ in range(20):
            b = bytearray(good)
            b[int(torch.randint(0, len(b), (1,), generator=rng))] ^= 0x10
            bad_values.append(bytes(b))
        for cut in (0, 10, codec.HEADER_SIZE, len(good) - 1):
            bad_values.append(good[:cut])  # a torn file
        bad_values.append(codec.encode(b"Z" * 16, rank_key(k, 0), blocks(1)[0]).joined())
        bad_values.append(codec.encode(NS, rank_key(keys(1)[0], 0), blocks(1)[0]).joined())
        for bad in bad_values:
            with open(path, "wb") as f:
                f.write(bad)
            dst = empty(1)
            assert s.get_blocks([k], 0, dst) == 0
            assert (dst[0] == SENTINEL).all()
        assert s.stats.corrupt == len(bad_values)
    finally:
        s.close()


def test_file_deleted_behind_our_back_is_a_miss(tmp_path) -> None:
    s = store_at(str(tmp_path))
    try:
        (k,) = keys(1)
        s.put_blocks([k], 0, blocks(1))
        os.unlink(s.backend._path(rank_key(k, 0)))  # type: ignore[union-attr]
        assert s.get_blocks([k], 0, empty(1)) == 0
        assert s.available
    finally:
        s.close()
