"""Key hashing + L1 lookup time of a fully cached prompt, by prompt length.

For each prompt length and block size: the prompt is a Python list of token
ids (what vLLM hands the connector); its keys are inserted into an L1 index
first, so the lookup is a full hit. Timed separately and together:

* ``hash_ms``: :func:`chain_hashes` of the whole prompt;
* ``lookup_ms``: :meth:`L1Index.lookup` (prefix walk + policy touch of every hit);
* ``total_ms``: both, what the scheduler pays per new request.

``ns_per_token`` shows linearity: it should stay flat as the prompt grows.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from vllm_aibrix.bench._common import add_output_args, best_of, machine
from vllm_aibrix.core.keys import Namespace, chain_hashes
from vllm_aibrix.core.l1 import L1Index

DEFAULT_LENGTHS = (4096, 16384, 32768, 131072)
DEFAULT_BLOCKS = (16, 256)


def measure(tokens: int, block_size: int, policy: str, repeats: int) -> dict[str, Any]:
    """One row of the table."""
    rng = random.Random(tokens * 1000 + block_size)
    prompt = [rng.randrange(152_000) for _ in range(tokens)]
    ns = Namespace(model="bench", block_size=block_size)
    keys = chain_hashes(ns.digest, prompt, block_size)
    l1 = L1Index(len(keys) + 1, policy)
    l1.insert(keys)

    def both() -> None:
        assert l1.lookup(chain_hashes(ns.digest, prompt, block_size))[0] == len(keys)

    hash_s = best_of(lambda: chain_hashes(ns.digest, prompt, block_size), repeats)
    lookup_s = best_of(lambda: l1.lookup(keys), repeats)
    total_s = best_of(both, repeats)
    return {
        "tokens": tokens,
        "block_size": block_size,
        "blocks": len(keys),
        "hash_ms": hash_s * 1e3,
        "lookup_ms": lookup_s * 1e3,
        "total_ms": total_s * 1e3,
        "ns_per_token": total_s * 1e9 / tokens,
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    rows = [
        measure(n, b, args.policy, args.repeats) for b in args.block_sizes for n in args.lengths
    ]
    return {
        "benchmark": "keys",
        "policy": args.policy,
        "repeats": args.repeats,
        "machine": machine(),
        "results": rows,
    }


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``keys`` subcommand."""
    p = subparsers.add_parser("keys", help="hash + lookup time of a fully cached prompt")
    p.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS))
    p.add_argument("--block-sizes", nargs="+", type=int, default=list(DEFAULT_BLOCKS))
    p.add_argument("--policy", default="S3FIFO")
    p.add_argument("--repeats", type=int, default=20, help="best of this many timed runs")
    add_output_args(p)
    p.set_defaults(func=_run)
