"""Quality filters for synthetic and web text, each reported with counts and examples.

Filters run in a fixed order and a record is rejected by the first that fails it:

* ``empty``: no text after stripping whitespace;
* ``truncated``: the generator stopped on its token limit (``finish_reason == "length"`` in the
  provenance), or, when ``require_end_punctuation`` is on, the text does not end a sentence;
* ``boilerplate``: the text opens with a stock phrase ("Once upon a time", "As an AI"...);
* ``length``: fewer than ``min_words`` or more than ``max_words`` words;
* ``repetition``: the fraction of word n-grams that repeat an earlier n-gram of the same text;
* ``non_alpha``: the fraction of non-space characters that are not letters.

Rejected records go to ``rejects.jsonl`` with the filter and the measured value; none is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from effilm.data.inputs import expand_inputs, iter_records
from effilm.errors import ConfigError
from effilm.io import atomic_open, atomic_write_json
from effilm.outputs import claim_dir, claim_file, mark

FILTERS = ("empty", "truncated", "boilerplate", "length", "repetition", "non_alpha")
DEFAULT_OPENINGS = [
    "once upon a time", "as an ai", "as a language model", "sure, here", "sure! here", "certainly!",
    "certainly, here", "in today's fast-paced world", "in the realm of", "here is a", "here's a",
]


@dataclass
class FilterConfig:
    min_words: int = field(default=20, metadata={"help": "fewest words a record may have"})
    max_words: int = field(default=20_000, metadata={"help": "most words a record may have"})
    repeat_ngram: int = field(default=3, metadata={"help": "n of the word n-grams checked for repetition"})
    max_repeated_fraction: float = field(default=0.3, metadata={"help": "largest share of repeated n-grams"})
    max_non_alpha_fraction: float = field(default=0.5, metadata={"help": "largest share of non-letter characters"})
    boilerplate_openings: list[str] = field(default_factory=lambda: list(DEFAULT_OPENINGS),
                                            metadata={"help": "stock openings rejected (case-insensitive)"})
    require_end_punctuation: bool = field(default=False, metadata={"help": "treat text not ending a sentence as truncated"})
    end_punctuation: str = field(default=".!?\"')]`", metadata={"help": "characters that end a complete text"})
    disabled: list[str] = field(default_factory=list, metadata={"help": f"filters to skip, from {list(FILTERS)}"})
    text_field: str = field(default="text", metadata={"help": "record field holding the text"})
    max_examples: int = field(default=3, metadata={"help": "examples kept per filter in the report"})
    example_chars: int = field(default=160, metadata={"help": "characters quoted per example"})

    def __post_init__(self):
        for name in ("min_words", "max_words", "repeat_ngram"):
            if getattr(self, name) < (0 if name == "min_words" else 1):
                raise ConfigError(f"filters.{name} is out of range: {getattr(self, name)}")
        if self.min_words > self.max_words:
            raise ConfigError(f"filters.min_words ({self.min_words}) exceeds max_words ({self.max_words})")
        for name in ("max_repeated_fraction", "max_non_alpha_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"filters.{name} must be in [0, 1], got {getattr(self, name)}")
        bad = [f for f in self.disabled if f not in FILTERS]
        if bad:
            raise ConfigError(f"filters.disabled: unknown filter(s) {bad}; choose from {list(FILTERS)}")
        self.boilerplate_openings = [o.lower() for o in self.boilerplate_openings]


def repeated_fraction(words: list[str], n: int) -> float:
    """The share of word n-grams that repeat an earlier one (n-grams held as hashes: bounded
    memory for a huge record)."""
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    seen = {hash(tuple(words[i:i + n])) for i in range(total)}
    return 1.0 - len(seen) / total


def non_alpha_fraction(text: str) -> float:
    """The share of non-space characters that are not letters (counted, not listed)."""
    nonspace = len(text) - sum(map(str.isspace, text))
    return (nonspace - sum(map(str.isalpha, text))) / nonspace if nonspace else 0.0


def check(rec: dict, cfg: FilterConfig) -> tuple[str, object] | None:
    """The first filter ``rec`` fails, with the measured value; None when it passes all."""
    text = rec.get(cfg.text_field)
    if not isinstance(text, str):
        return "empty", None
    on = [f for f in FILTERS if f not in cfg.disabled]
    stripped = text.strip()
    if "empty" in on and not stripped:
        return "empty", 0
    if "truncated" in on:
        finish = (rec.get("provenance") or {}).get("finish_reason")
        if finish == "length":
            return "truncated", "finish_reason=length"
        if cfg.require_end_punctuation and stripped and stripped[-1] not in cfg.end_punctuation:
            return "truncated", stripped[-20:]
    if "boilerplate" in on:
        head = stripped[:80].lower()
        for opening in cfg.boilerplate_openings:
            if head.startswith(opening):
                return "boilerplate", opening
    words = stripped.lower().split()
    if "length" in on and not cfg.min_words <= len(words) <= cfg.max_words:
        return "length", len(words)
    if "repetition" in on:
        r = repeated_fraction(words, cfg.repeat_ngram)
        if r > cfg.max_repeated_fraction:
            return "repetition", round(r, 4)
    if "non_alpha" in on:
        r = non_alpha_fraction(stripped)
        if r > cfg.max_non_alpha_fraction:
            return "non_alpha", round(r, 4)
    return None


def apply_filters(records: Iterable[tuple[str, dict]], cfg: FilterConfig) -> Iterator[tuple[str, dict, tuple | None]]:
    for where, rec in records:
        yield where, rec, check(rec, cfg)


def filter_files(inputs, out_dir, report_path, cfg: FilterConfig | None = None, overwrite: bool = False) -> dict:
    """Filter ``inputs`` into ``out_dir`` (kept.jsonl, rejects.jsonl) and write the report."""
    cfg = cfg or FilterConfig()
    files = expand_inputs(inputs)
    out = claim_dir(out_dir, "filter", sources=files, overwrite=overwrite)
    claim_file(report_path, inputs=files, what="--report")
    per = {f: {"rejected": 0, "examples": []} for f in FILTERS}
    n = kept = 0
    with atomic_open(out / "kept.jsonl") as fk, atomic_open(out / "rejects.jsonl") as fr:
        for where, rec, verdict in apply_filters(iter_records(files, cfg.text_field), cfg):
            n += 1
            if verdict is None:
                kept += 1
                fk.write(json.dumps(rec, ensure_ascii=False) + "\n")
                continue
            name, value = verdict
            fr.write(json.dumps({**rec, "_rejected": {"filter": name, "value": value}}, ensure_ascii=False) + "\n")
            slot = per[name]
            slot["rejected"] += 1
            if len(slot["examples"]) < cfg.max_examples:
                slot["examples"].append({"id": rec.get("id", where), "value": value,
                                         "text": rec[cfg.text_field][: cfg.example_chars]})
    report = {"summary": {"input_records": n, "kept": kept, "rejected": n - kept,
                          **{f"rejected_{k}": v["rejected"] for k, v in per.items()}},
              "filters": per, "config": asdict(cfg),
              "outputs": {"kept": str(out / "kept.jsonl"), "rejects": str(out / "rejects.jsonl")}}
    mark(out, "filter")
    atomic_write_json(report_path, report)
    return report
