"""Keys: deterministic across processes, incremental == one-shot, namespace-sensitive."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import xxhash

from vllm_aibrix.core.keys import Namespace, PrefixHasher, chain_hashes, rank_key

TOKENS = [(i * 7919) % 151_000 for i in range(1000)]


def reference_keys(parent: bytes, tokens: list[int], block_size: int) -> list[bytes]:
    """The key definition written out independently: h_i = xxh3_128(h_{i-1} || le32 tokens)."""
    out, prev = [], parent
    for b in range(len(tokens) // block_size):
        block = tokens[b * block_size : (b + 1) * block_size]
        data = b"".join(t.to_bytes(4, "little") for t in block)
        prev = xxhash.xxh3_128_digest(prev + data)
        out.append(prev)
    return out


def test_chain_hashes_match_the_key_definition() -> None:
    ns = Namespace(model="m")
    assert chain_hashes(ns.digest, TOKENS, 16) == reference_keys(ns.digest, TOKENS, 16)


def test_list_and_numpy_inputs_give_the_same_keys() -> None:
    parent = Namespace(model="m").digest
    for dtype in (np.int64, np.int32, np.uint32):
        assert chain_hashes(parent, np.array(TOKENS, dtype=dtype), 16) == chain_hashes(
            parent, TOKENS, 16
        )


def test_partial_last_block_gets_no_key() -> None:
    assert len(chain_hashes(b"\0" * 16, TOKENS[:47], 16)) == 2


@pytest.mark.parametrize("bad", [[-1] * 16, [2**32] * 16])
def test_token_outside_uint32_is_rejected(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        chain_hashes(b"\0" * 16, bad, 16)


def test_keys_are_identical_in_a_process_with_another_hash_seed() -> None:
    code = textwrap.dedent(
        """
        from vllm_aibrix.core.keys import Namespace, chain_hashes
        ns = Namespace(model="m", lora="a", cache_salt="s")
        toks = [(i * 7919) % 151_000 for i in range(1000)]
        print(b"".join(chain_hashes(ns.digest, toks, 16)).hex())
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    ns = Namespace(model="m", lora="a", cache_salt="s")
    assert out == b"".join(chain_hashes(ns.digest, TOKENS, 16)).hex()


def test_incremental_prefix_hasher_equals_one_shot() -> None:
    ns = Namespace(model="m")
    hasher = PrefixHasher(ns.digest, 16)
    for end in (5, 16, 17, 100, 333, 1000):
        hasher.update(TOKENS[:end])
    assert hasher.keys == chain_hashes(ns.digest, TOKENS, 16)


def test_extending_from_a_parent_key_continues_the_chain() -> None:
    ns = Namespace(model="m")
    head = chain_hashes(ns.digest, TOKENS[:320], 16)
    tail = chain_hashes(head[-1], TOKENS[320:], 16)
    assert head + tail == chain_hashes(ns.digest, TOKENS, 16)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"kv_dtype": "float16"},
        {"kv_layout": "HND"},
        {"block_size": 32},
        {"tp_size": 2},
        {"model_fingerprint": "rev2"},
        {"lora": "adapter"},
        {"cache_salt": "tenant"},
        {"user_namespace": "x"},
    ],
)
def test_every_namespace_field_changes_the_keys(change: dict[str, object]) -> None:
    base = {"model": "m"}
    a = Namespace(**base)  # type: ignore[arg-type]
    b = Namespace(**{**base, **change})  # type: ignore[arg-type]
    assert a.digest != b.digest
    assert chain_hashes(a.digest, TOKENS, 16)[0] != chain_hashes(b.digest, TOKENS, 16)[0]


def test_with_salt_changes_keys_and_no_salt_keeps_them() -> None:
    ns = Namespace(model="m")
    assert ns.with_salt(None) is ns
    assert ns.with_salt("t").digest != ns.digest


def test_rank_keys_differ_per_rank() -> None:
    key = chain_hashes(Namespace(model="m").digest, TOKENS, 16)[0]
    assert rank_key(key, 0) != rank_key(key, 1)
