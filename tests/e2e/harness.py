"""Shared pieces of the end-to-end tests: tiny model, engines, comparisons.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor)
so tests can inspect the connector's scheduler and worker halves directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The engine pieces are shared with the connector benchmark; re-exported here.
from vllm_aibrix.bench._engine import BLOCK as BLOCK
from vllm_aibrix.bench._engine import connector_config as connector_config
from vllm_aibrix.bench._engine import make_llm as make_llm
from vllm_aibrix.bench._engine import random_tokens
from vllm_aibrix.bench._engine import scheduler_half as scheduler_half
from vllm_aibrix.bench._engine import shutdown as shutdown

REPO = Path(__file__).resolve().parents[2]
MODEL_CACHE = REPO / ".cache" / "tiny-llama-fp32"  # float32: see scripts/make_tiny_model.py
GEMMA2_CACHE = REPO / ".cache" / "tiny-gemma2-fp32"  # sliding-window layers
LOGPROB_ATOL = 1e-3

prompt_tokens = random_tokens  # the name the test modules use


def _builder(name: str) -> Any:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_tiny_model
    finally:
        sys.path.pop(0)
    return getattr(make_tiny_model, name)


def tiny_model() -> str:
    """Path of the tiny local model, built on first use."""
    return str(_builder("build")(MODEL_CACHE))


def tiny_gemma2() -> str:
    """Path of the tiny Gemma-2 (alternating sliding-window/full layers), built on first use."""
    return str(_builder("build_gemma2")(GEMMA2_CACHE))


def block_bytes(model: str, block: int = BLOCK, dtype_bytes: int = 4) -> int:
    """Bytes of one KV block of ``model`` (all layers, K and V, TP=1, float32).

    ``layers * 2 * kv_heads * head_dim * block * dtype_bytes``: what one L1
    slot holds, so ``n * block_bytes(model) / 2**30`` GiB of
    ``l1_cache_capacity_gb`` is room for exactly ``n`` blocks.
    """
    cfg = json.loads((Path(model) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return int(cfg["num_hidden_layers"]) * 2 * int(kv_heads) * int(head_dim) * block * dtype_bytes


@contextlib.contextmanager
def engine(model: str, **kw: Any) -> Iterator[Any]:
    llm = make_llm(model, **kw)
    try:
        yield llm
    finally:
        shutdown(llm)


@dataclass(frozen=True)
class Completion:
    """What we compare: greedy token ids and their logprobs."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    num_cached_tokens: int


def generate(
    llm: Any, prompts: Sequence[Sequence[int] | Mapping[str, Any]], max_tokens: int = 6
) -> list[Completion]:
    """Greedy completions; a prompt is token ids or a vLLM prompt dict (e.g. ``prompt_embeds``)."""
    from vllm import SamplingParams, TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    outs = llm.generate(
        [p if isinstance(p, Mapping) else TokensPrompt(prompt_token_ids=list(p)) for p in prompts],
        sp,
        use_tqdm=False,
    )
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = tuple(
            float(step[tok].logprob) for step, tok in zip(c.logprobs, c.token_ids, strict=True)
        )
        result.append(Completion(tuple(c.token_ids), lps, int(o.num_cached_tokens or 0)))
    return result


def same_output(a: Completion, b: Completion, atol: float = LOGPROB_ATOL) -> bool:
    """Token ids equal and every logprob within ``atol``."""
    return a.token_ids == b.token_ids and all(
        abs(x - y) <= atol for x, y in zip(a.logprobs, b.logprobs, strict=True)
    )


def worker_half() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._worker


class Hooks:
    """Writes the workers' fault file (``vllm_aibrix.vllm.faults.FileFaults``).

    Engines built after this object read the file at every load.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.environ["AIBRIX_KV_CACHE_OL_DEBUG_FAULT_FILE"] = str(path)
        self.clear()

    def set(self, **hooks: Any) -> None:
        self.path.write_text(json.dumps(hooks))

    def clear(self) -> None:
        self.path.write_text("{}")


def run_engine_process(
    spec: dict[str, Any],
    workdir: Path,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run tests/e2e/run_engine.py with ``spec`` in a fresh process; parse its JSON.

    ``env`` replaces the inherited environment (e.g. one that preloads
    Mooncake's bind-to-loopback library); default: this process's.
    """
    import subprocess

    path = workdir / f"engine-{random.randrange(1 << 30)}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ if env is None else env)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "e2e" / "run_engine.py"), str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(REPO),
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for b in out.get("batches", []):
        b["outs"] = [_completion(c) for c in b["outs"]]
    out["rounds"] = [[_completion(c) for c in r] for r in out["rounds"]]
    return out


def _completion(c: dict[str, Any]) -> Completion:
    return Completion(
        token_ids=tuple(c["token_ids"]),
        logprobs=tuple(c["logprobs"]),
        num_cached_tokens=int(c["num_cached_tokens"]),
    )
