"""MooncakeBackend when the Mooncake master or storage node crashes and comes back.

At the backend level a failure is a quick :class:`BackendError` (within the op
timeout); above it, :class:`L2Store` turns it into misses and never raises.
Every test leaves the cluster running again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.l2.backend import BackendError
from vllm_aibrix.core.l2.store import L2Store

if TYPE_CHECKING:
    from tests.integration.mooncake_cluster import MooncakeCluster
    from tests.integration.mooncake_fixtures import RemoteBackend

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.integration.mooncake_fixtures"]

OP_TIMEOUT_MS = 500
# The op timeout plus the round trip to the child process that hosts the backend.
FAST_S = OP_TIMEOUT_MS / 1000 + 0.5


@pytest.fixture
def cluster(mooncake_cluster: MooncakeCluster) -> Iterator[MooncakeCluster]:
    """The module's cluster, brought back up after each test whatever it killed."""
    yield mooncake_cluster
    mooncake_cluster.restart()


@pytest.fixture
def client(mooncake_client_factory: Any, cluster: MooncakeCluster) -> Iterator[RemoteBackend]:
    yield mooncake_client_factory(l2_cache_op_timeout_ms=OP_TIMEOUT_MS)
    cluster.restart()  # before the client closes, so that it can leave the cluster cleanly


def _timed(fn: Any) -> tuple[type[BaseException] | None, float]:
    t0 = time.monotonic()
    try:
        fn()
        err = None
    except Exception as e:
        err = type(e)
    return err, time.monotonic() - t0


def test_every_operation_raises_backend_error_quickly_while_the_master_is_down(
    cluster: MooncakeCluster, client: RemoteBackend
) -> None:
    client.put_many([(b"m-a", b"value")])
    cluster.kill_master()
    results = {
        "exists": _timed(lambda: client.exists([b"m-a"])),
        "get_many": _timed(lambda: client.get_many([b"m-a"])),
        "put_many": _timed(lambda: client.put_many([(b"m-b", b"value")])),
        "delete": _timed(lambda: client.delete([b"m-a"])),
        "exists again": _timed(lambda: client.exists([b"m-a"])),
    }
    assert {op: err for op, (err, _) in results.items()} == dict.fromkeys(results, BackendError)
    slow = {op: round(dt, 2) for op, (_, dt) in results.items() if dt > FAST_S}
    assert slow == {}


def test_get_into_raises_backend_error_while_the_master_is_down(
    cluster: MooncakeCluster, client: RemoteBackend
) -> None:
    # get_into is never abandoned mid-transfer (it writes caller memory), so it is
    # bounded by Mooncake's own retry (~4.3 s) rather than the op timeout.
    client.put_many([(b"gi-a", b"value")])
    cluster.kill_master()
    err, dt = _timed(lambda: client.get_into([b"gi-a"], [memoryview(bytearray(16))]))
    assert err is BackendError and dt < 8
    err, dt = _timed(lambda: client.get_into([b"gi-a"], [memoryview(bytearray(16))]))
    assert err is BackendError and dt < FAST_S  # now known down: fails fast


def test_ping_is_false_while_the_master_is_down_and_true_after_restart(
    cluster: MooncakeCluster, client: RemoteBackend
) -> None:
    assert client.ping()
    cluster.kill_master()
    assert not client.ping()
    cluster.restart()
    assert client.ping()


def test_after_a_master_and_node_restart_reput_values_hit_again(
    cluster: MooncakeCluster, client: RemoteBackend
) -> None:
    client.put_many([(b"r-a", b"before the crash")])
    cluster.kill_node()
    cluster.kill_master()
    with pytest.raises(BackendError):
        client.get_many([b"r-a"])
    cluster.restart()
    assert client.get_many([b"r-a"]) == [None]  # the node's memory died with it
    client.put_many([(b"r-a", b"after the restart")])
    assert client.get_many([b"r-a"]) == [b"after the restart"]


def test_reading_a_value_whose_node_died_raises_backend_error(
    cluster: MooncakeCluster, client: RemoteBackend
) -> None:
    # The master still lists the value until the node's lease expires; the read fails.
    client.put_many([(b"n-a", b"x" * 4096)])
    cluster.kill_node()
    err, dt = _timed(lambda: client.get_many([b"n-a"]))
    assert err is BackendError and dt < FAST_S


def test_constructing_against_a_closed_port_raises_backend_error_quickly(
    mooncake_client_factory: Any, cluster: MooncakeCluster
) -> None:
    from tests.integration.mooncake_cluster import free_port

    t0 = time.monotonic()
    with pytest.raises(BackendError, match="unreachable"):
        mooncake_client_factory(
            mooncake_master=f"127.0.0.1:{free_port()}", l2_cache_op_timeout_ms=OP_TIMEOUT_MS
        )
    assert time.monotonic() - t0 < 5  # includes starting the child interpreter


def test_the_store_above_the_backend_never_raises_through_a_crash(
    cluster: MooncakeCluster, client: RemoteBackend
) -> None:
    config = CacheConfig(
        l2_cache_backend="MOONCAKE",
        # Longer than the backend's own timeout: the backend, not the store, gives up.
        l2_cache_op_timeout_ms=5000,
        l2_cache_retry_interval_s=0.2,
    )
    src = [torch.arange(256, dtype=torch.float32) + i for i in range(3)]
    keys = [bytes([0xA0 + i]) * 16 for i in range(3)]  # block digests are 16 bytes
    store = L2Store(config, b"\x01" * 16, backend=client)  # type: ignore[arg-type]
    try:
        store.put_blocks(keys, 0, src)
        dst = [torch.zeros(256) for _ in keys]
        assert store.get_blocks(keys, 0, dst) == 3
        cluster.kill_master()
        # Misses, not exceptions, while the master is down.
        assert store.get_blocks(keys, 0, dst) == 0
        assert store.exists_prefix(keys) == 0
        store.put_blocks(keys, 0, src)
        cluster.restart()
        # The surviving node re-mounts its segment on the new master by itself
        # (a few seconds); until then writes fail and count as misses.
        deadline = time.monotonic() + 20
        hits = 0
        while hits < 3 and time.monotonic() < deadline:
            time.sleep(0.25)
            store.put_blocks(keys, 0, src)
            dst = [torch.zeros(256) for _ in keys]
            hits = store.get_blocks(keys, 0, dst)
        assert hits == 3
        assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
    finally:
        store.close()
