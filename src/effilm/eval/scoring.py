"""Scoring: lm-evaluation-harness's MMLU letter method, cloze scoring and perplexity.

Works with any causal LM whose ``model(input_ids)`` returns an object with ``.logits`` [B, T, V]
(effilm models and HF models alike) and any tokenizer the :class:`TokenizerAdapter` wraps.

Tokenisation follows the harness's HF backend (``HFLM._encode_pair``): trailing spaces of the
context move to the continuation, the context is encoded alone, ``context + continuation`` is
encoded whole, and the continuation's tokens are the whole encoding past the context's length.
The model input is ``(context_ids + continuation_ids)[-(max_length + 1):][:-1]`` and a
continuation's log-likelihood is the sum of its tokens' log-probabilities.

Efficiency: when every choice of a question is one token after the context (the usual letter
case) the context runs once and all choices are read from its last position. Otherwise each
choice is its own row. Rows are sorted by length, batched and right-padded; with a causal model
the real positions never see the padding, so scores do not depend on the batch size. A
model-specific scorer plugs in through the :class:`Scorer` protocol; effilm models get
:class:`effilm.eval.scorers.CachedScorer` (the context once per question, the choices from its KV
cache) by default.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from effilm.errors import ConfigError, EffilmError
from effilm.eval.scorers import BatchScorer, Group, Scorer, make_scorer, model_max_length
from effilm.eval.tasks import LETTERS, Item, Task

SCORINGS = ("letter", "cloze")
LETTER_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
CLOZE_DESCRIPTION = "The following are questions (with answers) about {subject}.\n\n"


@dataclass
class EvalConfig:
    shots: int = field(default=5, metadata={"help": "few-shot examples from the dev split (harness MMLU: 5)"})
    scoring: str = field(default="letter", metadata={"help": "letter (harness MMLU) or cloze (answer texts)"})
    batch_size: int = field(default=8, metadata={"help": "rows per forward pass"})
    max_length: int = field(default=0, metadata={"help": "context length; 0 reads the model config"})
    default_max_length: int = field(default=2048, metadata={"help": "context length when the model names none"})
    seed: int = field(default=1234, metadata={"help": "torch seed, recorded in the manifest"})
    add_special_tokens: bool = field(default=False, metadata={"help": "let the tokenizer add BOS/EOS (harness: off)"})
    pad_id: int = field(default=0, metadata={"help": "token id used for right padding (never scored)"})
    fewshot_delimiter: str = field(default="\n\n", metadata={"help": "text between few-shot examples"})
    target_delimiter: str = field(default=" ", metadata={"help": "text between 'Answer:' and the answer"})
    ppl_stride: int = field(default=0, metadata={"help": "perplexity: tokens scored per window after the first; "
                                                 "each window sees up to max_length tokens of context "
                                                 "(0: disjoint windows, as lm-eval's rolling log-likelihood)"})
    use_kv_cache: bool = field(default=True, metadata={"help": "effilm models: score the choices from the "
                                                       "context's KV cache (same numbers, less compute)"})
    max_new_tokens: int = field(default=32, metadata={"help": "chat tasks: most tokens generated per answer "
                                                       "(greedy; the answer ends at the end-of-turn token)"})
    max_gen_toks: int = field(default=256, metadata={"help": "gsm8k tasks: most tokens generated per answer "
                                                    "(lm-eval's default, 256)"})
    min_shared_prefix: int = field(default=16, metadata={"help": "KV-cache path: reuse the previous question's "
                                                         "cache when contexts share at least this many leading "
                                                         "tokens (few-shot prompts); 0 = off"})

    def __post_init__(self):
        if self.shots < 0:
            raise ConfigError(f"shots: must be >= 0, got {self.shots}")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring: must be one of {', '.join(SCORINGS)}, got {self.scoring!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.max_gen_toks, bool) or not isinstance(self.max_gen_toks, int) or self.max_gen_toks < 1:
            raise ConfigError(f"max_gen_toks: must be an integer >= 1, got {self.max_gen_toks!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.min_shared_prefix < 0:
            raise ConfigError(f"min_shared_prefix: must be >= 0 (0 = off), got {self.min_shared_prefix}")
        if self.ppl_stride < 0:
            raise ConfigError(f"ppl_stride: must be >= 0 (0 = disjoint windows), got {self.ppl_stride}")
        if self.max_length < 0 or self.default_max_length < 1:
            raise ConfigError("max_length: must be >= 0 (0 = from the model), default_max_length >= 1")


class TokenizerAdapter:
    """``encode(text) -> list[int]`` over a ``tokenizers.Tokenizer`` or a transformers tokenizer."""

    def __init__(self, tok, add_special_tokens: bool = False):
        if isinstance(tok, TokenizerAdapter):
            tok = tok.effilm or tok.tok
        # an effilm.data.tokenizer.Tokenizer: its tokenizers backend, and the special ids it resolved
        self.effilm = tok if hasattr(tok, "backend") and hasattr(tok, "eos_id") else None
        if self.effilm is not None:
            tok = self.effilm.backend
        self.tok = tok
        self.add_special_tokens = add_special_tokens
        self._is_fast_lib = type(tok).__module__.startswith("tokenizers")
        if not self._is_fast_lib and not hasattr(tok, "encode"):
            raise EffilmError(f"unsupported tokenizer type {type(tok).__name__}: needs an encode() method")

    def encode(self, text: str) -> list[int]:
        if self._is_fast_lib:
            return list(self.tok.encode(text, add_special_tokens=self.add_special_tokens).ids)
        return list(self.tok.encode(text, add_special_tokens=self.add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def special_id(self, *names: str) -> int | None:
        """The id of the first special token that exists among ``names`` (e.g. bos, eos)."""
        for name in names:
            if self.effilm is not None:
                tid = getattr(self.effilm, f"{name}_id", None)
                if tid is not None:
                    return int(tid)
                continue
            if not self._is_fast_lib:
                tid = getattr(self.tok, f"{name}_token_id", None)
                if tid is not None:
                    return int(tid)
            else:
                for text in {"bos": ("<s>", "<|begin_of_text|>", "<bos>"),
                             "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")}[name]:
                    tid = self.tok.token_to_id(text)
                    if tid is not None:
                        return int(tid)
        return None

    def fingerprint(self) -> str:
        raw = self.tok.to_str() if self._is_fast_lib else getattr(self.tok, "backend_tokenizer", None)
        if raw is not None and not isinstance(raw, str):
            raw = raw.to_str()
        return hashlib.sha256((raw or repr(self.tok)).encode()).hexdigest()


def encode_pair(tok: TokenizerAdapter, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation tokens, split the way the harness's HF backend splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


# ----------------------------------------------------------------------------- prompts


def subject_text(subject: str) -> str:
    return subject.replace("_", " ")


def format_question(item: Item, scoring: str) -> str:
    if scoring == "letter":
        lines = [item.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
        return "\n".join(lines) + "\nAnswer:"
    return f"Question: {item.question.strip()}\nAnswer:"


def choice_texts(item: Item, scoring: str) -> list[str]:
    return list(LETTERS[: len(item.choices)]) if scoring == "letter" else list(item.choices)


def build_context(task: Task, item: Item, cfg: EvalConfig) -> str:
    """Description, K few-shot examples (the dev split's first K for the subject), the question."""
    desc = (LETTER_DESCRIPTION if cfg.scoring == "letter" else CLOZE_DESCRIPTION).format(
        subject=subject_text(item.subject))
    shots = []
    if cfg.shots:
        pool = task.dev.get(item.subject, [])
        if len(pool) < cfg.shots:  # never fewer shots than asked without saying so
            have = f"only {len(pool)}" if pool else "no"
            raise EffilmError(f"task {task.name}: {have} dev examples for subject {item.subject!r}, but --shots "
                              f"{cfg.shots} asks for {cfg.shots}; use --shots {len(pool)} or give a larger "
                              "dev=PATH in the spec")  # fmt: skip
        for ex in pool[: cfg.shots]:
            target = choice_texts(ex, cfg.scoring)[ex.answer]
            shots.append(format_question(ex, cfg.scoring) + cfg.target_delimiter + target)
    return desc + "".join(s + cfg.fewshot_delimiter for s in shots) + format_question(item, cfg.scoring)


def prompt_format(cfg: EvalConfig) -> dict:
    return {
        "scoring": cfg.scoring,
        "description": LETTER_DESCRIPTION if cfg.scoring == "letter" else CLOZE_DESCRIPTION,
        "question": ("{question}\\nA. {choice0}\\nB. ...\\nAnswer:" if cfg.scoring == "letter"
                     else "Question: {question}\\nAnswer:"),
        "continuations": "' A', ' B', ..." if cfg.scoring == "letter" else "' ' + choice text",
        "shots": cfg.shots,
        "fewshot_source": "dev split, first K items of the same subject",
        "fewshot_delimiter": cfg.fewshot_delimiter,
        "target_delimiter": cfg.target_delimiter,
        "tokenisation": "lm-eval HFLM._encode_pair (encode whole, split at context length)",
        "acc_norm": "log-likelihood / len(choice text) in characters" if cfg.scoring == "cloze" else None,
    }


# ----------------------------------------------------------------------------- scoring


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def score_task(model, tokenizer, task: Task, cfg: EvalConfig, scorer: Scorer | None = None) -> list[dict]:
    """Per-item records: prompt hash, choice log-likelihoods, predictions and correctness."""
    tok = TokenizerAdapter(tokenizer, cfg.add_special_tokens)
    scorer = scorer or make_scorer(model, cfg)
    groups, contexts = [], []
    for item in task.items:
        ctx = build_context(task, item, cfg)
        enc = [encode_pair(tok, ctx, cfg.target_delimiter + t) for t in choice_texts(item, cfg.scoring)]
        groups.append(Group(enc[0][0], [c for _, c in enc]))
        contexts.append(ctx)
    lls = scorer.score(groups)
    records = []
    for item, ctx, ll in zip(task.items, contexts, lls, strict=True):
        pred = max(range(len(ll)), key=lambda i: (ll[i], -i))  # first maximum, as numpy argmax
        rec = {"id": item.uid, "subject": item.subject, "source": item.source, "prompt_hash": prompt_hash(ctx),
               "loglikelihoods": ll, "answer": item.answer, "prediction": pred, "correct": pred == item.answer}
        if cfg.scoring == "cloze":
            norm = [v / max(len(t), 1) for v, t in zip(ll, item.choices, strict=True)]
            pn = max(range(len(norm)), key=lambda i: (norm[i], -i))
            rec.update(prediction_norm=pn, correct_norm=pn == item.answer)
        records.append(rec)
    return records


def perplexity(model, tokenizer, texts: list[str], cfg: EvalConfig) -> dict:
    """Bits per byte and token perplexity on held-out text, over windows of the model's context.

    With ``cfg.ppl_stride == 0`` each document is scored in disjoint windows of ``max_length``
    tokens, as lm-eval's rolling log-likelihood does. With a stride ``s``, the first window scores
    its ``max_length`` tokens and every later window scores the next ``s`` tokens, seeing up to
    ``max_length`` tokens before each (a sliding window: more context per token, more compute).
    The first token is predicted from the tokenizer's BOS (else EOS) token; with neither, it is not
    scored and its bytes are not counted. Windows run batched (sorted by length, right-padded:
    padding sits after every scored position, so it changes nothing).
    Bits per byte = total NLL / ln 2 / UTF-8 bytes scored.
    """
    tok = TokenizerAdapter(tokenizer, cfg.add_special_tokens)
    max_len = model_max_length(model, cfg)
    stride = min(cfg.ppl_stride or max_len, max_len)
    prefix = tok.special_id("bos", "eos")
    groups, n_bytes, n_tokens, unscored, n_docs = [], 0, 0, 0, 0
    for text in texts:
        ids = tok.encode(text)
        if not ids:
            continue
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        if prefix is None:
            n_bytes -= len(tok.decode(ids[:1]).encode("utf-8"))
            stream, unscored = ids, unscored + 1
        else:
            stream = [prefix] + ids
        start, end = 1, min(1 + max_len, len(stream))
        while start < len(stream):
            ctx_from = start - 1 if stride == max_len else max(0, end - 1 - max_len)
            groups.append(Group(stream[ctx_from:start], [stream[start:end]]))
            n_tokens += end - start
            start, end = end, min(end + stride, len(stream))
    if not groups:
        raise EffilmError("perplexity: the text holds no tokens")
    scorer = BatchScorer(model, cfg.batch_size, max_len, cfg.pad_id)
    nll = -sum(g[0] for g in scorer.score(groups))
    method = "disjoint chunked windows" if stride == max_len else f"sliding windows, stride {stride}"
    return {"bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "perplexity": math.exp(nll / n_tokens),
            "nll": nll, "tokens": n_tokens, "bytes": n_bytes, "documents": n_docs,
            "unscored_first_tokens": unscored, "windows": len(groups), "window_tokens": max_len,
            "stride": stride, "method": method}
