"""A private Mooncake Store on 127.0.0.1 for tests and the Mooncake benchmark.

:class:`MooncakeCluster` starts one ``mooncake_master`` (RPC + HTTP metadata
server + metrics) and one storage node on free loopback ports, and can kill
and restart either to simulate crashes.

Loopback only. Mooncake's transfer engine listens on the wildcard address
whatever ``MC_TCP_BIND_ADDRESS`` says (that variable only sets the address
it *advertises*), and so does the master's HTTP metadata server. Every
Mooncake process started here therefore runs with a tiny ``LD_PRELOAD``
library (:func:`loopback_preload_library`, compiled once with ``cc``) that
rewrites wildcard ``bind`` calls to 127.0.0.1; a Mooncake *client* must run
in a process started with :func:`loopback_env` too, since the library can
only be loaded at process start.

Used by ``tests/integration/mooncake_fixtures.py``,
``tests/e2e/test_cross_engine_mooncake.py`` and, from a source checkout,
``python -m vllm_aibrix.bench mooncake``. Standard library only, so the
benchmark can load this file by path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Rewrites bind(INADDR_ANY / in6addr_any) to the loopback address. A dual-stack
# IPv6 socket is bound to ::ffff:127.0.0.1 so that it still accepts 127.0.0.1.
_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in a;
        memcpy(&a, addr, sizeof a);
        if (a.sin_addr.s_addr == htonl(INADDR_ANY)) {
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
        }
    } else if (addr && addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 a;
        memcpy(&a, addr, sizeof a);
        if (IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr)) {
            static const unsigned char mapped[16] = {0, 0, 0, 0, 0, 0, 0, 0,
                                                     0, 0, 0xff, 0xff, 127, 0, 0, 1};
            int off = 0;
            memcpy(&a.sin6_addr, mapped, sizeof mapped);
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
            return real_bind(fd, (const struct sockaddr *)&a, sizeof a);
        }
    }
    return real_bind(fd, addr, len);
}
"""

# A storage node: a client that contributes memory and stays alive.
_NODE_PY = r"""
import sys, time
from mooncake.store import MooncakeDistributedStore
metadata, master = sys.argv[1], sys.argv[2]
segment_mb, buffer_mb = int(sys.argv[3]), int(sys.argv[4])
store = MooncakeDistributedStore()
rc = store.setup("127.0.0.1", metadata, segment_mb << 20, buffer_mb << 20, "tcp", "", master)
if rc != 0:
    print(f"SETUP FAILED {rc}", flush=True)
    sys.exit(1)
print("READY", flush=True)
while True:
    time.sleep(3600)
"""


class MooncakeUnavailable(RuntimeError):
    """The Mooncake package, its binaries or a C compiler are missing."""


def mooncake_master_binary() -> str:
    """Path of ``mooncake_master`` (next to the interpreter, or on PATH)."""
    candidates = [Path(sys.executable).with_name("mooncake_master")]
    found = shutil.which("mooncake_master")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise MooncakeUnavailable(
        "mooncake_master not found: pip install mooncake-transfer-engine-non-cuda "
        "(scripts/setup_env.sh installs the [mooncake] extra) and apt-get install "
        "libibverbs1 libnuma1"
    )


def check_mooncake_client() -> None:
    """Raise :class:`MooncakeUnavailable` unless ``mooncake.store`` imports."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        raise MooncakeUnavailable(
            f"cannot import mooncake.store ({e}): pip install "
            "mooncake-transfer-engine-non-cuda and apt-get install libibverbs1 libnuma1"
        ) from e


def loopback_preload_library(cache_dir: str | None = None) -> str:
    """Build (once, cached by content) the bind-to-loopback ``LD_PRELOAD`` library."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise MooncakeUnavailable(
            "a C compiler (apt-get install gcc) is needed to keep Mooncake on 127.0.0.1"
        )
    digest = hashlib.sha256(_SHIM_C.encode()).hexdigest()[:12]
    root = Path(cache_dir or tempfile.gettempdir()) / f"aibrix-loopback-{digest}"
    lib = root / "libloopback_bind.so"
    if lib.is_file():
        return str(lib)
    root.mkdir(parents=True, exist_ok=True)
    src = root / "loopback_bind.c"
    src.write_text(_SHIM_C)
    tmp = root / f"libloopback_bind.{os.getpid()}.so"
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src), "-ldl"],
        check=True,
        capture_output=True,
    )
    tmp.replace(lib)  # atomic: concurrent builders never see a half-written file
    return str(lib)


def loopback_env(preload: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Mooncake process confined to 127.0.0.1."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = preload
    env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    env["MC_STORE_CLIENT_SETUP_RETRIES"] = "1"
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class MooncakeCluster:
    """A private Mooncake Store on 127.0.0.1: one master and one storage node.

    Ports are picked free at construction and kept across restarts, so clients
    configured once reach the restarted servers.
    """

    def __init__(
        self,
        workdir: str,
        segment_mb: int = 512,
        node_buffer_mb: int = 64,
        client_ttl_s: int = 2,
    ) -> None:
        self.workdir = Path(workdir)
        # How long the master keeps a silent node's segment (Mooncake's default is
        # 10 s); until it drops it, new values may still be placed in the dead one.
        self.client_ttl_s = client_ttl_s
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.segment_mb = segment_mb
        self.node_buffer_mb = node_buffer_mb
        self.master_bin = mooncake_master_binary()
        check_mooncake_client()
        self.preload = loopback_preload_library(str(self.workdir))
        self.env = loopback_env(self.preload)
        self.rpc_port = free_port()
        self.http_port = free_port()
        self.metrics_port = free_port()
        self.master: subprocess.Popen[bytes] | None = None
        self.node: subprocess.Popen[bytes] | None = None
        self._logs: list[Any] = []

    @property
    def master_addr(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    def client_config(self, **extra: Any) -> dict[str, Any]:
        """``CacheConfig`` fields for a client of this cluster."""
        cfg: dict[str, Any] = {
            "l2_cache_backend": "MOONCAKE",
            "mooncake_master": self.master_addr,
            "mooncake_metadata_server": self.metadata_url,
            "mooncake_local_hostname": "127.0.0.1",
            "mooncake_global_segment_size_mb": 0,
            "mooncake_local_buffer_size_mb": 64,
        }
        cfg.update(extra)
        return cfg

    def _log(self, name: str) -> Any:
        f = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(f)
        return f

    def start_master(self) -> None:
        """Start the master (RPC + HTTP metadata + metrics, all on 127.0.0.1)."""
        self.master = subprocess.Popen(
            [
                self.master_bin,
                "--rpc_address=127.0.0.1",
                f"--rpc_port={self.rpc_port}",
                "--enable_http_metadata_server=true",
                "--http_metadata_server_host=127.0.0.1",
                f"--http_metadata_server_port={self.http_port}",
                "--metrics_host=127.0.0.1",
                f"--metrics_port={self.metrics_port}",
                f"--client_ttl={self.client_ttl_s}",
            ],
            cwd=self.workdir,
            env=self.env,
            stdout=self._log("master"),
            stderr=subprocess.STDOUT,
        )
        _wait_port(self.rpc_port, self.master, 20)
        _wait_port(self.http_port, self.master, 20)

    def start_node(self, attempts: int = 5) -> None:
        """Start the storage node and wait until it has mounted its segment.

        Setup can be refused for a while after a node died: the master keeps
        the dead client's segment until ``client_ttl`` expires (and longer on
        a loaded machine), so a refused setup is retried a few times.
        """
        line = ""
        for attempt in range(attempts):
            self.node = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _NODE_PY,
                    self.metadata_url,
                    self.master_addr,
                    str(self.segment_mb),
                    str(self.node_buffer_mb),
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=self._log("node"),
            )
            assert self.node.stdout is not None
            line = self.node.stdout.readline().decode().strip()
            if line == "READY":
                return
            _stop(self.node)
            if not line.startswith("SETUP FAILED") or attempt == attempts - 1:
                break
            time.sleep(self.client_ttl_s + 1.0)
        raise RuntimeError(f"storage node did not start ({line!r}); see {self.workdir}")

    def start(self) -> MooncakeCluster:
        self.start_master()
        self.start_node()
        return self

    def kill_master(self) -> None:
        """SIGKILL the master (a crash, not a shutdown)."""
        _stop(self.master, signal.SIGKILL)

    def kill_node(self) -> None:
        """SIGKILL the storage node: its memory, and every value in it, is gone."""
        _stop(self.node, signal.SIGKILL)

    def restart(self) -> None:
        """Bring back whatever is down (master first), on the same ports."""
        master_restarted = self.master is None or self.master.poll() is not None
        if master_restarted:
            self.start_master()
        if self.node is None or self.node.poll() is not None:
            self.start_node()
            if not master_restarted:
                # The old master still lists the dead node's segment: wait it out.
                time.sleep(self.client_ttl_s + 1.0)

    def stop(self) -> None:
        """Stop both processes (node first, so it can unmount)."""
        _stop(self.node)
        _stop(self.master)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> MooncakeCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
