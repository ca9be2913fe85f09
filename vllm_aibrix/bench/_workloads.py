"""Workloads of the end-to-end benchmark, as token-id prompts (pure, no server).

Prompts are lists of token ids (``/v1/completions`` accepts them), so their
lengths are exact and the same on every configuration. Every token comes
from a generator seeded by ``(seed, key)``: a workload is the same in every
run and on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vllm_aibrix.bench.replay import load_trace

VOCAB = 256  # the byte tokens of scripts/make_tiny_model.py (specials above stay unused)
TRACE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake trace

# Key spaces for tokens(): each kind of text draws from its own, so a
# question can never repeat a document block by accident.
_DOC, _QUESTION, _SYSTEM, _TURN, _TRACE, _SERVER_WARMUP = range(6)


def tokens(seed: int, key: Sequence[int], n: int, vocab: int = VOCAB) -> list[int]:
    """``n`` deterministic token ids for ``key`` (the same ids for the same arguments)."""
    rng = np.random.default_rng([seed, *key])
    return [int(t) for t in rng.integers(0, vocab, size=n)]


@dataclass
class Request:
    """One completion request of a workload."""

    id: str
    phase: str
    prompt: list[int]
    max_tokens: int
    arrival_s: float | None = None  # offset from the phase start (trace replay); None = ASAP


def server_warmup(seed: int, prompt_tokens: int = 256) -> Request:
    """One untimed request on an unrelated prompt: the first request of a fresh
    server pays one-off costs (allocations, thread start-up)."""
    return Request(
        "server-warmup", "server_warmup", tokens(seed, (_SERVER_WARMUP,), prompt_tokens), 2
    )


# --- (a) long-document QA -------------------------------------------------------


@dataclass
class LongDoc:
    """Long-document QA: a warm-up round over the documents, then query rounds.

    Query round ``r`` asks every document a new question (document + new
    question tokens), in the same order as the warm-up. With documents whose
    total exceeds the engine's own KV space, a round-robin pass finds each
    document evicted from vLLM's prefix cache by the ones after it, so a hit
    can only come from the offload tiers. ``new_fraction`` of the queries of
    each round go to documents never seen before (misses for everyone): the
    hit:miss mix. The ``floor`` phase sends one query per document twice in a
    row; the second is vLLM's own prefix-cache hit on the same prompt.
    """

    docs: int = 4
    doc_tokens_min: int = 2500
    doc_tokens_max: int = 3500
    question_tokens: int = 32
    rounds: int = 2
    max_tokens: int = 8
    new_fraction: float = 0.0
    seed: int = 0

    def doc_lengths(self, n: int | None = None, offset: int = 0) -> list[int]:
        """Document lengths spread evenly over [min, max] (deterministic)."""
        n = self.docs if n is None else n
        lo, hi = self.doc_tokens_min, self.doc_tokens_max
        rng = np.random.default_rng([self.seed, _DOC, offset])
        return [
            int(rng.integers(lo + (hi - lo) * i // n, lo + (hi - lo) * (i + 1) // n + 1))
            for i in range(n)
        ]

    def document(self, d: int, length: int) -> list[int]:
        return tokens(self.seed, (_DOC, d), length)

    def question(self, d: int, r: int) -> list[int]:
        return tokens(self.seed, (_QUESTION, d, r), self.question_tokens)

    def phases(self) -> dict[str, list[Request]]:
        """``{"warmup": [...], "query": [...], "floor": [...]}`` in send order."""
        docs = [self.document(d, n) for d, n in enumerate(self.doc_lengths())]
        warmup = [
            Request(f"warmup-d{d}", "warmup", doc + self.question(d, 0), self.max_tokens)
            for d, doc in enumerate(docs)
        ]
        n_new = round(self.new_fraction * self.docs)
        query: list[Request] = []
        fresh = 0
        for r in range(1, self.rounds + 1):
            for d, doc in enumerate(docs):
                if d < n_new:
                    # A never-seen document of the same length instead: a miss everywhere.
                    nd = 1_000_000 + fresh
                    fresh += 1
                    prompt = self.document(nd, len(doc)) + self.question(nd, r)
                    query.append(Request(f"query-r{r}-new{nd}", "query", prompt, self.max_tokens))
                else:
                    prompt = doc + self.question(d, r)
                    query.append(Request(f"query-r{r}-d{d}", "query", prompt, self.max_tokens))
        floor: list[Request] = []
        r = self.rounds + 1
        for d, doc in enumerate(docs):
            prompt = doc + self.question(d, r)
            floor.append(Request(f"floor-prime-d{d}", "floor_prime", prompt, self.max_tokens))
            floor.append(Request(f"floor-d{d}", "floor", list(prompt), self.max_tokens))
        return {"warmup": warmup, "query": query, "floor": floor}


# --- (b) multi-round QA ---------------------------------------------------------


@dataclass
class MultiRound:
    """Multi-round QA: ``users`` conversations of ``turns`` turns each.

    Every conversation starts with the same system prompt plus a user-specific
    first message; turn ``t``'s prompt is the previous prompt + the previous
    answer's token ids + a new question, so the next prompt depends on the
    previous answer and a static dataset cannot express it.
    """

    users: int = 8
    turns: int = 4
    system_tokens: int = 512
    first_tokens: int = 256
    question_tokens: int = 64
    max_tokens: int = 32
    concurrency: int = 2
    seed: int = 0

    def system(self) -> list[int]:
        return tokens(self.seed, (_SYSTEM,), self.system_tokens)

    def first_prompt(self, user: int) -> list[int]:
        return self.system() + tokens(self.seed, (_TURN, user, 0), self.first_tokens)

    def question(self, user: int, turn: int) -> list[int]:
        return tokens(self.seed, (_TURN, user, turn), self.question_tokens)

    def next_prompt(
        self, previous: Sequence[int], answer: Sequence[int], user: int, turn: int
    ) -> list[int]:
        """Turn ``turn``'s prompt: history so far + the answer it got + a new question."""
        return [*previous, *answer, *self.question(user, turn)]

    def max_prompt_tokens(self) -> int:
        """Longest prompt of the workload (the last turn, answers at full length)."""
        t = self.turns - 1
        return self.system_tokens + self.first_tokens + t * (self.max_tokens + self.question_tokens)


# --- (c) Mooncake trace replay --------------------------------------------------


@dataclass(frozen=True)
class TraceRecord:
    """One request of the trace, as recorded."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace_records(path: str | Path, limit: int | None = None) -> list[TraceRecord]:
    """The first ``limit`` requests of a Mooncake JSONL trace.

    Lengths and hash ids come from :func:`vllm_aibrix.bench.replay.load_trace`
    (the replay simulator's parser, so both read the same requests); arrival
    times and output lengths, which the simulator has no use for, are read
    here.
    """
    parsed = load_trace(path)
    if limit is not None:
        parsed = parsed[:limit]
    timed: list[tuple[float, int]] = []
    with open(path) as f:
        for line in f:
            if len(timed) >= len(parsed):
                break
            if line.strip():
                rec = json.loads(line)
                timed.append((float(rec.get("timestamp", 0)), int(rec.get("output_length", 1))))
    return [
        TraceRecord(ts, n, out, tuple(ids))
        for (n, ids), (ts, out) in zip(parsed, timed, strict=True)
    ]


@dataclass
class TraceScale:
    """How trace requests are scaled to what this machine can run.

    Every 512-token hash-id block becomes ``block_tokens`` tokens (the last,
    partial block in proportion), prompts are cut at ``max_prompt_tokens``
    (whole blocks, so the cut keeps prefix sharing intact), outputs are capped
    at ``max_output_tokens``, and arrival times are stretched by
    ``time_scale`` (2.0 = half the trace's request rate).
    """

    requests: int = 40
    block_tokens: int = 128
    max_prompt_tokens: int = 3840
    max_output_tokens: int = 16
    time_scale: float = 4.0
    seed: int = 0


@dataclass
class ScaledTraceRequest:
    """A trace request after scaling: what is sent and what the simulator replays."""

    request: Request
    hash_ids: list[int] = field(default_factory=list)


def scale_trace(records: Sequence[TraceRecord], scale: TraceScale) -> list[ScaledTraceRequest]:
    """Token prompts of the trace's requests, scaled as ``scale`` says (deterministic).

    Hash id ``h`` always expands to the same ``block_tokens`` tokens, so two
    requests share exactly their common leading hash ids as a token prefix.
    """
    b = scale.block_tokens
    max_blocks = max(1, scale.max_prompt_tokens // b)
    t0 = records[0].timestamp_ms if records else 0.0
    out: list[ScaledTraceRequest] = []
    for i, rec in enumerate(records):
        ids = list(rec.hash_ids)
        if not ids:
            continue
        tail = rec.input_length - TRACE_BLOCK_TOKENS * (len(ids) - 1)
        last = min(b, max(1, round(tail * b / TRACE_BLOCK_TOKENS)))
        if len(ids) > max_blocks:
            ids = ids[:max_blocks]
            last = b
        prompt: list[int] = []
        for j, h in enumerate(ids):
            block = tokens(scale.seed, (_TRACE, h), b)
            prompt += block if j < len(ids) - 1 else block[:last]
        req = Request(
            f"trace-{i}",
            "trace",
            prompt,
            max(1, min(rec.output_length, scale.max_output_tokens)),
            arrival_s=(rec.timestamp_ms - t0) / 1000.0 * scale.time_scale,
        )
        out.append(ScaledTraceRequest(req, ids))
    return out


# --- (d) 0 % reuse ----------------------------------------------------------------


@dataclass
class RandomLoad:
    """Random prompts, nothing shared: run by ``vllm bench serve --dataset-name random``."""

    prompts: int = 32
    input_len: int = 1024
    output_len: int = 16
    concurrency: int = 4
    seed: int = 0

    def bench_serve_args(self) -> list[str]:
        """The dataset and load flags of ``vllm bench serve``."""
        return [
            "--dataset-name",
            "random",
            "--random-input-len",
            str(self.input_len),
            "--random-output-len",
            str(self.output_len),
            # Exact lengths: a 0 range keeps every configuration on the same prompts.
            "--random-range-ratio",
            "0",
            "--num-prompts",
            str(self.prompts),
            "--max-concurrency",
            str(self.concurrency),
            "--request-rate",
            "inf",
            "--ignore-eos",
            "--seed",
            str(self.seed),
        ]
