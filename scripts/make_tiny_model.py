"""Build a tiny random model + byte-level tokenizer for tests and the demo.

There is no model hub here, so tests make their own model. With the default
init (std 0.02) greedy decoding emits the same token for every prompt, which
would hide wrong KV; we scale the weights up so different prompts (and
different KV) give different outputs.

``--arch llama`` (default, :func:`build`): a Llama. ``--arch gemma2``
(:func:`build_gemma2`): a Gemma-2 whose layers alternate sliding-window
(256 tokens) and full attention, for the sliding-window tests.

Usage: python scripts/make_tiny_model.py OUT_DIR [--arch llama|gemma2] [--layers N] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


SPECIALS = ["<s>", "</s>", "<unk>", "<pad>"]


def _built(out: Path) -> bool:
    return (out / "config.json").exists() and (out / "tokenizer.json").exists()


def _save_tokenizer(out: Path) -> dict[str, int]:
    """Save the byte-level tokenizer to ``out``; returns its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level vocabulary: 256 byte tokens + a few specials, no merges.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = SPECIALS
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    return vocab


def build(
    out: Path,
    *,
    layers: int = 2,
    seed: int = 0,
    max_positions: int = 8192,
    hidden_size: int = 128,
) -> Path:
    """Write config, weights and tokenizer of the tiny Llama to ``out``; returns ``out``.

    ``hidden_size`` (a multiple of 32) scales the compute per token: the model
    gets ``hidden_size // 32`` query heads of 32 and an MLP of
    ``2 * hidden_size``, while the KV cache per token stays the same (2 KV heads
    of 32). The default, 128, is the tiny test model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    if _built(out):
        return out
    vocab = _save_tokenizer(out)
    specials = SPECIALS
    vocab_size = len(vocab)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=max_positions,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            # Large enough that the next token depends on the context (and so
            # on the KV), small enough to stay finite (also if served in bf16).
            p.normal_(0.0, 0.15 if "embed" in name or "lm_head" in name else 0.08)
        # Special tokens get a zero logit row: the best of 256 random logits
        # is almost always positive, so generations stay in the byte vocab.
        for s in specials:
            model.lm_head.weight[vocab[s]].zero_()
    # float32: vLLM's CPU kernels give the same logprobs (within 3e-6) whether a
    # request is served alone or in any batch; in bf16 they differ by up to
    # 0.032, more than the e2e tests' tolerance (LOGPROB_ATOL in
    # tests/e2e/harness.py). scripts/measure_batch_invariance.py measures it.
    model = model.to(torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return out


SLIDING_WINDOW = 256  # tokens, of every other Gemma-2 layer
GEMMA2_EMBED_STD = 0.07  # see build_gemma2


def build_gemma2(out: Path, *, layers: int = 4, seed: int = 0, max_positions: int = 8192) -> Path:
    """Write a tiny random Gemma-2 (float32) and the byte-level tokenizer to ``out``.

    Layers alternate ``sliding_attention`` (window :data:`SLIDING_WINDOW`)
    and ``full_attention``; head_dim 64, one KV head. ``initializer_range=0.2``
    (instead of 0.02) makes greedy output depend on the prompt. The (tied)
    embedding is then redrawn with std :data:`GEMMA2_EMBED_STD`: at 0.2 the
    output logits are so large that every greedy token has logprob ~ -0.0005,
    which a 1e-3 logprob comparison can barely tell apart; at 0.07 greedy
    logprobs are ~ -2..-4, the top two tokens stay >= 0.027 apart (far above
    float32 batch noise, ~3e-6), and prompts that differ only outside the
    sliding window get different logprobs.
    """
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    if _built(out):
        return out
    vocab = _save_tokenizer(out)
    cfg = Gemma2Config(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=SLIDING_WINDOW,
        layer_types=[
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ],
        max_position_embeddings=max_positions,
        initializer_range=0.2,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, GEMMA2_EMBED_STD)
        # The embedding is tied to the output layer: a zero row gives the
        # special tokens a zero logit, so generations stay in the byte vocab.
        for s in SPECIALS:
            model.model.embed_tokens.weight[vocab[s]].zero_()
    model = model.to(torch.float32)  # see build(): batch-invariant logprobs
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", choices=["llama", "gemma2"], default="llama")
    ap.add_argument("--layers", type=int, default=None, help="default: 2 (llama), 4 (gemma2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--hidden-size", type=int, default=128, help="llama only; see build() (default: 128)"
    )
    args = ap.parse_args()
    if args.arch == "gemma2":
        print(build_gemma2(args.out, layers=args.layers or 4, seed=args.seed))
    else:
        print(
            build(args.out, layers=args.layers or 2, seed=args.seed, hidden_size=args.hidden_size)
        )


if __name__ == "__main__":
    main()
