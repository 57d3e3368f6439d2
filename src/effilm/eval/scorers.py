"""Scorers: the summed log-likelihood of each continuation after its context.

``BatchScorer`` runs right-padded batched forward passes (any model, transformers' included);
``CachedScorer`` is the KV-cache path for effilm models. ``make_scorer`` picks one.

KV-cache scoring: for each question the shared context runs once (a batch of one, so nothing is padded), its KV
cache is copied into one row per choice, and all the choices run as one batch from the same start
position. The first token of every choice is read from the context's last logits; each later
token from the choice's own row. Choices are right-padded: with causal attention a real position
never sees the padding after it, and every batch holds exactly one question's choices whatever
``batch_size`` is, so scores do not depend on the batch size.

Consecutive questions share a long prompt prefix (the description and the few-shot examples of
their subject). The previous question's context cache is kept, and when the next context starts
with at least ``min_shared_prefix`` of the same tokens, those keys and values are copied instead
of recomputed: only the question itself runs.

A group falls back to :class:`BatchScorer` when the cache cannot give the same
numbers as the uncached path: context plus continuation longer than the model's context (the
uncached path truncates from the left), an empty context or continuation, or LongRoPE past its
original length (whose frequencies depend on the whole sequence's length, which a prefill does
not know yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from effilm.errors import ConfigError, EffilmError


@dataclass
class Group:
    """One question: a context and the continuations to score after it."""

    context: list[int]
    continuations: list[list[int]]


class Scorer(Protocol):
    def score(self, groups: list[Group]) -> list[list[float]]:
        """Per group, the summed log-likelihood of each continuation."""
        ...


def model_positions(model) -> int | None:
    """The context length the model's config names, if it names one."""
    conf = getattr(model, "config", None)
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "max_seq_length"):
        val = getattr(conf, name, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def model_max_length(model, cfg) -> int:
    """``cfg.max_length`` (refused beyond the model's positions, as ``generate`` refuses it), else
    the model's own context, else ``cfg.default_max_length``."""
    limit = model_positions(model)
    if cfg.max_length:
        if limit and cfg.max_length > limit:
            raise ConfigError(f"max_length={cfg.max_length} exceeds the model's {limit} positions; use at most {limit}")
        return cfg.max_length
    return limit or cfg.default_max_length


class BatchScorer:
    """Right-padded batched forward passes; shared-context rows for single-token choices."""

    def __init__(self, model, batch_size: int = 8, max_length: int = 2048, pad_id: int = 0):
        self.model, self.batch_size, self.max_length, self.pad_id = model, batch_size, max_length, pad_id
        self.forward_rows = 0
        self.keep_arg = _logits_to_keep_arg(model)

    def _forward(self, ids, keep: int):
        """Logits of the last ``keep`` positions (all positions where the model cannot skip any)."""
        if self.keep_arg and keep < ids.shape[1]:
            logits = self.model(ids, **{self.keep_arg: keep}).logits
            if logits.shape[1] == keep:
                return logits, ids.shape[1] - keep
        return self.model(ids).logits, 0

    def _rows(self, groups: list[Group]):
        rows = []  # (input ids, [(group, choice, target ids)])
        for gi, g in enumerate(groups):
            if g.continuations and all(len(c) == 1 for c in g.continuations):
                inp = (g.context + g.continuations[0])[-(self.max_length + 1):][:-1]
                rows.append((inp, [(gi, ci, c) for ci, c in enumerate(g.continuations)]))
                continue
            for ci, cont in enumerate(g.continuations):
                if not cont:
                    raise EffilmError("a continuation encodes to no tokens; cannot score it")
                if len(cont) > self.max_length:
                    raise EffilmError(f"a continuation of {len(cont)} tokens exceeds the context {self.max_length}")
                inp = (g.context + cont)[-(self.max_length + 1):][:-1]
                rows.append((inp, [(gi, ci, cont)]))
        return rows

    def score(self, groups: list[Group]) -> list[list[float]]:
        import torch

        out = [[0.0] * len(g.continuations) for g in groups]
        rows = self._rows(groups)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        device = next(iter(self.model.parameters())).device
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = [rows[i] for i in order[start : start + self.batch_size]]
                width = max(len(r[0]) for r in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                b_idx, p_idx, tgt, owner = [], [], [], []
                for b, (inp, targets) in enumerate(batch):
                    ids[b, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                    for gi, ci, cont in targets:
                        first = len(inp) - len(cont)
                        for k, tok in enumerate(cont):
                            b_idx.append(b)
                            p_idx.append(first + k)
                            tgt.append(tok)
                            owner.append((gi, ci))
                logits, shift = self._forward(ids.to(device), width - min(p_idx))
                pos = torch.tensor(p_idx, device=device) - shift
                sel = logits[torch.tensor(b_idx, device=device), pos].float()
                lp = torch.log_softmax(sel, dim=-1).gather(1, torch.tensor(tgt, device=device)[:, None])[:, 0]
                for (gi, ci), v in zip(owner, lp.double().cpu().tolist(), strict=True):
                    out[gi][ci] += v
                self.forward_rows += len(batch)
        return out


def make_scorer(model, cfg) -> Scorer:
    """The KV-cache scorer for effilm models (unless ``cfg.use_kv_cache`` is off), else batched rows.
    ``cfg`` is an :class:`effilm.eval.scoring.EvalConfig`."""
    args = (model, cfg.batch_size, model_max_length(model, cfg), cfg.pad_id)
    if cfg.use_kv_cache and supports_kv_cache(model):
        return CachedScorer(*args, min_shared_prefix=cfg.min_shared_prefix)
    return BatchScorer(*args)


def _logits_to_keep_arg(model) -> str | None:
    """The forward argument that limits the LM head to the last positions, if the model has one
    (transformers' ``logits_to_keep``). Only the positions that are scored are ever needed."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return name
    return None


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
