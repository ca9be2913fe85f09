"""Run one engine in its own process and print its outputs as JSON.

Used by tests that need engines in separate processes (cross-engine reuse
through L2, TP=2). Input: a JSON file path as argv[1] with keys ``model``,
``prompts`` (token id lists), ``extra`` (connector extra config, or null for
no connector), ``rounds`` (serve the prompts this many times, emptying
vLLM's prefix cache in between), ``tp``, ``max_tokens``, ``llm_kwargs``.
``batches`` (optional) is a list of ``{"prompts": [...], "hooks": {...},
"reset": bool}`` served one after another after the rounds, with the worker's
fault-injection hooks set for each (and vLLM's prefix cache emptied first
when ``reset``). ``trace_l2`` (optional): record which keys the planner sent
to L2 and which prompt blocks L1 holds at the end. Output (last stdout line):
``{"rounds": [[completion...]], "batches": [{"outs": [...], "totals": {...}}],
"totals": {...}, "pool": {...}, "namespace": hex, "l2_sent": {"before": [hex
key...], "after": [...]}, "l1_resident": [hex key...]}`` (the last two only
with ``trace_l2``; block keys without the rank suffix, in the order sent).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

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


def _trace_l2(sched: Any, sent: dict[str, list[str]]) -> None:
    """Record every step plan's L2 writes (``l2_before``: EVICTED, ``l2_after``: ALL/HOT)."""
    planner = sched.planner
    finish_step = planner.finish_step

    def traced() -> Any:
        plan = finish_step()
        sent["before"].extend(k.hex() for k, _ in plan.l2_before)
        sent["after"].extend(k.hex() for k, _ in plan.l2_after)
        return plan

    planner.finish_step = traced


def _resident(sched: Any, prompts: list[list[int]]) -> list[str]:
    """Keys of the prompts' full blocks that L1 holds now."""
    from vllm_aibrix.core.keys import chain_hashes

    seed = sched.info.namespace.digest
    keys = {k for p in prompts for k in chain_hashes(seed, p, sched.B)}
    return sorted(k.hex() for k in keys if k in sched.planner.l1)


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
    trace = bool(spec.get("trace_l2")) and extra is not None
    sent: dict[str, list[str]] = {"before": [], "after": []}
    if trace:
        _trace_l2(scheduler_half(llm), sent)
    traced: dict[str, object] = {}
    try:
        for r in range(int(spec.get("rounds", 1))):
            if r:
                assert llm.reset_prefix_cache()
            outs = generate(llm, spec["prompts"], max_tokens=int(spec.get("max_tokens", 6)))
            rounds.append([dataclasses.asdict(o) for o in outs])
        for batch in spec.get("batches") or []:
            if batch.get("reset"):
                assert llm.reset_prefix_cache()
            if batch.get("sleep_s"):
                time.sleep(float(batch["sleep_s"]))  # let background work end first
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
            if trace:
                served = list(spec["prompts"]) + [
                    p for b in spec.get("batches") or [] for p in b["prompts"]
                ]
                traced = {"l2_sent": sent, "l1_resident": _resident(sched, served)}
    finally:
        shutdown(llm)
    result = {
        "rounds": rounds,
        "batches": batches,
        "totals": totals,
        "pool": pool,
        "namespace": namespace,
        **traced,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
