"""Long-document workload against a running ``vllm serve`` with the connector.

Standard library only, so it runs against any server from any Python.

Several long documents (2,000-3,500 tokens by default), each with a few
questions appended, are sent through the OpenAI API (``/v1/completions`` by
default, ``--api chat`` for ``/v1/chat/completions``), streaming the reply to
time the first token (TTFT). Every prompt is sent three times, back to back,
so that all three see the same machine load:

* ``no cache``: vLLM's prefix cache *and* the connector's cache emptied first
  (``POST /reset_prefix_cache?reset_external=true``): the whole prompt is
  prefilled. The connector writes its blocks into L1 on the way.
* ``L1``: only vLLM's prefix cache emptied first (``POST /reset_prefix_cache``),
  as if the engine had evicted the document under memory pressure: the
  document can only come from the connector's L1.
* ``vLLM prefix cache``: nothing emptied: vLLM's own prefix cache serves the
  prompt, the best any cache can do (the floor).

The L1 and vLLM requests alternate in order from one prompt to the next. All
three cover the same full 128-token blocks, so the tokens after the last full
block are computed in every case. Hit ratios per tier come from the
connector's counters on ``/metrics``, read before and after every request.
Needs the server started with ``VLLM_SERVER_DEV_MODE=1`` (for the resets).

Usage: python scripts/demo_client.py --base http://127.0.0.1:PORT [--documents 4 --questions 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

COUNTERS = ("lookups", "lookup_tokens", "hit_tokens_l1", "hit_tokens_l2", "stored_blocks")
METRIC = "vllm:aibrix_kv_{}_total"
MODES = ("no_cache", "l1", "vllm")
LABELS = {"no_cache": "no cache", "l1": "from L1", "vllm": "vLLM prefix cache"}
WORDS = [
    "cache",
    "block",
    "prefix",
    "token",
    "engine",
    "memory",
    "tier",
    "remote",
    "local",
    "layer",
    "request",
    "reply",
    "history",
    "system",
    "model",
    "batch",
    "queue",
    "policy",
    "evict",
    "store",
    "load",
    "hit",
    "miss",
    "copy",
    "slot",
    "server",
    "client",
    "document",
    "answer",
    "latency",
    "prefill",
    "decode",
    "attention",
    "kernel",
]
TOPICS = (
    "the eviction policy",
    "the remote tier",
    "the copy path",
    "prefill latency",
    "the block size",
    "what is stored",
    "load failures",
    "memory pressure",
)


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _http(base: str, method: str, path: str, body: Any = None, timeout: float = 300.0) -> str:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return str(resp.read().decode())


def counters(base: str) -> dict[str, float]:
    """Connector counters from /metrics, summed over label sets."""
    text = _http(base, "GET", "/metrics")
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for name in COUNTERS:
            metric = METRIC.format(name)
            if line.startswith(metric) and line[len(metric)] in " {":
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


def settled_counters(base: str, timeout: float = 5.0) -> dict[str, float]:
    """Counters once two reads 0.2 s apart agree (they may reach /metrics late)."""
    prev = counters(base)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        cur = counters(base)
        if cur == prev:
            return cur
        prev = cur
    return prev


def reset(base: str, external: bool) -> None:
    """Empty vLLM's prefix cache (and the connector's with ``external``)."""
    path = "/reset_prefix_cache" + ("?reset_external=true" if external else "")
    for _ in range(50):  # refused while blocks are still held; retry briefly
        if json.loads(_http(base, "POST", path)).get("success"):
            return
        time.sleep(0.1)
    raise RuntimeError(f"POST {path} kept failing")


@dataclass
class Result:
    """One request of one mode."""

    ttft: float
    reply: str  # the generated token ids (as JSON), or the text if the server sends none
    prompt_tokens: int
    cached_tokens: int | None  # usage.prompt_tokens_details (--enable-prompt-tokens-details)
    counters: dict[str, float]  # connector counter deltas over this request


@dataclass
class Prompt:
    doc: int
    question: int
    doc_chars: int
    text: str
    results: dict[str, Result] = field(default_factory=dict)


def request(base: str, model: str, api: str, prompt: str, max_tokens: int) -> Result:
    """Stream one completion (or chat completion) and time its first token.

    TTFT is the arrival of the first chunk that carries a generated token id
    (``return_token_ids``), not the first text: the byte-level model often
    starts with bytes that are no complete UTF-8 character yet, and their text
    only arrives a few decode steps later. The reply is compared as token ids.
    """
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,  # vLLM extension: token ids in every chunk
    }
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    token_ids: list[int] = []
    usage: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            for choice in chunk.get("choices") or []:
                if api == "chat":
                    text = (choice.get("delta") or {}).get("content")
                else:
                    text = choice.get("text")
                ids = choice.get("token_ids") or []
                if (ids or text) and ttft is None:
                    ttft = time.perf_counter() - t0
                token_ids.extend(int(t) for t in ids)
                parts.append(text or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    text = "".join(parts)
    return Result(
        ttft=ttft if ttft is not None else time.perf_counter() - t0,
        reply=json.dumps(token_ids) if token_ids else text,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        cached_tokens=None if cached is None else int(cached),
        counters={},
    )


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
    return " ".join(words).capitalize() + "."


def document(rng: random.Random, chars: int) -> str:
    """Random sentences, ``chars`` long (the byte tokenizer: one token per char)."""
    text = ""
    while len(text) < chars:
        text += sentence(rng) + ("\n" if rng.random() < 0.15 else " ")
    return text[:chars]


def make_prompts(args: argparse.Namespace) -> list[Prompt]:
    rng = random.Random(args.seed)
    n = args.documents
    lo, hi = args.doc_tokens_min, args.doc_tokens_max
    # Lengths spread over [lo, hi], each drawn at random from its own slice: where
    # a prompt ends inside its last 128-token block (the part no cache can
    # serve) is left to chance, not picked in anyone's favour.
    sizes = [rng.randint(lo + (hi - lo) * i // n, lo + (hi - lo) * (i + 1) // n) for i in range(n)]
    prompts = []
    for d, size in enumerate(sizes):
        doc = f"Document {d + 1}.\n" + document(rng, size)
        topics = rng.sample(TOPICS, len(TOPICS))
        for q in range(args.questions):
            topic = topics[q % len(topics)]
            question = f"Question {q + 1}: what does the document say about {topic}?"
            prompts.append(Prompt(d, q, size, f"{doc}\n\n{question}\nAnswer:"))
    return prompts


def timed(base: str, model: str, args: argparse.Namespace, text: str) -> Result:
    before = settled_counters(base)
    res = request(base, model, args.api, text, args.max_tokens)
    after = settled_counters(base)
    res.counters = {k: after[k] - before[k] for k in COUNTERS}
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = args.base.rstrip("/")
    model = json.loads(_http(base, "GET", "/v1/models"))["data"][0]["id"]
    prompts = make_prompts(args)

    # The first long prefill and the first load of a fresh server are slower
    # (allocations, thread start-up): one untimed round on a throwaway document.
    log("warm-up (untimed): one long prompt cold, from L1 and from vLLM's cache")
    warm = document(random.Random(args.seed + 1), args.doc_tokens_max) + "\nAnswer:"
    reset(base, external=True)
    for external in (None, False, None):
        if external is not None:
            reset(base, external=external)
        request(base, model, args.api, warm, args.max_tokens)

    log(
        f"{len(prompts)} prompts ({args.documents} documents x {args.questions} questions, "
        f"/v1/{'chat/' if args.api == 'chat' else ''}completions, max_tokens={args.max_tokens}), "
        "each sent 3 times: no cache, from L1, from vLLM's prefix cache"
    )
    for i, p in enumerate(prompts):
        reset(base, external=True)
        p.results["no_cache"] = timed(base, model, args, p.text)
        order = ("l1", "vllm") if i % 2 == 0 else ("vllm", "l1")
        for mode in order:
            if mode == "l1":
                reset(base, external=False)
            p.results[mode] = timed(base, model, args, p.text)
        r = p.results
        log(
            f"  doc {p.doc + 1} q {p.question + 1}: "
            f"{r['no_cache'].prompt_tokens:5d} prompt tokens | "
            f"TTFT no cache {r['no_cache'].ttft * 1e3:7.1f} ms | "
            f"from L1 {r['l1'].ttft * 1e3:6.1f} ms "
            f"({r['no_cache'].ttft / r['l1'].ttft:4.1f}x) | "
            f"vLLM prefix cache {r['vllm'].ttft * 1e3:6.1f} ms"
        )
    return summarize(base, prompts, args)


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean_ms": round(1e3 * statistics.mean(values), 1),
        "p50_ms": round(1e3 * statistics.median(values), 1),
        "min_ms": round(1e3 * min(values), 1),
        "max_ms": round(1e3 * max(values), 1),
    }


def summarize(base: str, prompts: list[Prompt], args: argparse.Namespace) -> dict[str, Any]:
    ttft = {m: _stats([p.results[m].ttft for p in prompts]) for m in MODES}
    tot = {m: {k: sum(p.results[m].counters[k] for p in prompts) for k in COUNTERS} for m in MODES}
    hit = {
        m: {
            tier: round(tot[m][f"hit_tokens_{tier}"] / (tot[m]["lookup_tokens"] or 1.0), 3)
            for tier in ("l1", "l2")
        }
        for m in MODES
    }
    cached: dict[str, list[int]] = {m: [] for m in MODES}
    for p in prompts:
        for m in MODES:
            c = p.results[m].cached_tokens
            if c is not None:
                cached[m].append(c)
    differing = [
        f"doc {p.doc + 1} q {p.question + 1} ({m})"
        for p in prompts
        for m in ("l1", "vllm")
        if p.results[m].reply != p.results["no_cache"].reply
    ]
    by_doc = []
    for d in range(args.documents):
        sel = [p for p in prompts if p.doc == d]
        row: dict[str, Any] = {
            "doc": d + 1,
            "prompt_tokens": round(
                statistics.mean(p.results["no_cache"].prompt_tokens for p in sel)
            ),
        }
        for m in MODES:
            row[f"ttft_ms_{m}"] = round(1e3 * statistics.mean(p.results[m].ttft for p in sel), 1)
        by_doc.append(row)
    ptoks = [p.results["no_cache"].prompt_tokens for p in prompts]

    def ratio(a: str, b: str, k: str) -> float:
        return round(ttft[a][k] / ttft[b][k], 2)

    result = {
        "api": args.api,
        "prompts": len(prompts),
        "documents": args.documents,
        "questions_per_document": args.questions,
        "prompt_tokens": {
            "min": min(ptoks),
            "max": max(ptoks),
            "mean": round(statistics.mean(ptoks)),
        },
        "max_tokens": args.max_tokens,
        "ttft": ttft,
        "speedup_l1_mean": ratio("no_cache", "l1", "mean_ms"),
        "speedup_l1_p50": ratio("no_cache", "l1", "p50_ms"),
        "speedup_vllm_mean": ratio("no_cache", "vllm", "mean_ms"),
        "speedup_vllm_p50": ratio("no_cache", "vllm", "p50_ms"),
        "l1_over_vllm_p50": ratio("l1", "vllm", "p50_ms"),
        "hit_ratio": hit,
        "counters": tot,
        "cached_tokens_mean": {
            m: round(statistics.mean(v)) if v else None for m, v in cached.items()
        },
        "by_document": by_doc,
        "replies_differing_from_no_cache": differing,
    }

    w = 78
    print()
    print("=" * w)
    print(
        f" Results: {len(prompts)} prompts of {min(ptoks)}-{max(ptoks)} tokens "
        f"({args.documents} documents x {args.questions} questions), each sent 3 times"
    )
    print("=" * w)
    print(" TTFT (ms)            |    mean |     p50 |  min..max        | speedup (p50)")
    for m in MODES:
        s = ttft[m]
        sp = "        -" if m == "no_cache" else f"{ratio('no_cache', m, 'p50_ms'):8.1f}x"
        print(
            f" {LABELS[m]:<20} | {s['mean_ms']:7.1f} | {s['p50_ms']:7.1f} | "
            f"{s['min_ms']:7.1f}..{s['max_ms']:<7.1f} | {sp}"
        )
    print(
        f" Speedup of L1 over no cache: {result['speedup_l1_mean']:.1f}x (mean), "
        f"{result['speedup_l1_p50']:.1f}x (p50); L1 / vLLM prefix cache (p50): "
        f"{result['l1_over_vllm_p50']:.2f}"
    )
    print()
    print(" per document | prompt tokens | no cache ms | from L1 ms | vLLM cache ms | speedup")
    for row in by_doc:
        print(
            f" {row['doc']:12d} | {row['prompt_tokens']:13d} | {row['ttft_ms_no_cache']:11.1f} | "
            f"{row['ttft_ms_l1']:10.1f} | {row['ttft_ms_vllm']:13.1f} | "
            f"{row['ttft_ms_no_cache'] / row['ttft_ms_l1']:6.1f}x"
        )
    print()
    print(" Connector hit ratio per tier (hit tokens / looked-up tokens, from /metrics):")
    for m in MODES:
        t = tot[m]
        print(
            f"   {LABELS[m] + ' requests:':<27} L1 {hit[m]['l1']:6.1%} "
            f"({t['hit_tokens_l1']:.0f} / {t['lookup_tokens']:.0f} tokens), "
            f"L2 {hit[m]['l2']:5.1%}"
        )
    print("   (no L2 configured in this demo; the connector looks up every full block,")
    print("    also those vLLM's own cache already holds; see docs/l2.md for L2)")
    cm = result["cached_tokens_mean"]
    if all(v is not None for v in cm.values()):
        print(
            f" Cached prompt tokens per request (usage.prompt_tokens_details), mean: "
            f"no cache {cm['no_cache']}, from L1 {cm['l1']}, vLLM cache {cm['vllm']}"
        )
    n = 2 * len(prompts)
    print(
        f" Replies (greedy) identical to the no-cache reply: {n - len(differing)}/{n}"
        + (f"; differing: {', '.join(differing)}" if differing else "")
    )
    print()
    print(f" Metrics: {base}/metrics")
    print("   " + ", ".join(METRIC.format(n) for n in ("lookup_tokens", "hit_tokens_l1")))
    print("   ... every vllm:aibrix_kv_*_total counter is listed in vllm_aibrix/core/counters.py")
    print("=" * w)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--api", choices=["completions", "chat"], default="completions")
    ap.add_argument("--documents", type=int, default=4)
    ap.add_argument("--questions", type=int, default=3, help="questions per document")
    ap.add_argument("--doc-tokens-min", type=int, default=2000, help="shortest document")
    ap.add_argument("--doc-tokens-max", type=int, default=3500, help="longest document")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per reply")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if min(args.documents, args.questions, args.doc_tokens_min) < 1:
        ap.error("--documents, --questions and --doc-tokens-min must be positive")
    if args.doc_tokens_max < args.doc_tokens_min:
        ap.error("--doc-tokens-max must be at least --doc-tokens-min")
    try:
        result = run(args)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        return 1
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if result["counters"]["l1"]["hit_tokens_l1"] <= 0:
        log("FAILED: the L1 requests got no L1 hit (see the server log)")
        return 2
    if result["replies_differing_from_no_cache"]:
        log("FAILED: replies served from a cache differ from the no-cache replies")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
