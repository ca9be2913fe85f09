"""MooncakeBackend against a real Mooncake Store (master + storage node on 127.0.0.1)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from tests.integration.mooncake_cluster import MooncakeCluster
from vllm_aibrix.core.l2.backend import BackendError

if TYPE_CHECKING:
    from tests.integration.mooncake_fixtures import RemoteBackend

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.integration.mooncake_fixtures"]

MIB = 1 << 20


def _keys(prefix: str, n: int) -> list[bytes]:
    # Prefixed with the test's name so that tests sharing the module's cluster never collide.
    return [f"{prefix}-{i}".encode() for i in range(n)]


def test_exists_reports_presence_of_each_key(mooncake_client: RemoteBackend) -> None:
    a, b, c = _keys("exists", 3)
    mooncake_client.put_many([(a, b"va"), (c, b"vc")])
    assert mooncake_client.exists([a, b, c]) == [True, False, True]


def test_exists_prefix_counts_leading_present_keys(mooncake_client: RemoteBackend) -> None:
    keys = _keys("prefix", 4)
    mooncake_client.put_many([(keys[0], b"0"), (keys[1], b"1"), (keys[3], b"3")])
    assert mooncake_client.exists_prefix(keys) == 2


def test_get_many_returns_values_in_order_and_none_for_missing(
    mooncake_client: RemoteBackend,
) -> None:
    a, b, c = _keys("getmany", 3)
    mooncake_client.put_many([(a, b"alpha"), (c, b"gamma" * 1000)])
    assert mooncake_client.get_many([a, b, c]) == [b"alpha", None, b"gamma" * 1000]


def test_get_into_writes_value_and_returns_its_length(mooncake_client: RemoteBackend) -> None:
    a, missing = _keys("getinto", 2)
    value = os.urandom(4096)
    mooncake_client.put_many([(a, value)])
    bufs = [memoryview(bytearray(8192)), memoryview(bytearray(16))]
    assert mooncake_client.get_into([a, missing], bufs) == [4096, -1]
    assert bytes(bufs[0][:4096]) == value


def test_get_into_value_larger_than_buffer_is_a_miss(mooncake_client: RemoteBackend) -> None:
    (a,) = _keys("toolarge", 1)
    mooncake_client.put_many([(a, b"x" * 1000)])
    buf = memoryview(bytearray(999))
    assert mooncake_client.get_into([a], [buf]) == [-1]


def test_put_overwrites_an_existing_value(mooncake_client: RemoteBackend) -> None:
    # Mooncake's plain put keeps the first value; the backend contract is overwrite.
    (a,) = _keys("overwrite", 1)
    mooncake_client.put_many([(a, b"old value")])
    mooncake_client.put_many([(a, b"new, longer value")])
    assert mooncake_client.get_many([a]) == [b"new, longer value"]


def test_put_many_parts_stores_the_parts_back_to_back(mooncake_client: RemoteBackend) -> None:
    a, b = _keys("parts", 2)
    mooncake_client.put_many_parts([(a, [b"head:", b"payload"]), (b, [b"single"])])
    assert mooncake_client.get_many([a, b]) == [b"head:payload", b"single"]


def test_delete_removes_fresh_keys_and_ignores_missing_ones(
    mooncake_client: RemoteBackend,
) -> None:
    # Deleting right after a put falls inside Mooncake's lease: must still work.
    a, b, never = _keys("delete", 3)
    mooncake_client.put_many([(a, b"a"), (b, b"b")])
    mooncake_client.delete([a, never])
    assert mooncake_client.exists([a, b]) == [False, True]
    assert mooncake_client.get_many([a]) == [None]


def test_large_values_of_2_mib_round_trip(mooncake_client: RemoteBackend) -> None:
    keys = _keys("large", 4)
    values = [os.urandom(2 * MIB) for _ in keys]
    mooncake_client.put_many(list(zip(keys, values, strict=True)))
    assert mooncake_client.get_many(keys) == values


def test_a_batch_larger_than_the_client_buffer_round_trips(
    mooncake_client_factory: Any,
) -> None:
    # 24 MiB through a 16 MiB client buffer: the pointer calls do not stage values there.
    client = mooncake_client_factory(mooncake_local_buffer_size_mb=16)
    keys = _keys("overbuffer", 12)
    values = [os.urandom(2 * MIB) for _ in keys]
    client.put_many(list(zip(keys, values, strict=True)))
    assert client.get_many(keys) == values


def test_many_small_keys_round_trip_in_one_batch(mooncake_client: RemoteBackend) -> None:
    keys = _keys("many", 2000)
    values = [k * 8 for k in keys]
    mooncake_client.put_many(list(zip(keys, values, strict=True)))
    assert mooncake_client.exists_prefix(keys) == len(keys)
    assert mooncake_client.get_many(keys) == values


def test_values_written_by_one_client_are_read_by_another(
    mooncake_client_factory: Any,
) -> None:
    writer, reader = mooncake_client_factory(), mooncake_client_factory()
    (a,) = _keys("shared", 1)
    writer.put_many([(a, b"from the writer")])
    assert reader.get_many([a]) == [b"from the writer"]


def test_empty_value_is_rejected_with_backend_error(mooncake_client: RemoteBackend) -> None:
    (a,) = _keys("empty", 1)
    with pytest.raises(BackendError, match="empty"):
        mooncake_client.put_many([(a, b"")])


def test_every_mooncake_process_listens_on_loopback_only(
    mooncake_cluster: MooncakeCluster, mooncake_client: RemoteBackend
) -> None:
    pids = {
        "master": mooncake_cluster.master.pid,  # type: ignore[union-attr]
        "node": mooncake_cluster.node.pid,  # type: ignore[union-attr]
        "client": mooncake_client.proc.pid,
    }
    # Imported here: a top-level import of a pytest_plugins module warns.
    from tests.integration.mooncake_fixtures import LOOPBACK_HEX, listening_addresses

    found = {name: listening_addresses(pid) for name, pid in pids.items()}
    assert all(found.values()), found  # each of them does listen on something
    assert {name: addrs - LOOPBACK_HEX for name, addrs in found.items()} == {
        "master": set(),
        "node": set(),
        "client": set(),
    }
