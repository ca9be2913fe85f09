"""Run one engine in its own process and print its outputs as JSON.

Used by tests that need engines in separate processes (cross-engine reuse
through L2, TP=2). Input: a JSON file path as argv[1] with keys ``model``,
``prompts`` (token id lists), ``extra`` (connector extra config, or null for
no connector), ``rounds`` (serve the prompts this many times, emptying
vLLM's prefix cache in between), ``tp``, ``max_tokens``, ``llm_kwargs``.
Output (last stdout line): ``{"rounds": [[completion...]...], "totals": {...},
"pool": {...}}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import (  # noqa: E402
    connector_config,
    generate,
    make_llm,
    scheduler_half,
    shutdown,
)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    extra = spec.get("extra")
    kw = dict(spec.get("llm_kwargs") or {})
    if spec.get("tp", 1) > 1:
        kw["tensor_parallel_size"] = spec["tp"]
        kw["distributed_executor_backend"] = "mp"
    llm = make_llm(
        spec["model"],
        kv_transfer_config=connector_config(extra) if extra is not None else None,
        **kw,
    )
    rounds = []
    try:
        for r in range(int(spec.get("rounds", 1))):
            if r:
                assert llm.reset_prefix_cache()
            outs = generate(llm, spec["prompts"], max_tokens=int(spec.get("max_tokens", 6)))
            rounds.append([dataclasses.asdict(o) for o in outs])
        totals, pool = {}, {}
        if extra is not None:
            sched = scheduler_half(llm)
            sched.take_counters()
            totals, pool = dict(sched.totals), sched.pool_state()
            if sched.l2 is not None:
                totals["l2_store"] = dataclasses.asdict(sched.l2.stats)
    finally:
        shutdown(llm)
    print(json.dumps({"rounds": rounds, "totals": totals, "pool": pool}))


if __name__ == "__main__":
    main()
