"""Build a tiny random Llama model + byte-level tokenizer for tests and the demo.

There is no model hub here, so tests make their own model. With the default
init (std 0.02) greedy decoding emits the same token for every prompt, which
would hide wrong KV; we scale the weights up so different prompts (and
different KV) give different outputs.

Usage: python scripts/make_tiny_model.py OUT_DIR [--layers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build(out: Path, *, layers: int = 2, seed: int = 0, max_positions: int = 8192) -> Path:
    """Write config, weights and tokenizer to ``out``; returns ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out

    # Byte-level vocabulary: 256 byte tokens + a few specials, no merges.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<s>", "</s>", "<unk>", "<pad>"]
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

    vocab_size = len(vocab)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build(args.out, layers=args.layers, seed=args.seed))


if __name__ == "__main__":
    main()
