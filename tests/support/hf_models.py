"""Tiny random Hugging Face models, built locally with transformers, for parity tests."""

from __future__ import annotations

import torch

PHI3_SHORT = [1.0 + 0.05 * i for i in range(8)]
PHI3_LONG = [1.5 + 0.5 * i for i in range(8)]


def build_hf(kind: str, **over):
    """A tiny random transformers model of ``kind`` with seeded weights (some biases non-zero)."""
    import transformers as tf

    torch.manual_seed(over.pop("seed", 0))
    common = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    common.update(over)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "phi3":
        cfg = tf.Phi3Config(**common)
        model = tf.Phi3ForCausalLM(cfg)
    elif kind == "mixtral":
        common.setdefault("num_local_experts", 4)
        cfg = tf.MixtralConfig(**common)
        model = tf.MixtralForCausalLM(cfg)
    elif kind == "phimoe":
        common.setdefault("num_local_experts", 4)
        cfg = tf.PhimoeConfig(**common)
        model = tf.PhimoeForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # random, non-trivial values everywhere (norm weights and biases too)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif "router" in name or "gate.weight" in name:
                p.normal_(0.0, 0.5)
    return model.eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits
