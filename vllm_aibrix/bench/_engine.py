"""An in-process vLLM CPU engine, shared by the connector benchmark and the e2e tests.

In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so callers can read the
connector's scheduler half directly.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
from typing import Any

BLOCK = 128  # CPU attention needs a multiple of 32; 128 is vLLM's CPU default
# float32, so that a request's logprobs do not depend on the batch it is served
# in: measured by scripts/measure_batch_invariance.py, bf16 moves them by up to
# 0.032, float32 by under 3e-6. The e2e tests compare engines with and without
# the connector at a 1e-3 tolerance, and a cache hit (or an async load) changes
# the step, and so the batch, in which a request runs.
DTYPE = "float32"

CONNECTOR: dict[str, Any] = {
    "kv_connector": "AIBrixOffloadingConnector",
    "kv_connector_module_path": "vllm_aibrix.vllm.connector",
    "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute",
}


def connector_config(extra: dict[str, Any] | None = None, **kw: Any) -> Any:
    """vLLM's KVTransferConfig for our connector with ``extra`` cache settings."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(**CONNECTOR, kv_connector_extra_config=dict(extra or {}), **kw)


def make_llm(model: str, *, kv_transfer_config: Any = None, **kw: Any) -> Any:
    """An in-process engine with the settings every test and benchmark shares.

    ``kw`` overrides any of them (e.g. ``dtype="bfloat16"``).
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Small engine KV memory, so the engine must evict and the tiers matter.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    args: dict[str, Any] = dict(
        model=model,
        max_model_len=4096,
        block_size=BLOCK,
        enforce_eager=True,
        dtype=DTYPE,
        distributed_executor_backend="uni",
        seed=0,
        kv_transfer_config=kv_transfer_config,
    )
    args.update(kw)
    return LLM(**args)


def shutdown(llm: Any) -> None:
    """Stop an engine made by :func:`make_llm` and free its memory."""
    with contextlib.suppress(Exception):
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def random_tokens(seed: int, n: int, vocab: int = 256) -> list[int]:
    """Deterministic pseudo-random byte tokens (the tiny model's vocabulary)."""
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def scheduler_half(llm: Any) -> Any:
    """The connector's scheduler half inside an in-process engine."""
    return llm.llm_engine.engine_core.engine_core.scheduler.connector._scheduler
