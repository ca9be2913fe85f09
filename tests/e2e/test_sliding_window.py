"""A sliding-window model (tiny random Gemma-2) served with the connector.

The model's 4 layers alternate sliding-window (256 tokens) and full
attention (``scripts/make_tiny_model.py --arch gemma2``). Without a connector
vLLM builds two KV cache groups (its hybrid manager). The connector does not
declare ``SupportsHMA``, so vLLM turns the hybrid manager off and serves the
model with one group in which every layer keeps every block; the connector
stores and loads all 4 layers of each block like any other model.

Prompts are longer than the window (600-1500 tokens), so every hit leaves
the sliding layers reading loaded KV of the last 256 cached tokens and the
full layers reading all of it. Served once (fills L1), vLLM's prefix cache
emptied, served again: L1 hits, and outputs equal to the same model served
without the connector. Two prompts that share their last 400 tokens (more
than the window) and differ before give different outputs, so the output
depends on KV outside the window; corrupting the loaded KV makes the
comparison fail.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    BLOCK,
    Completion,
    Hooks,
    block_bytes,
    connector_config,
    engine,
    generate,
    make_llm,
    prompt_tokens,
    same_output,
    scheduler_half,
    shutdown,
    tiny_gemma2,
)

pytestmark = pytest.mark.e2e

WINDOW = 256
TAIL = prompt_tokens(40, 400)  # shared by the last two prompts, longer than the window
PROMPTS = [
    prompt_tokens(31, 600),
    prompt_tokens(32, 1000),
    prompt_tokens(33, 1500),
    prompt_tokens(34, 500) + TAIL,
    prompt_tokens(35, 500) + TAIL,
]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _groups(llm: Any) -> list[Any]:
    return list(llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups)


@pytest.fixture(scope="module")
def model() -> str:
    return tiny_gemma2()


@pytest.fixture(scope="module")
def baseline(model: str) -> dict[str, Any]:
    with engine(model) as llm:
        outs = generate(llm, PROMPTS)
        groups = _groups(llm)
    return {"outs": {tuple(p): o for p, o in zip(PROMPTS, outs, strict=True)}, "groups": groups}


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooks]:
    before = os.environ.get("AIBRIX_KV_CACHE_OL_DEBUG_FAULT_FILE")
    yield Hooks(Path(tmp_path_factory.mktemp("hooks")) / "hooks.json")
    if before is None:
        os.environ.pop("AIBRIX_KV_CACHE_OL_DEBUG_FAULT_FILE", None)
    else:
        os.environ["AIBRIX_KV_CACHE_OL_DEBUG_FAULT_FILE"] = before


@pytest.fixture(scope="module")
def served(model: str, baseline: Any, hooks: Hooks) -> Iterator[dict[str, Any]]:
    """The connector engine, and the vLLM warnings it logged while starting."""
    import vllm  # noqa: F401  (configures vLLM's loggers; attach after that)

    records = _Records()
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(records)
    try:
        llm = make_llm(model, kv_transfer_config=connector_config({"l1_cache_capacity_gb": 0.25}))
    finally:
        vllm_logger.removeHandler(records)
    yield {"llm": llm, "warnings": records.messages}
    shutdown(llm)


def _second_round(llm: Any) -> list[Completion]:
    """Serve the prompts once (fills L1), empty vLLM's prefix cache, serve again."""
    generate(llm, PROMPTS)
    assert llm.reset_prefix_cache()
    return generate(llm, PROMPTS)


def test_without_connector_vllm_builds_two_kv_cache_groups(baseline: dict[str, Any]) -> None:
    specs = [type(g.kv_cache_spec).__name__ for g in baseline["groups"]]
    assert sorted(specs) == ["FullAttentionSpec", "SlidingWindowSpec"]


def test_with_connector_one_group_holds_every_layer(model: str, served: dict[str, Any]) -> None:
    llm = served["llm"]
    groups = _groups(llm)
    assert len(groups) == 1
    assert len(groups[0].layer_names) == 4
    assert groups[0].kv_cache_spec.sliding_window == WINDOW  # still computed windowed
    vllm_config = llm.llm_engine.engine_core.engine_core.vllm_config
    assert vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    assert any("hybrid kv cache manager" in m.lower() for m in served["warnings"])
    # The connector stores all 4 layers of a block.
    info = scheduler_half(llm).info
    assert info.slot_bytes == block_bytes(model)
    assert "L4" in info.namespace.kv_layout.split("/")  # 4 layers in the key namespace


def test_prompts_give_different_outputs(baseline: dict[str, Any]) -> None:
    outs = baseline["outs"]
    distinct = PROMPTS[:-1]  # the last two share their tail (and here their greedy tokens)
    assert len({outs[tuple(p)].token_ids for p in distinct}) == len(distinct)
    # Same last 400 tokens, different before: the output depends on tokens
    # (and so KV) outside the sliding window.
    assert not same_output(outs[tuple(PROMPTS[-2])], outs[tuple(PROMPTS[-1])])


def test_second_request_is_served_from_l1_and_matches_baseline(
    served: dict[str, Any], baseline: dict[str, Any], hooks: Hooks
) -> None:
    llm = served["llm"]
    hooks.clear()
    sched = scheduler_half(llm)
    sched.take_counters()
    before = dict(sched.totals)
    outs = _second_round(llm)
    for p, o in zip(PROMPTS, outs, strict=True):
        assert len(p) > 2 * WINDOW
        assert o.num_cached_tokens == (len(p) - 1) // BLOCK * BLOCK
        assert same_output(o, baseline["outs"][tuple(p)]), len(p)
    sched.take_counters()
    assert sched.totals.get("hit_tokens_l1", 0) - before.get("hit_tokens_l1", 0) == sum(
        (len(p) - 1) // BLOCK * BLOCK for p in PROMPTS
    )
    assert sched.pool_state()["slots_pinned"] == 0


def test_corrupted_kv_makes_the_comparison_fail(
    served: dict[str, Any], baseline: dict[str, Any], hooks: Hooks
) -> None:
    llm = served["llm"]
    hooks.set(corrupt=True)
    try:
        outs = _second_round(llm)
    finally:
        hooks.clear()
    assert all(o.num_cached_tokens > 0 for o in outs)
    wrong = [
        not same_output(o, baseline["outs"][tuple(p)]) for p, o in zip(PROMPTS, outs, strict=True)
    ]
    assert all(wrong), wrong
