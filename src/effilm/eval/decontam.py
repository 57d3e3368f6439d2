"""Benchmark contamination: hashed n-gram index, streamed corpus scan, Cosmopedia-style confirmation.

Both sides are normalised the same way: lowercase, apostrophes dropped, every other punctuation
or symbol character turned into a space, whitespace folded. Words are hashed with a polynomial
hash computed for a whole batch of documents at once in numpy (uint64, wrapping), and n-grams of
word hashes likewise, so the per-document Python cost is nil. The index holds the n-grams of every
item's question-plus-correct-answer (which contains all of the question's n-grams) as a sorted
uint64 array behind a one-hash Bloom bit array: a lookup costs O(1) for the ~all n-grams that miss,
so the scan speed does not depend on the number of benchmark items. An item shorter than ``n``
words (question + answer), but at least ``min_words`` long, is indexed by its ``min_words``-grams,
which the scan hashes as one extra gram length; shorter items are reported as unchecked.

A document n-gram found in the index makes a *candidate* (document, item). It is confirmed by the
fraction of the item's normalised text that ``difflib`` finds in a window of the document around
the hits, computed for the question alone and for question + answer; a candidate is confirmed when
the larger reaches ``confirm_threshold`` (Cosmopedia: more than half). Shared boilerplate makes
candidates that fail this test and are counted as rejected, not flagged.

Templated benchmarks. Items made from one template share most of their n-grams, so a document
that leaks one of them is a candidate for every *template-mate*, and its text matches each mate's
template words well beyond the threshold. So an item's **distinguishing words** decide as well:
its *mates* are the items that share at least one indexed n-gram with it, and its distinguishing
words are the words of its question that fewer than half of its mates' questions contain (the
entity, the numbers), or, when the questions are the same, of its answer. A candidate is confirmed
only if every distinguishing word also stands among the words the hits cover, widened by
``slot_words`` either side: where the item's own words would be if this were the item. A mate's
hits cover the shared template, next to which the leaked item's entity stands, not the mate's.
A document that reuses the template for an entity not in the benchmark fails the same way, and
plain prose stating an answer makes no candidate at all.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

import numpy as np

from effilm.errors import ConfigError, EffilmError

# Characters that separate words (besides ASCII non-alphanumerics): Latin-1 punctuation and
# symbols, general punctuation, CJK punctuation. Apostrophes are deleted, not separators.
_SEP_RANGES = ((0x80, 0xBF), (0x2000, 0x206F), (0x3000, 0x303F))
_APOSTROPHES = (0x27, 0x2019)
_NONWORD_RE = re.compile("[^a-z0-9\u00c0-\U0010ffff]|[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in _SEP_RANGES[1:]) + "]")
_APOS_RE = re.compile("['\u2019]")

_U64 = np.uint64
_BASE_CHAR = _U64(0x100000001B3)  # odd multipliers: invertible mod 2**64
_BASE_WORD = _U64(0x9E3779B97F4A7C15)
_MIX = _U64(0xBF58476D1CE4E5B9)


@dataclass
class DecontamConfig:
    n: int = field(default=13, metadata={"help": "n-gram length in words (GPT-3 / lm-eval: 13)"})
    min_words: int = field(default=8, metadata={"help": "items shorter than n words but at least this long are "
                                                "matched by their min_words-grams; shorter ones are reported unchecked (0: off)"})
    confirm_threshold: float = field(default=0.5, metadata={"help": "matched fraction of the item text that confirms"})
    window_words: int = field(default=0, metadata={"help": "words of context around hits for confirmation; 0 = item length"})
    slot_words: int = field(default=3, metadata={"help": "an item's distinguishing words (the words its template-mates "
                                                 "lack) must stand within this many words of its n-gram hits; -1 = "
                                                 "do not check them"})
    margin_chars: int = field(default=200, metadata={"help": "characters cut either side of a hit (GPT-3: 200)"})
    max_pieces: int = field(default=10, metadata={"help": "a document cut into more pieces is dropped (GPT-3: 10)"})
    min_piece_chars: int = field(default=200, metadata={"help": "pieces shorter than this are removed (GPT-3: 200)"})
    mode: str = field(default="cut", metadata={"help": "clean-out mode: cut (GPT-3) or drop (whole documents)"})
    text_field: str = field(default="text", metadata={"help": "JSONL field holding the document text"})
    id_field: str = field(default="id", metadata={"help": "JSONL field holding the document id (else its line)"})
    batch_chars: int = field(default=1 << 22, metadata={"help": "characters hashed per numpy batch"})
    bloom_log2: int = field(default=25, metadata={"help": "log2 of the Bloom filter's bit count"})
    piece_separator: str = field(default=" ", metadata={"help": "text joining the pieces left after a cut"})
    workers: int = field(default=1, metadata={"help": "corpus files scanned at once, each in its own process"})

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1, got {self.n}")
        if not 0.0 < self.confirm_threshold <= 1.0:
            raise ConfigError(f"confirm_threshold: must be in (0, 1], got {self.confirm_threshold}")
        if self.mode not in ("cut", "drop"):
            raise ConfigError(f"mode: must be cut or drop, got {self.mode!r}")
        if self.slot_words < -1:
            raise ConfigError(f"slot_words: must be >= 0, or -1 to skip the distinguishing-words check, got {self.slot_words}")
        for name in ("margin_chars", "max_pieces", "min_piece_chars", "window_words", "min_words"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
        if not 10 <= self.bloom_log2 <= 34:
            raise ConfigError(f"bloom_log2: must be in 10..34, got {self.bloom_log2}")
        if self.batch_chars < 1:
            raise ConfigError("batch_chars: must be >= 1")
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")


def normalize(text: str) -> str:
    """Lowercase, drop apostrophes, punctuation to spaces, whitespace folded (the index's view)."""
    return " ".join(_NONWORD_RE.sub(" ", _APOS_RE.sub("", _lower(text))).split())


def _lower(text: str) -> str:
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)  # keep offsets 1:1


class _Powers:
    """Cached powers of a base and of its inverse modulo 2**64."""

    def __init__(self, base: np.uint64):
        self.base = int(base)
        self.inv = pow(self.base, -1, 1 << 64)
        self.p = np.ones(1, _U64)
        self.ip = np.ones(1, _U64)

    def get(self, n: int):
        if len(self.p) < n:
            m = max(n, 2 * len(self.p))
            self.p = np.cumprod(np.full(m, self.base, _U64)) * _U64(self.inv)  # base**i, i = 0..m-1
            self.ip = np.cumprod(np.full(m, self.inv, _U64)) * _U64(self.base)
        return self.p[:n], self.ip[:n]


_CHAR_POW = _Powers(_BASE_CHAR)
_WORD_POW = _Powers(_BASE_WORD)
# Character classes for code points below _LUT_TOP (all above are word characters):
# 0 separator, 1 word character, 2 apostrophe (deleted).
_LUT_TOP = max(hi for _, hi in _SEP_RANGES) + 1
_CLASS = np.ones(_LUT_TOP + 1, np.uint8)
_CLASS[:128] = 0
_CLASS[[ord(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]] = 1
for _lo, _hi in _SEP_RANGES:
    _CLASS[_lo : _hi + 1] = 0
_CLASS[list(_APOSTROPHES)] = 2


@dataclass
class Hashed:
    """The word-level view of a batch of texts."""

    word_start: np.ndarray  # char offset (in the joined batch) where each word starts
    word_end: np.ndarray  # char offset one past each word's end
    word_doc: np.ndarray  # which text each word belongs to
    doc_offset: np.ndarray  # char offset of each text in the joined batch
    grams: np.ndarray  # hash of the n-gram starting at each word (valid where gram_ok)
    gram_ok: np.ndarray  # the n-gram lies inside one text
    prefix: np.ndarray  # polynomial prefix sums of the word hashes, for other gram lengths

    def grams_of(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of the ``length``-word grams at each word, and whether each lies inside one text."""
        nw = len(self.word_doc)
        if nw < length:
            return np.zeros(0, _U64), np.zeros(0, bool)
        _, iqw = _WORD_POW.get(nw + 1)
        grams = (self.prefix[length:] - self.prefix[:-length]) * iqw[: nw - length + 1]
        return grams, self.word_doc[: nw - length + 1] == self.word_doc[length - 1 :]


def hash_batch(texts: list[str], n: int) -> Hashed:
    """Word and n-gram hashes for many texts at once; offsets are in original characters."""
    lengths = np.fromiter((len(t) + 1 for t in texts), np.int64, len(texts))
    doc_offset = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(texts) else np.zeros(0, np.int64)
    joined = "\n".join(_lower(t) for t in texts)
    codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cls = _CLASS[np.minimum(codes, _LUT_TOP)]
    apos = cls == 2
    if apos.any():
        keep = ~apos
        pos = np.flatnonzero(keep)
        codes, cls = codes[keep], cls[keep]
    else:
        pos = np.arange(len(codes))
    edges = np.diff(cls.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    pw, ipw = _CHAR_POW.get(len(codes) + 1)
    prefix = np.zeros(len(codes) + 1, _U64)
    np.cumsum(codes.astype(_U64) * pw[: len(codes)], out=prefix[1:])
    wh = (prefix[ends] - prefix[starts]) * ipw[starts]
    wh = (wh ^ (wh >> _U64(31))) * _MIX
    wh ^= wh >> _U64(29)
    w_start = pos[starts] if len(starts) else np.zeros(0, np.int64)
    w_end = pos[ends - 1] + 1 if len(ends) else np.zeros(0, np.int64)
    w_doc = np.searchsorted(doc_offset, w_start, side="right") - 1
    nw = len(wh)
    qw, _ = _WORD_POW.get(nw + 1)
    q = np.zeros(nw + 1, _U64)
    np.cumsum(wh * qw[:nw], out=q[1:])
    h = Hashed(w_start, w_end, w_doc, doc_offset, np.zeros(0, _U64), np.zeros(0, bool), q)
    h.grams, h.gram_ok = h.grams_of(n)
    return h


@dataclass
class BenchItem:
    benchmark: int
    uid: str
    question: str
    answer: str


class NgramIndex:
    """Sorted uint64 n-gram keys with item ids, behind a Bloom bit array."""

    def __init__(self, items: list[BenchItem], cfg: DecontamConfig):
        self.items, self.cfg = items, cfg
        texts = [f"{it.question} {it.answer}" for it in items]
        h = hash_batch(texts, cfg.n)
        valid = np.flatnonzero(h.gram_ok)
        keys, owners = [h.grams[valid]], [h.word_doc[valid]]
        # Items shorter than n words (but at least min_words) are indexed by their min_words-grams:
        # one extra gram length for the scan, whatever the mix of item lengths.
        words = np.bincount(h.word_doc, minlength=len(items))
        short = (words < cfg.n) & (words >= cfg.min_words) & (cfg.min_words > 0)
        self.short_lengths = [cfg.min_words] if short.any() else []
        if short.any():
            grams, ok = h.grams_of(cfg.min_words)
            sel = np.flatnonzero(ok & short[h.word_doc[: len(ok)]])
            keys.append(grams[sel])
            owners.append(h.word_doc[sel])
        keys, owners = np.concatenate(keys), np.concatenate(owners)
        order = np.lexsort((owners, keys))  # by key, then item; drop repeated (key, item) pairs
        keys, owners = keys[order], owners[order]
        first = np.ones(len(keys), bool)
        first[1:] = (keys[1:] != keys[:-1]) | (owners[1:] != owners[:-1])
        self.keys, self.owner = keys[first], owners[first].astype(np.int64)
        self.checked = np.zeros(len(items), bool)
        self.checked[np.unique(self.owner)] = True
        self.bits = np.zeros(1 << max(cfg.bloom_log2 - 6, 0), _U64)
        b = self.keys >> _U64(64 - cfg.bloom_log2)
        np.bitwise_or.at(self.bits, (b >> _U64(6)).astype(np.int64), _U64(1) << (b & _U64(63)))
        _CHAR_POW.get(cfg.batch_chars + 1)  # warm the power tables outside the timed scan
        self._norm: dict[int, tuple[str, str]] = {}
        self._by_item = np.argsort(self.owner, kind="stable")  # positions of each item's keys, by item
        self._item_start = np.searchsorted(self.owner[self._by_item], np.arange(len(items) + 1))
        self._distinct: dict[int, frozenset[str]] = {}
        self._wordsets: dict[int, tuple[set[str], set[str]]] = {}

    def normalized(self, item: int) -> tuple[str, str]:
        """(question, question + answer) normalised, computed on first use for candidates only."""
        if item not in self._norm:
            it = self.items[item]
            self._norm[item] = (normalize(it.question), normalize(f"{it.question} {it.answer}"))
        return self._norm[item]

    def mates(self, item: int) -> np.ndarray:
        """The other items that share at least one indexed n-gram with ``item``."""
        mine = self.keys[self._by_item[self._item_start[item] : self._item_start[item + 1]]]
        lo = np.searchsorted(self.keys, mine, side="left")
        hi = np.searchsorted(self.keys, mine, side="right")
        shared = [self.owner[a:z] for a, z in zip(lo.tolist(), hi.tolist(), strict=True) if z - a > 1]
        return np.setdiff1d(np.concatenate(shared), [item]) if shared else np.zeros(0, np.int64)

    def distinguishing(self, item: int) -> frozenset[str]:
        """The words that tell ``item`` from its template-mates (see the module docstring):
        question words fewer than half of the mates' questions have, else such answer words."""
        if item not in self._distinct:
            mates = self.mates(item)
            words = frozenset()
            if len(mates):
                for part in (0, 1):  # the question, then (same questions) the answer
                    own = self._words(item)[part]
                    counts = dict.fromkeys(own, 0)
                    for m in mates.tolist():
                        for w in own & self._words(m)[part]:
                            counts[w] += 1
                    words = frozenset(w for w, c in counts.items() if 2 * c < len(mates))
                    if words:
                        break
            self._distinct[item] = words
        return self._distinct[item]

    def _words(self, item: int) -> tuple[set[str], set[str]]:
        """The item's question words and answer words, from its normalised texts."""
        if item not in self._wordsets:
            q, qa = (s.split() for s in self.normalized(item))
            self._wordsets[item] = (set(q), set(qa[len(q):]))
        return self._wordsets[item]

    def lookup(self, grams: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
        """(word position, item) for every gram found in the index."""
        if not len(grams) or not len(self.keys):
            return []
        b = grams >> _U64(64 - self.cfg.bloom_log2)
        maybe = ((self.bits[(b >> _U64(6)).astype(np.int64)] >> (b & _U64(63))) & _U64(1)).astype(bool) & ok
        cand = np.flatnonzero(maybe)
        if not len(cand):
            return []
        lo = np.searchsorted(self.keys, grams[cand], side="left")
        hi = np.searchsorted(self.keys, grams[cand], side="right")
        out = []
        for c, a, z in zip(cand[hi > lo].tolist(), lo[hi > lo].tolist(), hi[hi > lo].tolist(), strict=True):
            out.extend((c, int(i)) for i in self.owner[a:z])
        return out


def matched_fraction(item_norm: str, window_norm: str) -> float:
    """Fraction of the item's normalised characters that difflib matches inside the window."""
    if not item_norm:
        return 0.0
    sm = difflib.SequenceMatcher(None, item_norm, window_norm, autojunk=False)
    return sum(b.size for b in sm.get_matching_blocks()) / len(item_norm)


def _merge(spans: list[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


LONG_SCAN_CHARS = 1 << 20  # a text longer than this is scanned in overlapping pieces (bounded memory)
SCAN_OVERLAP_CHARS = 1 << 16  # each piece is scanned with this much of the text before it (n-grams, context)


def scan_texts(texts: list[str], index: NgramIndex) -> list[list[dict]]:
    """Per text, the candidate matches: item, matched spans (char offsets) and confirmation. Texts
    longer than ``LONG_SCAN_CHARS`` are scanned piece by piece (see :func:`_scan_long`)."""
    long = [i for i, t in enumerate(texts) if len(t) > LONG_SCAN_CHARS]
    if not long:
        return _scan(texts, index)
    out: list[list[dict]] = [[] for _ in texts]
    short = [i for i in range(len(texts)) if i not in set(long)]
    for i, found in zip(short, _scan([texts[i] for i in short], index) if short else [], strict=True):
        out[i] = found
    for i in long:
        out[i] = _scan_long(texts[i], index)
    return out


def _scan_long(text: str, index: NgramIndex) -> list[dict]:
    """One long text, scanned in pieces cut before words, each with ``SCAN_OVERLAP_CHARS`` of the
    text before it (from a word start), so n-grams across a cut and the confirmation context are
    seen; an item found in several pieces is one match (spans merged, the best score kept)."""
    from effilm.data.inputs import word_boundaries_cut

    merged: dict[int, dict] = {}
    for start, piece in word_boundaries_cut(text, LONG_SCAN_CHARS):
        lo = max(0, start - SCAN_OVERLAP_CHARS)
        if lo:
            space = text.find(" ", lo, start)
            lo = space + 1 if space >= 0 else start
        for m in _scan([text[lo : start + len(piece)]], index)[0]:
            spans = [[s + lo, e + lo] for s, e in m["spans"]]
            prev = merged.get(m["index"])
            if prev is None:
                merged[m["index"]] = {**m, "spans": spans}
                continue
            prev["spans"] = _merge(prev["spans"] + spans)
            for key in ("score_question", "score_question_answer", "score"):
                prev[key] = max(prev[key], m[key])
            prev["confirmed"] = prev["confirmed"] or m["confirmed"]
    return [merged[k] for k in sorted(merged)]


def _scan(texts: list[str], index: NgramIndex) -> list[list[dict]]:
    cfg = index.cfg
    h = hash_batch(texts, cfg.n)
    per_doc: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for length in [cfg.n, *index.short_lengths]:
        grams, ok = (h.grams, h.gram_ok) if length == cfg.n else h.grams_of(length)
        for w, item in index.lookup(grams, ok):
            per_doc.setdefault((int(h.word_doc[w]), item), []).append((w, length))
    out: list[list[dict]] = [[] for _ in texts]
    for (d, item), hits in sorted(per_doc.items()):
        off = int(h.doc_offset[d])
        spans = _merge([(int(h.word_start[w]) - off, int(h.word_end[w + k - 1]) - off) for w, k in hits])
        norm_q, qa = index.normalized(item)
        pad = cfg.window_words or len(qa.split())
        first, last = min(w for w, _ in hits), max(w + k - 1 for w, k in hits)
        lo_w = max(first - pad, int(np.searchsorted(h.word_doc, d, side="left")))
        hi_w = min(last + pad, int(np.searchsorted(h.word_doc, d, side="right")) - 1)
        window = normalize(texts[d][int(h.word_start[lo_w]) - off : int(h.word_end[hi_w]) - off])
        s_q, s_qa = matched_fraction(norm_q, window), matched_fraction(qa, window)
        it = index.items[item]
        missing: list[str] = []
        if cfg.slot_words >= 0 and max(s_q, s_qa) >= cfg.confirm_threshold:
            distinct = index.distinguishing(item)
            if distinct:
                lo_s = max(first - cfg.slot_words, int(np.searchsorted(h.word_doc, d, side="left")))
                hi_s = min(last + cfg.slot_words, int(np.searchsorted(h.word_doc, d, side="right")) - 1)
                slot = set(normalize(texts[d][int(h.word_start[lo_s]) - off : int(h.word_end[hi_s]) - off]).split())
                missing = sorted(distinct - slot)
        entry = {"benchmark": it.benchmark, "item": it.uid, "index": item, "spans": spans,
                 "score_question": round(s_q, 4), "score_question_answer": round(s_qa, 4),
                 "score": round(max(s_q, s_qa), 4),
                 "confirmed": max(s_q, s_qa) >= cfg.confirm_threshold and not missing}
        if missing:
            entry["missing_distinguishing_words"] = missing  # a template-mate's, or a reused template's, hit
        out[d].append(entry)
    return out


def clean_text(text: str, matches: list[dict], cfg: DecontamConfig) -> tuple[str | None, list[dict]]:
    """GPT-3 cut (or whole-document drop) of the confirmed hits; returns (new text or None, removals)."""
    spans = [s for m in matches if m["confirmed"] for s in m["spans"]]
    if not spans:
        return text, []
    items = sorted({m["item"] for m in matches if m["confirmed"]})
    if cfg.mode == "drop":
        return None, [{"start": 0, "end": len(text), "text": text, "items": items, "reason": "document dropped"}]
    cuts = _merge([(max(0, s - cfg.margin_chars), min(len(text), e + cfg.margin_chars)) for s, e in spans])
    removals = [{"start": s, "end": e, "text": text[s:e], "items": items, "reason": "hit with margin"} for s, e in cuts]
    bounds = [0] + [x for s, e in cuts for x in (s, e)] + [len(text)]
    pieces = [(bounds[i], bounds[i + 1]) for i in range(0, len(bounds), 2) if bounds[i + 1] > bounds[i]]
    if len(pieces) > cfg.max_pieces:
        return None, [{"start": 0, "end": len(text), "text": text, "items": items,
                       "reason": f"cut into {len(pieces)} pieces > {cfg.max_pieces}: document dropped"}]
    kept = []
    for s, e in pieces:
        if e - s < cfg.min_piece_chars:
            removals.append({"start": s, "end": e, "text": text[s:e], "items": items,
                             "reason": f"piece shorter than {cfg.min_piece_chars} chars"})
        else:
            kept.append(text[s:e])
    if not kept:
        return None, removals
    return cfg.piece_separator.join(kept), sorted(removals, key=lambda r: r["start"])


def items_from_tasks(tasks) -> list[BenchItem]:
    items = []
    for b, task in enumerate(tasks):
        for it in task.entries:
            items.append(BenchItem(b, it.uid, it.question, it.answer_text))
    if not items:
        raise EffilmError("decontam: the benchmarks hold no items")
    return items
