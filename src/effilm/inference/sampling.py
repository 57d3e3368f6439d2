"""Sampling parameters and the per-step logits pipeline of the generation engine.

The order follows transformers' ``generate``: repetition penalty (CTRL / HF definition: a seen
token's positive logit is divided by the penalty, a negative one multiplied), then temperature,
top-k and top-p (nucleus). Each row of a batch has its own parameters and, when seeded, its own
``torch.Generator``, so a seeded sequence samples the same tokens whether it runs alone or batched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from effilm.errors import ConfigError


@dataclass
class SamplingParams:
    """How one sequence is decoded. Validation raises ``ConfigError`` naming the field."""

    max_new_tokens: int = field(default=64, metadata={"help": "Most tokens to generate (>= 1)."})
    temperature: float = field(default=0.0, metadata={"help": "Softmax temperature; 0 means greedy."})
    top_k: int = field(default=0, metadata={"help": "Keep only the k most likely tokens; 0 = off."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1 = off."})
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "CTRL penalty (> 0) on tokens already in the prompt or output; 1 = off."}
    )
    seed: int | None = field(default=None, metadata={"help": "Seed of this sequence's own generator (None: global RNG)."})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "Stop strings; not included in the returned text."})

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"{name} {rule}, got {getattr(self, name)!r}")

        for name in ("max_new_tokens", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise bad(name, "must be a number")
            setattr(self, name, float(v))
        if self.max_new_tokens < 1:
            raise bad("max_new_tokens", "must be >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class LogitsPipeline:
    """Turns next-token logits [B, V] into chosen tokens [B] for a batch of ``SamplingParams``.

    Tensors of per-row parameters are built once; each ``step`` runs a handful of batched ops. A
    pipeline whose rows are all greedy with no penalty is a single ``argmax``.
    """

    def __init__(self, params: list[SamplingParams], vocab_size: int, device, prompts: list[list[int]]):
        self.params = params
        B = len(params)
        self.all_greedy = all(p.greedy for p in params)
        self.penalize = any(p.repetition_penalty != 1.0 for p in params)
        self.sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if self.penalize:
            self.penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
            self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
            for i, ids in enumerate(prompts):
                if ids:
                    self.seen[i, torch.tensor(ids, device=device)] = True
        if self.sample_rows:
            temps = [p.temperature if not p.greedy else 1.0 for p in params]
            self.temperature = torch.tensor(temps, device=device)[:, None]
            self.top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device)[:, None]
            self.top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
            self.truncate = any(p.top_k or p.top_p < 1.0 for p in params)
            self.generators = [
                torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in params
            ]

    def select(self, rows: list[int]) -> None:
        """Keep only these rows (in this order): the engine drops finished sequences from the batch."""
        idx = torch.tensor(rows, dtype=torch.long)
        self.params = [self.params[r] for r in rows]
        self.sample_rows = [i for i, p in enumerate(self.params) if not p.greedy]
        if self.penalize:
            idx = idx.to(self.seen.device)
            self.penalty, self.seen = self.penalty[idx], self.seen[idx]
        if hasattr(self, "generators"):
            idx = idx.to(self.temperature.device)
            self.temperature, self.top_k, self.top_p = self.temperature[idx], self.top_k[idx], self.top_p[idx]
            self.generators = [self.generators[r] for r in rows]

    def observe(self, tokens: torch.Tensor) -> None:
        """Record the tokens just chosen (for the repetition penalty)."""
        if self.penalize:
            self.seen.scatter_(1, tokens[:, None], True)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits after the penalty, temperature and top-k / top-p masking (-inf), as float32.
        Greedy rows get the penalty only (truncation always keeps the best token anyway)."""
        logits = logits.float()
        if self.penalize:
            penalized = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
            logits = torch.where(self.seen, penalized, logits)
        if not self.sample_rows:
            return logits
        scaled = logits / self.temperature
        return self._truncate(scaled) if self.truncate else scaled

    def step(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row, [B] int64 (on the logits' device; no host sync here)."""
        scores = self.process(logits)
        chosen = scores.argmax(dim=-1)
        if not self.sample_rows:
            return chosen
        probs = torch.softmax(scores, dim=-1)
        for i in self.sample_rows:
            chosen[i] = torch.multinomial(probs[i], 1, generator=self.generators[i])[0]
        return chosen

    def _truncate(self, scaled: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p over what is left, by masking to -inf (always keeps the best token)."""
        sorted_vals, sorted_idx = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
        drop = rank >= self.top_k
        sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
        probs = torch.softmax(sorted_vals, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop = drop | (mass_before >= self.top_p)
        drop[:, 0] = False
        mask = torch.zeros_like(drop).scatter_(1, sorted_idx, drop)
        return scaled.masked_fill(mask, float("-inf"))
