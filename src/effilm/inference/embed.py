"""Document features from an effilm model: mean-pooled final hidden states.

``HiddenStateFeatures(model_dir)`` is a featurizer for the quality classifier
(``effilm.data.classifier_train.train_classifier(..., hidden=...)``): each document is tokenized,
cut to ``max_tokens``, run through the model, and the final norm's output is averaged over the
document's tokens (padding excluded). The hidden states are read with a forward hook on the
model's final norm; the forward asks for no logits (``logits_at`` all False), so the LM head
costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class HiddenStateFeatures:
    kind = "hidden"

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 16, max_tokens: int = 256, device=None):
        from effilm.errors import ConfigError

        if batch_size < 1 or max_tokens < 1:
            raise ConfigError(f"batch_size ({batch_size}) and max_tokens ({max_tokens}) must be >= 1")
        self.model_dir = Path(model_dir)
        self.batch_size, self.max_tokens, self.device = batch_size, max_tokens, device
        self._model = self._tok = None

    def describe(self) -> dict:
        return {"kind": self.kind, "model": str(self.model_dir.resolve()), "pooling": "mean",
                "max_tokens": self.max_tokens}  # fmt: skip

    def _load(self):
        if self._model is None:
            from effilm.device import resolve_device
            from effilm.formats.load import load_model_and_tokenizer

            device = resolve_device(self.device or "auto")
            self._model, self._tok = load_model_and_tokenizer(self.model_dir, device=device)
            self._model.eval()
        return self._model, self._tok

    def matrix(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), hidden] float32 features."""
        import torch

        model, tok = self._load()
        dev = model.embed.weight.device
        captured: list = []
        hook = model.norm.register_forward_hook(lambda mod, inp, out: captured.append(out))
        rows = []
        try:
            with torch.no_grad():
                for s in range(0, len(texts), self.batch_size):
                    ids = [t[: self.max_tokens] or [tok.eos_id or 0] for t in tok.encode_batch(list(texts[s:s + self.batch_size]))]
                    T = max(map(len, ids))
                    x = torch.zeros(len(ids), T, dtype=torch.long)
                    mask = torch.zeros(len(ids), T, dtype=torch.bool)
                    for i, row in enumerate(ids):
                        x[i, : len(row)] = torch.tensor(row)
                        mask[i, : len(row)] = True
                    x, mask = x.to(dev), mask.to(dev)
                    captured.clear()
                    model(x, attention_mask=mask, logits_at=torch.zeros_like(mask))
                    h = captured[-1].float()
                    m = mask[..., None].float()
                    rows.append(((h * m).sum(1) / m.sum(1)).cpu().numpy())
        finally:
            hook.remove()
        if not rows:
            return np.zeros((0, model.cfg.d_model), np.float32)
        return np.concatenate(rows).astype(np.float32)
