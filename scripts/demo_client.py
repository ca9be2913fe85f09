"""Multi-turn chat workload against a running ``vllm serve`` with the connector.

Standard library only, so it runs against any server from any Python.

Two passes over the same conversations (turn by turn, conversations
interleaved, every turn appending the reply and a new user message to the
history), streaming each reply to time the first token (TTFT):

* ``no cache``: before each request vLLM's prefix cache *and* the connector's
  cache are emptied (``POST /reset_prefix_cache?reset_external=true``), so every
  request prefills its whole history;
* ``L1``: the connector's cache is emptied once at the start; before each
  request only vLLM's prefix cache is emptied (``POST /reset_prefix_cache``),
  as if the engine had evicted it under memory pressure. Earlier turns (and
  the system prompt other conversations share) can only come from our L1.

The second pass replays exactly the messages of the first, so both passes
send identical prompts. Needs the server started with ``VLLM_SERVER_DEV_MODE=1``.

Usage: python scripts/demo_client.py --base http://127.0.0.1:PORT [--conversations 4 --turns 5]
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
    "turn",
    "system",
    "user",
    "model",
    "batch",
    "queue",
    "policy",
    "evict",
    "store",
    "load",
    "hit",
    "miss",
]


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


def settled_counters(base: str, timeout: float = 10.0) -> dict[str, float]:
    """Counters once they stop moving (they reach /metrics a little late)."""
    prev = counters(base)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
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
class Turn:
    """One request: the full message list sent and what came back."""

    conv: int
    turn: int
    messages: list[dict[str, str]]
    reply: str = ""
    prompt_tokens: int = 0
    ttft: dict[str, float] = field(default_factory=dict)


def chat(
    base: str, model: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, float, int]:
    """Stream one chat completion; returns (reply, TTFT seconds, prompt tokens)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    prompt_tokens = 0
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
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(text)
            if chunk.get("usage"):
                prompt_tokens = int(chunk["usage"]["prompt_tokens"])
    return "".join(parts), ttft if ttft is not None else time.perf_counter() - t0, prompt_tokens


def user_message(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = args.base.rstrip("/")
    model = json.loads(_http(base, "GET", "/v1/models"))["data"][0]["id"]
    rng = random.Random(args.seed)
    system = "You are a helpful assistant. " + user_message(rng, args.system_chars)

    log("warm-up request")
    chat(base, model, [{"role": "user", "content": "hello"}], 4)

    # Pass 1 builds the conversations; pass 2 replays their message lists.
    histories = [[{"role": "system", "content": system}] for _ in range(args.conversations)]
    turns: list[Turn] = []
    log(
        f"pass 1/2 'no cache': {args.conversations} conversations x {args.turns} turns, "
        "vLLM prefix cache + connector cache emptied before every request"
    )
    for t in range(args.turns):
        for c in range(args.conversations):
            histories[c].append({"role": "user", "content": user_message(rng, args.turn_chars)})
            turn = Turn(c, t, [dict(m) for m in histories[c]])
            reset(base, external=True)
            turn.reply, ttft, turn.prompt_tokens = chat(base, model, turn.messages, args.max_tokens)
            turn.ttft["no_cache"] = ttft
            histories[c].append({"role": "assistant", "content": turn.reply})
            turns.append(turn)
            log(
                f"  no-cache conv {c} turn {t}: {turn.prompt_tokens:5d} prompt tokens, "
                f"TTFT {ttft * 1e3:7.1f} ms"
            )

    reset(base, external=True)
    before = settled_counters(base)
    log("pass 2/2 'L1': same requests, only vLLM's prefix cache emptied before each")
    differing = 0
    for turn in turns:
        reset(base, external=False)
        reply, ttft, _ = chat(base, model, turn.messages, args.max_tokens)
        turn.ttft["l1"] = ttft
        if reply != turn.reply:
            differing += 1
            log(f"  WARNING: conv {turn.conv} turn {turn.turn}: reply differs from pass 1")
        log(
            f"  L1       conv {turn.conv} turn {turn.turn}: {turn.prompt_tokens:5d} prompt tokens, "
            f"TTFT {ttft * 1e3:7.1f} ms ({turn.ttft['no_cache'] / ttft:4.1f}x faster)"
        )
    after = settled_counters(base)
    delta = {k: after[k] - before[k] for k in COUNTERS}
    return summarize(base, turns, delta, differing, args)


def summarize(
    base: str,
    turns: list[Turn],
    delta: dict[str, float],
    differing: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    def mean_ms(key: str, sel: list[Turn]) -> float:
        return 1e3 * statistics.mean(t.ttft[key] for t in sel)

    looked = delta["lookup_tokens"] or 1.0
    later = [t for t in turns if t.turn > 0]
    by_turn = []
    for k in range(args.turns):
        sel = [t for t in turns if t.turn == k]
        by_turn.append(
            {
                "turn": k,
                "prompt_tokens": round(statistics.mean(t.prompt_tokens for t in sel)),
                "ttft_ms_no_cache": round(mean_ms("no_cache", sel), 1),
                "ttft_ms_l1": round(mean_ms("l1", sel), 1),
            }
        )
    result = {
        "requests_per_pass": len(turns),
        "ttft_ms_no_cache": round(mean_ms("no_cache", turns), 1),
        "ttft_ms_l1": round(mean_ms("l1", turns), 1),
        "ttft_speedup": round(mean_ms("no_cache", turns) / mean_ms("l1", turns), 2),
        "ttft_speedup_turns_2plus": round(mean_ms("no_cache", later) / mean_ms("l1", later), 2)
        if later
        else None,
        "hit_ratio_l1": round(delta["hit_tokens_l1"] / looked, 3),
        "hit_ratio_l2": round(delta["hit_tokens_l2"] / looked, 3),
        "pass2_counters": delta,
        "by_turn": by_turn,
        "replies_differing_from_pass1": differing,
    }
    print()
    print("=" * 72)
    print(f" Results ({len(turns)} chat requests per pass, {args.conversations} conversations)")
    print("=" * 72)
    print(" turn | prompt tokens | TTFT no cache | TTFT from L1 | speedup")
    for row in by_turn:
        print(
            f" {row['turn'] + 1:4d} | {row['prompt_tokens']:13d} | "
            f"{row['ttft_ms_no_cache']:10.1f} ms | {row['ttft_ms_l1']:9.1f} ms | "
            f"{row['ttft_ms_no_cache'] / row['ttft_ms_l1']:5.2f}x"
        )
    print(
        f" all  |               | {result['ttft_ms_no_cache']:10.1f} ms | "
        f"{result['ttft_ms_l1']:9.1f} ms | {result['ttft_speedup']:5.2f}x"
    )
    print()
    print(
        f" Hit ratio in the L1 pass (hit tokens / looked-up tokens, from /metrics):\n"
        f"   L1 (CPU memory): {result['hit_ratio_l1']:6.1%}  "
        f"({delta['hit_tokens_l1']:.0f} / {delta['lookup_tokens']:.0f} tokens)\n"
        f"   L2 (remote):     {result['hit_ratio_l2']:6.1%}  "
        "(no L2 configured in this demo; see docs/l2.md)"
    )
    print(
        f" Replies in the L1 pass identical to the no-cache pass: "
        f"{len(turns) - differing}/{len(turns)} (greedy decoding)"
    )
    print()
    print(f" Metrics: {base}/metrics")
    print("   " + ", ".join(METRIC.format(n) for n in ("lookup_tokens", "hit_tokens_l1")))
    print("   " + ", ".join(METRIC.format(n) for n in ("hit_tokens_l2", "stored_blocks")))
    print("   ... every vllm:aibrix_kv_*_total counter is listed in vllm_aibrix/vllm/stats.py")
    print("=" * 72)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--base", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--system-chars", type=int, default=1000, help="shared system prompt size")
    ap.add_argument("--turn-chars", type=int, default=550, help="size of each user message")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens per reply")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
