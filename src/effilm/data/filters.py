"""Quality filters for synthetic and web text, each reported with counts and examples.

Filters run in a fixed order and a record is rejected by the first that fails it:

* ``empty``: no text after stripping whitespace;
* ``truncated``: the generator stopped on its token limit (``finish_reason == "length"`` in the
  provenance), or, when ``require_end_punctuation`` is on, the text does not end a sentence;
* ``boilerplate``: the text opens with a stock phrase ("Once upon a time", "As an AI"...);
* ``length``: fewer than ``min_words`` or more than ``max_words`` words;
* ``repetition``: the fraction of word n-grams that repeat an earlier n-gram of the same text;
* ``non_alpha``: the fraction of non-space characters that are not letters;
* ``classifier`` (with ``classifier = DIR``): a learned quality classifier
  (:mod:`effilm.data.classifier`) scores what the heuristics kept, in batches, and rejects a
  document whose rounded score is below ``threshold`` (default: the classifier's own). A text
  with no words is rejected as ``empty``.

Rejected records go to ``rejects.jsonl`` with the filter and the measured value; none is dropped.
With ``workers > 1`` batches of records are checked in worker processes (at most two batches per
worker in flight, so memory stays bounded) and written in input order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from effilm.data.inputs import expand_inputs, iter_records
from effilm.errors import ConfigError, EffilmError
from effilm.io import atomic_open, atomic_write_json
from effilm.outputs import claim_dir, claim_file, mark

FILTERS = ("empty", "truncated", "boilerplate", "length", "repetition", "non_alpha", "classifier")
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
    classifier: str = field(default="", metadata={"help": "quality classifier directory (effilm classifier train); "
                                                          "'' = heuristics only"})
    threshold: float | None = field(default=None, metadata={
        "help": "keep a document when its rounded classifier score is at least this (default: the classifier's)"})
    score_field: str = field(default="", metadata={"help": "record field that gets each kept record's classifier "
                                                           "score ('' = none)"})
    workers: int = field(default=1, metadata={"help": "worker processes checking batches of records"})
    batch_records: int = field(default=2000, metadata={"help": "records per batch handed to a worker"})

    def __post_init__(self):
        if self.workers < 1 or self.batch_records < 1:
            raise ConfigError(f"filters.workers ({self.workers}) and batch_records ({self.batch_records}) must be >= 1")
        if self.threshold is not None and not self.classifier:
            raise ConfigError("filters.threshold needs a classifier (--classifier DIR)")
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


_WORKER: dict = {}


def _open_classifier(cfg: FilterConfig):
    """The classifier ``cfg`` names and the threshold to apply (checked against its scale)."""
    from effilm.data.classifier import load_classifier

    clf = load_classifier(cfg.classifier)
    if clf.features.get("kind") != "ngram":
        raise EffilmError(f"{cfg.classifier}: a {clf.features.get('kind')!r}-feature classifier; effilm filter runs "
                          "n-gram classifiers (score hidden-state ones from Python with load_classifier)")  # fmt: skip
    threshold = clf.threshold if cfg.threshold is None else clf.check_threshold(cfg.threshold)
    return clf, threshold


def _init_worker(cfg: FilterConfig) -> None:
    _WORKER["cfg"] = cfg
    _WORKER["clf"] = _open_classifier(cfg) if cfg.classifier and "classifier" not in cfg.disabled else None


def check_batch(recs: list[dict], cfg: FilterConfig, clf=None) -> list[tuple[tuple | None, float | None]]:
    """``(verdict, score)`` of each record: the heuristics, then the classifier (``(classifier,
    threshold)`` or None) on the records they kept, in one vectorised call."""
    out = [(check(rec, cfg), None) for rec in recs]
    if clf is None:
        return out
    from effilm.data.classifier import keep

    model, threshold = clf
    idx = [i for i, (v, _) in enumerate(out) if v is None]
    if not idx:
        return out
    scores, words = model.predict([recs[i][cfg.text_field] for i in idx])
    kept = keep(scores, threshold)
    for j, i in enumerate(idx):
        score = round(float(scores[j]), 4)
        if words is not None and words[j] == 0:
            out[i] = (("empty", 0), None)
        elif not kept[j]:
            out[i] = (("classifier", score), score)
        else:
            out[i] = (None, score)
    return out


def _worker_batch(recs: list[dict]):
    return check_batch(recs, _WORKER["cfg"], _WORKER["clf"])


def _batches(records: Iterable[tuple[str, dict]], size: int):
    batch: list = []
    for item in records:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _checked(records: Iterable[tuple[str, dict]], cfg: FilterConfig, clf):
    """``(where, rec, verdict, score)`` in input order, from this process or ``cfg.workers`` workers."""
    if cfg.workers == 1:
        for batch in _batches(records, cfg.batch_records):
            for (where, rec), (verdict, score) in zip(batch, check_batch([r for _, r in batch], cfg, clf)):
                yield where, rec, verdict, score
        return
    import multiprocessing as mp
    from collections import deque

    with mp.get_context("spawn").Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        pending: deque = deque()
        for batch in _batches(records, cfg.batch_records):
            pending.append((batch, pool.apply_async(_worker_batch, ([r for _, r in batch],))))
            while len(pending) > 2 * cfg.workers:
                yield from _drain(pending.popleft())
        while pending:
            yield from _drain(pending.popleft())


def _drain(item):
    batch, result = item
    for (where, rec), (verdict, score) in zip(batch, result.get()):
        yield where, rec, verdict, score


def filter_files(inputs, out_dir, report_path, cfg: FilterConfig | None = None, overwrite: bool = False) -> dict:
    """Filter ``inputs`` into ``out_dir`` (kept.jsonl, rejects.jsonl) and write the report."""
    cfg = cfg or FilterConfig()
    files = expand_inputs(inputs)
    clf = _open_classifier(cfg) if cfg.classifier and "classifier" not in cfg.disabled else None
    out = claim_dir(out_dir, "filter", sources=files, overwrite=overwrite)
    claim_file(report_path, inputs=files, what="--report")
    per = {f: {"rejected": 0, "examples": []} for f in FILTERS}
    scored = ScoreLog(cfg, clf)
    n = kept = 0
    with atomic_open(out / "kept.jsonl") as fk, atomic_open(out / "rejects.jsonl") as fr:
        for where, rec, verdict, score in _checked(iter_records(files, cfg.text_field), cfg, clf):
            n += 1
            scored.add(where, rec, verdict, score)
            if verdict is None:
                kept += 1
                if cfg.score_field and score is not None:
                    rec = {**rec, cfg.score_field: score}
                fk.write(json.dumps(rec, ensure_ascii=False) + "\n")
                continue
            name, value = verdict
            why = {"filter": name, "value": value}
            if name == "classifier":
                why["threshold"] = clf[1]
            fr.write(json.dumps({**rec, "_rejected": why}, ensure_ascii=False) + "\n")
            slot = per[name]
            slot["rejected"] += 1
            if len(slot["examples"]) < cfg.max_examples:
                slot["examples"].append({"id": rec.get("id", where), "value": value,
                                         "text": rec[cfg.text_field][: cfg.example_chars]})
    report = {"summary": {"input_records": n, "kept": kept, "rejected": n - kept,
                          **{f"rejected_{k}": v["rejected"] for k, v in per.items()}},
              "filters": per, "config": asdict(cfg),
              "outputs": {"kept": str(out / "kept.jsonl"), "rejects": str(out / "rejects.jsonl")}}
    if clf is not None:
        report["classifier"] = scored.report()
    mark(out, "filter")
    atomic_write_json(report_path, report)
    return report


class ScoreLog:
    """What the classifier did: its scores' histogram, and the highest- and lowest-scored documents."""

    def __init__(self, cfg: FilterConfig, clf):
        self.cfg, self.clf = cfg, clf
        self.hist: dict[int, int] = {}
        self.total = 0.0
        self.count = 0
        self.high: list = []
        self.low: list = []

    def add(self, where: str, rec: dict, verdict, score) -> None:
        if score is None:
            return
        import heapq

        self.count += 1
        self.total += score
        b = int(score + 0.5)
        self.hist[b] = self.hist.get(b, 0) + 1
        item = (score, self.count, where, rec)
        k = self.cfg.max_examples
        (heapq.heappush if len(self.high) < k else heapq.heappushpop)(self.high, item)
        neg = (-score, self.count, where, rec)
        (heapq.heappush if len(self.low) < k else heapq.heappushpop)(self.low, neg)

    def _example(self, score, where, rec) -> dict:
        return {"id": rec.get("id", where), "score": score, "text": rec[self.cfg.text_field][: self.cfg.example_chars]}

    def report(self) -> dict:
        model, threshold = self.clf
        return {"dir": self.cfg.classifier, "threshold": threshold, "scale": list(model.scale),
                "rule": "kept when the score rounded to a whole number is at least the threshold",
                "scored": self.count, "mean_score": round(self.total / self.count, 4) if self.count else None,
                "histogram": {str(k): v for k, v in sorted(self.hist.items())},
                "highest": [self._example(s, w, r) for s, _, w, r in sorted(self.high, reverse=True)],
                "lowest": [self._example(-s, w, r) for s, _, w, r in sorted(self.low, reverse=True)]}
