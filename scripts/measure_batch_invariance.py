"""How much do the tiny test model's logprobs depend on the batch a request runs in?

The e2e tests compare greedy token ids and logprobs (``LOGPROB_ATOL`` in
tests/e2e/harness.py) of an engine with the connector against one without.
A cache hit or an async load changes the step, and so the batch, in which a
request is computed; the comparison is only sound if that alone does not move
the logprobs by more than the tolerance. This script measures it on the
no-connector engine: each prompt served alone (the reference), then

* ``batch2`` / ``batch4`` / ``batch8``: in batches of 2, 4 and 8 mixed lengths;
* ``staggered``: all prompts, one more joining at every engine step;
* ``prefix_cached``: served again without emptying vLLM's prefix cache
  (full blocks come from the cache, as from the connector's L1);
* ``chunked_alone`` / ``chunked_batch8``: on a second engine whose
  ``max_num_batched_tokens`` splits the long prompts' prefill into chunks.

Usage: python scripts/measure_batch_invariance.py [--dtype float32|bfloat16]
Prints one line per scenario and a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import (  # noqa: E402
    BLOCK,
    LOGPROB_ATOL,
    Completion,
    generate,
    make_llm,
    prompt_tokens,
    shutdown,
    tiny_model,
)

LENGTHS = [17, 100, BLOCK + 5, 3 * BLOCK + 100, 5 * BLOCK + 17, 700, 8 * BLOCK + 3, 1600]
PROMPTS = [prompt_tokens(1000 + i, n) for i, n in enumerate(LENGTHS)]
MAX_TOKENS = 8
CHUNK_TOKENS = 256  # < the long prompts: their prefill is split into chunks


def staggered(llm: Any, prompts: Sequence[Sequence[int]]) -> list[Completion]:
    """Add one request per engine step, so each joins a running batch."""
    from vllm import SamplingParams, TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    eng = llm.llm_engine
    pending = list(enumerate(prompts))
    done: dict[int, Completion] = {}
    while pending or eng.has_unfinished_requests():
        if pending:
            i, p = pending.pop(0)
            eng.add_request(f"stagger-{i}", TokensPrompt(prompt_token_ids=list(p)), sp)
        for o in eng.step():
            if not o.finished:
                continue
            c = o.outputs[0]
            lps = tuple(float(s[t].logprob) for s, t in zip(c.logprobs, c.token_ids, strict=True))
            done[int(o.request_id.split("-")[1])] = Completion(tuple(c.token_ids), lps, 0)
    return [done[i] for i in range(len(prompts))]


def compare(ref: Sequence[Completion], got: Sequence[Completion]) -> tuple[float, int, int]:
    """Max |logprob difference| over the steps with equal ids so far, the number
    of those steps off by more than ``LOGPROB_ATOL``, and of id mismatches."""
    worst, over, mismatched = 0.0, 0, 0
    for a, b in zip(ref, got, strict=True):
        if a.token_ids != b.token_ids:
            mismatched += 1
        for (ta, la), (tb, lb) in zip(
            zip(a.token_ids, a.logprobs, strict=True),
            zip(b.token_ids, b.logprobs, strict=True),
            strict=True,
        ):
            if ta != tb:
                break  # after a different token the contexts differ
            worst = max(worst, abs(la - lb))
            over += abs(la - lb) > LOGPROB_ATOL
    return worst, over, mismatched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    model = tiny_model()

    def gen(llm: Any, prompts: Sequence[Sequence[int]], reset: bool = True) -> list[Completion]:
        if reset:
            assert llm.reset_prefix_cache()
        return generate(llm, prompts, max_tokens=MAX_TOKENS)

    results: dict[str, Any] = {}
    llm = make_llm(model, dtype=args.dtype)
    try:
        sc = llm.llm_engine.vllm_config.scheduler_config
        print(f"dtype={args.dtype} max_num_batched_tokens={sc.max_num_batched_tokens}")
        alone = [gen(llm, [p])[0] for p in PROMPTS]
        runs: dict[str, list[Completion]] = {}
        for size in (2, 4, 8):
            out: list[Completion] = []
            for i in range(0, len(PROMPTS), size):
                out += gen(llm, PROMPTS[i : i + size])
            runs[f"batch{size}"] = out
        assert llm.reset_prefix_cache()
        runs["staggered"] = staggered(llm, PROMPTS)
        runs["prefix_cached"] = gen(llm, PROMPTS, reset=False)
    finally:
        shutdown(llm)
    llm = make_llm(model, dtype=args.dtype, max_num_batched_tokens=CHUNK_TOKENS)
    try:
        runs["chunked_alone"] = [gen(llm, [p])[0] for p in PROMPTS]
        runs["chunked_batch8"] = gen(llm, PROMPTS)
    finally:
        shutdown(llm)
    for name, out in runs.items():
        worst, over, mismatched = compare(alone, out)
        results[name] = {
            "max_abs_logprob_diff": worst,
            "steps_over_atol": over,
            "token_id_mismatches": mismatched,
        }
        ok = worst <= LOGPROB_ATOL and not mismatched
        print(
            f"{name:15s} max|dlogprob|={worst:.3g} steps>{LOGPROB_ATOL:g}={over}/"
            f"{len(PROMPTS) * MAX_TOKENS} id_mismatches={mismatched} ok={ok}"
        )
    distinct = len({o.token_ids for o in alone})
    print(f"distinct greedy outputs over {len(PROMPTS)} prompts: {distinct}")
    print(json.dumps({"dtype": args.dtype, "distinct": distinct, "results": results}))


if __name__ == "__main__":
    main()
