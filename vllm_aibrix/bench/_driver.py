"""Async streaming client for what ``vllm bench serve`` cannot express.

Sends token-id prompts to ``/v1/completions`` with ``stream=True`` and
vLLM's ``return_token_ids`` extension. TTFT is the arrival of the first
chunk that carries a generated token id (the byte-level test model's first
bytes often decode to no text yet, so the first *text* would come late);
inter-token latencies (ITL) are the gaps between later token-carrying chunks,
as ``vllm bench serve`` measures them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from vllm_aibrix.bench._workloads import MultiRound, Request

REQUEST_TIMEOUT_S = 600.0


@dataclass
class Record:
    """What one request measured."""

    id: str
    phase: str
    prompt_tokens: int
    start_s: float  # perf_counter at send
    end_s: float = 0.0
    ttft_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int | None = None  # usage.prompt_tokens_details (vLLM prefix cache + connector)
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)

    def to_json(self) -> dict[str, Any]:
        """The record for the per-configuration JSON (no token ids: they are large)."""
        return {
            "id": self.id,
            "phase": self.phase,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1e3, 2),
            "latency_ms": round((self.end_s - self.start_s) * 1e3, 2),
            "itl_ms": [round(x * 1e3, 2) for x in self.itls_s],
            "cached_tokens": self.cached_tokens,
            "error": self.error,
        }


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """One ``data: {...}`` line of the stream as a dict; None for others and ``[DONE]``."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return None
    out = json.loads(payload)
    return out if isinstance(out, dict) else None


async def complete(client: httpx.AsyncClient, base: str, model: str, req: Request) -> Record:
    """Stream one completion of ``req`` and time it."""
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,  # fixed output lengths on every configuration
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    rec = Record(req.id, req.phase, len(req.prompt), time.perf_counter())
    last: float | None = None
    try:
        async with client.stream(
            "POST", base + "/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S
        ) as resp:
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:500]!r}"
                return rec
            async for line in resp.aiter_lines():
                chunk = parse_sse_line(line)
                if chunk is None:
                    continue
                if "error" in chunk:
                    rec.error = str(chunk["error"])[:500]
                    break
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids") or []
                    if not ids:
                        continue
                    if rec.ttft_s is None:
                        rec.ttft_s = now - rec.start_s
                    elif last is not None:
                        rec.itls_s.append(now - last)
                    last = now
                    rec.output_ids.extend(int(t) for t in ids)
                usage = chunk.get("usage")
                if usage:
                    details = usage.get("prompt_tokens_details") or {}
                    if details.get("cached_tokens") is not None:
                        rec.cached_tokens = int(details["cached_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    finally:
        rec.end_s = time.perf_counter()
    return rec


def _client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max(1, concurrency) + 2)
    return httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S)


async def _run_requests(
    base: str,
    model: str,
    requests: Sequence[Request],
    concurrency: int,
    on_done: Callable[[Record], None],
) -> list[Record]:
    sem = asyncio.Semaphore(max(1, concurrency))
    t0 = time.perf_counter()

    async with _client(concurrency) as client:

        async def one(i: int, req: Request) -> tuple[int, Record]:
            if req.arrival_s is not None:
                delay = t0 + req.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            async with sem:
                rec = await complete(client, base, model, req)
            on_done(rec)
            return i, rec

        if concurrency <= 1 and all(r.arrival_s is None for r in requests):
            # Strictly in order: the round-robin eviction pattern depends on it.
            out = []
            for req in requests:
                rec = await complete(client, base, model, req)
                on_done(rec)
                out.append(rec)
            return out
        done = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return [rec for _, rec in sorted(done, key=lambda x: x[0])]


def run_requests(
    base: str,
    model: str,
    requests: Sequence[Request],
    concurrency: int = 1,
    on_done: Callable[[Record], None] = lambda _: None,
) -> list[Record]:
    """Send ``requests`` (in order when ``concurrency`` is 1 and none has an
    arrival time; else up to ``concurrency`` at once, each not before its
    ``arrival_s``) and return their records in request order."""
    return asyncio.run(_run_requests(base, model, requests, concurrency, on_done))


async def _run_conversations(
    base: str, model: str, plan: MultiRound, phase: str, on_done: Callable[[Record], None]
) -> list[Record]:
    # A queue of ready turns: a finished turn puts its conversation's next turn
    # at the back, so conversations take turns round-robin and, with more of
    # them than the engine holds, each one's history is evicted between turns.
    queue: asyncio.Queue[tuple[int, int, list[int]]] = asyncio.Queue()
    for u in range(plan.users):
        queue.put_nowait((u, 0, plan.first_prompt(u)))
    records: list[Record] = []
    remaining = plan.users * plan.turns

    async with _client(plan.concurrency) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                try:
                    u, t, prompt = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    continue
                req = Request(f"conv{u}-turn{t}", phase, prompt, plan.max_tokens)
                rec = await complete(client, base, model, req)
                records.append(rec)
                remaining -= 1
                on_done(rec)
                if t + 1 < plan.turns:
                    nxt = plan.next_prompt(prompt, rec.output_ids, u, t + 1)
                    queue.put_nowait((u, t + 1, nxt))

        await asyncio.gather(*(worker() for _ in range(max(1, plan.concurrency))))
    return records


def run_conversations(
    base: str,
    model: str,
    plan: MultiRound,
    phase: str = "multiround",
    on_done: Callable[[Record], None] = lambda _: None,
) -> list[Record]:
    """Run every conversation of ``plan`` to its last turn; records in completion order."""
    return asyncio.run(_run_conversations(base, model, plan, phase, on_done))
