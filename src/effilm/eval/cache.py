"""KV-cache scoring for effilm models.

For each question the shared context runs once (a batch of one, so nothing is padded), its KV
cache is copied into one row per choice, and all the choices run as one batch from the same start
position. The first token of every choice is read from the context's last logits; each later
token from the choice's own row. Choices are right-padded: with causal attention a real position
never sees the padding after it, and every batch holds exactly one question's choices whatever
``batch_size`` is, so scores do not depend on the batch size.

Consecutive questions share a long prompt prefix (the description and the few-shot examples of
their subject). The previous question's context cache is kept, and when the next context starts
with at least ``min_shared_prefix`` of the same tokens, those keys and values are copied instead
of recomputed: only the question itself runs.

A group falls back to :class:`effilm.eval.scoring.BatchScorer` when the cache cannot give the same
numbers as the uncached path: context plus continuation longer than the model's context (the
uncached path truncates from the left), an empty context or continuation, or LongRoPE past its
original length (whose frequencies depend on the whole sequence's length, which a prefill does
not know yet).
"""

from __future__ import annotations

from effilm.eval.scoring import BatchScorer, Group


def supports_kv_cache(model) -> bool:
    """An effilm Transformer (``new_cache`` and a ``cache=`` forward)."""
    return callable(getattr(model, "new_cache", None)) and hasattr(model, "cfg")


class CachedScorer(BatchScorer):
    """Scorer for effilm models: the KV-cache path where it is exact, else batched rows."""

    def __init__(self, model, batch_size: int = 8, max_length: int = 2048, pad_id: int = 0,
                 min_shared_prefix: int = 16):
        if not supports_kv_cache(model):
            raise TypeError(f"{type(model).__name__} has no KV cache (new_cache); use BatchScorer")
        super().__init__(model, batch_size, max_length, pad_id)
        self.min_shared_prefix = min_shared_prefix  # 0 turns prefix sharing off
        self.cached_groups = 0
        self.shared_tokens = 0  # context tokens copied from the previous question's cache
        self._prefix_ids: list[int] = []
        self._prefix = None

    def cacheable(self, g: Group) -> bool:
        conts = g.continuations
        if not g.context or not conts or any(not c for c in conts):
            return False
        total = len(g.context) + max(len(c) for c in conts) - 1  # positions held in the cache
        if total > self.max_length:
            return False
        cfg = self.model.cfg
        return not (cfg.rope_type == "longrope" and total > cfg.rope_original_max_seq_len)

    def score(self, groups: list[Group]) -> list[list[float]]:
        self._prefix_ids, self._prefix = [], None  # weights may have changed since the last call
        use = [self.cacheable(g) for g in groups]
        rest = [g for g, u in zip(groups, use, strict=True) if not u]
        rest_scores = iter(super().score(rest) if rest else [])
        out = [self._score_group(g) if u else next(rest_scores) for g, u in zip(groups, use, strict=True)]
        self._prefix_ids, self._prefix = [], None
        return out

    def _score_group(self, g: Group) -> list[float]:
        import torch

        model = self.model
        device = model.embed.weight.device
        conts = g.continuations
        width = max(len(c) for c in conts) - 1
        lc = len(g.context)
        with torch.inference_mode():
            cache = model.new_cache(1, lc)
            shared = self._shared_prefix(g.context)
            if shared:
                for layer in range(len(cache.k)):
                    cache.k[layer][:, :, :shared] = self._prefix.k[layer][:, :, :shared]
                    cache.v[layer][:, :, :shared] = self._prefix.v[layer][:, :, :shared]
                cache.length = shared
                self.shared_tokens += shared
            ctx = torch.tensor([g.context[shared:]], dtype=torch.long, device=device)
            last = model(ctx, cache=cache).logits[0, -1]
            self._prefix_ids, self._prefix = g.context, cache
            first_lp = torch.log_softmax(last.float(), dim=-1)
            scores = [float(first_lp[c[0]]) for c in conts]
            self.forward_rows += 1
            if width:
                rows = model.new_cache(len(conts), lc + width)
                for layer in range(len(rows.k)):
                    rows.k[layer][:, :, :lc] = cache.k[layer][:, :, :lc]
                    rows.v[layer][:, :, :lc] = cache.v[layer][:, :, :lc]
                rows.length = lc
                ids = torch.full((len(conts), width), self.pad_id, dtype=torch.long)
                b_idx, p_idx, tgt = [], [], []
                for b, c in enumerate(conts):
                    if len(c) > 1:
                        ids[b, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                    for k in range(1, len(c)):
                        b_idx.append(b)
                        p_idx.append(k - 1)
                        tgt.append(c[k])
                logits = model(ids.to(device), cache=rows).logits
                sel = logits[torch.tensor(b_idx, device=device), torch.tensor(p_idx, device=device)].float()
                lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tgt, device=device)[:, None])[:, 0]
                for b, v in zip(b_idx, lp.double().cpu().tolist(), strict=True):
                    scores[b] += v
                self.forward_rows += len(conts)
        self.cached_groups += 1
        return scores

    def _shared_prefix(self, context: list[int]) -> int:
        """Leading tokens of ``context`` whose keys and values the kept cache already holds (at
        least one token is left to run, for the last position's logits)."""
        if self._prefix is None or not self.min_shared_prefix:
            return 0
        limit = min(len(self._prefix_ids), len(context) - 1)
        n = 0
        while n < limit and self._prefix_ids[n] == context[n]:
            n += 1
        return n if n >= self.min_shared_prefix else 0
