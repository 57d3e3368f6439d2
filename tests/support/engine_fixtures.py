"""Tiny models with a real byte-level BPE tokenizer, saved as model directories, for engine tests."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

WORDS = ("the cat sat on a mat while river stone bright garden number seven equals sum of two and "
         "five apple water light story lesson small large fast slow red blue green house tree").split()
VOCAB = 384  # model vocabulary: the 320-token tokenizer (chat tokens included) fits inside it


def make_tokenizer(root: Path, chat_template: bool = True) -> Path:
    from effilm.config.data import TokenizerTrainConfig
    from effilm.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)))
    cfg = TokenizerTrainConfig(vocab_size=320) if chat_template else TokenizerTrainConfig(vocab_size=320, chat_template="")
    return train_tokenizer([corpus], root / ("tok" if chat_template else "tok-nochat"), cfg)


def add_tokenizer(model_dir: Path, tok_dir: Path) -> Path:
    for f in Path(tok_dir).iterdir():
        shutil.copy(f, Path(model_dir) / f.name)
    return Path(model_dir)


def tiny(name: str, seed: int = 0, **over):
    """A tiny preset model (float32, eval mode) with the test vocabulary."""
    from effilm.config import ModelConfig
    from effilm.models.transformer import build_model

    over.setdefault("vocab_size", VOCAB)
    return build_model(ModelConfig.from_name(name, **over), seed=seed).eval()


def assert_steps_match_forward(model, prompt: list[int], tokens=(3, 4, 5), tol: float = 1e-5, check_prefill=True):
    """effilm.inference.decode's prefill and decode steps give Transformer.forward's logits (with the
    KV cache) for ``prompt`` then each of ``tokens``."""
    import torch

    from effilm.inference.decode import decode_step, prefill

    ids = torch.tensor([prompt])
    c1, c2 = model.new_cache(1, len(prompt) + len(tokens)), model.new_cache(1, len(prompt) + len(tokens))
    with torch.inference_mode():
        first, ref = prefill(model, ids, c1, None, None), model(ids, cache=c2).logits[:, -1]
        if check_prefill:
            torch.testing.assert_close(first, ref)
        for t in tokens:
            torch.testing.assert_close(decode_step(model, torch.tensor([t]), c1, None, None),
                                       model(torch.tensor([[t]]), cache=c2).logits[:, -1], atol=tol, rtol=tol)
    assert c1.length == c2.length == len(prompt) + len(tokens)
