"""``effilm classifier train``: fit the quality classifier on annotated documents and report it.

Python API (what the demo calls)::

    from effilm.data.classifier_train import ClassifierConfig, train_classifier
    report = train_classifier(["ann/"], "clf/", ClassifierConfig(threshold=3))
    report["features"]["ngram"]["f1"]

The annotations are JSONL records with the text and a ``score`` (``effilm annotate`` writes them;
``score: null`` marks an unscored document, which is counted and skipped). A seeded split holds
out ``holdout`` of them; the report gives, per feature kind, F1 at the keep/drop threshold, the
keep/drop and score confusion matrices, MAE and RMSE, as ``report.json`` and ``report.png``.

With a hidden-state featurizer (``effilm.inference.embed.HiddenStateFeatures``, the CLI's
``--hidden-model DIR``), the same split also trains on mean-pooled hidden states, saved under
``OUT/hidden/``, and both are reported. ``OUT`` itself is the n-gram classifier.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from effilm.config.reader import option
from effilm.data.classifier import NgramFeatures, QualityClassifier, fit_linear, metrics
from effilm.data.inputs import expand_inputs, iter_file
from effilm.errors import ConfigError, EffilmError

DEFAULT_SCALE = (0.0, 5.0)


@dataclass
class ClassifierConfig:
    """How ``effilm classifier train`` fits and evaluates the quality classifier."""

    threshold: float = option(3.0, "Keep/drop threshold on the score scale: a document is kept when its "
                                   "predicted score is at least this (FineWeb-Edu: 3 on 0-5).")
    scale: list[float] = option(factory=list, help="Score scale [min, max]; empty: the annotations' own "
                                                   "(annotation.scale), else [0, 5].")
    holdout: float = option(0.2, "Fraction of the scored documents held out for the report.")
    seed: int = option(0, "Seed of the hold-out split.")
    ngram: int = option(2, "Longest word n-gram hashed: 1 (words) or 2 (words and word pairs).")
    hash_bits: int = option(20, "The n-grams are hashed into 2**hash_bits buckets.")
    alpha: float = option(0.1, "Ridge (L2) regularisation strength of the n-gram model.")
    hidden_alpha: float = option(10.0, "Ridge (L2) regularisation strength of the hidden-state model.")
    text_field: str = option("text", "Record field holding the text.")
    min_documents: int = option(10, "Fewest scored documents to train on.")
    hidden_model: str = option("", "Also train on mean-pooled hidden states of this effilm model directory "
                                   "and report both ('' = n-gram features only).")
    hidden_batch_size: int = option(16, "Documents per forward pass for hidden-state features.")
    hidden_max_tokens: int = option(256, "Tokens of each document read for hidden-state features.")
    device: str = option("auto", "Device of the hidden-state model: auto, cpu, cuda or cuda:N.")

    def __post_init__(self):
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"holdout={self.holdout} must be in (0, 1)")
        if self.scale and (len(self.scale) != 2 or self.scale[0] >= self.scale[1]):
            raise ConfigError(f"scale={self.scale} must be [min, max] with min < max")
        if self.alpha <= 0 or self.hidden_alpha <= 0:
            raise ConfigError("alpha and hidden_alpha must be > 0")
        if self.min_documents < 4:
            raise ConfigError(f"min_documents={self.min_documents} must be at least 4")
        NgramFeatures(self.hash_bits, self.ngram)  # validates both
        if self.scale:
            check_threshold(self.threshold, tuple(self.scale))


def check_threshold(threshold: float, scale: tuple[float, float], what: str = "threshold") -> None:
    if not scale[0] <= threshold <= scale[1]:
        raise ConfigError(f"{what}={threshold:g} is outside the score scale {scale[0]:g}-{scale[1]:g}")


@dataclass
class Annotations:
    texts: list[str]
    scores: np.ndarray
    where: list[str]
    scale: tuple[float, float]
    unscored: int
    files: list[Path]


def read_annotations(inputs, text_field: str = "text", scale: tuple[float, float] | None = None) -> Annotations:
    """Scored documents of ``inputs`` (files, directories, globs). A record without ``score``, a
    score that is not a number or lies outside the scale is one error naming the file and line."""
    files = expand_inputs(inputs)
    texts, scores, where = [], [], []
    unscored = 0
    for f in files:
        for doc in iter_file(f, text_field):
            rec = doc.record
            if rec is None:
                raise EffilmError(f"{doc.where}: annotations must be JSONL records with a 'score' field")
            ann = rec.get("annotation") if isinstance(rec.get("annotation"), dict) else {}
            rec_scale = ann.get("scale")
            if rec_scale is not None:
                if not (isinstance(rec_scale, list) and len(rec_scale) == 2
                        and all(isinstance(v, (int, float)) for v in rec_scale)):  # fmt: skip
                    raise EffilmError(f"{doc.where}: annotation.scale must be [min, max], got {rec_scale!r}")
                if scale is None:
                    scale = (float(rec_scale[0]), float(rec_scale[1]))
                elif tuple(map(float, rec_scale)) != scale:
                    raise EffilmError(f"{doc.where}: annotation.scale {rec_scale} differs from the scale "
                                      f"{scale[0]:g}-{scale[1]:g} used for the other records")  # fmt: skip
            if "score" not in rec:
                raise EffilmError(f"{doc.where}: missing field 'score' (an annotation record holds the text and "
                                  "its score; null marks an unscored document)")  # fmt: skip
            s = rec["score"]
            if s is None:
                unscored += 1
                continue
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not np.isfinite(s):
                raise EffilmError(f"{doc.where}: field 'score' is {s!r}, not a number")
            lo, hi = scale or DEFAULT_SCALE
            if not lo <= s <= hi:
                raise EffilmError(f"{doc.where}: score {s:g} is outside the scale {lo:g}-{hi:g}")
            texts.append(doc.text)
            scores.append(float(s))
            where.append(doc.where)
    return Annotations(texts, np.asarray(scores), where, scale or DEFAULT_SCALE, unscored, files)


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(holdout * n)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _fit_eval(feats, ann: Annotations, train, test, alpha, cfg, dense: bool) -> tuple[QualityClassifier, dict]:
    t0 = time.perf_counter()
    x = feats.matrix(ann.texts)
    t_feat = time.perf_counter() - t0
    weight, bias = fit_linear(x[train], ann.scores[train], alpha, dense)
    clf = QualityClassifier(feats.describe(), weight, bias, ann.scale, cfg.threshold, featurizer=feats)
    pred = np.clip(np.asarray(x[test] @ weight.astype(np.float64)).ravel() + bias, *ann.scale)
    m = metrics(ann.scores[test], pred, cfg.threshold, ann.scale)
    m.update({"features": feats.describe(), "feature_seconds": round(t_feat, 3),
              "fit_seconds": round(time.perf_counter() - t0 - t_feat, 3)})  # fmt: skip
    m["_pred"] = pred
    return clf, m


def train_classifier(annotations, out, cfg: ClassifierConfig | None = None, *, hidden=None,
                     overwrite: bool = False, log=None) -> dict:
    """Train on ``annotations`` and write the classifier directory ``out`` (with report.json and
    report.png). ``hidden`` is an optional second featurizer (mean-pooled hidden states) trained
    and reported on the same split. Returns the report."""
    from effilm.io import atomic_dir, atomic_write_json
    from effilm.outputs import claim_dir

    cfg = cfg or ClassifierConfig()
    log = log or (lambda msg: None)
    if cfg.hidden_model and hidden is None:
        raise EffilmError("hidden_model needs its featurizer: pass hidden=effilm.inference.embed.HiddenStateFeatures"
                          "(cfg.hidden_model, ...) (the command line does)")  # fmt: skip
    files = expand_inputs(annotations)
    out = claim_dir(out, "classifier train", sources=files, overwrite=overwrite)
    ann = read_annotations(files, cfg.text_field, tuple(cfg.scale) if cfg.scale else None)
    check_threshold(cfg.threshold, ann.scale)
    if len(ann.texts) < cfg.min_documents:
        raise EffilmError(f"{', '.join(map(str, files))}: {len(ann.texts)} scored document(s); training needs at "
                          f"least {cfg.min_documents} (min_documents)")  # fmt: skip
    train, test = split(len(ann.texts), cfg.holdout, cfg.seed)
    log(f"training on {len(train)} documents, {len(test)} held out ({ann.unscored} unscored skipped)")
    kinds = {"ngram": (NgramFeatures(cfg.hash_bits, cfg.ngram), cfg.alpha, False)}
    if hidden is not None:
        kinds["hidden"] = (hidden, cfg.hidden_alpha, True)
    results, classifiers, preds = {}, {}, {}
    for name, (feats, alpha, dense) in kinds.items():
        clf, m = _fit_eval(feats, ann, train, test, alpha, cfg, dense)
        preds[name] = m.pop("_pred")
        results[name], classifiers[name] = m, clf
        log(f"  {name}: F1 {m['f1']:.3f} at threshold {cfg.threshold:g}, MAE {m['mae']:.3f}, RMSE {m['rmse']:.3f}")
    report = {"annotations": {"files": [str(f) for f in files], "scored": len(ann.texts), "unscored": ann.unscored,
                              "score_counts": _counts(ann.scores)},
              "scale": list(ann.scale), "threshold": cfg.threshold,
              "split": {"train": int(len(train)), "test": int(len(test)), "seed": cfg.seed, "holdout": cfg.holdout},
              "features": results, "config": asdict(cfg)}  # fmt: skip
    with atomic_dir(out, mark="classifier train") as tmp:
        for name, clf in classifiers.items():
            clf.info = {"trained_on": int(len(train)),
                        "holdout": {k: v for k, v in results[name].items() if k != "features"}}
            target = tmp if name == "ngram" else tmp / name
            target.mkdir(exist_ok=True)
            clf.save(target)
        atomic_write_json(tmp / "report.json", report)
        plot_report(report, ann.scores[test], preds, tmp / "report.png")
    report["outputs"] = {"classifier": str(out), "report": str(Path(out) / "report.json"),
                         "png": str(Path(out) / "report.png")}  # fmt: skip
    return report


def _counts(scores: np.ndarray) -> dict:
    vals, counts = np.unique(np.rint(scores).astype(int), return_counts=True)
    return {str(v): int(c) for v, c in zip(vals, counts)}


def plot_report(report: dict, y_true: np.ndarray, preds: dict, path: Path) -> None:
    """One row per feature kind: the score confusion matrix and predicted vs. annotated scores."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EffilmError("the classifier report's PNG needs matplotlib: pip install 'effilm[quality]'") from None
    from effilm.io import atomic_open

    kinds = list(preds)
    fig = Figure(figsize=(10, 4 * len(kinds)), layout="constrained")
    FigureCanvasAgg(fig)
    thr = report["threshold"]
    lo, hi = report["scale"]
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(y_true))
    for row, name in enumerate(kinds):
        m = report["features"][name]
        ax = fig.add_subplot(len(kinds), 2, 2 * row + 1)
        grid = np.asarray(m["score_confusion"]["matrix"])
        labels = m["score_confusion"]["labels"]
        ax.imshow(grid, cmap="Blues")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="black" if v < grid.max() / 2 else "white")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted score (rounded)")
        ax.set_ylabel("annotated score")
        ax.set_title(f"{name}: F1 {m['f1']:.3f} at >= {thr:g}, MAE {m['mae']:.2f}, RMSE {m['rmse']:.2f}")
        ax = fig.add_subplot(len(kinds), 2, 2 * row + 2)
        keep = y_true >= thr
        ax.scatter(y_true[keep] + jitter[keep], preds[name][keep], s=6, alpha=0.5, label="annotated keep")
        ax.scatter(y_true[~keep] + jitter[~keep], preds[name][~keep], s=6, alpha=0.5, label="annotated drop")
        ax.axhline(thr - 0.5, color="k", lw=0.8, ls="--", label=f"kept above (rounds to >= {thr:g})")
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.6)
        ax.set_xlabel("annotated score (jittered)")
        ax.set_ylabel("predicted score")
        ax.set_title(f"{name}: held-out predictions (n={len(y_true)})")
        ax.legend(loc="upper left", fontsize=8)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
