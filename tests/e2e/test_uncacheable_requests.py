"""Requests whose KV is not a function of their token ids are never cached.

vLLM's CPU build serves prompt embeddings (``enable_prompt_embeds=True``,
``{"prompt_embeds": tensor}`` prompts): such a request has placeholder token
ids only (vLLM fills them with 0), so two different embedding prompts of the
same length have identical token ids. Keyed on those ids, the second would
be served the first one's KV. The connector must neither look them up nor
store them, and count them (``uncacheable_requests``).

Two random embedding tensors A and B of the same length (3 blocks + 5
tokens, the tiny Llama's hidden size 128, float32) are served on a connector
engine, vLLM's prefix cache emptied in between: B must equal B served on an
engine without a connector (and differ from A), with zero hit tokens. A
token prompt made of the same placeholder ids must neither find anything an
embedding prompt left (nothing was stored under those keys) nor be handed
to one: it is cached and hit by itself, and an embedding prompt served after
it still computes everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.harness import (
    BLOCK,
    connector_config,
    engine,
    generate,
    make_llm,
    same_output,
    scheduler_half,
    shutdown,
    tiny_model,
)

pytestmark = pytest.mark.e2e

HIDDEN = 128  # the tiny Llama's hidden size
LEN = 3 * BLOCK + 5


def _embeds(seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    # The scale of the model's own embedding rows (std 0.15).
    return torch.randn(LEN, HIDDEN, generator=g, dtype=torch.float32) * 0.15


@pytest.fixture(scope="module")
def prompts() -> dict[str, Any]:
    return {"A": {"prompt_embeds": _embeds(1)}, "B": {"prompt_embeds": _embeds(2)}}


@pytest.fixture(scope="module")
def placeholder_ids(baseline: dict[str, Any]) -> list[int]:
    return list(baseline["placeholder_ids"])


@pytest.fixture(scope="module")
def baseline(prompts: dict[str, Any]) -> dict[str, Any]:
    """A and B (and the placeholder-id token prompt) on an engine without a connector."""
    from vllm import SamplingParams

    out: dict[str, Any] = {}
    with engine(tiny_model(), enable_prompt_embeds=True) as llm:
        raw = llm.generate([prompts["A"]], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        out["placeholder_ids"] = list(raw.prompt_token_ids or [])
        for name in ("A", "B"):
            assert llm.reset_prefix_cache()
            out[name] = generate(llm, [prompts[name]])[0]
        assert llm.reset_prefix_cache()
        out["tokens"] = generate(llm, [out["placeholder_ids"]])[0]
    return out


@pytest.fixture(scope="module")
def llm(baseline: Any) -> Iterator[Any]:
    llm = make_llm(
        tiny_model(),
        enable_prompt_embeds=True,
        kv_transfer_config=connector_config({"l1_cache_capacity_gb": 0.25}),
    )
    yield llm
    shutdown(llm)


def _delta(llm: Any, before: dict[str, float]) -> dict[str, float]:
    sched = scheduler_half(llm)
    sched.take_counters()
    return {k: v - before.get(k, 0) for k, v in sched.totals.items() if v != before.get(k, 0)}


def _totals(llm: Any) -> dict[str, float]:
    sched = scheduler_half(llm)
    sched.take_counters()
    return dict(sched.totals)


def test_embedding_prompts_share_placeholder_ids_but_not_outputs(
    baseline: dict[str, Any], placeholder_ids: list[int]
) -> None:
    # The premise: the ids alone cannot tell A from B ...
    assert len(placeholder_ids) == LEN
    assert len(set(placeholder_ids)) == 1
    # ... but their outputs differ, and differ from the placeholder token prompt.
    a, b, t = baseline["A"], baseline["B"], baseline["tokens"]
    assert a.token_ids != b.token_ids
    assert not same_output(a, t) and not same_output(b, t)


def test_second_embedding_prompt_gets_its_own_kv(
    llm: Any, prompts: dict[str, Any], baseline: dict[str, Any]
) -> None:
    before = _totals(llm)
    a = generate(llm, [prompts["A"]])[0]
    assert llm.reset_prefix_cache()
    b = generate(llm, [prompts["B"]])[0]
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 0
    assert same_output(a, baseline["A"])
    assert same_output(b, baseline["B"])
    assert not same_output(a, b)
    delta = _delta(llm, before)
    # Counted, neither looked up nor stored.
    assert delta == {"uncacheable_requests": 2}, delta
    assert scheduler_half(llm).pool_state()["slots_used"] == 0


def test_placeholder_token_prompt_and_embedding_prompts_never_share(
    llm: Any, prompts: dict[str, Any], baseline: dict[str, Any], placeholder_ids: list[int]
) -> None:
    full = (LEN - 1) // BLOCK * BLOCK
    before = _totals(llm)
    # A stored nothing under the placeholder ids' keys: the token prompt misses.
    generate(llm, [prompts["A"]])
    assert llm.reset_prefix_cache()
    first = generate(llm, [placeholder_ids])[0]
    assert first.num_cached_tokens == 0
    assert same_output(first, baseline["tokens"])
    # The token prompt itself is cached (the engine does cache) ...
    assert llm.reset_prefix_cache()
    again = generate(llm, [placeholder_ids])[0]
    assert again.num_cached_tokens == full
    assert same_output(again, baseline["tokens"])
    # ... but its KV is never handed to an embedding prompt with the same ids.
    assert llm.reset_prefix_cache()
    b = generate(llm, [prompts["B"]])[0]
    assert b.num_cached_tokens == 0
    assert same_output(b, baseline["B"])
    delta = _delta(llm, before)
    assert delta["uncacheable_requests"] == 2
    assert delta["hit_tokens_l1"] == full  # the token prompt's second run only
    assert delta.get("hit_tokens_l2", 0) == 0
    assert delta["stored_blocks"] == LEN // BLOCK  # the token prompt's blocks only
