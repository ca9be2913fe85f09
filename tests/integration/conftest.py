"""Real servers for integration tests: redis-server standalone, with a password,
with TLS, and a 3-master Redis Cluster, all on free 127.0.0.1 ports.

Every server started here is stopped by a finalizer (and, as a last resort,
at interpreter exit). ``redis-server`` comes from Debian
(``scripts/setup_env.sh`` installs it); when it is missing the tests fail
with a message saying so instead of silently skipping.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

HOST = "127.0.0.1"
_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(5)


atexit.register(_kill_leftovers)


def free_port() -> int:
    """A port nobody listens on right now (and its +10000 cluster-bus port too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def redis_binary(name: str = "redis-server") -> str:
    fallback = f"/usr/bin/{name}"
    path = shutil.which(name) or (fallback if os.path.exists(fallback) else None)
    if path is None:
        pytest.fail(
            f"{name} not found: install it with 'apt-get install -y redis-server' "
            "(scripts/setup_env.sh does this)",
            pytrace=False,
        )
    return path


@dataclass
class RedisServer:
    """One redis-server process we own. ``kill``/``start`` reuse the same port."""

    port: int
    workdir: str
    args: list[str] = field(default_factory=list)
    password: str = ""
    tls: dict[str, str] | None = None  # ca, cert, key paths when TLS is on
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}{HOST}:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
        return f"redis://{auth}{HOST}:{self.port}/0"

    def start(self, wait: bool = True) -> RedisServer:
        cmd = [
            redis_binary(),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.workdir,
            "--protected-mode",
            "no" if self.password else "yes",
            *self.args,
        ]
        if self.tls:
            cmd += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls["cert"],
                "--tls-key-file",
                self.tls["key"],
                "--tls-ca-cert-file",
                self.tls["ca"],
                "--tls-auth-clients",
                "no",
            ]
        else:
            cmd += ["--port", str(self.port)]
        if self.password:
            cmd += ["--requirepass", self.password]
        log = open(os.path.join(self.workdir, f"redis-{self.port}.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _LIVE.add(self.proc)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on {self.port} exited: {self.log_tail()}")
            with socket.socket() as s, contextlib.suppress(OSError):
                s.settimeout(0.2)
                s.connect((HOST, self.port))
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        with (
            contextlib.suppress(OSError),
            open(os.path.join(self.workdir, f"redis-{self.port}.log"), "rb") as f,
        ):
            return f.read()[-2000:].decode(errors="replace")
        return ""

    def kill(self) -> None:
        """SIGKILL: the server vanishes like a crashed host (no goodbye)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        if self.proc is not None:
            _LIVE.discard(self.proc)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            _LIVE.discard(self.proc)
        self.proc = None

    def client(self):  # -> redis.Redis; raw client for planting values in tests
        import redis

        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="module")
def redis_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start extra redis-servers (``start=False`` only reserves a port); all stopped at the end."""
    servers: list[RedisServer] = []
    tmp = tempfile.mkdtemp(prefix="aibrix-redis-")

    def make(*args: str, password: str = "", start: bool = True) -> RedisServer:
        srv = RedisServer(free_port(), tmp, list(args), password)
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A plain standalone redis-server for the module."""
    return redis_factory()


@pytest.fixture(scope="module")
def redis_password_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A redis-server that requires AUTH."""
    return redis_factory(password="s3cret-pw")


def _make_certs(d: str) -> dict[str, str] | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    ca, ca_key = os.path.join(d, "ca.crt"), os.path.join(d, "ca.key")
    cert, key, csr = (os.path.join(d, n) for n in ("server.crt", "server.key", "server.csr"))
    ext = os.path.join(d, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    subj_ca, subj_srv = "/CN=aibrix-test-ca", "/CN=127.0.0.1"
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", subj_ca,
        "-keyout", ca_key, "-out", ca)  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj_srv, "-keyout", key,
        "-out", csr)  # fmt: skip
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-days", "1", "-out", cert, "-extfile", ext)  # fmt: skip
    return {"ca": ca, "cert": cert, "key": key}


@pytest.fixture(scope="module")
def redis_tls_server() -> Iterator[RedisServer]:
    """A TLS-only redis-server with a throw-away CA; skipped if TLS is unavailable."""
    tmp = tempfile.mkdtemp(prefix="aibrix-redis-tls-")
    try:
        certs = _make_certs(tmp)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot make test certificates with openssl: {e.stderr!r}")
    if certs is None:
        pytest.skip("openssl is not installed; cannot make a test certificate for TLS")
    srv = RedisServer(free_port(), tmp, tls=certs)
    try:
        srv.start()
    except RuntimeError as e:
        srv.stop()
        if "tls" in str(e).lower():
            pytest.skip(f"this redis-server build has no TLS support: {e}")
        raise
    yield srv
    srv.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class RedisClusterHandle:
    """Three masters, slots split by ``redis-cli --cluster create``."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return self.nodes[0].url


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterHandle]:
    """A 3-master Redis Cluster on loopback (no replicas)."""
    tmp = tempfile.mkdtemp(prefix="aibrix-cluster-")
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            port = free_port()
            nodes.append(
                RedisServer(
                    port,
                    tmp,
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                ).start()
            )
        subprocess.run(
            [
                redis_binary("redis-cli"),
                "--cluster",
                "create",
                *[f"{HOST}:{n.port}" for n in nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait_cluster_ok(nodes)
        yield RedisClusterHandle(nodes)
    finally:
        for n in nodes:
            n.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_cluster_ok(nodes: list[RedisServer], timeout: float = 30.0) -> None:
    import redis

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = []
        for n in nodes:
            c = redis.Redis(host=HOST, port=n.port)
            try:
                states.append(c.cluster("info").get("cluster_state"))
            finally:
                c.close()
        if all(s == "ok" for s in states):
            return
        time.sleep(0.1)
    raise RuntimeError("cluster did not reach cluster_state:ok")
