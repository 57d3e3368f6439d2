"""The demo's model stages: train the six models at equal token budgets, then evaluate them.

* ``train_models``: ``dense-web`` (tiny-dense, web-like text only), ``dense-textbook`` (tiny-dense,
  web then textbook, as Phi-3 staged its data), ``dense-filtered`` (tiny-dense, web then the web
  corpus's top share by quality-classifier score) and three Arctic hybrids at the same active
  parameters and tokens, many more parameters in total: ``arctic-textbook`` (the Switch loss),
  ``arctic-loss-free`` (loss-free balancing) and ``arctic-upcycled`` (dense-textbook's checkpoint at
  ``upcycle_step``, upcycled and trained on the rest of the budget, loss-free), each through
  ``effilm.train.loop.train`` with a run config written to ``runs/<name>.json``.
* ``evaluate_models``: the quiz with letter and cloze scoring (zero-shot), bits per byte on the
  held-out textbook and web text, and beside each score the contamination status of the corpora
  that model trained on, all through ``effilm.eval.report.run_evaluation``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from effilm.demo.config import FILTERED_SOURCE, MODEL_NAMES, DemoConfig
from effilm.io import atomic_write_json


def curves(run_dir: Path) -> tuple[list[dict], dict]:
    """The training loss curve ``[{step, tokens, stage, loss}]`` and the last validation losses,
    read by the one metrics reader (:mod:`effilm.reports.metrics`, which keeps a resumed run's
    latest record of every step)."""
    from effilm.reports.metrics import read_metrics

    m = read_metrics(run_dir / "metrics.jsonl")
    curve = [{k: rec.get(k) for k in ("step", "tokens", "stage", "loss")} for rec in m.train]
    return curve, (m.val[-1]["val_loss"] if m.val else {})


def fresh_run(d: dict, config_path: Path, where: str):
    """The run config ``d`` written to ``config_path`` and parsed, any older run in its ``out_dir``
    removed first (a fresh demo run, never a resume of an older one)."""
    from effilm.config.run import RunConfig

    if Path(d["out_dir"]).exists():
        shutil.rmtree(d["out_dir"])
    atomic_write_json(config_path, d)
    return RunConfig.from_dict(d, where=where)


def timed_train(rc, seed: int) -> tuple[dict, list[dict]]:
    """Train ``rc`` from ``seed``; returns the summary every demo run reports, and its loss curve."""
    import torch

    from effilm.train.loop import train

    torch.manual_seed(seed)
    w0, c0 = time.perf_counter(), time.process_time()
    res = train(rc)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    curve, val_loss = curves(Path(rc.out_dir))
    return {"run_dir": str(rc.out_dir), "final_dir": str(res.final_dir), "steps": res.steps, "tokens": res.tokens,
            "final_loss": res.final_loss, "first_loss": curve[0]["loss"] if curve else None, "val_loss": val_loss,
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}, curve


def train_models(cfg: DemoConfig, tok: dict, out: Path, log=print) -> dict:
    """Train every demo model; returns ``{name: result}`` (see ``effilm.demo.run`` for the schema)."""
    sources = {name: tok["datasets"][name]["path"] for name in ("web", "textbook")}
    results = {}
    for name in MODEL_NAMES:
        # only dense-filtered reads the filtered corpus (another source would add a validation split to the others)
        extra = {FILTERED_SOURCE: tok["datasets"][FILTERED_SOURCE]["path"]} if name == "dense-filtered" else {}
        d = cfg.run_dict(name, str(out / name), tok["tokenizer"], {**sources, **extra})
        rc = fresh_run(d, out / f"{name}.json", f"demo run {name}")
        log(f"  {name}: {rc.model.num_active_params():,} active / {rc.model.num_params():,} total params, "
            f"{sum(s.tokens for s in rc.data.stages):,} tokens in stages {[s.name for s in rc.data.stages]}")
        run, curve = timed_train(rc, cfg.seed)
        moe = rc.model.moe
        results[name] = {
            **run, "config": str(out / f"{name}.json"), "preset": d["model"].get("preset", "upcycled"),
            "stages": [{"name": s.name, "tokens": s.tokens, "mixture": s.mixture} for s in rc.data.stages],
            "total_params": rc.model.num_params(), "active_params": rc.model.num_active_params(),
            "flops_per_token": rc.model.flops_per_token(cfg.seq_len), "loss_curve": curve,
            "tokens_per_cpu_s": round(run["tokens"] / max(run["cpu_s"], 1e-9), 1),
            "balance": moe.balance if moe else None, "tokens_total": run["tokens"], "cpu_s_total": run["cpu_s"],
        }
        if rc.model.upcycle is not None:  # the dense steps before upcycling count toward its budget and cost
            src = results["dense-textbook"]
            share = cfg.upcycle_step / max(src["steps"], 1)
            results[name].update(
                upcycled_from={"run": "dense-textbook", "step": cfg.upcycle_step, "checkpoint": rc.model.init_from,
                               "tokens": cfg.upcycle_step * cfg.tokens_per_step},
                tokens_total=run["tokens"] + cfg.upcycle_step * cfg.tokens_per_step,
                cpu_s_total=round(run["cpu_s"] + share * src["cpu_s"], 2))  # fmt: skip
        if moe:
            results[name]["final_balance"] = _final_balance(Path(rc.out_dir))
        log(f"  {name}: final loss {run['final_loss']:.3f}, val {run['val_loss']}, "
            f"{run['wall_s']:.1f}s wall, {run['cpu_s']:.1f}s CPU")
    return results


def _final_balance(run_dir: Path) -> dict:
    """The last logged balance of an MoE run: per layer, max load / mean and the starved fraction."""
    from effilm.reports.metrics import read_metrics

    last = read_metrics(run_dir / "metrics.jsonl").train[-1]
    return {"load_max_over_mean": last.get("load_max_over_mean"), "starved_frac": last.get("starved_frac")}


def accuracy(entry: dict, metric: str) -> dict:
    o = entry["overall"][metric]
    return {"acc": o["micro"], "stderr": o["micro_stderr"], "n": o["n"], "average": "micro"}


def evaluate_models(cfg: DemoConfig, synth: dict, cleaned: dict, trained: dict, out: Path, log=print) -> dict:
    """Quiz (letter and cloze) and bits per byte for every trained model, with contamination status."""
    import torch

    from effilm.demo.stages import quiz_spec
    from effilm.eval.report import run_evaluation
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.tasks import load_task
    from effilm.formats.load import load_model_and_tokenizer

    torch.set_num_threads(cfg.threads)
    quiz = load_task(quiz_spec(Path(synth["quiz"]["path"])))
    heldout = [load_task(f"ppl:{synth['paths'][k]},name={k}") for k in ("heldout_textbook", "heldout_web")]
    chance = synth["quiz"]["chance"]
    results = {}
    for name, tr in trained.items():
        runs = [tr] + ([trained[tr["upcycled_from"]["run"]]] if tr.get("upcycled_from") else [])
        used = sorted({src for r in runs for st in r["stages"] for src in st["mixture"]})
        corpus_report = corpus_contamination(cleaned, used)
        model, tokenizer = load_model_and_tokenizer(tr["final_dir"])
        entry: dict = {"trained_on": used, "chance": chance}
        for scoring in ("letter", "cloze"):
            ecfg = EvalConfig(shots=0, scoring=scoring, batch_size=cfg.eval_batch_size, seed=cfg.seed)
            tasks = [quiz] + (heldout if scoring == "cloze" else [])
            rep = run_evaluation(model, tokenizer, tasks, ecfg, corpus_report=corpus_report, model_path=tr["final_dir"])
            atomic_write_json(out / f"{name}-{scoring}.json", rep)
            q = rep["tasks"][0]
            entry[scoring] = accuracy(q, "acc")
            if scoring == "cloze":
                entry["cloze_norm"] = accuracy(q, "acc_norm")
                entry["bits_per_byte"] = {t["name"]: t["perplexity"]["bits_per_byte"] for t in rep["tasks"][1:]}
            else:
                preds = [r["prediction"] for r in q["items"]]
                entry["predicted_letters"] = {"ABCD"[i]: preds.count(i) for i in range(len(quiz.items[0].choices))}
            entry.setdefault("contamination", q.get("contamination"))
            entry.setdefault("reports", {})[scoring] = str(out / f"{name}-{scoring}.json")
        results[name] = entry
        log(f"  {name}: cloze {entry['cloze']['acc']:.3f}  letter {entry['letter']['acc']:.3f}  (chance {chance:.2f})  "
            f"bpb textbook {entry['bits_per_byte']['heldout_textbook']:.3f} web {entry['bits_per_byte']['heldout_web']:.3f}  "
            f"contaminated items in its data: {entry['contamination']['contaminated']}")
    return results


def corpus_contamination(cleaned: dict, corpora: list[str]) -> dict:
    """The quiz's contamination in the cleaned corpora one model trained on (union over corpora;
    the filtered web corpus is a subset of the cleaned web one, so it counts as that)."""
    ids: list[str] = []
    items = 0
    for c in corpora:
        d = cleaned["corpora"]["web" if c == FILTERED_SOURCE else c]["decontam"]
        items = d["items"]
        ids += [i for i in d["after_cleaning"]["contaminated_ids"] if i not in ids]
    return {"benchmarks": [{"name": "quiz", "items": items, "contaminated": len(ids), "contaminated_ids": ids}]}
