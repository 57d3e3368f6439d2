"""Public-versus-twin evaluation: the gap between a model's accuracy on a public benchmark and on
its private twins (fresh items of the same templates, :mod:`effilm.synth.twins`), with a
bootstrap confidence interval.

A model that learned what the benchmark tests scores the same on both, up to sampling noise. A
model that saw the public items (verbatim or paraphrased), or was fitted to them, scores higher on
them: a gap whose interval lies above 0 is flagged as a possible leak or fit to the benchmark
(one below 0, twins easier than the public items, is flagged too: the sets are not as alike as
they should be).

The interval is a percentile bootstrap of the difference of two means: each resample draws the
public items and the twin items with replacement, independently (the two sets are independent
samples of the same templates), and takes the difference of the two accuracies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from effilm.errors import ConfigError, EffilmError

SPEC_FILE = "twins.json"  # written by effilm.synth.twins.make_twins
# per-item keys of each metric: MMLU-format (acc, acc_norm) and gsm8k (strict-match, flexible-extract)
RECORD_KEYS = ("correct", "correct_norm")


@dataclass
class TwinEvalConfig:
    resamples: int = field(default=10_000, metadata={"help": "bootstrap resamples of the public-twin gap"})
    confidence: float = field(default=0.95, metadata={"help": "confidence level of the gap's interval"})
    bootstrap_seed: int = field(default=0, metadata={"help": "seed of the bootstrap draws"})

    def __post_init__(self):
        if isinstance(self.resamples, bool) or not isinstance(self.resamples, int) or self.resamples < 100:
            raise ConfigError(f"twin.resamples={self.resamples!r} must be an integer >= 100")
        if not 0.5 <= self.confidence < 1.0:
            raise ConfigError(f"twin.confidence={self.confidence} must lie in [0.5, 1)")


def bootstrap_gap(public: list[float], twins: list[float], cfg: TwinEvalConfig | None = None) -> dict:
    """Accuracies of both sets, their gap (public - twins) and its percentile-bootstrap interval;
    ``flagged`` when the interval excludes 0."""
    import numpy as np

    cfg = cfg or TwinEvalConfig()
    if not public or not twins:
        raise EffilmError("the twin gap needs at least one public and one twin item")
    p, t = np.asarray(public, dtype=np.float64), np.asarray(twins, dtype=np.float64)
    rng = np.random.default_rng(cfg.bootstrap_seed)
    gaps = (p[rng.integers(0, len(p), (cfg.resamples, len(p)))].mean(1)
            - t[rng.integers(0, len(t), (cfg.resamples, len(t)))].mean(1))
    alpha = 1.0 - cfg.confidence
    lo, hi = (float(x) for x in np.quantile(gaps, [alpha / 2, 1 - alpha / 2]))
    gap = float(p.mean() - t.mean())
    flagged = lo > 0 or hi < 0
    verdict = ("public above twins: possible leak or fit to the benchmark" if lo > 0 else
               "twins above public: the sets differ more than their templates should allow" if hi < 0 else
               "no gap beyond sampling noise")
    return {"public_acc": float(p.mean()), "twin_acc": float(t.mean()), "gap": gap, "ci": [lo, hi],
            "confidence": cfg.confidence, "n_public": len(p), "n_twins": len(t), "flagged": flagged,
            "verdict": verdict}


def read_spec(twin_dir: str | Path) -> dict:
    """``twins.json`` of ``twin_dir``, with each file checked against its recorded item count and
    sha256 (an edited or swapped file is an error naming it)."""
    d = Path(twin_dir)
    f = d / SPEC_FILE
    if not f.is_file():
        raise EffilmError(f"{d}: no {SPEC_FILE}; write the twin benchmark with 'effilm twin make --out {d}'")
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
        kind, files = spec["generator"]["kind"], spec["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EffilmError(f"{f}: not a twin benchmark spec ({exc})") from None
    if kind not in ("quiz", "math"):
        raise EffilmError(f"{f}: generator.kind={kind!r} is not quiz or math")
    for name in ("public", "twins", "dev"):
        entry = files.get(name) if isinstance(files, dict) else None
        if not isinstance(entry, dict) or "path" not in entry:
            raise EffilmError(f"{f}: files.{name} is missing")
        path = d / entry["path"]
        if not path.is_file():
            raise EffilmError(f"{path}: missing (listed in {f})")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry.get("sha256"):
            raise EffilmError(f"{path}: its sha256 is not the one {f} records; the file changed after "
                              "'effilm twin make' wrote it")
    return spec


def twin_tasks(twin_dir: str | Path, spec: dict) -> list:
    """The public and the twin set as effilm tasks (MMLU-format JSONL or gsm8k), few-shot from dev."""
    from effilm.eval.tasks import load_task

    d = Path(twin_dir)
    fmt = "jsonl" if spec["generator"]["kind"] == "quiz" else "gsm8k"
    dev = d / spec["files"]["dev"]["path"]
    return [load_task(f"{fmt}:{d / spec['files'][name]['path']},dev={dev},name={name}") for name in ("public", "twins")]


def twin_gaps(report: dict, cfg: TwinEvalConfig) -> dict:
    """``{metric: bootstrap_gap(...)}`` from an evaluation report of [public, twins]."""
    public, twins = report["tasks"]
    out = {}
    for metric, key in zip(public["overall"], RECORD_KEYS, strict=False):
        out[metric] = bootstrap_gap([float(r[key]) for r in public["items"]], [float(r[key]) for r in twins["items"]], cfg)
    return out


def evaluate_twins(model, tokenizer, twin_dir: str | Path, eval_cfg, cfg: TwinEvalConfig | None = None, *,
                   model_path: str | None = None, corpus_report: dict | None = None,
                   contamination_check: dict | None = None, spec: dict | None = None, tasks: list | None = None) -> dict:
    """Score ``model`` on the public set and the twins of ``twin_dir`` with ``eval_cfg`` (an
    :class:`effilm.eval.scoring.EvalConfig`) and report the gap of every metric. ``spec`` and
    ``tasks``: ``read_spec`` and ``twin_tasks`` of ``twin_dir``, when the caller has them already."""
    from effilm.eval.report import run_evaluation

    cfg = cfg or TwinEvalConfig()
    spec = spec if spec is not None else read_spec(twin_dir)
    tasks = tasks if tasks is not None else twin_tasks(twin_dir, spec)
    report = run_evaluation(model, tokenizer, tasks, eval_cfg, model_path=model_path, corpus_report=corpus_report,
                            contamination_check=contamination_check)
    gaps = twin_gaps(report, cfg)
    return {"twins": {"dir": str(twin_dir), **spec},
            "bootstrap": {"resamples": cfg.resamples, "confidence": cfg.confidence, "seed": cfg.bootstrap_seed,
                          "method": "percentile bootstrap of mean(public) - mean(twins), the two sets resampled "
                                    "independently"},
            "gaps": gaps, "flagged": [m for m, g in gaps.items() if g["flagged"]], **report}


def format_gaps(report: dict) -> str:
    """The gap table printed by ``effilm twin eval``."""
    g0 = report["twins"]["generator"]
    conf = round(100 * report["bootstrap"]["confidence"])
    lines = [f"twin benchmark: {g0['kind']}, seed {g0['seed']}, twin seed {g0['twin_seed']} ({report['twins']['dir']})",
             f"{'metric':<18} {'public':>8} {'twins':>8} {'gap':>8} {f'{conf}% CI':>18}  flag"]
    for m, g in report["gaps"].items():
        ci = f"[{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]"
        lines.append(f"{m:<18} {g['public_acc']:>8.3f} {g['twin_acc']:>8.3f} {g['gap']:>+8.3f} {ci:>18}  "
                     f"{'FLAGGED: ' + g['verdict'] if g['flagged'] else 'ok'}")
    n = report["gaps"][next(iter(report["gaps"]))]
    lines.append(f"{n['n_public']} public items, {n['n_twins']} twins; {report['bootstrap']['resamples']} bootstrap "
                 "resamples")
    return "\n".join(lines)
