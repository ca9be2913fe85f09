"""InfiniStoreBackend: what can be checked without an InfiniStore server.

The server needs an RDMA device to start, and this machine has none, so the
data path (put/get/exists/delete against a live server) is marked skipped
rather than faked. Everything else runs against the real client package.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator

import pytest

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.l2.backend import BackendError
from vllm_aibrix.core.l2.infinistore import InfiniStoreBackend, client_config_kwargs

NO_SERVER = pytest.mark.skip(
    reason="InfiniStore server needs an RDMA device; this machine has none"
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def _config(**kw: object) -> CacheConfig:
    return CacheConfig(l2_cache_backend="INFINISTORE", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def infinistore() -> object:
    try:
        import infinistore
    except ImportError as e:
        pytest.fail(
            f"infinistore is not installed ({e}): pip install --no-deps infinistore==0.2.35 "
            "uvloop fastapi uvicorn numpy pybind11",
            pytrace=False,
        )
    return infinistore


def test_config_maps_to_a_tcp_client_config_the_real_package_accepts(infinistore: object) -> None:
    kwargs = client_config_kwargs(_config(infinistore_host="10.1.2.3", infinistore_port=23456))
    assert kwargs["host_addr"] == "10.1.2.3" and kwargs["service_port"] == 23456
    real = infinistore.ClientConfig(**{**kwargs, "connection_type": infinistore.TYPE_TCP})  # type: ignore[attr-defined]
    real.verify()  # raises on a field the client does not accept
    assert real.connection_type == infinistore.TYPE_TCP  # type: ignore[attr-defined]


def test_rdma_connection_type_is_refused_with_backend_error() -> None:
    with pytest.raises(BackendError, match="TCP only"):
        InfiniStoreBackend(_config(infinistore_connection_type="RDMA"))


def test_missing_package_raises_backend_error_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "infinistore", None)  # makes the import fail
    with pytest.raises(BackendError, match="pip install --no-deps infinistore"):
        InfiniStoreBackend(_config())


def test_unreachable_server_raises_backend_error_within_the_op_timeout(infinistore: object) -> None:
    config = _config(infinistore_port=_closed_port(), l2_cache_op_timeout_ms=500)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="unreachable"):
        InfiniStoreBackend(config)
    assert time.monotonic() - t0 < 1.0


# The data path, written as it would run against a live server on 127.0.0.1:12345.
@pytest.fixture
def live() -> Iterator[InfiniStoreBackend]:
    backend = InfiniStoreBackend(_config())
    yield backend
    backend.close()


@NO_SERVER
def test_put_then_get_many_returns_the_values_and_none_for_missing(
    live: InfiniStoreBackend,
) -> None:
    live.put_many([(b"is-a", b"alpha"), (b"is-c", b"gamma" * 1000)])
    got = live.get_many([b"is-a", b"is-b", b"is-c"])
    assert [None if v is None else bytes(v) for v in got] == [b"alpha", None, b"gamma" * 1000]


@NO_SERVER
def test_exists_and_exists_prefix_see_written_keys(live: InfiniStoreBackend) -> None:
    live.put_many([(b"ie-0", b"0"), (b"ie-1", b"1"), (b"ie-3", b"3")])
    assert live.exists([b"ie-0", b"ie-2"]) == [True, False]
    assert live.exists_prefix([b"ie-0", b"ie-1", b"ie-2", b"ie-3"]) == 2


@NO_SERVER
def test_put_overwrites_an_existing_value(live: InfiniStoreBackend) -> None:
    live.put_many([(b"io-a", b"old")])
    live.put_many([(b"io-a", b"new value")])
    assert [bytes(v) for v in live.get_many([b"io-a"]) if v is not None] == [b"new value"]


@NO_SERVER
def test_delete_removes_keys_and_ignores_missing_ones(live: InfiniStoreBackend) -> None:
    live.put_many([(b"id-a", b"a")])
    live.delete([b"id-a", b"id-never"])
    assert live.exists([b"id-a"]) == [False]
