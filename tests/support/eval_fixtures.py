"""Tiny, seeded models, tokenizers and MMLU-format data for the evaluation tests (no network)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS = ("high_school_physics", "world_religions")
WORDS = ("energy mass force light wave atom field charge heat motion god temple prayer faith ritual "
         "scripture myth church monk saint the of a is which what how why when").split()


def make_items(subject, n, seed):
    rng = random.Random(f"{subject}-{seed}")
    items = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "?"
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        items.append({"question": q, "choices": choices, "answer": rng.randrange(4), "subject": subject})
    return items


def write_csv(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        for it in items:
            w.writerow([it["question"], *it["choices"], "ABCD"[it["answer"]]])


def make_mmlu_dir(root: Path, n_test=6, n_dev=5):
    """root/{dev,val,test}/<subject>_<split>.csv; returns (test items, dev items by subject)."""
    tests, devs = [], {}
    for s in SUBJECTS:
        dev, val, test = make_items(s, n_dev, 1), make_items(s, 2, 2), make_items(s, n_test, 3)
        write_csv(root / "dev" / f"{s}_dev.csv", dev)
        write_csv(root / "val" / f"{s}_val.csv", val)
        write_csv(root / "test" / f"{s}_test.csv", test)
        tests += test
        devs[s] = dev
    return tests, devs


def train_tokenizer(vocab_size=320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(random.Random(i).choice(WORDS) for _ in range(30)) for i in range(200)]
    corpus += ["Answer: A B C D", "The following are multiple choice questions (with answers) about"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def hf_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size, seed=0, max_positions=1024):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger logits so that the choices are told apart
        model.lm_head.weight.mul_(20.0)
    return model
