"""The record format shared by every backend: ``id``, ``text``, provenance and token counts."""

from __future__ import annotations

import re

TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens in ``text``: a ``tokenizers.Tokenizer`` when given, else a word/punctuation count."""
    if tokenizer is not None:
        return len(tokenizer.encode(text).ids)
    return len(TOKEN_RE.findall(text))


def make_record(
    rec_id: str,
    text: str,
    *,
    backend: str,
    model: str | None,
    prompt: str | None,
    topic: str,
    audience: str,
    style: str,
    kind: str,
    injected_words: list[str],
    seed: int | str,
    sampling: dict,
    prompt_tokens: int | None = None,
    extra: dict | None = None,
    tokenizer=None,
) -> dict:
    """One JSONL record. ``extra`` holds backend-specific provenance (facts taught, usage...)."""
    provenance = {
        "backend": backend, "model": model, "prompt": prompt, "topic": topic, "audience": audience,
        "style": style, "kind": kind, "injected_words": list(injected_words), "seed": seed,
        "sampling": dict(sampling),
    }
    if extra:
        provenance.update(extra)
    tokens = {"text": count_tokens(text, tokenizer)}
    if prompt_tokens is not None:
        tokens["prompt"] = prompt_tokens
    elif prompt is not None:
        tokens["prompt"] = count_tokens(prompt, tokenizer)
    tokens["counter"] = "tokenizer" if tokenizer is not None else "regex"
    return {"id": rec_id, "text": text, "provenance": provenance, "n_tokens": tokens}
