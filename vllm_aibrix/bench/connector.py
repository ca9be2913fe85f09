"""The connector inside the real vLLM engine: what it costs and what it saves.

``python -m vllm_aibrix.bench connector --scenario miss|reuse|all [--json --out F]``

* ``miss`` (overhead with 0 % reuse): the same unique prompts through an
  engine without the connector and through one with it (write-through into
  L1 on every block, lookups that never hit), alternating the two engines.
  Reports throughput (tokens per wall second and per CPU second of the
  process) of both and their ratio; the goal is at most 3 % slower.
* ``reuse`` (gain): one engine with the connector; requests share a long
  prefix and differ in a short tail. Each iteration serves one request after
  emptying only vLLM's prefix cache (the prefix comes from L1) and one after
  emptying vLLM's cache *and* the connector's (full recompute), alternating
  so both see the same machine load. Reports the median latency of a
  one-token request (= prefill time + one decode step, i.e. TTFT) for both.

Engines run in this process one after another (never two at once), on the
uni executor with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` so that timings include
no IPC. The default model is built locally (8 layers, random weights, byte
tokenizer) by ``scripts/make_tiny_model.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vllm_aibrix.bench._common import add_output_args, emit, machine
from vllm_aibrix.bench._engine import (
    BLOCK,
    connector_config,
    make_llm,
    random_tokens,
    scheduler_half,
    shutdown,
)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO / ".cache" / "bench-llama-8l"


def _model(path: str | None, layers: int) -> str:
    """``path``, or the default local model (built on first use)."""
    if path:
        return path
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_tiny_model import build
    finally:
        sys.path.pop(0)
    return str(build(DEFAULT_MODEL_DIR, layers=layers))


def _engine(model: str, with_connector: bool, extra: dict[str, Any]) -> Any:
    # Keep vLLM's INFO lines off stdout, where the JSON goes.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # bfloat16, unlike the e2e tests' float32 (make_llm's default): the KV this
    # moves should have the size it has in production. The only output check
    # here compares token ids of one request served alone, which bf16 holds.
    return make_llm(
        model,
        kv_transfer_config=connector_config(extra) if with_connector else None,
        dtype="bfloat16",
    )


def _generate(llm: Any, prompts: Sequence[list[int]], max_tokens: int) -> list[Any]:
    from vllm import SamplingParams, TokensPrompt

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return list(
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    )


def _l1_totals(llm: Any) -> dict[str, float]:
    """The connector's cumulative scheduler counters (in-process engine only)."""
    sched = scheduler_half(llm)
    sched.take_counters()
    return dict(sched.totals)


# Every connector entry point vLLM calls on the hot path (both halves).
HOOKS = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
    "request_finished_all_groups",
    "start_load_kv",
    "wait_for_save",
    "get_finished",
    "get_block_ids_with_load_errors",
    "build_connector_worker_meta",
    "get_kv_connector_stats",
)


@contextlib.contextmanager
def _timed_connector(acc: dict[str, float]) -> Iterator[None]:
    """Add the wall time spent inside each connector hook to ``acc``.

    With the in-process engine all of them run in this process, so their sum
    over a run is the connector's direct cost, a number that other jobs on a
    shared machine disturb far less than an end-to-end throughput difference.
    """
    from vllm_aibrix.vllm.connector import AIBrixOffloadingConnector as cls

    originals = {name: getattr(cls, name) for name in HOOKS}

    def wrap(name: str, fn: Any) -> Any:
        def timed(self: Any, *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(self, *a, **kw)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0

        return timed

    for name, fn in originals.items():
        setattr(cls, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(cls, name, fn)


# ------------------------------------------------------------------ miss
def _miss_child(args: argparse.Namespace, model: str, name: str, rnd: int) -> dict[str, Any]:
    """Run one engine's repetitions in a fresh process; returns its JSON.

    A fresh process per engine: engines started one after another in one
    process were measured to slow each other down (threads and memory left
    behind), which would bias whichever engine runs later.
    """
    cmd = [
        sys.executable,
        "-m",
        "vllm_aibrix.bench.connector",
        "--model",
        model,
        "--extra",
        json.dumps(args.extra),
        "--miss-prompts",
        str(args.miss_prompts),
        "--miss-prompt-tokens",
        str(args.miss_prompt_tokens),
        "--miss-max-tokens",
        str(args.miss_max_tokens),
        "--repeats",
        str(args.repeats),
        "--child",
        f"{name}:{rnd}",
    ]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _miss_engine_run(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The child side of :func:`_miss_child`: one engine, warm-up + timed reps."""
    name, rnd_s = args.child.split(":")
    rnd = int(rnd_s)
    reps_per_round = args.repeats + 1
    # A repeated prompt would hit vLLM's own prefix cache: every repetition
    # (and warm-up) gets a fresh prompt set, identical for both engines.
    seeds = range(rnd * reps_per_round, (rnd + 1) * reps_per_round)
    sets = [
        [random_tokens(10_000 * r + i, args.miss_prompt_tokens) for i in range(args.miss_prompts)]
        for r in seeds
    ]
    with_conn = name == "connector"
    out: dict[str, Any] = {"wall": [], "cpu": [], "hooks": {}, "stored_blocks": 0}
    out["hit_tokens_l1"] = 0
    llm = _engine(model, with_conn, args.extra)
    try:
        for r, prompts in enumerate(sets):
            acc: dict[str, float] = {}
            with _timed_connector(acc):
                t0, c0 = time.perf_counter(), time.process_time()
                _generate(llm, prompts, args.miss_max_tokens)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r:  # the first repetition warms the engine up
                out["wall"].append(dt)
                out["cpu"].append(dc)
                for k, v in acc.items():
                    out["hooks"][k] = out["hooks"].get(k, 0.0) + v
            print(
                f"[bench connector]   {name} rep {r}: wall {dt:.2f} s, cpu {dc:.2f} s"
                + (" (warm-up)" if r == 0 else ""),
                file=sys.stderr,
                flush=True,
            )
        if with_conn:
            totals = _l1_totals(llm)
            out["stored_blocks"] = totals.get("stored_blocks", 0)
            out["hit_tokens_l1"] = totals.get("hit_tokens_l1", 0)
    finally:
        shutdown(llm)
    return out


def run_miss(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Throughput on unique prompts, without and with the connector.

    The machine is shared, so the two engines alternate (baseline, connector,
    baseline, ...; one at a time, each in a fresh child process) for
    ``--rounds`` rounds. Every timed repetition is recorded as wall time and
    as the child's CPU time (its in-process engine does all the work there),
    plus the time spent inside the connector's hooks.
    """
    rounds: list[tuple[str, bool]] = [("baseline", False), ("connector", True)] * args.rounds
    tokens_per_rep = args.miss_prompts * (args.miss_prompt_tokens + args.miss_max_tokens)
    wall: dict[str, list[float]] = {"baseline": [], "connector": []}
    cpu: dict[str, list[float]] = {"baseline": [], "connector": []}
    stored = 0.0
    hits = 0.0
    hook_s: dict[str, float] = {}  # connector hooks, timed repetitions only
    for idx, (name, _) in enumerate(rounds):
        print(
            f"[bench connector] miss round {idx // 2}: engine {name}", file=sys.stderr, flush=True
        )
        child = _miss_child(args, model, name, idx // 2)
        wall[name] += child["wall"]
        cpu[name] += child["cpu"]
        for k, v in child["hooks"].items():
            hook_s[k] = hook_s.get(k, 0.0) + v
        stored += child["stored_blocks"]
        hits += child["hit_tokens_l1"]

    def tput(v: list[float], agg: Any) -> float:
        return float(tokens_per_rep / agg(v))

    out: dict[str, Any] = {
        "prompts_per_rep": args.miss_prompts,
        "prompt_tokens": args.miss_prompt_tokens,
        "max_tokens": args.miss_max_tokens,
        "rounds": args.rounds,
        "repeats_per_round": args.repeats,
        "wall_s": {k: [round(x, 3) for x in v] for k, v in wall.items()},
        "cpu_s": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
    }
    for label, data in (("wall", wall), ("cpu", cpu)):
        for agg_name, agg in (("median", statistics.median), ("best", min)):
            t = {k: tput(v, agg) for k, v in data.items()}
            out[f"tokens_per_{label}_s_{agg_name}"] = {k: round(v, 1) for k, v in t.items()}
            out[f"throughput_ratio_{label}_{agg_name}"] = round(t["connector"] / t["baseline"], 4)
    conn_wall = sum(wall["connector"])
    out["connector_hook_s"] = {k: round(v, 4) for k, v in sorted(hook_s.items())}
    out["connector_hook_s_total"] = round(sum(hook_s.values()), 4)
    out["connector_hook_share_of_wall"] = round(sum(hook_s.values()) / conn_wall, 5)
    out["connector_stored_blocks"] = stored
    out["connector_hit_tokens_l1"] = hits  # 0 expected: nothing is reused
    return out


# ----------------------------------------------------------------- reuse
def run_reuse(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """One-token request latency with the shared prefix from L1 vs recomputed."""
    prefix = random_tokens(1, args.reuse_prefix_tokens)
    prompts = [
        prefix + random_tokens(1000 + i, args.reuse_tail_tokens)
        for i in range(2 * args.reuse_iters + 1)
    ]
    print("[bench connector] reuse: starting engine (connector)", file=sys.stderr, flush=True)
    llm = _engine(model, True, args.extra)
    hit_s: list[float] = []
    miss_s: list[float] = []
    mismatches = 0
    cached_on_hit: list[int] = []
    try:
        _generate(llm, [prompts[0]], 1)  # warm-up; also fills L1 with the prefix
        for i in range(args.reuse_iters):
            for mode in ("hit", "miss") if i % 2 == 0 else ("miss", "hit"):
                p = prompts[1 + 2 * i + (mode == "miss")]
                # vLLM's cache always; ours too for "miss" (full recompute). A
                # miss stores the shared prefix into L1 again for the next hit.
                assert llm.reset_prefix_cache(reset_connector=(mode == "miss"))
                t0 = time.perf_counter()
                out = _generate(llm, [p], 1)[0]
                (miss_s if mode == "miss" else hit_s).append(time.perf_counter() - t0)
                if mode == "hit":
                    cached_on_hit.append(int(out.num_cached_tokens or 0))
            print(
                f"[bench connector] reuse iter {i}: hit {hit_s[-1] * 1e3:.1f} ms, "
                f"recompute {miss_s[-1] * 1e3:.1f} ms",
                file=sys.stderr,
                flush=True,
            )
        # Same prompt both ways must give the same token (sanity, not timed).
        probe = prompts[-1]
        assert llm.reset_prefix_cache(reset_connector=True)
        cold = _generate(llm, [probe], 4)[0].outputs[0].token_ids
        assert llm.reset_prefix_cache()
        warm = _generate(llm, [probe], 4)[0].outputs[0].token_ids
        mismatches += int(list(cold) != list(warm))
        counters = _l1_totals(llm)
    finally:
        shutdown(llm)
    hit_med, miss_med = statistics.median(hit_s), statistics.median(miss_s)
    return {
        "prefix_tokens": args.reuse_prefix_tokens,
        "tail_tokens": args.reuse_tail_tokens,
        "iterations": args.reuse_iters,
        "hit_ms": [round(x * 1e3, 1) for x in hit_s],
        "recompute_ms": [round(x * 1e3, 1) for x in miss_s],
        "hit_ms_median": round(hit_med * 1e3, 1),
        "recompute_ms_median": round(miss_med * 1e3, 1),
        "speedup_median": round(miss_med / hit_med, 2),
        "cached_tokens_on_hit": sorted(set(cached_on_hit)),
        "hit_equals_recompute_output": mismatches == 0,
        "connector_hit_tokens_l1": counters.get("hit_tokens_l1", 0),
    }


# ------------------------------------------------------------------- cli
def run(args: argparse.Namespace) -> dict[str, Any]:
    model = _model(args.model, args.layers)
    if args.child:
        return _miss_engine_run(args, model)
    result: dict[str, Any] = {
        "benchmark": "connector",
        "model": model,
        "layers": args.layers if args.model is None else None,
        "block_size": BLOCK,
        "kv_connector_extra_config": args.extra,
        "vllm_cpu_kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "machine": machine(),
    }
    # reuse first: it runs in this process, before anything else started here.
    if args.scenario in ("reuse", "all"):
        result["reuse"] = run_reuse(args, model)
    if args.scenario in ("miss", "all"):
        result["miss"] = run_miss(args, model)
    if args.out and not args.child:
        emit(result, None)  # the caller writes --out; the JSON goes to stdout too
    return result


def register(subparsers: Any) -> None:
    """Add the ``connector`` subcommand."""
    p = subparsers.add_parser(
        "connector",
        help="connector in real vLLM: miss overhead and L1 reuse gain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--scenario", choices=("miss", "reuse", "all"), default="all")
    p.add_argument("--model", default=None, help="model dir (default: build an 8-layer one)")
    p.add_argument("--layers", type=int, default=8, help="layers of the default model")
    p.add_argument("--rounds", type=int, default=2, help="miss: baseline/connector alternations")
    p.add_argument("--repeats", type=int, default=2, help="miss: timed repetitions per engine run")
    p.add_argument("--miss-prompts", type=int, default=32)
    p.add_argument("--miss-prompt-tokens", type=int, default=1024)
    p.add_argument("--miss-max-tokens", type=int, default=16)
    p.add_argument("--reuse-prefix-tokens", type=int, default=3072)
    p.add_argument("--reuse-tail-tokens", type=int, default=64)
    p.add_argument("--reuse-iters", type=int, default=8)
    p.add_argument(
        "--extra",
        type=json.loads,
        default={},
        help="kv_connector_extra_config as JSON (default {}: the embedded L1 defaults)",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one miss engine
    add_output_args(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``connector`` subcommand alone (``python -m vllm_aibrix.bench.connector``)."""
    parser = argparse.ArgumentParser(prog="python -m vllm_aibrix.bench.connector")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["connector", *(sys.argv[1:] if argv is None else argv)])
    result = args.func(args)
    if args.child:
        print(json.dumps(result), flush=True)  # one line, read by the parent
    else:
        emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
