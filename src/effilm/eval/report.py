"""Evaluation reports: accuracy per subject and overall (micro and macro), standard errors,
the reproducibility manifest and the table printed on stdout."""

from __future__ import annotations

import hashlib
import json
import math
import platform

from effilm.eval.chat import score_chat
from effilm.eval.code_task import CodeConfig, generation_manifest, score_code
from effilm.eval.gsm8k import score_gsm8k
from effilm.eval.scoring import EvalConfig, TokenizerAdapter, perplexity, prompt_format, score_task
from effilm.eval.tasks import Task


def mean_stderr(values: list[float]) -> float | None:
    """Sample standard deviation over sqrt(n), as the harness reports it (None below 2 values)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def _acc(records: list[dict], key: str) -> dict:
    vals = [float(r[key]) for r in records]  # correct (bool) or a per-item score in [0, 1] (pass@k)
    return {"n": len(vals), "acc": sum(vals) / len(vals) if vals else None, "stderr": mean_stderr(vals)}


def aggregate(records: list[dict], metrics: tuple[str, ...], keys: tuple[str, ...] = ("correct", "correct_norm")) -> dict:
    """Per subject accuracy, then overall micro (every item weighs the same) and macro (every
    subject weighs the same; stderr from the subjects' stderrs) averages, both labelled. Metric i
    is the mean of each record's ``keys[i]``."""
    subjects: dict[str, list[dict]] = {}
    for r in records:
        subjects.setdefault(r["subject"], []).append(r)
    out = {"subjects": {}, "overall": {}}
    for metric, key in zip(metrics, keys, strict=False):
        per = {s: _acc(rs, key) for s, rs in sorted(subjects.items())}
        for s, v in per.items():
            out["subjects"].setdefault(s, {"n": v["n"]})[metric] = v["acc"]
            out["subjects"][s][f"{metric}_stderr"] = v["stderr"]
        micro = _acc(records, key)
        accs = [v["acc"] for v in per.values()]
        ses = [v["stderr"] for v in per.values()]
        macro = sum(accs) / len(accs) if accs else float("nan")
        macro_se = math.sqrt(sum(se * se for se in ses)) / len(ses) if ses and None not in ses else None
        out["overall"][metric] = {"micro": micro["acc"], "micro_stderr": micro["stderr"],
                                  "macro": macro, "macro_stderr": macro_se, "n": len(records),
                                  "subjects": len(per)}
    return out


def model_fingerprint(model) -> dict:
    """sha256 of the weights (names, dtypes, shapes and bytes, sorted) and of the config."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    conf = getattr(model, "config", None)
    if conf is None:
        conf_text = ""
    elif hasattr(conf, "to_dict"):
        conf_text = json.dumps(conf.to_dict(), sort_keys=True, default=str)
    else:
        import dataclasses

        conf_text = json.dumps(dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else repr(conf),
                               sort_keys=True, default=str)
    return {"weights_sha256": h.hexdigest(), "config_sha256": hashlib.sha256(conf_text.encode()).hexdigest()}


def contamination_for(task: Task, corpus_report: dict | None) -> dict | None:
    """This task's line in a decontamination report (matched by benchmark name, then spec)."""
    if not corpus_report:
        return None
    for b in corpus_report.get("benchmarks", []):
        if b.get("name") == task.name or b.get("spec") == task.spec:
            return {"contaminated": b.get("contaminated", 0), "items": b.get("items", 0),
                    "contaminated_ids": b.get("contaminated_ids", [])}
    return None


def run_evaluation(model, tokenizer, tasks: list[Task], cfg: EvalConfig, *, scorer=None,
                   corpus_report: dict | None = None, model_path: str | None = None,
                   contamination_check: dict | None = None, code_cfg: CodeConfig | None = None) -> dict:
    """Evaluate every task and return the full report (JSON-serialisable). ``contamination_check``
    (from :func:`effilm.eval.provenance.check_training_data`) says how the contamination figures
    were obtained, or why there are none; it is kept in the report and printed by the table.
    ``code_cfg`` sets code tasks' sampling, pass@k and sandbox (and must allow code execution)."""
    import torch

    import effilm

    torch.manual_seed(cfg.seed)
    tok = TokenizerAdapter(tokenizer, cfg.add_special_tokens)
    results = []
    for task in tasks:
        entry = {"name": task.name, "spec": task.spec, "data_sha256": task.data_hash(), "skipped": task.skipped}
        if task.kind == "ppl":
            entry["perplexity"] = perplexity(model, tok, task.texts, cfg)
        else:
            if task.kind == "chat":
                records = score_chat(model, tokenizer, task.chat, batch_size=cfg.batch_size,
                                     max_new_tokens=cfg.max_new_tokens)
                metrics = ("exact_match",)
            elif task.kind == "gsm8k":
                records = score_gsm8k(model, tokenizer, task.math, task.math_dev, shots=cfg.shots,
                                      batch_size=cfg.batch_size, max_gen_toks=cfg.max_gen_toks,
                                      max_length=cfg.max_length)
                metrics = ("strict-match", "flexible-extract")  # keys correct, correct_norm
            elif task.kind == "code":
                code_cfg = code_cfg or CodeConfig()
                records = score_code(model, tokenizer, task.code, code_cfg, batch_size=cfg.batch_size,
                                     max_length=cfg.max_length, seed=cfg.seed)
                metrics = tuple(f"pass@{k}" for k in code_cfg.ks)  # the mean over problems of each pass@k
                entry["generation"] = generation_manifest(code_cfg, records)
            else:
                records = score_task(model, tok, task, cfg, scorer=scorer)
                metrics = ("acc",) if cfg.scoring == "letter" else ("acc", "acc_norm")
            entry.update(aggregate(records, metrics, metrics if task.kind == "code" else ("correct", "correct_norm")))
            cont = contamination_for(task, corpus_report)
            if cont is not None:
                bad = set(cont["contaminated_ids"])
                clean = [r for r in records if r["id"] not in bad]
                cont["clean_acc"] = _acc(clean, "correct")["acc"] if clean else None
                entry["contamination"] = cont
            entry["items"] = records
        results.append(entry)
    manifest = {"effilm_version": effilm.__version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "seed": cfg.seed, "model_path": model_path,
                **model_fingerprint(model), "tokenizer_sha256": tok.fingerprint(),
                "prompt_format": prompt_format(cfg), "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                "averages": "micro = mean over items; macro = mean over subjects"}
    out = {"manifest": manifest, "tasks": results}
    if contamination_check is not None:
        out["contamination_check"] = contamination_check
    return out


def _f(v, width: int) -> str:
    return f"{v:>{width}.4f}" if isinstance(v, float) else f"{'n/a':>{width}}"


def format_table(report: dict) -> str:
    """A human-readable table: one line per subject, then the micro and macro averages."""
    lines = []
    for t in report["tasks"]:
        if "perplexity" in t:
            p = t["perplexity"]
            lines.append(f"{t['name']}: bits/byte {p['bits_per_byte']:.4f}  perplexity {p['perplexity']:.3f}  "
                         f"({p['tokens']} tokens, {p['method']})")
            continue
        metrics = list(t["overall"])  # acc (and acc_norm), or exact_match
        widths = [max(7, len(m)) for m in metrics]
        head = f"{'subject':<40} {'n':>6}" + "".join(f" {m:>{w}} {'± se':>7}" for m, w in zip(metrics, widths))
        lines += [f"== {t['name']} ==", head, "-" * len(head)]
        for s, v in t["subjects"].items():
            lines.append(f"{s:<40} {v['n']:>6}" + "".join(f" {_f(v[m], w)} {_f(v[m + '_stderr'], 7)}"
                                                            for m, w in zip(metrics, widths)))
        o = t["overall"]
        for avg in ("micro", "macro"):
            lines.append(f"{'OVERALL (' + avg + ')':<40} {o[metrics[0]]['n']:>6}"
                         + "".join(f" {_f(o[m][avg], w)} {_f(o[m][avg + '_stderr'], 7)}" for m, w in zip(metrics, widths)))
        if t.get("skipped"):
            lines.append(f"skipped {len(t['skipped'])} bad rows (see report 'skipped')")
        c = t.get("contamination")
        if c is not None:
            lines.append(f"contamination: {c['contaminated']}/{c['items']} items found in the corpus; "
                         f"{metrics[0]} on the clean items {_f(c['clean_acc'], 0)}")
        elif report.get("contamination_check"):
            lines.append(f"contamination: {report['contamination_check']['status']} (see below)")
    if report.get("contamination_check"):
        lines.append(report["contamination_check"]["line"])
    return "\n".join(lines)
