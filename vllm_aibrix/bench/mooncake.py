"""MooncakeBackend vs Mooncake's own batch calls, same run, same server.

Starts a private Mooncake Store on 127.0.0.1 (master + one storage node),
then, in one client process, times for each value size:

* ``backend put``: :meth:`MooncakeBackend.put_many` of ``--batch`` values;
* ``raw put``: ``batch_upsert_from`` of the same values from a registered
  buffer (Mooncake's fastest write path);
* ``backend get``: :meth:`MooncakeBackend.get_many` (sizes from the master,
  values read into memory the backend allocates);
* ``backend get_into``: :meth:`MooncakeBackend.get_into` (zero-copy into
  caller buffers);
* ``raw get``: ``batch_get_into`` into a registered buffer.

``ratio = backend GB/s / raw GB/s`` (best of ``--repeats``). Run:
``python -m vllm_aibrix.bench.mooncake`` (or ``python -m vllm_aibrix.bench
mooncake``).

Loopback only. Mooncake's transfer engine listens on the wildcard address
whatever ``MC_TCP_BIND_ADDRESS`` says (that variable only sets the address
it *advertises*), and so does the master's HTTP metadata server. Every
Mooncake process started here therefore runs with a tiny ``LD_PRELOAD``
library (:func:`loopback_preload_library`) that rewrites wildcard ``bind``
calls to 127.0.0.1; the measuring client runs in such a child process too.
The same helpers start the servers of the integration tests.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_aibrix.bench._common import add_output_args, emit

KIB = 1024
DEFAULT_VALUE_KIB = (64, 512, 2048)

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


# -- the measurement (runs in a loopback-confined child) ----------------------------
def _measure(cfg: dict[str, Any], value_kib: Sequence[int], batch: int, repeats: int) -> list[dict]:
    import numpy as np
    from mooncake.store import MooncakeDistributedStore

    from vllm_aibrix.core.config import CacheConfig
    from vllm_aibrix.core.l2.mooncake import MooncakeBackend

    backend = MooncakeBackend(CacheConfig.from_sources(cfg, environ={}))
    raw = MooncakeDistributedStore()
    rc = raw.setup(
        "127.0.0.1",
        cfg["mooncake_metadata_server"],
        0,
        cfg["mooncake_local_buffer_size_mb"] << 20,
        "tcp",
        "",
        cfg["mooncake_master"],
    )
    if rc != 0:
        raise RuntimeError(f"raw client setup failed: {rc}")
    rows = []
    rng = np.random.default_rng(0)
    for kib in value_kib:
        size = kib * KIB
        total = size * batch
        keys = [f"bench-{kib}-{i}".encode() for i in range(batch)]
        skeys = [k.hex() for k in keys]  # the backend's key mapping, so both read the same
        values = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(batch)]
        items = list(zip(keys, values, strict=True))
        src = np.frombuffer(b"".join(values), dtype=np.uint8).copy()
        dst = np.zeros(total, dtype=np.uint8)
        raw.register_buffer(src.ctypes.data, src.nbytes)
        raw.register_buffer(dst.ctypes.data, dst.nbytes)
        ptrs = [src.ctypes.data + i * size for i in range(batch)]
        dptrs = [dst.ctypes.data + i * size for i in range(batch)]
        sizes = [size] * batch
        bufs = [memoryview(dst[i * size : (i + 1) * size].data) for i in range(batch)]

        def raw_put() -> None:
            codes = raw.batch_upsert_from(skeys, ptrs, sizes)  # noqa: B023
            assert all(c == 0 for c in codes), codes

        def raw_get() -> None:
            codes = raw.batch_get_into(skeys, dptrs, sizes)  # noqa: B023
            assert all(c == size for c in codes), codes  # noqa: B023

        def be_put() -> None:
            backend.put_many(items)  # noqa: B023

        def be_get() -> None:
            got = backend.get_many(keys)  # noqa: B023
            assert all(v is not None and len(v) == size for v in got)  # noqa: B023

        def be_get_into() -> None:
            n = backend.get_into(keys, bufs)  # noqa: B023
            assert all(x == size for x in n)  # noqa: B023

        # Rounds interleave all five so that drift on a shared machine hits every
        # side alike; each keeps its fastest (least disturbed) round.
        ops = {
            "raw_put": raw_put,
            "backend_put": be_put,
            "raw_get": raw_get,
            "backend_get": be_get,
            "backend_get_into": be_get_into,
        }
        t = {name: float("inf") for name in ops}
        for fn in ops.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in ops.items():
                t0 = time.perf_counter()
                fn()
                t[name] = min(t[name], time.perf_counter() - t0)
        backend.get_into(keys, bufs)
        assert bytes(dst[:size]) == values[0], "read back wrong bytes"

        def gbps(sec: float, total: int = total) -> float:
            return round(total / sec / 1e9, 3)

        rows.append(
            {
                "value_kib": kib,
                "batch": batch,
                "bytes_per_op": total,
                "raw_put_gbps": gbps(t["raw_put"]),
                "backend_put_gbps": gbps(t["backend_put"]),
                "put_ratio": round(t["raw_put"] / t["backend_put"], 3),
                "raw_get_gbps": gbps(t["raw_get"]),
                "backend_get_gbps": gbps(t["backend_get"]),
                "get_ratio": round(t["raw_get"] / t["backend_get"], 3),
                "backend_get_into_gbps": gbps(t["backend_get_into"]),
                "get_into_ratio": round(t["raw_get"] / t["backend_get_into"], 3),
            }
        )
        backend.delete(keys)
        raw.unregister_buffer(src.ctypes.data)
        raw.unregister_buffer(dst.ctypes.data)
    backend.close()
    raw.close()
    return rows


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    needed_mb = max(args.value_kib) * args.batch // 1024
    with tempfile.TemporaryDirectory(prefix="aibrix-mc-bench-") as tmp:
        cluster = MooncakeCluster(tmp, segment_mb=max(512, 4 * needed_mb))
        with cluster:
            cfg = cluster.client_config(
                mooncake_local_buffer_size_mb=max(64, 2 * needed_mb),
                l2_cache_op_timeout_ms=30000,
            )
            spec = json.dumps(
                {
                    "cfg": cfg,
                    "value_kib": args.value_kib,
                    "batch": args.batch,
                    "repeats": args.repeats,
                }
            )
            # The measuring client listens too: it must run with the loopback library.
            proc = subprocess.run(
                [sys.executable, "-m", "vllm_aibrix.bench.mooncake", "--_child", spec],
                env=cluster.env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark client failed:\n{proc.stderr[-4000:]}")
            rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "benchmark": "mooncake",
        "what": "MooncakeBackend vs raw MooncakeDistributedStore batch calls, one client, "
        "same master + storage node on 127.0.0.1 (TCP)",
        "ratio": "raw seconds / backend seconds (1.0 = as fast as raw; goal >= 0.8)",
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
        "results": rows,
    }


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--value-kib", nargs="+", type=int, default=list(DEFAULT_VALUE_KIB))
    p.add_argument("--batch", type=int, default=16, help="values per batched call")
    p.add_argument("--repeats", type=int, default=7, help="best of this many timed calls")
    add_output_args(p)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``mooncake`` subcommand."""
    p = subparsers.add_parser("mooncake", help="MooncakeBackend vs raw Mooncake batch calls")
    _add_args(p)
    p.set_defaults(func=_run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_aibrix.bench.mooncake [--value-kib ...] [--batch N]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_child"]:
        spec = json.loads(argv[1])
        rows = _measure(spec["cfg"], spec["value_kib"], spec["batch"], spec["repeats"])
        sys.stdout.write(json.dumps(rows) + "\n")
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m vllm_aibrix.bench.mooncake", description=__doc__
    )
    _add_args(parser)
    args = parser.parse_args(argv)
    emit(_run(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
