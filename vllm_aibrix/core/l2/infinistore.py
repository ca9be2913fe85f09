"""L2 backend on InfiniStore (PyPI ``infinistore``), over its TCP data path.

Written against the client API of ``infinistore`` 0.2.35:
``InfinityConnection(ClientConfig(host_addr, service_port, connection_type=TYPE_TCP))``,
``connect()``, ``tcp_write_cache(key, ptr, size)``, ``tcp_read_cache(key) ->
np.ndarray``, ``check_exist(key) -> bool``, ``delete_keys(keys) -> int``.

Not verified against a server: an InfiniStore server cannot start without an
RDMA device, and the machines this was written on have none (see
docs/l2-mooncake-infinistore.md). What the tests here cover is everything
that runs without a server: configuration mapping, a missing package, and a
clear :class:`BackendError` when the server is unreachable.

Design notes:

* The client has no batch calls on the TCP path, so every batch is a loop of
  single-key requests over one connection.
* One connection is one blocking socket: calls are serialised by a lock and
  run on a worker thread under the op deadline (the client has no timeouts of
  its own). A call that misses the deadline poisons the connection (its reply
  may still arrive), so the backend reconnects before the next call.
* ``get_match_last_index`` is not used for :meth:`exists_prefix`: the server
  answers it with a binary search that assumes the present keys form a
  prefix, which can over-count when a middle block was evicted.
* RDMA (``infinistore_connection_type=RDMA``) is refused: its write path
  needs registered memory and remote allocation, which this backend does not
  implement.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ClassVar, TypeVar

import numpy as np

from vllm_aibrix.core.config import CacheConfig
from vllm_aibrix.core.l2.backend import (
    BackendError,
    BackendTimeout,
    Buffer,
    L2BackendBase,
)

T = TypeVar("T")


def client_config_kwargs(config: CacheConfig) -> dict[str, Any]:
    """``ClientConfig`` keyword arguments for ``config`` (TCP only)."""
    if config.infinistore_connection_type != "TCP":
        raise BackendError(
            "InfiniStoreBackend supports infinistore_connection_type=TCP only "
            f"(got {config.infinistore_connection_type})"
        )
    return {
        "host_addr": config.infinistore_host,
        "service_port": config.infinistore_port,
        "connection_type": "TCP",  # infinistore.TYPE_TCP
        "log_level": "error",
    }


class InfiniStoreBackend(L2BackendBase):
    """Raw L2 backend on an InfiniStore server (TCP)."""

    name: ClassVar[str] = "infinistore"

    def __init__(self, config: CacheConfig) -> None:
        """Connect to ``config.infinistore_host:infinistore_port``.

        Raises :class:`BackendError` when the package is missing or the server
        cannot be reached within the op timeout.
        """
        kwargs = client_config_kwargs(config)
        try:
            import infinistore
        except ImportError as e:
            raise BackendError(
                "l2_cache_backend=INFINISTORE needs the InfiniStore client: "
                "pip install --no-deps infinistore uvloop fastapi uvicorn numpy pybind11 "
                f"({e})"
            ) from e
        self._lib = infinistore
        self._client_config = infinistore.ClientConfig(
            **{**kwargs, "connection_type": infinistore.TYPE_TCP}
        )
        self.timeout_s = config.l2_op_timeout_s
        self._target = f"{config.infinistore_host}:{config.infinistore_port}"
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infinistore-l2")
        self._conn: Any = None
        self._closed = False
        try:
            self._run("connect", self._ensure_connected)
        except BackendError:
            self._pool.shutdown(wait=False)
            raise

    # -- plumbing -------------------------------------------------------------------------
    def _ensure_connected(self) -> Any:
        if self._conn is None:
            conn = self._lib.InfinityConnection(self._client_config)
            # connect() prints "connecting to <host>" on stdout; keep stdout clean.
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    conn.connect()
                except Exception as e:
                    raise BackendError(f"InfiniStore {self._target} is unreachable: {e}") from e
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker under the deadline, one call at a time."""
        if self._closed:
            raise BackendError("InfiniStore backend is closed")
        with self._lock:
            fut = self._pool.submit(fn)
            try:
                return fut.result(timeout=self.timeout_s)
            except FutureTimeout:
                # The late reply would be read by the next call: start afresh.
                fut.add_done_callback(lambda _f: self._drop_connection())
                self._conn = None
                raise BackendTimeout(
                    f"InfiniStore {what} took longer than {self.timeout_s:.3g}s"
                ) from None
            except BackendError:
                self._drop_connection()
                raise
            except Exception as e:
                self._drop_connection()
                raise BackendError(f"InfiniStore {what} failed: {e}") from e

    @staticmethod
    def _key(key: bytes) -> str:
        return key.hex()

    # -- L2BackendBase ------------------------------------------------------------------------
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """``check_exist`` per key (the TCP path has no batched form)."""
        skeys = [self._key(k) for k in keys]

        def run() -> list[bool]:
            conn = self._ensure_connected()
            return [bool(conn.check_exist(k)) for k in skeys]

        return self._run("exists", run)

    def get_many(self, keys: Sequence[bytes]) -> list[Buffer | None]:
        """``tcp_read_cache`` per key; a failed read of an absent key is a miss."""
        skeys = [self._key(k) for k in keys]

        def run() -> list[Buffer | None]:
            conn = self._ensure_connected()
            out: list[Buffer | None] = []
            for k in skeys:
                try:
                    arr = conn.tcp_read_cache(k)
                except Exception:
                    # The client raises for a missing key and for a broken
                    # connection alike; ask which one it was.
                    if conn.check_exist(k):
                        raise
                    out.append(None)
                    continue
                data = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
                out.append(data.data if data.size else None)
            return out

        return self._run("get", run)

    def put_many(self, items: Sequence[tuple[bytes, Buffer]]) -> None:
        """``tcp_write_cache`` per value, straight from the caller's memory."""
        prepared = []
        for key, value in items:
            arr = np.frombuffer(memoryview(value).cast("B"), dtype=np.uint8)
            if arr.size == 0:
                raise BackendError("InfiniStore cannot store empty values")
            prepared.append((self._key(key), arr))

        def run() -> None:
            conn = self._ensure_connected()
            for k, arr in prepared:
                conn.tcp_write_cache(k, int(arr.ctypes.data), int(arr.nbytes))

        self._run("put", run)

    def delete(self, keys: Sequence[bytes]) -> None:
        """``delete_keys``; missing keys are not an error."""
        if not keys:
            return
        skeys = [self._key(k) for k in keys]

        def run() -> None:
            conn = self._ensure_connected()
            conn.delete_keys(skeys)

        self._run("delete", run)

    def close(self) -> None:
        """Close the connection."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._drop_connection()
        self._pool.shutdown(wait=False)
