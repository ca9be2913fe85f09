"""Trace replay: prefix-cache hit ratios of an eviction policy on a request trace.

Trace format (see /work/shared/traces/README.md): JSONL, one request per line
with ``input_length`` (tokens) and ``hash_ids`` (one prefix-chained id per
``--block-tokens`` tokens of the prompt).

Semantics, per request in file order:

1. its *prefix hit* is the number of its leading ``hash_ids`` present in the
   cache before the request; its token hit is
   ``min(prefix_hit * block_tokens, input_length)``;
2. then every block of the request is accessed in order: a resident block is
   a hit and is refreshed, a missing one is inserted, evicting as the policy
   says. The block hit ratio counts every one of these accesses.

``--policy lru|fifo|s3fifo|sieve`` (or any registered name / ``module:Class``)
is the plain policy driven through :meth:`EvictionPolicy.access`, nothing
more, so any independent implementation of the policy gives the same numbers.
``<name>-prefix`` replays through :class:`~vllm_aibrix.core.l1.L1Index` with
``prefix_aware=True`` (tail-first ordering + dropping orphaned descendants):
the lookup touches the leading hits, resident later blocks are touched too,
then the missing blocks are inserted as one chain.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_aibrix.bench._common import add_output_args, machine
from vllm_aibrix.core.l1 import L1Index
from vllm_aibrix.core.policy.registry import resolve_policy

PREFIX_SUFFIX = "-prefix"
# shared/ lies beside the repository checkout.
DEFAULT_TRACE = str(
    Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
)
MATRIX_POLICIES = ("lru", "fifo", "s3fifo", "sieve")
MATRIX_FRACTIONS = (0.01, 0.05, 0.10, 0.30)

Request = tuple[int, list[int]]  # (input_length, hash_ids)


@dataclass
class ReplayResult:
    """Outcome of one replay (all counts are totals over the trace)."""

    policy: str
    capacity_blocks: int
    unlimited: bool
    distinct_blocks: int
    requests: int
    prompt_tokens: int
    hit_tokens: int
    prefix_token_hit_ratio: float
    block_accesses: int
    block_hits: int
    block_hit_ratio: float
    prefix_hit_blocks: int
    seconds: float
    requests_per_s: float
    block_accesses_per_s: float


def load_trace(path: str | Path) -> list[Request]:
    """``(input_length, hash_ids)`` of every request of a JSONL trace, in order."""
    out: list[Request] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append((int(rec["input_length"]), list(rec["hash_ids"])))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: not a trace record ({e})") from None
    return out


def distinct_blocks(requests: list[Request]) -> int:
    """Number of different block ids in the trace."""
    return len({h for _, ids in requests for h in ids})


def resolve_capacity(
    requests: list[Request], capacity_blocks: int | None, capacity_fraction: float | None
) -> tuple[int, bool]:
    """``(capacity, unlimited)`` from the CLI options (0 / neither = unlimited)."""
    n = distinct_blocks(requests)
    if capacity_fraction is not None:
        if not 0.0 < capacity_fraction <= 1.0:
            raise ValueError(f"--capacity-fraction must be in (0, 1], got {capacity_fraction}")
        return max(1, round(capacity_fraction * n)), False
    if capacity_blocks is None or capacity_blocks == 0:
        # Room for every distinct block: nothing is ever evicted.
        return max(1, n), True
    if capacity_blocks < 0:
        raise ValueError(f"--capacity-blocks must be >= 0, got {capacity_blocks}")
    return capacity_blocks, False


def replay(
    requests: list[Request],
    policy: str,
    capacity_blocks: int,
    *,
    block_tokens: int = 512,
    policy_params: dict[str, Any] | None = None,
    unlimited: bool = False,
) -> ReplayResult:
    """Replay ``requests`` through ``policy`` with room for ``capacity_blocks`` blocks."""
    params = policy_params or {}
    prompt_tokens = hit_tokens = accesses = block_hits = prefix_blocks = 0
    t0 = time.perf_counter()
    if policy.lower().endswith(PREFIX_SUFFIX):
        base = policy[: -len(PREFIX_SUFFIX)]
        l1 = L1Index(capacity_blocks, base, policy_params=params, prefix_aware=True)
        for input_length, ids in requests:
            n, _ = l1.lookup(ids)  # leading hits, counted as accesses
            later = [k for k in ids[n:] if k in l1]
            if later:
                l1.touch(later)
            l1.insert(ids)
            prefix_blocks += n
            block_hits += n + len(later)
            accesses += len(ids)
            prompt_tokens += input_length
            hit_tokens += min(n * block_tokens, input_length)
    else:
        pol = resolve_policy(policy)(capacity_blocks, **params)
        access = pol.access
        for input_length, ids in requests:
            n = 0
            for k in ids:
                if k not in pol:
                    break
                n += 1
            for k in ids:
                if access(k):
                    block_hits += 1
            prefix_blocks += n
            accesses += len(ids)
            prompt_tokens += input_length
            hit_tokens += min(n * block_tokens, input_length)
    seconds = time.perf_counter() - t0
    return ReplayResult(
        policy=policy,
        capacity_blocks=capacity_blocks,
        unlimited=unlimited,
        distinct_blocks=distinct_blocks(requests),
        requests=len(requests),
        prompt_tokens=prompt_tokens,
        hit_tokens=hit_tokens,
        prefix_token_hit_ratio=hit_tokens / prompt_tokens if prompt_tokens else 0.0,
        block_accesses=accesses,
        block_hits=block_hits,
        block_hit_ratio=block_hits / accesses if accesses else 0.0,
        prefix_hit_blocks=prefix_blocks,
        seconds=seconds,
        requests_per_s=len(requests) / seconds if seconds else 0.0,
        block_accesses_per_s=accesses / seconds if seconds else 0.0,
    )


def _params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        name, sep, raw = p.partition("=")
        if not sep:
            raise ValueError(f"--param wants NAME=VALUE, got {p!r}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def _run_replay(args: argparse.Namespace) -> dict[str, Any]:
    requests = load_trace(args.trace)
    capacity, unlimited = resolve_capacity(requests, args.capacity_blocks, args.capacity_fraction)
    result = replay(
        requests,
        args.policy,
        capacity,
        block_tokens=args.block_tokens,
        policy_params=_params(args.param),
        unlimited=unlimited,
    )
    return {"benchmark": "replay", "trace": str(args.trace), **asdict(result)}


def _run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    requests = load_trace(args.trace)
    n = distinct_blocks(requests)
    policies = [p for base in args.policies for p in (base, base + PREFIX_SUFFIX)]
    rows: list[dict[str, Any]] = []
    cap, _ = resolve_capacity(requests, 0, None)
    unlimited = replay(requests, "lru", cap, block_tokens=args.block_tokens, unlimited=True)
    rows.append({"capacity_fraction": None, **asdict(unlimited)})
    for frac in args.fractions:
        cap, _ = resolve_capacity(requests, None, frac)
        for policy in policies:
            res = replay(requests, policy, cap, block_tokens=args.block_tokens)
            rows.append({"capacity_fraction": frac, **asdict(res)})
    return {
        "benchmark": "replay-matrix",
        "trace": str(args.trace),
        "distinct_blocks": n,
        "machine": machine(),
        "results": rows,
    }


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=DEFAULT_TRACE, help="JSONL trace (default: Mooncake)")
    p.add_argument(
        "--block-tokens", type=int, default=512, help="tokens per hash_id (Mooncake: 512)"
    )
    add_output_args(p)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``replay`` and ``replay-matrix`` subcommands."""
    p = subparsers.add_parser("replay", help="replay a trace through one policy")
    _common_args(p)
    p.add_argument(
        "--policy",
        default="s3fifo",
        help="lru, fifo, s3fifo, sieve, module:Class; append -prefix for the L1 prefix-aware mode",
    )
    cap = p.add_mutually_exclusive_group()
    cap.add_argument(
        "--capacity-blocks", type=int, default=None, help="cache size in blocks (0 = unlimited)"
    )
    cap.add_argument(
        "--capacity-fraction", type=float, default=None, help="share of distinct blocks"
    )
    p.add_argument(
        "--param", action="append", default=[], help="policy parameter NAME=VALUE (repeatable)"
    )
    p.set_defaults(func=_run_replay)

    m = subparsers.add_parser(
        "replay-matrix", help="replay every policy (plain and -prefix) at several capacities"
    )
    _common_args(m)
    m.add_argument("--policies", nargs="+", default=list(MATRIX_POLICIES))
    m.add_argument("--fractions", nargs="+", type=float, default=list(MATRIX_FRACTIONS))
    m.set_defaults(func=_run_matrix)
