"""The demo's private-twin stage: does the public-versus-twin gap catch a contaminated model?

``synthesize`` splits the taught facts: the public quiz asks ``quiz_public_share`` of them, and
``effilm.synth.twins`` writes the twins (the held-back facts, which the corpora teach alike, in
the quiz's phrasings) to ``data/twins``. This stage:

* writes a leaked corpus: every public quiz item with its answer, as a cloze line and as an
  MMLU-style listing (the benchmark as a scraped page would hold it);
* trains ``dense-contaminated``, labelled so everywhere: ``dense-web`` continued for
  ``contaminated_tokens`` tokens on web text mixed with that leak (``contaminated_leak_share``);
* scores ``dense-web``, ``dense-textbook`` and ``dense-contaminated`` on the public items and the
  twins (zero-shot cloze, the demo's headline scoring) with :func:`effilm.eval.twins.evaluate_twins`,
  beside each model's n-gram contamination of the public quiz.

It returns the ``twins`` section of ``summary.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from effilm.demo.config import DemoConfig
from effilm.eval.tasks import LETTERS
from effilm.io import atomic_write_json

CONTAMINATED = "dense-contaminated"
COMPARED = ("dense-web", "dense-textbook", CONTAMINATED)  # the clean models: the contaminated one's base, the textbook one
LEAK = "quiz_leak"


def leak_documents(items: list) -> list[dict]:
    """Each public item (``effilm.eval.tasks.Item``) with its answer, twice: as the cloze prompt
    answered and as an MMLU-style listing with the answer letter."""
    docs = []
    for i, it in enumerate(items):
        answer = it.choices[it.answer]
        listing = "\n".join([it.question, *(f"{LETTERS[k]}. {c}" for k, c in enumerate(it.choices))])
        docs.append({"id": f"leak-{i}-cloze", "text": f"Question: {it.question}\nAnswer: {answer}"})
        docs.append({"id": f"leak-{i}-listing", "text": f"{listing}\nAnswer: {LETTERS[it.answer]} ({answer})"})
    return docs


def twins_stage(cfg: DemoConfig, summary: dict, out: Path, log=print) -> dict:
    import torch

    from effilm.config.data import TokenizeConfig
    from effilm.data.shards import tokenize_files
    from effilm.demo.stages import decontam_config, quiz_spec, write_jsonl
    from effilm.demo.train import corpus_contamination, fresh_run, timed_train
    from effilm.eval.decontam_scan import find_contamination
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.tasks import load_task
    from effilm.eval.twins import TwinEvalConfig, evaluate_twins
    from effilm.formats.load import load_model_and_tokenizer

    synth, trained = summary["synthesize"], summary["train"]
    twin_dir = Path(synth["twins"]["dir"])
    quiz = load_task(quiz_spec(Path(synth["quiz"]["path"])))
    # the leaked corpus, tokenized with the demo's tokenizer
    leak = out / f"{LEAK}.jsonl"
    n_docs = write_jsonl(leak, leak_documents(quiz.items))
    found = find_contamination([quiz], [leak], decontam_config(cfg))["benchmarks"][0]
    tokens = out / "tokens" / LEAK
    if tokens.exists():
        shutil.rmtree(tokens)
    m = tokenize_files([leak], summary["tokenize"]["tokenizer"], tokens, TokenizeConfig())
    log(f"  leaked corpus: {n_docs} documents ({m['tokens']:,} tokens) holding {len(quiz.items)} public quiz items; "
        f"n-gram decontamination finds {found['contaminated']} of them")
    base = trained["dense-web"]["final_dir"]
    d = cfg.contaminated_run_dict(str(out / "runs" / CONTAMINATED), base,
                                  {"web": summary["tokenize"]["datasets"]["web"]["path"], LEAK: str(tokens)})
    rc = fresh_run(d, out / "runs" / f"{CONTAMINATED}.json", f"demo run {CONTAMINATED}")
    run, _ = timed_train(rc, cfg.seed)
    log(f"  {CONTAMINATED}: dense-web continued for {run['tokens']:,} tokens ({cfg.contaminated_leak_share:.0%} "
        f"leaked quiz text), final loss {run['final_loss']:.3f}, {run['wall_s']:.1f}s wall")
    torch.set_num_threads(cfg.threads)
    ecfg = EvalConfig(shots=0, scoring="cloze", batch_size=cfg.eval_batch_size, seed=cfg.seed)
    tcfg = TwinEvalConfig(bootstrap_seed=cfg.seed)
    dirs = {name: trained[name]["final_dir"] for name in COMPARED if name != CONTAMINATED}
    dirs[CONTAMINATED] = run["final_dir"]
    models = {}
    for name, model_dir in dirs.items():
        # the public set is the quiz file's items (the same ids): each model's n-gram figure beside its scores
        if name == CONTAMINATED:
            q = {k: found[k] for k in ("items", "contaminated", "contaminated_ids")}
        else:
            q = corpus_contamination(summary["clean"], summary["evaluate"][name]["trained_on"])["benchmarks"][0]
        ngram = {"benchmarks": [{**q, "name": "public"}]}
        model, tok = load_model_and_tokenizer(model_dir)
        rep = evaluate_twins(model, tok, twin_dir, ecfg, tcfg, model_path=model_dir, corpus_report=ngram)
        atomic_write_json(out / "eval" / f"{name}-twins.json", rep)
        g = rep["gaps"]["acc"]
        models[name] = {"label": "deliberately contaminated" if name == CONTAMINATED else "clean",
                        "model_dir": model_dir, "gaps": rep["gaps"], "flagged": g["flagged"],
                        "ngram_contaminated": rep["tasks"][0]["contamination"]["contaminated"],
                        "report": str(out / "eval" / f"{name}-twins.json")}
        log(f"  {name:19s} ({models[name]['label']}): public {g['public_acc']:.3f}  twins {g['twin_acc']:.3f}  gap "
            f"{g['gap']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]  {'FLAGGED' if g['flagged'] else 'not flagged'}; "
            f"n-gram: {models[name]['ngram_contaminated']} public items in its corpora")
    section = {"dir": str(twin_dir), "spec": synth["twins"]["spec"], "scoring": "cloze, zero-shot",
               "bootstrap": {"resamples": tcfg.resamples, "confidence": tcfg.confidence, "seed": tcfg.bootstrap_seed},
               "leak": {"path": str(leak), "documents": n_docs, "tokens": m["tokens"], "items": len(quiz.items),
                        "share": cfg.contaminated_leak_share,
                        "ngram_found": found["contaminated"]},
               "contaminated_run": {**run, "config": str(out / "runs" / f"{CONTAMINATED}.json"), "init_from": base},
               "models": models}
    atomic_write_json(out / "twins.json", section)
    return section
