"""The end-to-end benchmark's pure logic: workloads, trace scaling, /metrics, reports.

No engine and no server: everything here runs in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_aibrix.bench._driver import Record, parse_sse_line
from vllm_aibrix.bench._serve import ServeOptions, metrics_delta, parse_core_ids, parse_metrics
from vllm_aibrix.bench._workloads import (
    LongDoc,
    MultiRound,
    RandomLoad,
    TraceRecord,
    TraceScale,
    load_trace_records,
    scale_trace,
    tokens,
)
from vllm_aibrix.bench.e2e import (
    ConfigSpec,
    block_bytes,
    compare,
    connector_extra,
    latency_stats,
    parse_bench_serve,
    parse_configs,
    summary_row,
    summary_table,
    tier_report,
)

# --- workloads --------------------------------------------------------------------


def test_tokens_are_deterministic_and_keyed() -> None:
    assert tokens(0, (1, 2), 50) == tokens(0, (1, 2), 50)
    assert tokens(0, (1, 2), 50) != tokens(0, (1, 3), 50)
    assert tokens(0, (1, 2), 50) != tokens(1, (1, 2), 50)
    assert all(0 <= t < 256 for t in tokens(3, (7,), 1000))
    # A shorter draw is a prefix of a longer one: partial trace blocks rely on it.
    assert tokens(0, (9,), 30) == tokens(0, (9,), 60)[:30]


def test_longdoc_phases_shapes() -> None:
    ld = LongDoc(docs=3, doc_tokens_min=500, doc_tokens_max=900, question_tokens=16, rounds=2)
    ph = ld.phases()
    assert [len(ph[k]) for k in ("warmup", "query", "floor")] == [3, 6, 6]
    lengths = ld.doc_lengths()
    assert all(500 <= n <= 900 for n in lengths)
    assert lengths == sorted(lengths)  # spread evenly, one slice each
    for d, w in enumerate(ph["warmup"]):
        assert len(w.prompt) == lengths[d] + 16
    # Round r asks document d a new question after the same document tokens.
    q = {r.id: r for r in ph["query"]}
    for d in range(3):
        r1, r2 = q[f"query-r1-d{d}"], q[f"query-r2-d{d}"]
        doc = ph["warmup"][d].prompt[: lengths[d]]
        assert r1.prompt[: lengths[d]] == doc == r2.prompt[: lengths[d]]
        assert r1.prompt[lengths[d] :] != r2.prompt[lengths[d] :]
    # Query order is round-robin over the documents, as in the warm-up.
    assert [r.id for r in ph["query"][:3]] == ["query-r1-d0", "query-r1-d1", "query-r1-d2"]
    # Floor: each query twice in a row, the same prompt.
    f = ph["floor"]
    assert [r.phase for r in f[:2]] == ["floor_prime", "floor"]
    assert f[0].prompt == f[1].prompt
    assert ld.phases()["query"][4].prompt == ph["query"][4].prompt  # deterministic


def test_longdoc_new_fraction_sends_unseen_documents() -> None:
    ld = LongDoc(docs=4, doc_tokens_min=300, doc_tokens_max=400, rounds=2, new_fraction=0.5)
    ph = ld.phases()
    seen = {tuple(w.prompt[:300]) for w in ph["warmup"]}
    new = [r for r in ph["query"] if "new" in r.id]
    assert len(new) == 4  # 2 per round
    assert all(tuple(r.prompt[:300]) not in seen for r in new)
    assert len({tuple(r.prompt) for r in new}) == 4  # a fresh document each time


def test_multiround_prompts_grow_by_answer_and_question() -> None:
    mr = MultiRound(users=3, turns=3, system_tokens=64, first_tokens=32, question_tokens=8)
    firsts = [mr.first_prompt(u) for u in range(3)]
    assert all(p[:64] == mr.system() for p in firsts)  # shared system prompt
    assert len({tuple(p) for p in firsts}) == 3
    answer = [1, 2, 3]
    nxt = mr.next_prompt(firsts[0], answer, 0, 1)
    assert nxt[: len(firsts[0])] == firsts[0]
    assert nxt[len(firsts[0]) : len(firsts[0]) + 3] == answer
    assert len(nxt) == len(firsts[0]) + 3 + 8
    assert mr.max_prompt_tokens() == 64 + 32 + 2 * (mr.max_tokens + 8)


def test_random_load_uses_vllm_bench_serve_random_dataset() -> None:
    args = RandomLoad(prompts=5, input_len=100, output_len=4, concurrency=2).bench_serve_args()
    joined = " ".join(args)
    assert "--dataset-name random" in joined
    assert "--random-input-len 100" in joined and "--num-prompts 5" in joined
    assert "--max-concurrency 2" in joined and "--ignore-eos" in args


# --- trace ------------------------------------------------------------------------


def _trace_file(tmp_path: Path) -> Path:
    recs = [
        {"timestamp": 1000, "input_length": 1200, "output_length": 50, "hash_ids": [0, 1, 2]},
        {"timestamp": 1500, "input_length": 1100, "output_length": 3, "hash_ids": [0, 1, 7]},
        {
            "timestamp": 3000,
            "input_length": 3000,
            "output_length": 9,
            "hash_ids": list(range(10, 16)),
        },
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return path


def test_load_trace_records_reads_times_and_lengths(tmp_path: Path) -> None:
    recs = load_trace_records(_trace_file(tmp_path))
    assert recs[0] == TraceRecord(1000.0, 1200, 50, (0, 1, 2))
    assert [r.output_length for r in recs] == [50, 3, 9]
    assert len(load_trace_records(_trace_file(tmp_path), limit=2)) == 2


def test_scale_trace_is_deterministic_scaled_and_shares_prefixes(tmp_path: Path) -> None:
    recs = load_trace_records(_trace_file(tmp_path))
    scale = TraceScale(
        block_tokens=128, max_prompt_tokens=512, max_output_tokens=16, time_scale=2.0
    )
    out = scale_trace(recs, scale)
    assert [len(s.request.prompt) for s in out] == [
        2 * 128 + round((1200 - 1024) * 128 / 512),  # full blocks + the tail in proportion
        2 * 128 + round((1100 - 1024) * 128 / 512),
        4 * 128,  # 6 blocks cut to max_prompt_tokens (whole blocks)
    ]
    assert out[2].hash_ids == [10, 11, 12, 13]
    # Shared leading hash ids -> shared token prefix; the third block differs.
    a, b = out[0].request.prompt, out[1].request.prompt
    assert a[:256] == b[:256] and a[256:270] != b[256:270]
    # Arrivals relative to the first request, stretched; outputs capped.
    assert [s.request.arrival_s for s in out] == [0.0, 1.0, 4.0]
    assert [s.request.max_tokens for s in out] == [16, 3, 9]
    again = scale_trace(recs, scale)
    assert [s.request.prompt for s in again] == [s.request.prompt for s in out]


def test_scale_trace_on_the_real_trace_fits_the_engine() -> None:
    from vllm_aibrix.bench.replay import DEFAULT_TRACE

    if not Path(DEFAULT_TRACE).exists():
        pytest.skip("no shared trace beside the checkout")
    out = scale_trace(load_trace_records(DEFAULT_TRACE, limit=40), TraceScale())
    assert len(out) == 40
    assert max(len(s.request.prompt) for s in out) <= 3840
    assert all(len(s.request.prompt) > 128 * (len(s.hash_ids) - 1) for s in out)


# --- /metrics ---------------------------------------------------------------------

METRICS = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 4000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 1920.0
vllm:prefix_cache_hits_created{engine="0",model_name="m"} 1.7e9
vllm:aibrix_kv_hit_tokens_l1_total{engine="0",model_name="m"} 256.0
vllm:aibrix_kv_hit_tokens_l1_total{engine="1",model_name="m"} 128.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
process_open_fds 12.0
"""


def test_parse_metrics_sums_label_sets_and_skips_comments() -> None:
    m = parse_metrics(METRICS)
    assert m["vllm:prompt_tokens_total"] == 4000.0
    assert m["vllm:aibrix_kv_hit_tokens_l1_total"] == 384.0
    assert m["process_open_fds"] == 12.0
    assert not any(k.startswith("#") for k in m)


def test_metrics_delta_keeps_counters_only() -> None:
    before = parse_metrics(METRICS)
    after = dict(before)
    after["vllm:prompt_tokens_total"] += 100
    after["vllm:kv_cache_usage_perc"] = 0.9
    after["vllm:aibrix_kv_load_bytes_total"] = 10.0  # appears only later
    d = metrics_delta(before, after)
    assert d["vllm:prompt_tokens_total"] == 100
    assert d["vllm:aibrix_kv_load_bytes_total"] == 10.0
    assert "vllm:kv_cache_usage_perc" not in d and "vllm:prefix_cache_hits_created" not in d


def test_parse_core_ids() -> None:
    log = "x\n(EngineCore pid=1) INFO [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0, 1]\n"
    assert parse_core_ids(log) == "core ids=[0, 1]"
    assert parse_core_ids("nothing") is None


def test_parse_sse_line() -> None:
    assert parse_sse_line('data: {"choices": []}') == {"choices": []}
    assert parse_sse_line("data: [DONE]") is None
    assert parse_sse_line(": keep-alive") is None


# --- reports ----------------------------------------------------------------------


def _rec(ttft: float, itls: list[float], start: float, end: float, prompt: int = 100) -> Record:
    r = Record("r", "query", prompt, start, end, ttft, itls)
    r.output_ids = [1] * (len(itls) + 1)
    return r


def test_latency_stats() -> None:
    recs = [_rec(0.1, [0.01, 0.02], 0.0, 1.0), _rec(0.3, [0.03], 1.0, 2.0)]
    bad = Record("x", "query", 5, 0.0, 0.5, error="HTTP 500")
    s = latency_stats([*recs, bad])
    assert (s["requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["ttft_ms"]["mean"] == 200.0 and s["ttft_ms"]["p50"] == 200.0
    assert s["ttft_ms"]["p99"] == pytest.approx(298.0)
    assert s["itl_ms"]["p50"] == 20.0
    assert s["duration_s"] == 2.0 and s["request_throughput"] == 1.0
    assert s["total_token_throughput"] == (200 + 5) / 2.0
    assert latency_stats([])["ttft_ms"]["mean"] is None


def test_parse_bench_serve_result() -> None:
    raw = {
        "duration": 10.0,
        "completed": 8,
        "failed": 0,
        "total_input_tokens": 8192,
        "total_output_tokens": 128,
        "request_throughput": 0.8,
        "output_throughput": 12.8,
        "total_token_throughput": 832.0,
        "mean_ttft_ms": 500.0,
        "median_ttft_ms": 480.0,
        "p50_ttft_ms": 480.0,
        "p99_ttft_ms": 900.0,
        "p50_itl_ms": 15.0,
        "p99_itl_ms": 40.0,
        "ttfts": [0.5, 0.48],
    }
    s = parse_bench_serve(raw)
    assert s["ttft_ms"] == {"mean": 500.0, "p50": 480.0, "p99": 900.0}
    assert s["itl_ms"] == {"p50": 15.0, "p99": 40.0}
    assert s["request_throughput"] == 0.8 and s["prompt_tokens"] == 8192
    assert s["ttfts_ms"] == [500.0, 480.0]
    del raw["p50_ttft_ms"]
    assert parse_bench_serve(raw)["ttft_ms"]["p50"] == 480.0  # median as the fallback


def test_tier_report_ratios_and_bytes() -> None:
    delta = {
        "vllm:prompt_tokens_total": 1000.0,
        "vllm:prefix_cache_hits_total": 100.0,
        "vllm:aibrix_kv_hit_tokens_l1_total": 500.0,
        "vllm:aibrix_kv_hit_tokens_l2_total": 250.0,
        "vllm:aibrix_kv_load_bytes_total": 4096.0,
        "vllm:aibrix_kv_store_bytes_total": 2048.0,
        "vllm:aibrix_kv_l2_get_blocks_total": 2.0,
        "vllm:aibrix_kv_l2_put_blocks_total": 3.0,
    }
    t = tier_report(delta, slot_bytes=1024)
    assert t["hit_ratio"] == {"vllm": 0.1, "l1": 0.5, "l2": 0.25, "total": 0.85}
    assert t["bytes"] == {
        "engine_to_l1": 2048,
        "l1_to_engine": 4096,
        "l1_to_l2": 3072,
        "l2_to_l1": 2048,
    }
    assert tier_report({}, 1)["hit_ratio"]["total"] == 0.0


def _result(name: str, ttft: float, rps: float) -> dict[str, object]:
    stats = latency_stats([_rec(ttft, [0.01], 0.0, 1.0 / rps)])
    return {
        "config": name,
        "stats": stats,
        "tiers": tier_report({"vllm:prompt_tokens_total": 10.0}, 1),
        "servers": [{"core_ids": "core ids=[0]"}],
        "phases": {"floor": {"stats": latency_stats([_rec(0.05, [], 0.0, 1.0)])}},
    }


def test_summary_rows_compare_and_table() -> None:
    rows = {n: summary_row(_result(n, t, r)) for n, t, r in (("vllm", 1.0, 1.0), ("l1", 0.1, 2.0))}
    assert rows["l1"]["core_ids"] == "core ids=[0]"
    vs = compare(rows)
    assert set(vs) == {"l1"}
    assert vs["l1"]["ttft_speedup_mean"] == 10.0
    assert vs["l1"]["throughput_gain"] == 2.0
    assert vs["l1"]["ttft_over_vllm_floor_p50"] == 2.0
    table = summary_table(rows, vs)
    assert "l1" in table and "10.00x" in table and "floor" in table
    assert compare({"l1": rows["l1"]}) == {}


# --- configurations ---------------------------------------------------------------


def test_parse_configs() -> None:
    specs = parse_configs("vllm,l1,l2,l1+l2,shared-l2,l1@gpu_evict")
    assert [s.name for s in specs] == ["vllm", "l1", "l2", "l1+l2", "shared-l2", "l1@gpu_evict"]
    assert [s.needs_redis for s in specs] == [False, False, True, True, True, False]
    assert specs[4].engines == 2 and specs[0].engines == 1
    assert not specs[0].connector and specs[1].connector
    for bad in ("gpu", "vllm@gpu_evict", "l1,l1", ""):
        with pytest.raises(ValueError):
            parse_configs(bad)


def test_connector_extra_per_config() -> None:
    kw = {"redis_url": "redis://127.0.0.1:1/0", "slot_bytes": 1 << 20, "l2_only_l1_blocks": 40}
    assert connector_extra(ConfigSpec("vllm"), **kw) is None
    assert connector_extra(ConfigSpec("l1"), **kw) == {}
    l2 = connector_extra(ConfigSpec("l2"), **kw)
    assert l2 is not None
    assert l2["l2_cache_backend"] == "REDIS" and l2["redis_url"] == kw["redis_url"]
    assert l2["l1_cache_capacity_gb"] == pytest.approx(40 / 1024)  # 40 slots of 1 MiB
    both = connector_extra(ConfigSpec("l1+l2"), **kw)
    assert both is not None and "l1_cache_capacity_gb" not in both
    assert both["l2_cache_ingestion_type"] == "ALL"
    # The offload-trigger hook and user overrides.
    ev = connector_extra(ConfigSpec("l1", "gpu_evict"), **kw, user_extra={"min_hit_tokens": 128})
    assert ev == {"offload_trigger": "gpu_evict", "min_hit_tokens": 128}
    with pytest.raises(ValueError):
        connector_extra(ConfigSpec("l2"), redis_url=None, slot_bytes=1, l2_only_l1_blocks=1)


def test_block_bytes_from_model_config(tmp_path: Path) -> None:
    cfg = {
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "hidden_size": 512,
        "head_dim": 32,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # scripts/demo.sh's model: 512 KiB per 128-token float32 block.
    assert block_bytes(tmp_path, 128) == 512 * 1024


def test_serve_options_bind_every_server_equally() -> None:
    opts = ServeOptions(model="/m", engine_blocks=48, reserved_cpus=1)
    plain = opts.command(8000, None)
    with_conn = opts.command(8000, {})
    assert "--kv-transfer-config" not in plain and "--kv-transfer-config" in with_conn
    assert plain[plain.index("--num-gpu-blocks-override") + 1] == "48"
    assert "--enable-prefix-caching" in plain and "127.0.0.1" in plain
    conf = json.loads(with_conn[with_conn.index("--kv-transfer-config") + 1])
    assert conf["kv_connector"] == "AIBrixOffloadingConnector"
    # The binding does not depend on whether a connector is configured.
    assert opts.env()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


def test_e2e_is_a_registered_subcommand() -> None:
    from vllm_aibrix.bench.__main__ import build_parser

    args = build_parser().parse_args(
        ["e2e", "--workload", "random", "--configs", "vllm,l1", "--out", "/tmp/x"]
    )
    assert args.workload == "random" and args.out_dir == "/tmp/x"
    assert not hasattr(args, "out")  # main() then prints the summary to stdout
