"""Fixtures for tests against a real Mooncake Store on 127.0.0.1.

* ``mooncake_cluster`` (module scope): a master (RPC + HTTP metadata server)
  and one storage node on free loopback ports, always stopped afterwards.
  ``kill_master`` / ``kill_node`` / ``restart`` simulate crashes.
* ``mooncake_client``: a :class:`RemoteBackend`, i.e. a real
  :class:`~vllm_aibrix.core.l2.mooncake.MooncakeBackend` living in a child
  process.

Why a child process: Mooncake's transfer engine opens listening sockets on
the wildcard address in every client, whatever ``MC_TCP_BIND_ADDRESS`` says.
Servers here must listen on 127.0.0.1 only, so every Mooncake process runs
with the bind-to-loopback ``LD_PRELOAD`` library from
:mod:`tests.integration.mooncake_cluster`, which can only be loaded at process
start.
The child executes the backend calls verbatim and sends back results and
exceptions (a :class:`BackendError` is re-raised as one).

A missing Mooncake package or binary makes these fixtures *fail* with the
install command, never skip: the project's setup installs them.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

import pytest

from tests.integration.mooncake_cluster import MooncakeCluster, MooncakeUnavailable
from vllm_aibrix.core.l2.backend import BackendError, BackendTimeout

REPO_ROOT = Path(__file__).resolve().parents[2]
OP_TIMEOUT = "l2_cache_op_timeout_ms"


class RemoteBackend:
    """Calls a MooncakeBackend in a loopback-confined child process."""

    name = "mooncake"  # what L2Store reads from a backend

    def __init__(self, cluster: MooncakeCluster, config: dict[str, Any]) -> None:
        self._dir = tempfile.mkdtemp(prefix="aibrix-mc-host-")
        address = os.path.join(self._dir, "sock")
        authkey = os.urandom(16)
        listener = Listener(address, family="AF_UNIX", authkey=authkey)
        env = dict(cluster.env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        self.log_path = Path(self._dir) / "client.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.mooncake_fixtures", address, authkey.hex()],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        try:
            self.conn: Connection = listener.accept()
        finally:
            listener.close()
        self._caps: Any = None
        t0 = time.monotonic()
        try:
            self._request("__init__", pickle.dumps(config))
        except BaseException:
            self.close()  # a failed construction must not leave the child behind
            raise
        finally:
            self.construct_seconds = time.monotonic() - t0

    def _request(self, method: str, *args: Any) -> Any:
        self.conn.send((method, args))
        status, payload = self.conn.recv()
        if status == "ok":
            return payload
        kind, message = payload
        if kind == "BackendTimeout":
            raise BackendTimeout(message)
        if kind == "BackendError":
            raise BackendError(message)
        if kind == "ValueError":
            raise ValueError(message)
        raise RuntimeError(f"{kind}: {message}")

    # The L2BackendBase surface, as the tests use it.
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        return self._request("exists", list(keys))

    def exists_prefix(self, keys: Sequence[bytes]) -> int:
        return self._request("exists_prefix", list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._request("get_many", list(keys))

    def get_into(self, keys: Sequence[bytes], buffers: Sequence[memoryview]) -> list[int]:
        """Runs get_into on child buffers of the same sizes, then copies them back."""
        counts, contents = self._request("get_into", list(keys), [len(b) for b in buffers])
        for buf, data in zip(buffers, contents, strict=True):
            buf[: len(data)] = data
        return counts

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self._request("put_many", [(k, bytes(v)) for k, v in items])

    def put_many_parts(self, items: Sequence[tuple[bytes, Sequence[bytes]]]) -> None:
        self._request(
            "put_many_parts", [(k, [bytes(memoryview(p)) for p in ps]) for k, ps in items]
        )

    def delete(self, keys: Sequence[bytes]) -> None:
        self._request("delete", list(keys))

    def ping(self) -> bool:
        return self._request("ping")

    @property
    def capabilities(self) -> Any:
        """The child's ``MooncakeBackend.capabilities`` (L2Store reads it)."""
        if self._caps is None:
            self._caps = self._request("__capabilities__")
        return self._caps

    def close(self) -> None:
        """Close the backend and end the child."""
        if self.conn.closed:
            return
        try:
            if self.proc.poll() is None:
                self._request("close")
        except (OSError, EOFError, RuntimeError, BackendError):
            pass
        with contextlib.suppress(OSError):
            self.conn.send(("__exit__", ()))
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.conn.close()
        self._log.close()


# 127.0.0.1 as /proc/net/tcp prints it, and as a v4-mapped IPv6 address in tcp6.
LOOPBACK_HEX = frozenset({"0100007F", "0000000000000000FFFF00000100007F"})


def listening_addresses(pid: int) -> set[str]:
    """Local addresses (``/proc/net`` hex) of the TCP sockets ``pid`` listens on.

    Empty when the process is gone. Compare against :data:`LOOPBACK_HEX`.
    """
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return set()
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                out.add(f[1].rsplit(":", 1)[0])
    return out


def _serve(address: str, authkey: bytes) -> None:
    """Child side: build the backend, then execute requests until told to exit."""
    from vllm_aibrix.core.config import CacheConfig
    from vllm_aibrix.core.l2.mooncake import MooncakeBackend

    conn = Client(address, family="AF_UNIX", authkey=authkey)
    backend: MooncakeBackend | None = None
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            break
        if method == "__exit__":
            break
        try:
            if method == "__init__":
                config = CacheConfig.from_sources(pickle.loads(args[0]), environ={})
                backend = MooncakeBackend(config)
                result: Any = None
            elif backend is None:
                raise BackendError("backend was not constructed")
            elif method == "__capabilities__":
                result = backend.capabilities
            elif method == "get_many":
                result = [None if v is None else bytes(v) for v in backend.get_many(args[0])]
            elif method == "get_into":
                bufs = [bytearray(n) for n in args[1]]
                counts = backend.get_into(args[0], [memoryview(b) for b in bufs])
                result = (counts, [bytes(b) for b in bufs])
            else:
                result = getattr(backend, method)(*args)
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("err", (type(e).__name__, str(e))))
    if backend is not None:
        backend.close()
    conn.close()


def start_cluster(tmp: Path) -> MooncakeCluster:
    """Start a cluster or fail the test with what to install."""
    try:
        return MooncakeCluster(str(tmp)).start()
    except MooncakeUnavailable as e:
        pytest.fail(f"Mooncake is not installed: {e}", pytrace=False)


@pytest.fixture(scope="module")
def mooncake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeCluster]:
    """A running master + storage node on 127.0.0.1, stopped after the module."""
    cluster = start_cluster(tmp_path_factory.mktemp("mooncake"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def mooncake_client_factory(
    mooncake_cluster: MooncakeCluster,
) -> Iterator[Any]:
    """``make(**config_overrides) -> RemoteBackend``; all closed after the test."""
    made: list[RemoteBackend] = []

    def make(**overrides: Any) -> RemoteBackend:
        client = RemoteBackend(
            mooncake_cluster, mooncake_cluster.client_config(**{OP_TIMEOUT: 10000, **overrides})
        )
        made.append(client)
        return client

    yield make
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def mooncake_client(mooncake_cluster: MooncakeCluster) -> Iterator[RemoteBackend]:
    """One MooncakeBackend client shared by the module (tests use distinct keys)."""
    # A generous op timeout: these tests check behaviour, not speed, on a shared machine.
    client = RemoteBackend(mooncake_cluster, mooncake_cluster.client_config(**{OP_TIMEOUT: 10000}))
    try:
        yield client
    finally:
        client.close()


if __name__ == "__main__":
    _serve(sys.argv[1], bytes.fromhex(sys.argv[2]))
