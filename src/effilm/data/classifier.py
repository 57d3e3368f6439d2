"""A learned quality classifier: a linear regression on teacher scores, over hashed word n-grams.

The features: every word and word pair of a document is hashed into one of ``2**hash_bits``
buckets, and the document is the sum of its buckets' one-hot vectors divided by the square root
of their number, plus one column holding ``log1p(words)``. (Dividing by the count, fastText's
mean, lost how much a document says: F1 0.81 against 0.83 on the procedural web corpus.) A ridge regression (scikit-learn) predicts the rubric score; a
document is kept when its predicted score, rounded to the nearest whole number, is at least the
threshold (FineWeb-Edu's rule: 3 on 0-5). Without the rounding a regression's pull towards the
mean turns most errors into wrongly dropped documents (held-out F1 0.84 against 0.96 on the
procedural web corpus).

Hashing is vectorised in numpy so the filter can score tens of MB per second per core (the
``HashingVectorizer`` of scikit-learn tokenises in Python, about 6 MB/s here): the documents of a
batch are joined into one byte array, ASCII letters lowercased through a table, and a word's
hash is a polynomial in its bytes (mod 2**64) computed for every word at once with one
``reduceat``, then scrambled (murmur3's finaliser). Words are runs of ASCII letters, digits and
non-ASCII bytes. A text longer than ``PIECE_CHARS`` is hashed piece by piece (cut before a word), so
memory stays bounded on a huge record.

A classifier directory holds ``classifier.json`` (format name, format version, features, scale,
threshold, training figures) and ``weights.safetensors`` (``weight`` [F], ``bias`` [1], float32):
plain arrays, no pickle. A directory of another format version is refused with one line.
Hidden-state features (``effilm.inference.embed``) plug in through the same ``Features``
protocol; such a directory records the model it needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from effilm.errors import ConfigError, EffilmError

FORMAT = "effilm-quality-classifier"
VERSION = 1
MANIFEST = "classifier.json"
WEIGHTS = "weights.safetensors"
PIECE_CHARS = 1 << 20  # texts longer than this are hashed in pieces (bounded memory)
CHUNK_BYTES = 4 << 20  # bytes hashed in one numpy pass

_M64 = (1 << 64) - 1
_P = 0x9E3779B97F4A7C15  # odd, so it has an inverse mod 2**64
_P_INV = pow(_P, -1, 1 << 64)
_FMIX1, _FMIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_PAIR = np.uint64(0x2545F4914F6CDD1D)


def _byte_table() -> np.ndarray:
    """Byte -> its value + 1 inside a word (ASCII lowercased), 0 for a separator."""
    t = np.zeros(256, dtype=np.uint64)
    for b in range(256):
        c = chr(b)
        if b >= 128 or c.isdigit() or ("a" <= c <= "z"):
            t[b] = b + 1
        elif "A" <= c <= "Z":
            t[b] = ord(c.lower()) + 1
    return t


_TABLE = _byte_table()
_POWERS: dict[str, np.ndarray] = {}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**j and P**-j (mod 2**64) for j < n, computed once per process and grown as needed."""
    if _POWERS.get("fwd") is None or len(_POWERS["fwd"]) < n:
        size = max(n, 1 << 16)
        with np.errstate(over="ignore"):
            fwd = np.cumprod(np.full(size, _P, dtype=np.uint64))
            inv = np.cumprod(np.full(size, _P_INV, dtype=np.uint64))
        _POWERS["fwd"] = np.concatenate([np.ones(1, np.uint64), fwd[:-1]])
        _POWERS["inv"] = np.concatenate([np.ones(1, np.uint64), inv[:-1]])
    return _POWERS["fwd"], _POWERS["inv"]


def _fmix(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX1
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX2
    return h ^ (h >> np.uint64(33))


def _hash_chunk(encoded: list[bytes], owners: list[int], ngram: int, bits: int):
    """``(owner, bucket)`` of every word (and word pair) of the pieces ``encoded``, and the word
    count per piece."""
    buf = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
    lens = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    piece_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
    vals = _TABLE[buf]
    inword = vals != 0
    starts = np.flatnonzero(inword & ~np.concatenate([[False], inword[:-1]]))
    if not len(starts):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(len(encoded), np.int64)
    fwd, inv = _powers(len(buf))
    with np.errstate(over="ignore"):
        sums = np.add.reduceat(vals * fwd[: len(buf)], starts)  # separators add 0
        words = _fmix(sums * inv[starts])
        piece = np.searchsorted(piece_start, starts, side="right") - 1
        feats = [words]
        where = [piece]
        if ngram >= 2 and len(words) > 1:
            same = piece[1:] == piece[:-1]
            feats.append(_fmix(words[:-1][same] * _PAIR + words[1:][same]))
            where.append(piece[:-1][same])
    shift = np.uint64(64 - bits)
    buckets = (np.concatenate(feats) >> shift).astype(np.int64)
    owner = np.asarray(owners, dtype=np.int64)[np.concatenate(where)]
    nwords = np.bincount(piece, minlength=len(encoded))
    return owner, buckets, nwords


@dataclass
class NgramFeatures:
    """Hashed word n-grams, summed over sqrt(count), plus ``log1p(words)`` (see the module docstring)."""

    hash_bits: int = 20
    ngram: int = 2
    kind: str = field(default="ngram", init=False)

    def __post_init__(self):
        if not 10 <= self.hash_bits <= 26:
            raise ConfigError(f"hash_bits={self.hash_bits} must be in [10, 26]")
        if self.ngram not in (1, 2):
            raise ConfigError(f"ngram={self.ngram} must be 1 (words) or 2 (words and word pairs)")

    @property
    def dim(self) -> int:
        return (1 << self.hash_bits) + 1

    def describe(self) -> dict:
        return {"kind": self.kind, "hash_bits": self.hash_bits, "ngram": self.ngram}

    def hashed(self, texts: Sequence[str]):
        """Per chunk of the batch: ``(owner, bucket)`` arrays; then the words of each text."""
        from effilm.data.inputs import word_boundaries_cut

        nwords = np.zeros(len(texts), dtype=np.int64)
        chunks = []
        enc: list[bytes] = []
        owners: list[int] = []
        size = 0

        def flush():
            nonlocal enc, owners, size
            if enc:
                owner, buckets, nw = _hash_chunk(enc, owners, self.ngram, self.hash_bits)
                np.add.at(nwords, np.asarray(owners, dtype=np.int64), nw)
                chunks.append((owner, buckets))
            enc, owners, size = [], [], 0

        for i, text in enumerate(texts):
            pieces = [text] if len(text) <= PIECE_CHARS else [p for _, p in word_boundaries_cut(text, PIECE_CHARS)]
            for piece in pieces:
                b = piece.encode("utf-8", "replace")
                enc.append(b)
                owners.append(i)
                size += len(b) + 1
                if size >= CHUNK_BYTES:
                    flush()
        flush()
        return chunks, nwords

    def matrix(self, texts: Sequence[str]):
        """The features of ``texts`` as a scipy CSR matrix [len(texts), dim] (training)."""
        from scipy import sparse

        chunks, nwords = self.hashed(texts)
        n = len(texts)
        owner = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int64)
        buckets = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, np.int64)
        nfeat = np.bincount(owner, minlength=n).astype(np.float64)
        data = 1.0 / np.sqrt(np.maximum(nfeat, 1.0))[owner]
        rows = np.concatenate([owner, np.arange(n)])
        cols = np.concatenate([buckets, np.full(n, self.dim - 1)])
        data = np.concatenate([data, np.log1p(nwords)])
        return sparse.csr_matrix((data, (rows, cols)), shape=(n, self.dim), dtype=np.float32)

    def predict(self, texts: Sequence[str], weight: np.ndarray, bias: float) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, words)`` of ``texts`` under a linear model, without building the matrix."""
        n = len(texts)
        chunks, nwords = self.hashed(texts)
        sums = np.zeros(n)
        nfeat = np.zeros(n)
        for owner, buckets in chunks:
            sums += np.bincount(owner, weights=weight[buckets], minlength=n)
            nfeat += np.bincount(owner, minlength=n)
        scores = bias + sums / np.sqrt(np.maximum(nfeat, 1.0)) + weight[-1] * np.log1p(nwords)
        return scores, nwords


class Features(Protocol):
    kind: str

    def describe(self) -> dict: ...
    def matrix(self, texts: Sequence[str]): ...


@dataclass
class QualityClassifier:
    """A trained classifier: features, linear weights, the score scale and the keep threshold."""

    features: dict
    weight: np.ndarray
    bias: float
    scale: tuple[float, float]
    threshold: float
    info: dict = field(default_factory=dict)
    featurizer: object = None

    def __post_init__(self):
        if self.featurizer is None and self.features.get("kind") == "ngram":
            self.featurizer = NgramFeatures(self.features["hash_bits"], self.features["ngram"])

    def check_threshold(self, threshold: float, what: str = "threshold") -> float:
        lo, hi = self.scale
        if not (isinstance(threshold, (int, float)) and lo <= threshold <= hi):
            raise ConfigError(f"{what}={threshold} is outside the classifier's score scale {_fmt(lo)}-{_fmt(hi)}")
        return float(threshold)

    def predict(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """``(scores, words)``: predicted scores clipped to the scale (and each text's word count
        for n-gram features, else None)."""
        lo, hi = self.scale
        if isinstance(self.featurizer, NgramFeatures):
            s, nw = self.featurizer.predict(texts, self.weight, self.bias)
        else:
            if self.featurizer is None:
                raise EffilmError(f"this classifier uses {self.features.get('kind')!r} features; pass their "
                                  "featurizer (effilm.inference.embed.HiddenStateFeatures) to load_classifier")
            x = np.asarray(self.featurizer.matrix(texts), dtype=np.float64)
            s, nw = x @ self.weight.astype(np.float64) + self.bias, None
        return np.clip(s, lo, hi), nw

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted scores of ``texts`` on the rubric's scale."""
        return self.predict(texts)[0]

    def save(self, out: str | Path) -> Path:
        """Write the classifier into the directory ``out`` (which must exist)."""
        from safetensors.numpy import save_file

        out = Path(out)
        save_file({"weight": np.ascontiguousarray(self.weight, dtype=np.float32),
                   "bias": np.asarray([self.bias], dtype=np.float32)}, str(out / WEIGHTS))  # fmt: skip
        manifest = {"format": FORMAT, "version": VERSION, "features": self.features,
                    "scale": list(self.scale), "threshold": self.threshold, **self.info}
        from effilm.io import atomic_write_json

        atomic_write_json(out / MANIFEST, manifest)
        return out


def _fmt(x: float) -> str:
    return f"{x:g}"


def read_manifest(path: str | Path) -> dict:
    """The manifest of a classifier directory; a missing, corrupt or other-version one is one line."""
    d = Path(path)
    m = d / MANIFEST
    if not d.is_dir():
        raise EffilmError(f"{d}: no such classifier directory")
    if not m.is_file():
        raise EffilmError(f"{m}: not found; {d} is not a classifier directory (write one with `effilm classifier train`)")
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EffilmError(f"{m}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise EffilmError(f"{m}: not an effilm quality classifier (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("version") != VERSION:
        raise EffilmError(f"{m}: classifier format version {data.get('version')!r}, but this effilm reads version "
                          f"{VERSION}; retrain it with `effilm classifier train`")  # fmt: skip
    for key in ("features", "scale", "threshold"):
        if key not in data:
            raise EffilmError(f"{m}: field {key!r} is missing")
    return data


def load_classifier(path: str | Path, featurizer=None) -> QualityClassifier:
    """The classifier in directory ``path``. Hidden-state classifiers need their ``featurizer``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    m = read_manifest(path)
    w = Path(path) / WEIGHTS
    try:
        tensors = load_file(str(w))
    except (OSError, SafetensorError) as exc:
        raise EffilmError(f"{w}: cannot read the classifier weights ({exc})") from None
    kind = m["features"].get("kind")
    if kind == "ngram":
        want = NgramFeatures(m["features"]["hash_bits"], m["features"]["ngram"]).dim
        if tensors.get("weight") is None or tensors["weight"].shape != (want,):
            raise EffilmError(f"{w}: weight shape {getattr(tensors.get('weight'), 'shape', None)} does not match "
                              f"the manifest's features ({want})")  # fmt: skip
    elif kind != "hidden":
        raise EffilmError(f"{Path(path) / MANIFEST}: field 'features.kind' is {kind!r}; expected 'ngram' or 'hidden'")
    lo, hi = m["scale"]
    info = {k: v for k, v in m.items() if k not in ("format", "version", "features", "scale", "threshold")}
    return QualityClassifier(m["features"], tensors["weight"], float(tensors["bias"][0]), (float(lo), float(hi)),
                             float(m["threshold"]), info, featurizer)  # fmt: skip


# ----- training --------------------------------------------------------------------------------------
def fit_linear(x, y: np.ndarray, alpha: float, dense: bool) -> tuple[np.ndarray, float]:
    """Ridge regression (scikit-learn); dense features are standardised and the scaling folded
    back into the weights, so the saved model is one weight vector and a bias either way."""
    try:
        from sklearn.linear_model import Ridge
    except ImportError:
        raise EffilmError("training a quality classifier needs scikit-learn: pip install 'effilm[quality]'") from None
    if dense:
        x = np.asarray(x, dtype=np.float64)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        model = Ridge(alpha=alpha).fit((x - mu) / sd, y)
        w = model.coef_ / sd
        return w.astype(np.float32), float(model.intercept_ - (w * mu).sum())
    model = Ridge(alpha=alpha, solver="sparse_cg", max_iter=2000, tol=1e-5).fit(x, y)
    return np.asarray(model.coef_, dtype=np.float32), float(model.intercept_)


def keep(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The keep decision: the score rounded half up to a whole number is at least ``threshold``."""
    return np.floor(np.asarray(scores) + 0.5) >= threshold


def metrics(y_true: np.ndarray, y_pred: np.ndarray, threshold: float, scale: tuple[float, float]) -> dict:
    """F1 of keep vs drop (annotated score >= threshold against :func:`keep` of the prediction),
    the keep/drop confusion matrix, the confusion matrix of rounded scores, MAE and RMSE."""
    t, p = y_true >= threshold, keep(y_pred, threshold)
    tp, fp, fn, tn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum()), int((~t & ~p).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    lo, hi = int(math.floor(scale[0])), int(math.ceil(scale[1]))
    labels = list(range(lo, hi + 1))
    grid = np.zeros((len(labels), len(labels)), dtype=int)
    ti = np.clip(np.rint(y_true).astype(int), lo, hi) - lo
    pi = np.clip(np.rint(y_pred).astype(int), lo, hi) - lo
    np.add.at(grid, (ti, pi), 1)
    err = y_pred - y_true
    return {"n": int(len(y_true)), "threshold": threshold, "f1": round(f1, 4), "precision": round(prec, 4),
            "recall": round(rec, 4), "accuracy": round((tp + tn) / max(len(y_true), 1), 4),
            "kept_true": int(t.sum()), "kept_pred": int(p.sum()),
            "f1_unrounded": round(_f1(t, y_pred >= threshold), 4),
            "confusion": {"rows": "true drop, true keep", "cols": "predicted drop, predicted keep",
                          "matrix": [[tn, fp], [fn, tp]]},
            "score_confusion": {"labels": labels, "matrix": grid.tolist()},
            "mae": round(float(np.abs(err).mean()), 4) if len(err) else None,
            "rmse": round(float(np.sqrt((err**2).mean())), 4) if len(err) else None}  # fmt: skip


def _f1(t: np.ndarray, p: np.ndarray) -> float:
    tp, fp, fn = int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
