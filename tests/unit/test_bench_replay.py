"""The trace replay benchmark agrees with an independent tiny reimplementation."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from pathlib import Path

import pytest

from vllm_aibrix.bench.__main__ import main

BLOCK = 512


def synthetic_trace(
    path: Path, n_requests: int = 300, seed: int = 7
) -> list[tuple[int, list[int]]]:
    """Requests sharing prefixes of a few conversation trees, written as JSONL."""
    rng = random.Random(seed)
    next_id = 0
    roots: list[list[int]] = []
    reqs: list[tuple[int, list[int]]] = []
    for _ in range(n_requests):
        if roots and rng.random() < 0.7:
            base = rng.choice(roots)
            ids = base[: rng.randint(1, len(base))]
        else:
            ids = []
        for _ in range(rng.randint(1, 6)):
            ids = [*ids, next_id]
            next_id += 1
        roots.append(ids)
        input_length = BLOCK * (len(ids) - 1) + rng.randint(1, BLOCK)
        reqs.append((input_length, ids))
    with path.open("w") as f:
        for t, (n, ids) in enumerate(reqs):
            f.write(
                json.dumps({"timestamp": t, "input_length": n, "output_length": 1, "hash_ids": ids})
                + "\n"
            )
    return reqs


def tiny_replay(
    reqs: list[tuple[int, list[int]]], capacity: int, fifo: bool
) -> tuple[float, float]:
    """LRU / FIFO written from the semantics in the task, sharing no code with the package."""
    cache: OrderedDict[int, None] = OrderedDict()
    tok = hit_tok = acc = hits = 0
    for n, ids in reqs:
        lead = 0
        while lead < len(ids) and ids[lead] in cache:
            lead += 1
        tok += n
        hit_tok += min(lead * BLOCK, n)
        for k in ids:
            acc += 1
            if k in cache:
                hits += 1
                if not fifo:
                    cache.move_to_end(k)
            else:
                if len(cache) >= capacity:
                    cache.popitem(last=False)
                cache[k] = None
    return hit_tok / tok, hits / acc


def run_replay(trace: Path, out: Path, *args: str) -> dict[str, float]:
    assert main(["replay", "--trace", str(trace), "--json", "--out", str(out), *args]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("policy", ["lru", "fifo"])
@pytest.mark.parametrize("capacity", [5, 40, 200])
def test_replay_matches_an_independent_reimplementation(
    tmp_path: Path, policy: str, capacity: int
) -> None:
    reqs = synthetic_trace(tmp_path / "t.jsonl")
    got = run_replay(
        tmp_path / "t.jsonl",
        tmp_path / "o.json",
        "--policy",
        policy,
        "--capacity-blocks",
        str(capacity),
    )
    token_ratio, block_ratio = tiny_replay(reqs, capacity, fifo=policy == "fifo")
    assert got["prefix_token_hit_ratio"] == pytest.approx(token_ratio, abs=1e-12)
    assert got["block_hit_ratio"] == pytest.approx(block_ratio, abs=1e-12)
    assert got["block_accesses_per_s"] > 0


def test_unlimited_capacity_counts_every_reuse(tmp_path: Path) -> None:
    reqs = synthetic_trace(tmp_path / "t.jsonl")
    got = run_replay(tmp_path / "t.jsonl", tmp_path / "o.json", "--capacity-blocks", "0")
    token_ratio, block_ratio = tiny_replay(reqs, capacity=10**9, fifo=False)
    assert got["unlimited"] is True
    assert got["prefix_token_hit_ratio"] == pytest.approx(token_ratio, abs=1e-12)
    assert got["block_hit_ratio"] == pytest.approx(block_ratio, abs=1e-12)


def test_prefix_variant_runs_and_never_beats_unlimited(tmp_path: Path) -> None:
    synthetic_trace(tmp_path / "t.jsonl")
    unlimited = run_replay(tmp_path / "t.jsonl", tmp_path / "u.json", "--capacity-blocks", "0")
    got = run_replay(
        tmp_path / "t.jsonl",
        tmp_path / "o.json",
        "--policy",
        "s3fifo-prefix",
        "--capacity-fraction",
        "0.1",
    )
    assert 0.0 < got["prefix_token_hit_ratio"] <= unlimited["prefix_token_hit_ratio"]
