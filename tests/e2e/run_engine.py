"""Run one engine in its own process and print its outputs as JSON.

Used by tests that need engines in separate processes (cross-engine reuse
through L2, TP=2). Input: a JSON file path as argv[1] with keys ``model``,
``prompts`` (token id lists), ``extra`` (connector extra config, or null for
no connector), ``rounds`` (serve the prompts this many times, emptying
vLLM's prefix cache in between), ``tp``, ``max_tokens``, ``llm_kwargs``.
``batches`` (optional) is a list of ``{"prompts": [...], "hooks": {...}}``
served one after another after the rounds, with the worker's fault-injection
hooks set for each. Output (last stdout line): ``{"rounds": [[completion...]],
"batches": [{"outs": [...], "totals": {...}}], "totals": {...}, "pool": {...},
"namespace": hex}``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e.harness import (  # noqa: E402
    Hooks,
    connector_config,
    generate,
    make_llm,
    scheduler_half,
    shutdown,
)


def _totals(llm: object) -> dict[str, float]:
    sched = scheduler_half(llm)
    sched.take_counters()
    return dict(sched.totals)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    hooks = Hooks(Path(sys.argv[1]).with_suffix(".hooks.json"))
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
    rounds: list[list[dict[str, object]]] = []
    batches: list[dict[str, object]] = []
    namespace = ""
    try:
        for r in range(int(spec.get("rounds", 1))):
            if r:
                assert llm.reset_prefix_cache()
            outs = generate(llm, spec["prompts"], max_tokens=int(spec.get("max_tokens", 6)))
            rounds.append([dataclasses.asdict(o) for o in outs])
        for batch in spec.get("batches") or []:
            hooks.set(**(batch.get("hooks") or {}))
            try:
                outs = generate(llm, batch["prompts"], max_tokens=int(spec.get("max_tokens", 6)))
            finally:
                hooks.clear()
            batches.append({"outs": [dataclasses.asdict(o) for o in outs], "totals": _totals(llm)})
        totals: dict[str, object] = {}
        pool: dict[str, int] = {}
        if extra is not None:
            sched = scheduler_half(llm)
            totals, pool = dict(_totals(llm)), sched.pool_state()
            namespace = sched.info.namespace.digest.hex()
            if sched.l2 is not None:
                totals["l2_store"] = dataclasses.asdict(sched.l2.stats)
    finally:
        shutdown(llm)
    result = {
        "rounds": rounds,
        "batches": batches,
        "totals": totals,
        "pool": pool,
        "namespace": namespace,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
