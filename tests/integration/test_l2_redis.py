"""L2 on a real standalone redis-server: round trips, auth, TLS, corruption fuzz."""

from __future__ import annotations

import os

import pytest
import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import rank_key
from vllm_aibrix.core.l2 import codec
from vllm_aibrix.core.l2.factory import create_backend
from vllm_aibrix.core.l2.redis import RedisBackend
from vllm_aibrix.core.l2.store import L2Store

pytestmark = pytest.mark.integration

NS = b"R" * 16
SIZE = 64 << 10
SENTINEL = 0x33


def cfg(url: str, **kw) -> CacheConfig:
    kw.setdefault("l2_cache_op_timeout_ms", 2000)
    return CacheConfig(l2_cache_backend="REDIS", redis_url=url, **kw)


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def blocks(n: int, size: int = SIZE) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(n)]


def empty(n: int, size: int = SIZE) -> list[torch.Tensor]:
    return [torch.full((size,), SENTINEL, dtype=torch.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def store(redis_server):
    s = L2Store(cfg(redis_server.url), NS)
    assert s.available
    yield s
    s.close()


def test_factory_builds_a_redis_backend(redis_server) -> None:
    b = create_backend(cfg(redis_server.url))
    assert isinstance(b, RedisBackend) and b.ping()
    b.close()


def test_batch_put_get_roundtrip(store: L2Store) -> None:
    ks, src, dst = keys(16), blocks(16), empty(16)
    store.put_blocks(ks, 0, src)
    assert store.get_blocks(ks, 0, dst) == 16
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))


def test_large_value_roundtrip(store: L2Store) -> None:
    ks, src, dst = keys(2), blocks(2, 2 << 20), empty(2, 2 << 20)
    store.put_blocks(ks, 3, src)
    assert store.get_blocks(ks, 3, dst) == 2
    assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))


def test_stored_value_is_header_plus_payload(store: L2Store, redis_server) -> None:
    ks = keys(1)
    store.put_blocks(ks, 0, blocks(1, 1000))
    raw = redis_server.client().get(rank_key(ks[0], 0))
    assert raw[:4] == codec.MAGIC and len(raw) == codec.HEADER_SIZE + 1000


def test_exists_prefix_across_ranks(store: L2Store) -> None:
    ks = keys(8)
    store.put_blocks(ks, 0, blocks(8, 128))
    store.put_blocks(ks[:5], 1, blocks(5, 128))
    assert store.exists_prefix(ks, ranks=(0,)) == 8
    assert store.exists_prefix(ks, ranks=(0, 1)) == 5
    assert store.exists_prefix(keys(3)) == 0


def test_async_put_lands_after_flush(store: L2Store) -> None:
    ks, src = keys(40), blocks(40, 4096)
    assert store.submit_put(ks, 0, src) == 40
    assert store.flush(10)
    assert store.exists_prefix(ks) == 40


def test_delete_removes_values(store: L2Store) -> None:
    ks = keys(3)
    store.put_blocks(ks, 0, blocks(3, 64))
    store.delete(ks)
    assert store.exists_prefix(ks) == 0


def test_password_from_config(redis_password_server) -> None:
    url = f"redis://127.0.0.1:{redis_password_server.port}/0"
    s = L2Store(cfg(url, redis_password="s3cret-pw"), NS)
    try:
        assert s.available
        ks, src = keys(2), blocks(2, 256)
        s.put_blocks(ks, 0, src)
        assert s.get_blocks(ks, 0, empty(2, 256)) == 2
    finally:
        s.close()


def test_password_from_url(redis_password_server) -> None:
    s = L2Store(cfg(redis_password_server.url), NS)  # url carries :pw@
    try:
        assert s.available
    finally:
        s.close()


def test_wrong_password_means_l2_down_not_an_exception(redis_password_server) -> None:
    url = f"redis://127.0.0.1:{redis_password_server.port}/0"
    s = L2Store(cfg(url, redis_password="wrong", l2_cache_retry_interval_s=60.0), NS)
    try:
        assert not s.available
        assert s.get_blocks(keys(1), 0, empty(1, 16)) == 0
    finally:
        s.close()


def test_tls_roundtrip(redis_tls_server) -> None:
    s = L2Store(cfg(redis_tls_server.url), NS)
    try:
        assert s.available
        ks, src, dst = keys(4), blocks(4), empty(4)
        s.put_blocks(ks, 0, src)
        assert s.get_blocks(ks, 0, dst) == 4
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        s.close()


def test_tls_server_refuses_plain_clients(redis_tls_server) -> None:
    url = f"redis://127.0.0.1:{redis_tls_server.port}/0"
    s = L2Store(cfg(url, l2_cache_op_timeout_ms=300, l2_cache_retry_interval_s=60.0), NS)
    try:
        assert not s.available
    finally:
        s.close()


def test_fuzzed_values_in_redis_are_never_used_and_always_counted(redis_server) -> None:
    s = L2Store(cfg(redis_server.url), NS)
    raw = redis_server.client()
    try:
        rng = torch.Generator().manual_seed(7)
        (k,) = keys(1)
        sk = rank_key(k, 0)
        s.put_blocks([k], 0, blocks(1, 4096))
        good = raw.get(sk)
        bad_values = []
        for _ in range(25):
            b = bytearray(good)
            pos = int(torch.randint(0, len(b), (1,), generator=rng))
            b[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=rng))
            bad_values.append(bytes(b))
        for _ in range(5):
            bad_values.append(good[: int(torch.randint(0, len(good), (1,), generator=rng))])
        bad_values.append(codec.encode(b"Q" * 16, sk, blocks(1, 4096)[0]).joined())
        bad_values.append(codec.encode(NS, rank_key(k, 1), blocks(1, 4096)[0]).joined())
        for bad in bad_values:
            raw.set(sk, bad)
            dst = empty(1, 4096)
            assert s.get_blocks([k], 0, dst) == 0
            assert (dst[0] == SENTINEL).all()
        assert s.stats.corrupt == len(bad_values)
        assert s.stats.get_hits == 0
        assert s.available  # corruption is a miss, not an outage
    finally:
        raw.close()
        s.close()
