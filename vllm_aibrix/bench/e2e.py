"""End-to-end benchmark: ``vllm serve`` per configuration, side by side, one command.

    python -m vllm_aibrix.bench e2e --workload longdoc --configs vllm,l1,l2,l1+l2 [--out DIR]

For every configuration it starts ``vllm serve`` on the same local model
(one server at a time; two for ``shared-l2``), drives it through the OpenAI
API, reads ``/metrics`` before and after every phase, and stops it.

Configurations:

* ``vllm``: no connector, vLLM's prefix caching on (the baseline);
* ``l1``: our connector, embedded L1 only (defaults);
* ``l2``: our connector with a Redis L2 and an L1 of only ``--l2-only-l1-blocks``
  blocks (the connector stages every load in L1, so L1 cannot be zero):
  hits come from Redis;
* ``l1+l2``: full L1 plus Redis L2 (every L1 insert written to L2);
* ``shared-l2``: engine A runs the warm-up against a Redis L2 and stops; a
  fresh engine B (empty L1) on the same Redis is measured.

``NAME@TRIGGER`` (e.g. ``l1@gpu_evict``) adds ``offload_trigger=TRIGGER`` to
that configuration's connector settings, for the GPU-eviction offload trigger
of the patch set (the server refuses to start where the field is unknown).

Every server gets the same CPU binding (``VLLM_CPU_NUM_OF_RESERVED_CPU``,
default 1): vLLM's CPU build reserves one more core whenever a KV connector is
configured, so without it the connector servers would compute on two cores
and vLLM alone on one. The binding and the ``core ids=`` line of every
server's log are in the JSON.

Workloads (token-id prompts, deterministic):

* ``longdoc``: documents whose total exceeds the engine's own KV space
  (``--engine-blocks``), a warm-up round, query rounds (document + new
  question), then a floor phase (a query sent twice: the second is vLLM's own
  prefix-cache hit); our own streaming driver;
* ``multiround``: conversations sharing a system prompt, each turn appending
  the previous answer; more conversations than the engine holds; our driver;
* ``trace``: the Mooncake conversation trace, hash ids expanded to tokens,
  lengths and arrival times scaled (``--trace-*``); our driver; the replay
  simulator's hit ratio for the same requests is reported beside it;
* ``random``: 0 % reuse, run by vLLM's own ``vllm bench serve --dataset-name
  random``, whose JSON is parsed.

Output: one JSON per configuration and ``summary.json`` in ``--out`` (default
``.cache/bench-e2e/WORKLOAD-TIME``), PNG plots there, the summary JSON on
stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_aibrix.bench._common import machine
from vllm_aibrix.bench._driver import Record, run_conversations, run_requests
from vllm_aibrix.bench._serve import (
    REPO,
    VLLM_PREFIX_HITS,
    VLLM_PREFIX_QUERIES,
    VLLM_PROMPT_TOKENS,
    RedisServer,
    ServeOptions,
    VllmServer,
    maybe_redis,
    metrics_delta,
    settled_scrape,
    vllm_cli,
)
from vllm_aibrix.bench._workloads import (
    LongDoc,
    MultiRound,
    RandomLoad,
    Request,
    ScaledTraceRequest,
    TraceScale,
    load_trace_records,
    scale_trace,
    server_warmup,
)
from vllm_aibrix.bench.replay import DEFAULT_TRACE, replay

WORKLOADS = ("longdoc", "multiround", "trace", "random")
BASE_CONFIGS = ("vllm", "l1", "l2", "l1+l2", "shared-l2")
DEFAULT_MODEL_DIR = REPO / ".cache" / "demo-llama-8l-h512"  # scripts/demo.sh's model
DEFAULT_OUT_ROOT = REPO / ".cache" / "bench-e2e"
AIBRIX = "vllm:aibrix_kv_{}_total"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
# The phase whose numbers are the configuration's headline, per workload.
MEASURED = {"longdoc": "query", "multiround": "multiround", "trace": "trace", "random": "random"}


# --- configurations -------------------------------------------------------------


@dataclass(frozen=True)
class ConfigSpec:
    """One configuration: a base name and an optional offload trigger."""

    base: str
    trigger: str | None = None

    @property
    def name(self) -> str:
        return self.base if self.trigger is None else f"{self.base}@{self.trigger}"

    @property
    def connector(self) -> bool:
        return self.base != "vllm"

    @property
    def needs_redis(self) -> bool:
        return self.base in ("l2", "l1+l2", "shared-l2")

    @property
    def engines(self) -> int:
        return 2 if self.base == "shared-l2" else 1


def parse_configs(text: str) -> list[ConfigSpec]:
    """``"vllm,l1,l1@gpu_evict"`` -> specs; unknown names raise ValueError."""
    out: list[ConfigSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        base, _, trigger = part.partition("@")
        if base not in BASE_CONFIGS:
            raise ValueError(
                f"unknown configuration {base!r}; choose from {', '.join(BASE_CONFIGS)}"
            )
        if base == "vllm" and trigger:
            raise ValueError("the 'vllm' configuration has no connector, so no offload trigger")
        out.append(ConfigSpec(base, trigger or None))
    if not out:
        raise ValueError("no configuration given")
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration listed twice: {text!r}")
    return out


def block_bytes(model_dir: str | Path, block_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one KV block of the model (all layers, K and V, TP 1): one L1 slot."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return int(cfg["num_hidden_layers"]) * 2 * kv_heads * head_dim * block_size * dtype_bytes


def connector_extra(
    spec: ConfigSpec,
    *,
    redis_url: str | None,
    slot_bytes: int,
    l2_only_l1_blocks: int,
    user_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """``kv_connector_extra_config`` of a configuration; None = no connector."""
    if not spec.connector:
        return None
    extra: dict[str, Any] = {}
    if spec.needs_redis:
        if not redis_url:
            raise ValueError(f"configuration {spec.name} needs a Redis URL")
        # ALL: every block written to L1 is also written to L2, so L2 holds
        # what a fresh engine (or a tiny L1) will ask for.
        extra.update(l2_cache_backend="REDIS", redis_url=redis_url, l2_cache_ingestion_type="ALL")
    if spec.base == "l2":
        # Loads are staged in L1 slots, so L1 cannot be off; this one holds
        # about one long request, so a repeated document must come from L2.
        extra["l1_cache_capacity_gb"] = l2_only_l1_blocks * slot_bytes / (1 << 30)
    if spec.trigger:
        extra["offload_trigger"] = spec.trigger
    extra.update(user_extra or {})
    return extra


# --- statistics -----------------------------------------------------------------


def _pct(values: Sequence[float], p: float) -> float | None:
    """Percentile ``p`` (linear, as numpy and ``vllm bench serve`` compute it)."""
    return float(np.percentile(values, p)) if len(values) else None


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 2)


def latency_stats(records: Sequence[Record]) -> dict[str, Any]:
    """TTFT, ITL and throughput of one phase's records (failed requests left out)."""
    ok = [r for r in records if r.error is None and r.ttft_s is not None]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [x for r in ok for x in r.itls_s]
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    duration = (max(r.end_s for r in ok) - min(r.start_s for r in ok)) if ok else 0.0
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "duration_s": round(duration, 3),
        "ttft_ms": {
            "mean": _ms(float(np.mean(ttfts))) if ttfts else None,
            "p50": _ms(_pct(ttfts, 50)),
            "p99": _ms(_pct(ttfts, 99)),
        },
        "itl_ms": {"p50": _ms(_pct(itls, 50)), "p99": _ms(_pct(itls, 99))},
        "request_throughput": round(len(ok) / duration, 4) if duration else None,
        "output_throughput": round(output / duration, 2) if duration else None,
        "total_token_throughput": round((prompt + output) / duration, 2) if duration else None,
        "ttfts_ms": [_ms(x) for x in ttfts],
    }


def parse_bench_serve(result: Mapping[str, Any]) -> dict[str, Any]:
    """The result JSON of ``vllm bench serve --save-result [--save-detailed]``, in
    the shape of :func:`latency_stats` (run with ``--metric-percentiles 50,99``)."""

    def get(key: str) -> float | None:
        v = result.get(key)
        return None if v is None else round(float(v), 2)

    ttfts = [float(x) for x in result.get("ttfts") or [] if x]
    completed = int(result.get("completed", 0))
    return {
        "requests": completed + int(result.get("failed", 0) or 0),
        "completed": completed,
        "failed": int(result.get("failed", 0) or 0),
        "prompt_tokens": int(result.get("total_input_tokens", 0)),
        "output_tokens": int(result.get("total_output_tokens", 0)),
        "duration_s": round(float(result.get("duration", 0.0)), 3),
        "ttft_ms": {
            "mean": get("mean_ttft_ms"),
            "p50": get("p50_ttft_ms") if "p50_ttft_ms" in result else get("median_ttft_ms"),
            "p99": get("p99_ttft_ms"),
        },
        "itl_ms": {
            "p50": get("p50_itl_ms") if "p50_itl_ms" in result else get("median_itl_ms"),
            "p99": get("p99_itl_ms"),
        },
        "request_throughput": get("request_throughput"),
        "output_throughput": get("output_throughput"),
        "total_token_throughput": get("total_token_throughput"),
        "ttfts_ms": [_ms(x) for x in ttfts],
    }


def tier_report(delta: Mapping[str, float], slot_bytes: int) -> dict[str, Any]:
    """Prompt-token hit ratio per tier and bytes moved per tier from ``/metrics`` deltas.

    The tiers are disjoint: vLLM's prefix cache serves what the engine still
    holds (``prefix_cache_hits``), the connector only what comes after it
    (``hit_tokens_l1`` / ``hit_tokens_l2``). The denominator is every prompt
    token the engine received (``prompt_tokens``).
    """

    def c(name: str) -> float:
        return float(delta.get(AIBRIX.format(name), 0.0))

    prompt = float(delta.get(VLLM_PROMPT_TOKENS, 0.0))
    hits = {
        "vllm": float(delta.get(VLLM_PREFIX_HITS, 0.0)),
        "l1": c("hit_tokens_l1"),
        "l2": c("hit_tokens_l2"),
    }
    ratio = {k: (round(v / prompt, 4) if prompt else 0.0) for k, v in hits.items()}
    ratio["total"] = round(sum(hits.values()) / prompt, 4) if prompt else 0.0
    return {
        "prompt_tokens": int(prompt),
        "prefix_cache_queries": int(delta.get(VLLM_PREFIX_QUERIES, 0.0)),
        "external_prefix_cache_hits": int(delta.get(EXTERNAL_HITS, 0.0)),
        "hit_tokens": {k: int(v) for k, v in hits.items()},
        "hit_ratio": ratio,
        "bytes": {
            "engine_to_l1": int(c("store_bytes")),
            "l1_to_engine": int(c("load_bytes")),
            "l1_to_l2": int(c("l2_put_blocks") * slot_bytes),
            "l2_to_l1": int(c("l2_get_blocks") * slot_bytes),
        },
        "load_failures": int(c("load_failures")),
        "l2_errors": int(c("l2_errors")),
        "l2_ingest_dropped_blocks": int(c("l2_ingest_dropped_blocks")),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, None when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def summary_row(result: Mapping[str, Any]) -> dict[str, Any]:
    """One configuration's headline numbers (the measured phase)."""
    stats = result["stats"]
    tiers = result["tiers"]
    row = {
        "config": result["config"],
        "ttft_ms": stats["ttft_ms"],
        "itl_ms": stats["itl_ms"],
        "request_throughput": stats["request_throughput"],
        "total_token_throughput": stats["total_token_throughput"],
        "output_throughput": stats["output_throughput"],
        "hit_ratio": tiers["hit_ratio"],
        "bytes": tiers["bytes"],
        "failed": stats["failed"],
        "core_ids": result["servers"][-1]["core_ids"],
    }
    floor = result.get("phases", {}).get("floor")
    if floor:
        row["floor_ttft_ms"] = floor["stats"]["ttft_ms"]
    return row


def compare(rows: Mapping[str, Mapping[str, Any]], baseline: str = "vllm") -> dict[str, Any]:
    """TTFT speedup and throughput gain of every configuration over ``baseline``."""
    base = rows.get(baseline)
    if base is None:
        return {}
    out: dict[str, Any] = {}
    for name, row in rows.items():
        if name == baseline:
            continue
        entry = {
            "ttft_speedup_mean": ratio(base["ttft_ms"]["mean"], row["ttft_ms"]["mean"]),
            "ttft_speedup_p50": ratio(base["ttft_ms"]["p50"], row["ttft_ms"]["p50"]),
            "ttft_speedup_p99": ratio(base["ttft_ms"]["p99"], row["ttft_ms"]["p99"]),
            "throughput_gain": ratio(row["request_throughput"], base["request_throughput"]),
        }
        if "floor_ttft_ms" in row:
            # How far the connector's hit is from vLLM's own prefix-cache hit.
            entry["ttft_over_vllm_floor_p50"] = ratio(
                row["ttft_ms"]["p50"], row["floor_ttft_ms"]["p50"]
            )
        out[name] = entry
    return out


# --- progress -------------------------------------------------------------------


class Progress:
    """A progress bar on stderr (tqdm when installed, else a line every ~10 %)."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self._bar: Any = None
        if not total:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=True, unit="req")
        except ImportError:
            log(f"{desc}: 0/{total}")

    def update(self, _rec: Record | None = None) -> None:
        self.n += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.total and (self.n == self.total or self.n % max(1, self.total // 10) == 0):
            log(f"{self.desc}: {self.n}/{self.total}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def log(msg: str) -> None:
    print(f"[bench e2e] {msg}", file=sys.stderr, flush=True)


# --- running one configuration --------------------------------------------------


@dataclass
class Plan:
    """What a workload sends: phases of requests, or a callable driver."""

    workload: str
    # (phase, requests) in order; for multiround/random the list is empty and
    # the phase is run by a dedicated driver.
    phases: list[tuple[str, list[Request]]]
    warm_phases: tuple[str, ...]  # what engine A of shared-l2 runs
    concurrency: int = 1
    multiround: MultiRound | None = None
    random: RandomLoad | None = None
    trace: list[ScaledTraceRequest] | None = None


def build_plan(args: argparse.Namespace) -> Plan:
    """The workload of ``args`` as phases of requests."""
    if args.workload == "longdoc":
        ld = LongDoc(
            docs=args.docs,
            doc_tokens_min=args.doc_tokens_min,
            doc_tokens_max=args.doc_tokens_max,
            question_tokens=args.question_tokens,
            rounds=args.rounds,
            max_tokens=args.max_tokens,
            new_fraction=args.new_fraction,
            seed=args.seed,
        )
        ph = ld.phases()
        return Plan(
            "longdoc",
            [("warmup", ph["warmup"]), ("query", ph["query"]), ("floor", ph["floor"])],
            warm_phases=("warmup",),
            concurrency=args.concurrency,
        )
    if args.workload == "multiround":
        mr = MultiRound(
            users=args.users,
            turns=args.turns,
            system_tokens=args.system_tokens,
            first_tokens=args.first_tokens,
            question_tokens=args.turn_tokens,
            max_tokens=args.answer_tokens,
            concurrency=args.mr_concurrency,
            seed=args.seed,
        )
        return Plan("multiround", [("multiround", [])], ("multiround",), multiround=mr)
    if args.workload == "trace":
        records = load_trace_records(args.trace, limit=args.trace_requests)
        scaled = scale_trace(records, trace_scale(args))
        return Plan(
            "trace",
            [("trace", [s.request for s in scaled])],
            ("trace",),
            concurrency=args.trace_concurrency,
            trace=scaled,
        )
    rl = RandomLoad(
        prompts=args.random_prompts,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        concurrency=args.random_concurrency,
        seed=args.seed,
    )
    return Plan("random", [("random", [])], ("random",), random=rl)


def trace_scale(args: argparse.Namespace) -> TraceScale:
    return TraceScale(
        requests=args.trace_requests,
        block_tokens=args.block_size,
        max_prompt_tokens=min(args.trace_max_prompt_tokens, args.max_model_len - 128),
        max_output_tokens=args.trace_max_output_tokens,
        time_scale=args.trace_time_scale,
        seed=args.seed,
    )


def _phase_size(plan: Plan, phase: str, requests: list[Request]) -> int:
    if phase == "multiround" and plan.multiround:
        return plan.multiround.users * plan.multiround.turns
    if phase == "random" and plan.random:
        return plan.random.prompts
    return len(requests)


def _run_bench_serve(
    server: VllmServer, model: str, plan: Plan, out_dir: Path, label: str, model_dir: str
) -> dict[str, Any]:
    """``vllm bench serve`` against ``server``; its parsed result JSON."""
    assert plan.random is not None
    name = f"{label}-bench-serve.json"
    cmd = [
        *vllm_cli(),
        "bench",
        "serve",
        "--base-url",
        server.base,
        "--model",
        model,
        "--tokenizer",
        model_dir,
        *plan.random.bench_serve_args(),
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        name,
    ]
    blog = out_dir / f"{label}-bench-serve.log"
    log(f"{label}: vllm bench serve ({plan.random.prompts} random prompts; log {blog})")
    with open(blog, "wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(blog.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{tail}")
    raw = json.loads((out_dir / name).read_text())
    return {"command": cmd, "result_file": str(out_dir / name), "raw": raw}


def run_phases(
    server: VllmServer,
    plan: Plan,
    phases: Sequence[str],
    label: str,
    out_dir: Path,
    model_dir: str,
    slot_bytes: int,
) -> dict[str, Any]:
    """Run ``phases`` of ``plan`` on ``server``: records, stats and /metrics deltas each."""
    model = server.model_id()
    # Untimed: a fresh server's first request pays one-off costs.
    run_requests(server.base, model, [server_warmup(0)])
    out: dict[str, Any] = {}
    for phase, requests in plan.phases:
        if phase not in phases:
            continue
        before = settled_scrape(server.base)
        # vllm bench serve draws its own progress bar (into its log).
        bar = Progress(
            0 if phase == "random" else _phase_size(plan, phase, requests), f"{label}:{phase}"
        )
        extra: dict[str, Any] = {}
        try:
            if phase == "multiround" and plan.multiround is not None:
                records = run_conversations(server.base, model, plan.multiround, phase, bar.update)
            elif phase == "random":
                res = _run_bench_serve(server, model, plan, out_dir, label, model_dir)
                records = []
                extra = {"bench_serve_command": res["command"], "result_file": res["result_file"]}
                stats = parse_bench_serve(res["raw"])
            else:
                records = run_requests(server.base, model, requests, plan.concurrency, bar.update)
        finally:
            bar.close()
        after = settled_scrape(server.base)
        delta = metrics_delta(before, after)
        if phase != "random":
            stats = latency_stats(
                [r for r in records if r.phase != "floor_prime"] if phase == "floor" else records
            )
        errors = sorted({r.error for r in records if r.error})
        if errors:
            log(f"{label}:{phase}: {len(errors)} kinds of request errors, first: {errors[0]}")
        out[phase] = {
            "stats": stats,
            "tiers": tier_report(delta, slot_bytes),
            "metrics_delta": {k: v for k, v in delta.items() if v},
            "records": [r.to_json() for r in records],
            **extra,
        }
    return out


def _server_info(server: VllmServer, role: str) -> dict[str, Any]:
    return {
        "role": role,
        "command": server.options.command(server.port, server.extra),
        "log": str(server.log),
        "startup_s": round(server.startup_s, 1),
        "core_ids": server.core_ids(),
    }


def run_config(
    spec: ConfigSpec,
    plan: Plan,
    opts: ServeOptions,
    args: argparse.Namespace,
    out_dir: Path,
    slot_bytes: int,
) -> dict[str, Any]:
    """Start the configuration's server(s), run the workload, stop them."""
    label = spec.name.replace("+", "_").replace("@", "_")
    servers: list[dict[str, Any]] = []
    warm: dict[str, Any] = {}
    with maybe_redis(spec.needs_redis) as redis:
        extra = connector_extra(
            spec,
            redis_url=redis.url if isinstance(redis, RedisServer) else None,
            slot_bytes=slot_bytes,
            l2_only_l1_blocks=args.l2_only_l1_blocks,
            user_extra=args.extra,
        )
        measured = [p for p, _ in plan.phases]
        if spec.engines == 2:
            log(f"{spec.name}: engine A (fills L2) starting")
            with VllmServer(
                opts, extra, out_dir / f"{label}-A-serve.log", args.startup_timeout
            ) as a:
                servers.append(_server_info(a, "A: fills L2"))
                warm = run_phases(
                    a, plan, plan.warm_phases, f"{label}-A", out_dir, opts.model, slot_bytes
                )
            if plan.workload == "longdoc":
                measured = [p for p in measured if p not in plan.warm_phases]
        log(f"{spec.name}: server starting")
        with VllmServer(opts, extra, out_dir / f"{label}-serve.log", args.startup_timeout) as s:
            servers.append(_server_info(s, "measured" if spec.engines == 1 else "B: measured"))
            log(f"{spec.name}: ready in {s.startup_s:.0f} s, {s.core_ids() or 'no core ids line'}")
            phases = run_phases(s, plan, measured, label, out_dir, opts.model, slot_bytes)
    head = phases[MEASURED[plan.workload]]
    return {
        "config": spec.name,
        "connector_extra_config": extra,
        "servers": servers,
        "stats": head["stats"],
        "tiers": head["tiers"],
        "phases": phases,
        "engine_a_phases": warm,
    }


# --- reporting ------------------------------------------------------------------


def simulate_trace(
    plan: Plan, engine_blocks: int | None, l1_slots: int, block_tokens: int
) -> dict[str, Any]:
    """The replay simulator on the same scaled requests (``bench replay`` semantics)."""
    if not plan.trace:
        return {}
    reqs = [(len(s.request.prompt), s.hash_ids) for s in plan.trace]
    out: dict[str, Any] = {}
    if engine_blocks:
        r = replay(reqs, "lru", engine_blocks, block_tokens=block_tokens)
        out["vllm_prefix_cache_lru"] = {
            "capacity_blocks": engine_blocks,
            "prefix_token_hit_ratio": round(r.prefix_token_hit_ratio, 4),
        }
    r = replay(reqs, "s3fifo-prefix", l1_slots, block_tokens=block_tokens)
    out["l1_s3fifo"] = {
        "capacity_blocks": l1_slots,
        "prefix_token_hit_ratio": round(r.prefix_token_hit_ratio, 4),
    }
    distinct = max(1, len({h for _, ids in reqs for h in ids}))
    r = replay(reqs, "lru", distinct, block_tokens=block_tokens, unlimited=True)
    out["unlimited"] = {"prefix_token_hit_ratio": round(r.prefix_token_hit_ratio, 4)}
    return out


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(rows: Mapping[str, Mapping[str, Any]], vs: Mapping[str, Any]) -> str:
    """The table printed at the end."""
    head = (
        f"{'config':<12} {'TTFT mean':>10} {'p50':>8} {'p99':>8} {'ITL p50':>8} {'p99':>7} "
        f"{'req/s':>7} {'tok/s':>8} {'hit vLLM':>8} {'L1':>6} {'L2':>6} "
        f"{'L1->eng MB':>10} {'L2->L1 MB':>9} {'speedup':>8}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        t, i, h, b = r["ttft_ms"], r["itl_ms"], r["hit_ratio"], r["bytes"]
        sp = vs.get(name, {}).get("ttft_speedup_mean")
        lines.append(
            f"{name:<12} {_fmt(t['mean']):>10} {_fmt(t['p50']):>8} {_fmt(t['p99']):>8} "
            f"{_fmt(i['p50']):>8} {_fmt(i['p99']):>7} {_fmt(r['request_throughput'], '.3f'):>7} "
            f"{_fmt(r['total_token_throughput'], '.0f'):>8} {h['vllm']:>8.1%} {h['l1']:>6.1%} "
            f"{h['l2']:>6.1%} {b['l1_to_engine'] / 1e6:>10.1f} {b['l2_to_l1'] / 1e6:>9.1f} "
            f"{(_fmt(sp, '.2f') + 'x') if sp else '-':>8}"
        )
    floors = {n: r["floor_ttft_ms"] for n, r in rows.items() if "floor_ttft_ms" in r}
    if floors:
        lines.append("")
        lines.append("vLLM prefix-cache hit on the same prompt (floor), TTFT ms mean / p50:")
        for n, f in floors.items():
            lines.append(f"  {n:<12} {_fmt(f['mean'])} / {_fmt(f['p50'])}")
    return "\n".join(lines)


def plot(results: Mapping[str, Mapping[str, Any]], out_dir: Path, title: str) -> list[str]:
    """TTFT CDF, throughput bars and hit ratio per tier as small PNGs; their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    names = list(results)
    paths: list[str] = []

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    for n in names:
        xs = sorted(x for x in results[n]["stats"]["ttfts_ms"] if x is not None)
        if xs:
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=n)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(str(out_dir / "ttft_cdf.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    vals = [results[n]["stats"]["request_throughput"] or 0.0 for n in names]
    ax.bar(names, vals, color="tab:blue")
    ax.set_ylabel("requests / s")
    ax.set_title(f"Throughput: {title}", fontsize=9)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    paths.append(str(out_dir / "throughput.png"))
    fig.savefig(paths[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    bottom = np.zeros(len(names))
    for tier, color in (("vllm", "tab:gray"), ("l1", "tab:green"), ("l2", "tab:orange")):
        v = np.array([results[n]["tiers"]["hit_ratio"][tier] for n in names])
        ax.bar(
            names,
            v,
            bottom=bottom,
            label=tier if tier != "vllm" else "vLLM prefix cache",
            color=color,
        )
        bottom += v
    ax.set_ylim(0, 1)
    ax.set_ylabel("prompt-token hit ratio")
    ax.set_title(f"Hit ratio per tier: {title}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(str(out_dir / "hit_ratio.png"))
    fig.savefig(paths[-1])
    plt.close(fig)
    return paths


def _default_model(args: argparse.Namespace) -> str:
    if args.model:
        return str(args.model)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_tiny_model import build
    finally:
        sys.path.pop(0)
    path = DEFAULT_MODEL_DIR
    if (args.layers, args.hidden_size) != (8, 512):
        path = REPO / ".cache" / f"demo-llama-{args.layers}l-h{args.hidden_size}"
    return str(build(path, layers=args.layers, hidden_size=args.hidden_size))


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def _interrupt_as_exit() -> Iterator[None]:
    """SIGTERM runs the same clean-up as Ctrl-C (servers stopped by their context managers)."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The ``e2e`` subcommand."""
    specs = parse_configs(args.configs)
    model = _default_model(args)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out_dir = Path(args.out_dir or DEFAULT_OUT_ROOT / f"{args.workload}-{stamp}")
    out_dir.mkdir(parents=True, exist_ok=True)
    opts = ServeOptions(
        model=model,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        engine_blocks=args.engine_blocks or None,
        kvcache_space_gib=args.kvcache_space_gib,
        reserved_cpus=None if args.reserved_cpus < 0 else args.reserved_cpus,
    )
    slot = block_bytes(model, args.block_size)
    plan = build_plan(args)
    log(
        f"workload {args.workload}, configs {', '.join(s.name for s in specs)}, model {model}, "
        f"engine KV {args.engine_blocks} blocks of {args.block_size} tokens, out {out_dir}"
    )
    conditions = {
        "model": model,
        "model_config": json.loads((Path(model) / "config.json").read_text()),
        "block_size": args.block_size,
        "slot_bytes": slot,
        "max_model_len": args.max_model_len,
        "engine_blocks": args.engine_blocks,
        "engine_kv_tokens": (args.engine_blocks or 0) * args.block_size,
        "cpu_binding": opts.binding(),
        "dtype": opts.dtype,
        "workload_args": {
            k: v for k, v in vars(args).items() if k not in ("func", "command", "json")
        },
        "load_before": os.getloadavg(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    if plan.trace:
        conditions["trace_prompt_tokens"] = [len(s.request.prompt) for s in plan.trace]
    results: dict[str, dict[str, Any]] = {}
    files: dict[str, str] = {}
    failed: dict[str, str] = {}
    with _interrupt_as_exit():
        for spec in specs:
            t0 = time.monotonic()
            try:
                res = run_config(spec, plan, opts, args, out_dir, slot)
            except (RuntimeError, OSError, ValueError, KeyError) as e:
                # One broken configuration must not lose the others' numbers.
                log(f"{spec.name}: FAILED: {type(e).__name__}: {str(e)[-3000:]}")
                failed[spec.name] = f"{type(e).__name__}: {str(e)[-3000:]}"
                continue
            res["wall_s"] = round(time.monotonic() - t0, 1)
            res["load_after"] = os.getloadavg()
            results[spec.name] = res
            path = out_dir / f"{spec.name.replace('+', '_').replace('@', '_')}.json"
            _write(path, {"benchmark": "e2e", "workload": args.workload, **res})
            files[spec.name] = str(path)
            log(f"{spec.name}: done in {res['wall_s']} s -> {path}")
    rows = {n: summary_row(r) for n, r in results.items()}
    vs = compare(rows)
    summary: dict[str, Any] = {
        "benchmark": "e2e",
        "workload": args.workload,
        "machine": machine(),
        "conditions": {**conditions, "load_after": os.getloadavg()},
        "summary": {n: {k: v for k, v in r.items()} for n, r in rows.items()},
        "vs_vllm": vs,
        "failed": failed,
        "files": files,
    }
    if plan.trace:
        summary["simulator"] = simulate_trace(
            plan, args.engine_blocks, int((1 << 30) // slot), args.block_size
        )
    summary["plots"] = plot(results, out_dir, args.workload)
    _write(out_dir / "summary.json", summary)
    summary["files"]["summary"] = str(out_dir / "summary.json")
    print("\n" + summary_table(rows, vs), file=sys.stderr)
    for name, err in failed.items():
        print(f"{name}: FAILED ({err.splitlines()[0] if err else err})", file=sys.stderr)
    if plan.trace:
        print(f"replay simulator on the same requests: {summary['simulator']}", file=sys.stderr)
    log(f"results in {out_dir}")
    return summary


def _json_obj(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra wants a JSON object")
    return value


def register(subparsers: Any) -> None:
    """Add the ``e2e`` subcommand."""
    p = subparsers.add_parser(
        "e2e",
        help="vllm serve per configuration (vLLM alone, L1, L2, ...) on one workload, side by side",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workload", choices=WORKLOADS, default="longdoc")
    p.add_argument(
        "--configs",
        default="vllm,l1",
        help=f"comma-separated: {', '.join(BASE_CONFIGS)}"
        " (NAME@TRIGGER adds offload_trigger=TRIGGER)",
    )
    p.add_argument("--json", action="store_true", help="print the summary JSON (the default)")
    # dest out_dir: a folder, unlike the other subcommands' --out file, so the
    # package's main() prints the summary to stdout as for every subcommand.
    p.add_argument(
        "--out",
        dest="out_dir",
        default=None,
        help="folder for the JSON files, logs and plots (default .cache/bench-e2e/...)",
    )
    g = p.add_argument_group("server")
    g.add_argument("--model", default=None, help="model dir (default: scripts/demo.sh's model)")
    g.add_argument("--layers", type=int, default=8, help="layers of the default model")
    g.add_argument("--hidden-size", type=int, default=512, help="hidden size of the default model")
    g.add_argument("--block-size", type=int, default=128)
    g.add_argument("--max-model-len", type=int, default=4096)
    g.add_argument(
        "--engine-blocks",
        type=int,
        default=48,
        help="engine KV blocks (--num-gpu-blocks-override; 0 = from VLLM_CPU_KVCACHE_SPACE)",
    )
    g.add_argument("--kvcache-space-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    g.add_argument(
        "--reserved-cpus",
        type=int,
        default=1,
        help="VLLM_CPU_NUM_OF_RESERVED_CPU for every server (-1: leave unset)",
    )
    g.add_argument(
        "--l2-only-l1-blocks",
        type=int,
        default=40,
        help="L1 size of the 'l2' configuration, in blocks",
    )
    g.add_argument(
        "--extra",
        type=_json_obj,
        default={},
        help="JSON merged into every connector configuration's extra config",
    )
    g.add_argument("--startup-timeout", type=float, default=300.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("longdoc")
    g.add_argument("--docs", type=int, default=4)
    g.add_argument("--doc-tokens-min", type=int, default=2500)
    g.add_argument("--doc-tokens-max", type=int, default=3500)
    g.add_argument("--question-tokens", type=int, default=32)
    g.add_argument("--rounds", type=int, default=2, help="query rounds after the warm-up")
    g.add_argument("--max-tokens", type=int, default=8)
    g.add_argument(
        "--new-fraction",
        type=float,
        default=0.0,
        help="share of each round's queries on never-seen documents (misses)",
    )
    g.add_argument("--concurrency", type=int, default=1)
    g = p.add_argument_group("multiround")
    g.add_argument("--users", type=int, default=8)
    g.add_argument("--turns", type=int, default=4)
    g.add_argument("--system-tokens", type=int, default=512)
    g.add_argument("--first-tokens", type=int, default=256)
    g.add_argument("--turn-tokens", type=int, default=64, help="new question tokens per turn")
    g.add_argument("--answer-tokens", type=int, default=32)
    g.add_argument("--mr-concurrency", type=int, default=2)
    g = p.add_argument_group("trace")
    g.add_argument("--trace", default=DEFAULT_TRACE)
    g.add_argument("--trace-requests", type=int, default=40)
    g.add_argument("--trace-max-prompt-tokens", type=int, default=3840)
    g.add_argument("--trace-max-output-tokens", type=int, default=16)
    g.add_argument(
        "--trace-time-scale", type=float, default=4.0, help="stretch arrival times by this factor"
    )
    g.add_argument("--trace-concurrency", type=int, default=8)
    g = p.add_argument_group("random")
    g.add_argument("--random-prompts", type=int, default=32)
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=16)
    g.add_argument("--random-concurrency", type=int, default=4)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vllm_aibrix.bench.e2e ...`` (same as ``python -m vllm_aibrix.bench e2e``)."""
    parser = argparse.ArgumentParser(prog="python -m vllm_aibrix.bench.e2e")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["e2e", *(sys.argv[1:] if argv is None else argv)])
    result = args.func(args)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
