"""Deduplication: exact (hash of normalised text) then near-duplicate (MinHash LSH, datasketch).

Normalisation lowercases, strips accents, maps digits to 0 and punctuation to space, and folds
whitespace. Near duplicates are found with MinHash over word n-grams (5 by default) and an LSH
index of 14 bands x 8 rows, which catches pairs above roughly (1/14)^(1/8) ~ 0.72 Jaccard.

Records stream through: the first of each cluster is kept (``OUT/kept.jsonl``), later members go
to ``OUT/removed.jsonl`` tagged with the id they duplicate. Only the LSH index (and, with a
``threshold``, the kept signatures) stays in memory.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from effilm.data.inputs import expand_inputs, iter_records, word_boundaries_cut
from effilm.errors import ConfigError, EffilmError
from effilm.io import atomic_open, atomic_write_json
from effilm.outputs import claim_dir, claim_file, mark

_PUNCT = re.compile(r"[^\w\s]|_", re.UNICODE)
_DIGIT = re.compile(r"\d", re.UNICODE)
_WS = re.compile(r"\s+", re.UNICODE)


@dataclass
class DedupConfig:
    num_bands: int = field(default=14, metadata={"help": "LSH bands"})
    rows_per_band: int = field(default=8, metadata={"help": "MinHash rows per band"})
    ngram: int = field(default=5, metadata={"help": "word n-gram size of the shingles"})
    threshold: float = field(default=0.0, metadata={"help": "also require estimated Jaccard >= this (0: off)"})
    seed: int = field(default=1, metadata={"help": "MinHash permutation seed"})
    text_field: str = field(default="text", metadata={"help": "record field holding the text"})
    max_examples_chars: int = field(default=160, metadata={"help": "characters of text quoted in the report"})

    def __post_init__(self):
        for name in ("num_bands", "rows_per_band", "ngram"):
            if getattr(self, name) < 1:
                raise ConfigError(f"dedup.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold must be in [0, 1], got {self.threshold}")

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band


PIECE_CHARS = 1 << 18  # long texts are normalized and shingled in pieces of about this many characters


def normalize(text: str) -> str:
    """Lowercase, strip accents, digits to 0, punctuation to space, whitespace folded. A long text
    is normalized piece by piece (cut before words), so memory stays bounded whatever its size."""
    if len(text) <= PIECE_CHARS:
        return _normalize(text)
    return " ".join(n for _, piece in word_boundaries_cut(text, PIECE_CHARS) if (n := _normalize(piece)))


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = _PUNCT.sub(" ", _DIGIT.sub("0", text))
    return _WS.sub(" ", text).strip()


def exact_key(text: str) -> str:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).hexdigest()


def shingles(norm: str, n: int) -> list[bytes]:
    words = norm.split()
    if len(words) <= n:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)]


class MinHasher:
    """MinHash signatures with the permutations drawn once and reused for every document."""

    def __init__(self, cfg: DedupConfig):
        from datasketch import MinHash

        self.cfg, self._MinHash = cfg, MinHash
        proto = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        self.perms, self.scheme = proto.permutations, proto.scheme

    def __call__(self, norm: str):
        m = self._MinHash(num_perm=self.cfg.num_perm, seed=self.cfg.seed, permutations=self.perms,
                           scheme=self.scheme)
        n = self.cfg.ngram
        if len(norm) <= PIECE_CHARS:
            m.update_batch(shingles(norm, n))
            return m
        # a long text: its shingles in pieces (each piece's words plus the n-1 before it), so that
        # hashing never holds a [num_perm, all shingles] matrix (7.5 GB for a 50 MB record)
        tail: list[str] = []
        for _, piece in word_boundaries_cut(norm, PIECE_CHARS):
            words = tail + piece.split()
            if len(words) >= n:
                m.update_batch([" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)])
                tail = words[len(words) - (n - 1):] if n > 1 else []
            else:
                tail = words
        return m


def dedup_records(records: Iterable[tuple[str, dict]], cfg: DedupConfig) -> Iterator[tuple[str, dict, dict | None]]:
    """Yield ``(where, record, verdict)``; verdict is None for a kept record, else a dict
    ``{"reason": "exact"|"near", "duplicate_of": id, "jaccard": est}``."""
    from datasketch import MinHashLSH

    hasher = MinHasher(cfg)
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.num_bands, cfg.rows_per_band))
    exact: dict[str, str] = {}
    kept_sigs: dict[str, object] = {}
    kept_ids: set[str] = set()
    for where, rec in records:
        rid = str(rec.get("id", where))
        norm = normalize(rec[cfg.text_field])
        key = hashlib.blake2b(norm.encode(), digest_size=16).hexdigest()
        if key in exact:
            yield where, rec, {"reason": "exact", "duplicate_of": exact[key], "jaccard": 1.0}
            continue
        m = hasher(norm)
        verdict = None
        for cand in sorted(lsh.query(m)):
            j = m.jaccard(kept_sigs[cand]) if cfg.threshold else None
            if j is None or j >= cfg.threshold:
                verdict = {"reason": "near", "duplicate_of": cand, "jaccard": j}
                break
        if verdict:
            yield where, rec, verdict
            continue
        if rid in kept_ids:
            raise EffilmError(f"{where}: duplicate record id {rid!r}; ids must be unique")
        kept_ids.add(rid)
        exact[key] = rid
        lsh.insert(rid, m, check_duplication=False)
        if cfg.threshold:
            kept_sigs[rid] = m
        yield where, rec, None


def dedup_files(inputs, out_dir, report_path, cfg: DedupConfig | None = None, overwrite: bool = False) -> dict:
    """Deduplicate ``inputs`` into ``out_dir`` (kept.jsonl, removed.jsonl); write the report."""
    cfg = cfg or DedupConfig()
    files = expand_inputs(inputs)
    out = claim_dir(out_dir, "dedup", sources=files, overwrite=overwrite)
    claim_file(report_path, inputs=files, what="--report")
    clusters: dict[str, dict] = {}
    n = kept = exact_n = near_n = nbytes = 0
    with atomic_open(out / "kept.jsonl") as fk, atomic_open(out / "removed.jsonl") as fr:
        for where, rec, verdict in dedup_records(iter_records(files, cfg.text_field), cfg):
            n += 1
            nbytes += len(rec[cfg.text_field].encode())
            line = json.dumps(rec, ensure_ascii=False)
            if verdict is None:
                kept += 1
                fk.write(line + "\n")
                continue
            exact_n += verdict["reason"] == "exact"
            near_n += verdict["reason"] == "near"
            fr.write(json.dumps({**rec, "_dedup": verdict}, ensure_ascii=False) + "\n")
            c = clusters.setdefault(verdict["duplicate_of"], {"kept": verdict["duplicate_of"], "removed": []})
            c["removed"].append({"id": str(rec.get("id", where)), "where": where, "reason": verdict["reason"],
                                 "jaccard": verdict["jaccard"],
                                 "text": rec[cfg.text_field][: cfg.max_examples_chars]})
    report = {
        "summary": {"input_records": n, "kept": kept, "removed_exact": exact_n, "removed_near": near_n,
                    "clusters": len(clusters), "input_bytes": nbytes,
                    "lsh_threshold_approx": round((1 / cfg.num_bands) ** (1 / cfg.rows_per_band), 3)},
        "config": asdict(cfg),
        "outputs": {"kept": str(out / "kept.jsonl"), "removed": str(out / "removed.jsonl")},
        "clusters": sorted(clusters.values(), key=lambda c: -len(c["removed"])),
    }
    mark(out, "dedup")
    atomic_write_json(report_path, report)
    return report
