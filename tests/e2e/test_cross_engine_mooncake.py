"""Cross-engine reuse through L2 on a real Mooncake Store (master + storage node).

Engine A (its own process) serves prompts and writes their blocks to Mooncake.
Engine B (another process, empty L1) serves the same prompts and must load
them from Mooncake; outputs must equal an engine without any connector.

Every process that loads the Mooncake client listens on the wildcard address
unless it starts with the fixtures' bind-to-loopback ``LD_PRELOAD`` library,
so both engines run in child processes with the cluster's environment, and
a watcher checks through ``/proc`` that none of them (nor the master or the
storage node) listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    BLOCK,
    Completion,
    prompt_tokens,
    run_engine_process,
    same_output,
    tiny_model,
)
from tests.integration.mooncake_cluster import MooncakeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
pytest_plugins = ["tests.integration.mooncake_fixtures"]

PROMPTS = [prompt_tokens(21, 4 * BLOCK + 30), prompt_tokens(22, 2 * BLOCK + 5)]


def _listening(pid: int) -> set[str]:
    # Imported late: pytest loads that module as a plugin (assertion rewriting).
    from tests.integration.mooncake_fixtures import listening_addresses

    return listening_addresses(pid)


def _beyond_loopback(addrs: set[str]) -> set[str]:
    from tests.integration.mooncake_fixtures import LOOPBACK_HEX

    return addrs - LOOPBACK_HEX


def _master_metric(cluster: MooncakeCluster, name: str) -> float:
    """One value of the master's Prometheus endpoint (127.0.0.1:metrics_port)."""
    url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.split(" ", 1)[0] == name:
                return float(line.split()[1])
    raise AssertionError(f"{name} not in {url}")


class ListenWatcher:
    """Polls the TCP listening sockets of this process's descendants.

    Engines run through ``subprocess.run`` (no pid handed back), so a thread
    samples every descendant of the test process while they live; the
    Mooncake servers are excluded (checked directly).
    """

    def __init__(self, exclude: set[int], interval: float = 0.1) -> None:
        self.exclude = exclude
        self.interval = interval
        self.seen: dict[int, set[str]] = {}  # pid -> listening addresses ever seen
        self.cmdlines: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listen-watcher", daemon=True)

    def __enter__(self) -> ListenWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _descendants(self) -> list[int]:
        parent: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        me, out = os.getpid(), []
        for pid in parent:
            p, depth = pid, 0
            while p in parent and p > 1 and depth < 64:
                p, depth = parent[p], depth + 1
                if p == me:
                    out.append(pid)
                    break
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self._descendants():
                if pid in self.exclude:
                    continue
                addrs = _listening(pid)
                if addrs:
                    self.seen.setdefault(pid, set()).update(addrs)
                    if pid not in self.cmdlines:
                        try:
                            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                            self.cmdlines[pid] = raw.replace(b"\0", b" ").decode()[:200]
                        except OSError:
                            self.cmdlines[pid] = "?"
            self._stop.wait(self.interval)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def baseline(workdir: Path) -> dict[tuple[int, ...], Completion]:
    out = run_engine_process({"model": tiny_model(), "prompts": PROMPTS, "extra": None}, workdir)
    return {tuple(p): c for p, c in zip(PROMPTS, out["rounds"][0], strict=True)}


def _l2_extra(cluster: MooncakeCluster) -> dict[str, Any]:
    # mooncake_master / _metadata_server / _local_hostname (127.0.0.1), a pure
    # client (segment 0: values live in the storage node) with a small buffer.
    return cluster.client_config(
        l2_cache_ingestion_type="ALL",
        l1_cache_capacity_gb=0.25,
        # Generous: this checks behaviour, not speed, on a loaded 2-core machine.
        l2_cache_op_timeout_ms=5000,
    )


def _engine_env(cluster: MooncakeCluster) -> dict[str, str]:
    # LD_PRELOAD (bind to loopback), MC_TCP_BIND_ADDRESS=127.0.0.1, fast setup failure.
    env = dict(cluster.env)
    env["VLLM_HOST_IP"] = "127.0.0.1"
    return env


@pytest.fixture(scope="module")
def watcher(mooncake_cluster: MooncakeCluster) -> Iterator[ListenWatcher]:
    servers = {mooncake_cluster.master.pid, mooncake_cluster.node.pid}  # type: ignore[union-attr]
    with ListenWatcher(exclude=servers) as w:
        yield w


@pytest.fixture(scope="module")
def engine_a(
    mooncake_cluster: MooncakeCluster, workdir: Path, baseline: Any, watcher: ListenWatcher
) -> dict[str, Any]:
    spec = {"model": tiny_model(), "prompts": PROMPTS, "extra": _l2_extra(mooncake_cluster)}
    return run_engine_process(spec, workdir, env=_engine_env(mooncake_cluster))


@pytest.fixture(scope="module")
def engine_b(
    mooncake_cluster: MooncakeCluster, workdir: Path, engine_a: Any, watcher: ListenWatcher
) -> dict[str, Any]:
    spec = {"model": tiny_model(), "prompts": PROMPTS, "extra": _l2_extra(mooncake_cluster)}
    return run_engine_process(spec, workdir, env=_engine_env(mooncake_cluster))


def test_engine_a_computes_and_writes_every_full_block(
    engine_a: dict[str, Any],
    baseline: dict[tuple[int, ...], Completion],
    mooncake_cluster: MooncakeCluster,
) -> None:
    for p, o in zip(PROMPTS, engine_a["rounds"][0], strict=True):
        assert o.num_cached_tokens == 0
        assert same_output(o, baseline[tuple(p)])
    full_blocks = sum(len(p) // BLOCK for p in PROMPTS)
    # Full prompt blocks (plus any decode blocks) of one rank (TP=1), now in the
    # storage node; engine A is gone, its writes were flushed before it exited.
    assert _master_metric(mooncake_cluster, "master_key_count") >= full_blocks
    assert _master_metric(mooncake_cluster, "master_evicted_key_count") == 0


def test_engine_b_loads_from_mooncake_and_matches_baseline(
    engine_b: dict[str, Any], baseline: dict[tuple[int, ...], Completion]
) -> None:
    for p, o in zip(PROMPTS, engine_b["rounds"][0], strict=True):
        assert o.num_cached_tokens == (len(p) - 1) // BLOCK * BLOCK
        assert same_output(o, baseline[tuple(p)])
    totals = engine_b["totals"]
    assert totals.get("hit_tokens_l2", 0) > 0, totals
    assert totals.get("hit_tokens_l1", 0) == 0, totals
    assert totals.get("load_failures", 0) == 0, totals


def test_no_mooncake_process_listens_beyond_loopback(
    mooncake_cluster: MooncakeCluster, engine_b: Any, watcher: ListenWatcher
) -> None:
    servers = {
        "master": _listening(mooncake_cluster.master.pid),  # type: ignore[union-attr]
        "node": _listening(mooncake_cluster.node.pid),  # type: ignore[union-attr]
    }
    assert all(servers.values()), servers  # both are alive and listen on something
    engines = {
        pid: addrs
        for pid, addrs in watcher.seen.items()
        if "run_engine.py" in watcher.cmdlines[pid]
    }
    # Engines A and B each loaded the Mooncake client, which listens (RPC + TCP transport).
    assert len(engines) >= 2, (watcher.seen, watcher.cmdlines)
    everyone = {**servers, **{f"engine {pid}": a for pid, a in engines.items()}}
    beyond = {name: _beyond_loopback(addrs) for name, addrs in everyone.items()}
    assert all(not a for a in beyond.values()), beyond
    others = {pid: _beyond_loopback(a) for pid, a in watcher.seen.items()}
    assert all(not a for a in others.values()), (others, watcher.cmdlines)
