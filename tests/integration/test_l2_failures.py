"""L2 failure behaviour against a real redis-server: absent, killed, frozen, restarted.

Timeouts are short (200 ms op deadline, 100 ms retry interval) so the whole
module stays fast.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pytest
import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.keys import Namespace
from vllm_aibrix.core.l2.store import L2Store
from vllm_aibrix.core.manager import KVCacheManager

pytestmark = pytest.mark.integration

NS = b"F" * 16
SIZE = 8192
DEADLINE_S = 0.2


def cfg(url: str, **kw) -> CacheConfig:
    kw.setdefault("l2_cache_retry_interval_s", 0.1)
    return CacheConfig(
        l2_cache_backend="REDIS",
        redis_url=url,
        l2_cache_op_timeout_ms=int(DEADLINE_S * 1000),
        l2_cache_ingestion_type="ALL",
        **kw,
    )


def keys(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def blocks(n: int) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (SIZE,), dtype=torch.uint8) for _ in range(n)]


def empty(n: int) -> list[torch.Tensor]:
    return [torch.zeros(SIZE, dtype=torch.uint8) for _ in range(n)]


def wait_for(cond, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_unreachable_at_start_logs_one_warning_and_serves_misses(redis_factory, caplog) -> None:
    srv = redis_factory(start=False)
    with caplog.at_level(logging.WARNING, logger="vllm_aibrix.core.l2.store"):
        s = L2Store(cfg(srv.url), NS)
        try:
            assert not s.available
            t0 = time.perf_counter()
            assert s.exists_prefix(keys(4)) == 0
            assert s.get_blocks(keys(2), 0, empty(2)) == 0
            assert s.submit_put(keys(2), 0, blocks(2)) == 0
            assert time.perf_counter() - t0 < 0.05  # down: answered without trying
            time.sleep(0.35)  # a few silent retries
        finally:
            s.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "unavailable" in warnings[0] and "retrying" in warnings[0]


def test_manager_works_l1_only_while_l2_is_unreachable(redis_factory) -> None:
    srv = redis_factory(start=False)
    ns = Namespace(model="m", block_size=4)
    m = KVCacheManager(cfg(srv.url), ns, 256, num_slots=16)
    try:
        toks = np.arange(16)
        data = torch.randint(0, 256, (4, 256), dtype=torch.uint8)
        assert m.put(toks, data) == 4
        assert m.lookup(toks) == 16
        out = torch.zeros(4, 256, dtype=torch.uint8)
        assert m.get(toks, out) == 16
        assert torch.equal(out, data)
    finally:
        m.close()


def test_server_appearing_later_is_picked_up(redis_factory) -> None:
    srv = redis_factory(start=False)
    s = L2Store(cfg(srv.url), NS)
    try:
        assert not s.available
        srv.start()
        assert wait_for(lambda: s.available)
        ks, src, dst = keys(3), blocks(3), empty(3)
        s.put_blocks(ks, 0, src)
        assert s.get_blocks(ks, 0, dst) == 3
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        s.close()


def test_killed_mid_run_ops_fail_fast_as_misses(redis_factory) -> None:
    srv = redis_factory()
    s = L2Store(cfg(srv.url, l2_cache_retry_interval_s=30.0), NS)
    try:
        ks = keys(4)
        s.put_blocks(ks, 0, blocks(4))
        assert s.exists_prefix(ks) == 4
        srv.kill()
        t0 = time.perf_counter()
        assert s.get_blocks(ks, 0, empty(4)) == 0
        assert time.perf_counter() - t0 < DEADLINE_S + 0.3
        assert not s.available
        t1 = time.perf_counter()
        for _ in range(20):
            assert s.exists_prefix(ks) == 0
            assert s.get_blocks(ks, 0, empty(4)) == 0
            s.put_blocks(ks, 0, blocks(4))
        assert time.perf_counter() - t1 < 0.2  # answered locally while down
        assert s.stats.errors + s.stats.timeouts >= 1
        assert s.stats.get_misses >= 4
    finally:
        s.close()


def test_frozen_server_times_out_at_the_deadline(redis_factory) -> None:
    srv = redis_factory()
    s = L2Store(cfg(srv.url, l2_cache_retry_interval_s=30.0), NS)
    try:
        ks = keys(2)
        s.put_blocks(ks, 0, blocks(2))
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            t0 = time.perf_counter()
            dst = empty(2)
            assert s.get_blocks(ks, 0, dst) == 0
            elapsed = time.perf_counter() - t0
            assert DEADLINE_S * 0.8 <= elapsed < DEADLINE_S + 0.3
            assert s.stats.timeouts == 1
            assert all((d == 0).all() for d in dst)
        finally:
            srv.proc.send_signal(signal.SIGCONT)
    finally:
        s.close()


def test_restarted_server_serves_hits_again_after_re_put(redis_factory) -> None:
    srv = redis_factory()
    s = L2Store(cfg(srv.url), NS)
    try:
        ks, src = keys(3), blocks(3)
        s.put_blocks(ks, 0, src)
        srv.kill()
        assert s.get_blocks(ks, 0, empty(3)) == 0
        srv.start()
        assert wait_for(lambda: s.available)
        assert s.stats.recovered >= 1
        # The server keeps nothing across restarts (--save ""): a miss, not an error.
        assert s.get_blocks(ks, 0, empty(3)) == 0
        assert s.available
        s.put_blocks(ks, 0, src)
        dst = empty(3)
        assert s.get_blocks(ks, 0, dst) == 3
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    finally:
        s.close()


def test_manager_keeps_serving_l1_while_l2_dies_and_uses_l2_after_restart(redis_factory) -> None:
    srv = redis_factory()
    ns = Namespace(model="m", block_size=4)
    m = KVCacheManager(cfg(srv.url), ns, 256, num_slots=64)
    other = None
    try:
        toks = np.arange(32)
        data = torch.randint(0, 256, (8, 256), dtype=torch.uint8)
        srv.kill()
        assert m.put(toks, data) == 8  # L1 takes it; the L2 write is dropped
        out = torch.zeros(8, 256, dtype=torch.uint8)
        assert m.get(toks, out) == 32 and torch.equal(out, data)
        srv.start()
        assert m.l2 is not None and wait_for(lambda: m.l2.available)  # type: ignore[union-attr]
        toks2 = np.arange(100, 132)
        m.put(toks2, data)
        m.flush(5)
        other = KVCacheManager(cfg(srv.url), ns, 256, num_slots=64)
        assert other.lookup(toks2) == 32  # a second engine sees it through L2
    finally:
        m.close()
        if other is not None:
            other.close()
