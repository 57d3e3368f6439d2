"""The demo's report: ``DIR/report.html`` and ``DIR/report.md`` built from ``summary.json``.

``write_demo_report(summary, out_dir)`` draws the plots (:mod:`effilm.reports.plots`) into
``DIR/plots/``, lays out the report dict :mod:`effilm.reports.render` renders, and returns the paths of
the Markdown and HTML files, in that order. Everything shown is read from the summary; nothing is computed here
except layout and the plots.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from effilm.config.presets import COST_SEQ_LEN, REAL_PRESETS

LABELS = {"dense-web": "dense, web text only", "dense-textbook": "dense, web then textbook",
          "dense-filtered": "dense, web then filtered web",
          "arctic-textbook": "Arctic hybrid, web then textbook (Switch loss)",
          "arctic-loss-free": "Arctic hybrid, web then textbook (loss-free balancing)",
          "arctic-upcycled": "Arctic hybrid upcycled from dense, web then textbook (loss-free)"}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _acc(a: dict) -> str:
    return f"{100 * a['acc']:.1f}% ± {100 * (a.get('stderr') or 0):.1f}"


def _plots(summary: dict, plot_dir: Path) -> dict[str, Path]:
    from effilm.reports.plots import plot_compare, plot_run

    tr = summary["train"]
    names = list(tr)
    out = {}
    out["compare"] = plot_compare([tr[n]["run_dir"] for n in names], plot_dir, labels=names)[0]
    for n in names:
        paths = plot_run(tr[n]["run_dir"], plot_dir / n)
        for p in paths:
            out[f"{n}/{p.stem}"] = p
    for kind, run in ((summary.get("posttrain") or {}).get("runs") or {}).items():
        for p in plot_run(run["run_dir"], plot_dir / kind):
            out[f"{kind}/{p.stem}"] = p
    tw = summary.get("twins")
    if tw:
        from effilm.reports.plots import draw_twin_gaps

        rows = [{"label": f"{n} ({m['label']})", "flagged": m["flagged"], **m["gaps"]["acc"]} for n, m in tw["models"].items()]
        out["twins"] = draw_twin_gaps(rows, plot_dir / "twins.png", tw["bootstrap"]["confidence"])
    return out


def _twin_blocks(tw: dict, plots: dict[str, Path]) -> list:
    g, leak, run = tw["spec"]["generator"], tw["leak"], tw["contaminated_run"]
    conf = round(100 * tw["bootstrap"]["confidence"])
    rows = []
    for n, m in tw["models"].items():
        a = m["gaps"]["acc"]
        rows.append([n, m["label"], _pct(a["public_acc"]), _pct(a["twin_acc"]), f"{100 * a['gap']:+.1f} points",
                     f"[{100 * a['ci'][0]:+.1f}, {100 * a['ci'][1]:+.1f}]", "**yes**" if m["flagged"] else "no",
                     f"{m['ngram_contaminated']}/{a['n_public']}"])
    blocks = [
        "**Private twins.** n-gram decontamination sees verbatim leaks only. The quiz asks "
        f"{round(100 * g['public_share'])}% of the taught facts; the twins ask the other "
        f"{tw['spec']['files']['twins']['items']} (taught "
        "alike by the corpora) in the quiz's own phrasings, with fresh distractors (`effilm twin make`, seed "
        f"{g['seed']}, twin seed {g['twin_seed']}). A model that learned the facts scores the same on both; one that "
        "saw the public items scores higher on them. `dense-contaminated` is deliberately contaminated: dense-web "
        f"trained on for {run['tokens']:,} more tokens, {_pct(leak['share'])} of them drawn from the {leak['items']} "
        f"public items with their answers ({leak['documents']} documents, {leak['tokens']:,} tokens).",
        {"table": {"headers": ["model", "data", "public (cloze)", "twins (cloze)", "gap", f"{conf}% CI", "flagged",
                               "public items in its corpora (n-gram)"], "rows": rows,
                   "caption": f"Zero-shot cloze accuracy; the interval is a percentile bootstrap "
                              f"({tw['bootstrap']['resamples']:,} resamples) of the gap. A gap whose interval excludes "
                              "0 is flagged."}},
    ]
    if "twins" in plots:
        blocks.append({"image": {"path": str(plots["twins"]), "caption": "Public and twin accuracy per model, and "
                                                                         "the gap with its interval."}})
    return blocks


def _posttrain_section(pt: dict, plots: dict[str, Path], chance: float) -> dict:
    from effilm.demo.config import POSTTRAIN_LABELS as PT_LABELS

    ev, runs, data = pt["evaluate"], pt["runs"], pt["data"]
    rows = [[PT_LABELS[m], _acc(e["chat_exact_match"]), _acc(e["letter"]), _pct(chance),
             ", ".join(f"{k}: {v}" for k, v in e["predicted_letters"].items())] for m, e in ev.items()]
    sft, dpo = runs["sft"], runs["dpo"]
    last = dpo.get("last") or {}
    blocks = [
        f"The {pt['from']} model, fine-tuned with SFT on {data['chat']['records']} chat conversations about its facts "
        f"({data['chat']['tokens']:,} tokens; the loss over the assistant's tokens only; {sft['steps']} steps, loss "
        f"{sft['first_loss']:.3f} → {sft['final_loss']:.3f}), then with DPO (loss {dpo['dpo']['loss']}, beta "
        f"{dpo['dpo']['beta']}, reference log-probabilities computed once before training) on "
        f"{data['preferences']['records']} pairs of a right answer against a plausible wrong one ({dpo['steps']} steps, "
        f"loss {dpo['first_loss']:.3f} → {dpo['final_loss']:.3f}). The conversations ask in the exercises' and in "
        f"conversational phrasings, never the quiz's: decontamination finds {data['chat']['contaminated']} quiz items in the chat data and "
        f"{data['preferences']['contaminated']} in the pairs.",
        {"table": {"headers": ["model", "chat-form quiz (exact match)", "quiz letter", "chance (letter)", "letters picked"],
                   "rows": rows,
                   "caption": "The quiz asked as free-form chat questions through the chat template, answered greedily "
                              "and scored by exact match after normalising case, punctuation and articles "
                              "(`effilm eval MODEL --task chat:quiz.jsonl`); letter scoring as in section 3."}},
    ]
    if last:
        blocks.append(f"At the last DPO step: reward of the chosen answers {last['rewards_chosen']:.3f}, of the "
                      f"rejected {last['rewards_rejected']:.3f}, margin {last['rewards_margin']:.3f}, preference "
                      f"accuracy {_pct(last['rewards_accuracy'])}.")
    for key, caption in (("sft/loss", "SFT: training loss (assistant tokens only)."),
                         ("dpo/rewards", "DPO: rewards of the chosen and rejected answers, their margin and the "
                                         "preference accuracy over training.")):
        if key in plots:
            blocks.append({"image": {"path": str(plots[key]), "caption": caption}})
    ex = ev["dpo"]["chat_examples"]
    blocks.append({"table": {"headers": ["question", "expected", "SFT + DPO answer", "exact match"],
                             "rows": [[e["question"], e["answers"][0], e["output"], "yes" if e["correct"] else "no"]
                                      for e in ex],
                             "caption": "The first chat-form quiz questions, answered by the post-trained model."}})
    tr = pt.get("transcript") or {}
    if tr.get("status") == "done":
        rows = []
        for turn in tr["turns"]:
            rows += [["user", turn["messages"][-1]["content"]],
                     ["assistant", f"{turn['reply']} (finish: {turn['finish_reason']}; expected: {turn['expected']})"]]
        blocks += [f"`effilm serve` with the SFT + DPO model, asked through the official OpenAI client "
                   f"({tr['client']}): `client.chat.completions.create(model=\"{tr['model']}\", messages=[...], "
                   f"max_tokens={tr['request']['max_tokens']}, temperature=0)` against `{tr['url']}`:",
                   {"table": {"headers": ["role", "message"], "rows": rows, "caption": "Transcript of the chat endpoint."}}]
    else:
        blocks.append(f"The serve transcript was skipped: missing {', '.join(tr.get('missing', []))}.")
    return {"title": "4. Post-training: the chat model", "blocks": blocks}


def _filter_blocks(qf: dict, tr: dict, ev: dict) -> list:
    """What the learned quality filter kept and why, and where web-then-filtered-web lands."""
    from effilm.demo.notes import between

    kept, dropped, clf, ann = qf["kept"], qf["dropped"], qf["classifier"], qf["annotations"]
    group_rows = [[name, g["documents"], f"{g['words']:,}", g["mean_score"], g["mean_rubric_score"],
                   g["facts_per_document"], g["noise_lines_per_document"], g["facts_per_100_words"],
                   _pct(g["rubric_3_or_more"])] for name, g in (("kept", kept), ("dropped", dropped))]
    ex_rows = [[which, e["score"], e["rubric_score"], e["facts"], e["noise_lines"], e["text"].replace("\n", " / ")]
               for which in ("high", "low") for e in qf["examples"][which]]
    names = ["dense-web", "dense-filtered", "dense-textbook"]
    rows = [[n, LABELS[n], " → ".join(st["name"] for st in tr[n]["stages"]), tr[n]["tokens"], _acc(ev[n]["cloze"]),
             round(ev[n]["bits_per_byte"]["heldout_textbook"], 3), round(ev[n]["bits_per_byte"]["heldout_web"], 3)]
            for n in names]  # fmt: skip
    cl = {n: ev[n]["cloze"]["acc"] for n in names}
    blocks = [
        "**What filtering buys.** FineWeb-Edu's recipe at the demo's size: the procedural annotator scored "
        f"{ann['scored']} web records generated apart from the corpus on the additive 0–5 rubric (a point for one "
        "fact, one for two, one when facts are at least half the lines, one for three facts, one when at most a "
        f"fifth of the lines are distractors); a hashed word n-gram classifier trained on them (F1 {clf['f1']:.3f} at "
        f"threshold {clf['threshold']:g}, MAE {clf['mae']:.3f} on {clf['split']['test']} held out) scored the cleaned "
        f"web corpus (`effilm filter --classifier`), and the top {_pct(qf['keep_fraction'])} by score were kept: "
        f"{qf['kept_documents']} of {qf['input_documents']} documents, score at least {qf['score_cutoff']:.2f}. "
        "The classifier never sees provenance, only the words; what it kept is told by the facts and distractor "
        f"lines of each group (the annotator's counts): {kept['facts_per_document']} facts among "
        f"{kept['noise_lines_per_document']} distractor lines per kept document, {dropped['facts_per_document']} among "
        f"{dropped['noise_lines_per_document']} per dropped one:",
        {"table": {"headers": ["web documents", "count", "words", "mean classifier score", "mean rubric score",
                               "facts / doc", "distractor lines / doc", "facts / 100 words", "rubric ≥ 3"],
                   "rows": group_rows,
                   "caption": "Rubric score: the annotator's, from what the generator knows (not seen by the classifier)."}},
        {"table": {"headers": ["end", "classifier score", "rubric score", "facts", "distractor lines", "text (lines joined by /)"],
                   "rows": ex_rows, "caption": "The highest- and lowest-scored documents of the web corpus."}},
    ]
    if Path(clf["png"]).is_file():
        blocks.append({"image": {"path": clf["png"], "caption": "The classifier on its held-out annotations: the "
                                                                "score confusion matrix (F1 at the threshold) and "
                                                                "predicted against annotated scores."}})
    blocks += [
        {"table": {"headers": ["model", "what", "stages", "tokens", "quiz cloze", "bits/byte textbook", "bits/byte web"],
                   "rows": rows,
                   "caption": "Same size and tokens. dense-filtered has dense-textbook's stage split: only the "
                              "second stage's data differs."}},
        f"On the quiz the filtered-web model lands {between(cl['dense-filtered'], cl['dense-web'], cl['dense-textbook'])} "
        "on this seed. The three-seed comparison is the demo's slow test; docs/ARCHITECTURE.md gives its figures.",
    ]
    return blocks


def _moe_blocks(tr: dict, ev: dict) -> list:
    """Dense vs the Arctic hybrids at matched active compute: quality, cost and expert balance."""
    from effilm.demo.config import MOE_RUNS

    names = ["dense-textbook"] + [n for n in MOE_RUNS if n in tr]
    rows = []
    for n in names:
        t, e = tr[n], ev[n]
        fb = t.get("final_balance") or {}
        rows.append([n, t.get("balance") or "–", t["active_params"], t["total_params"], t.get("tokens_total", t["tokens"]),
                     round(e["bits_per_byte"]["heldout_textbook"], 4), round(e["bits_per_byte"]["heldout_web"], 4),
                     _acc(e["cloze"]), round(t.get("cpu_s_total", t["cpu_s"]), 1),
                     ", ".join(f"{x:.2f}" for x in fb.get("load_max_over_mean") or []) or "–",
                     ", ".join(f"{x:.2f}" for x in fb.get("starved_frac") or []) or "–"])
    up = tr.get("arctic-upcycled", {}).get("upcycled_from")
    return [
        "**Dense vs MoE at matched active compute.** The hybrids have the dense model's active parameters and "
        "tokens: trained from scratch with the Switch loss or with loss-free balancing, or "
        + (f"upcycled from the dense run's checkpoint at step {up['step']} ({up['tokens']:,} dense tokens, counted in "
           "its budget and CPU time) and trained on the rest. " if up else "upcycled from the dense run. ")
        + "One seed at one learning rate; `benchmarks/moe_vs_dense.py` runs the three-seed comparison with each "
          "arm's rate tuned.",
        {"table": {"headers": ["model", "balancing", "active params", "total params", "tokens", "bits/byte textbook",
                               "bits/byte web", "quiz cloze", "train CPU s", "max/mean load (per layer)",
                               "starved experts (per layer)"], "rows": rows,
                   "caption": "Balance at the last logged step: 1.00 max/mean is perfect balance; 'starved' counts "
                              "experts under a quarter of the balanced share."}},
    ]


def _model_configs(summary: dict) -> list[dict]:
    cfgs = []
    for name, t in summary["train"].items():
        m = json.loads((Path(t["final_dir"]) / "config.json").read_text())["model"]
        cfgs.append({**m, "name": f"demo: {name}"})
    return cfgs


def build_report(summary: dict, plots: dict[str, Path]) -> dict:
    from effilm.reports.render import model_cost_table

    tr, ev, syn, cl = summary["train"], summary["evaluate"], summary["synthesize"], summary["clean"]
    chance = syn["quiz"]["chance"]
    quick = " (quick mode: smaller data and budgets)" if summary.get("quick") else ""
    sections = []

    pl = cl["planted_leak_check"]
    data_rows = [[k, v["documents"], f"{v['words']:,}"] for k, v in syn["corpora"].items()]
    clean_rows = [[k, v["input_documents"], v["dedup"]["removed_exact"] + v["dedup"]["removed_near"],
                   v["filters"]["rejected"], v["decontam"]["contaminated"], v["decontam"]["after_cleaning"]["contaminated"],
                   v["output_documents"]] for k, v in cl["corpora"].items()]  # fmt: skip
    sections.append({"title": "1. Data: synthesize and clean", "blocks": [
        f"{syn['facts']['count']} facts drawn from the bundled tables, stated by the procedural textbook "
        "generator (lessons, and exercises with solutions in several phrasings) and by the web-like generator "
        "(the same facts in loose prose among distractor lines). The quiz asks each fact in a phrasing the "
        f"corpora never use: {syn['quiz']['items']} four-choice items, chance {_pct(chance)}.",
        {"table": {"headers": ["corpus", "documents", "words"], "rows": data_rows}},
        {"table": {"headers": ["corpus", "in", "dedup removed", "filters rejected", "quiz items found",
                               "after cleaning", "out"], "rows": clean_rows,
                   "caption": "Deduplication (exact + MinHash LSH), quality filters, then decontamination against the quiz."}},
        f"**Planted-leak check.** {len(pl['planted'])} quiz items were planted in a copy of the cleaned textbook "
        f"corpus; decontamination found {len(pl['found_items'])} items "
        f"({'exactly the planted ones' if pl['exact'] else 'NOT exactly the planted ones'}; missed {len(pl['missed'])}, "
        f"false positives {len(pl['false_positives'])}).",
    ]})

    train_rows = [[n, LABELS.get(n, n), t["active_params"], t["total_params"], t["tokens"],
                   " → ".join(s["name"] for s in t["stages"]), round(t["final_loss"], 3),
                   round(t["cpu_s"], 1)] for n, t in tr.items()]  # fmt: skip
    blocks = [
        f"{len(tr)} models at equal token budgets. The Arctic hybrids have the same *active* parameters as the dense "
        "model (a dense residual MLP plus a routed top-2 MoE in every layer) and several times the total.",
        {"table": {"headers": ["model", "what", "active params", "total params", "tokens", "stages", "final loss",
                               "train CPU s"], "rows": train_rows}},
        {"image": {"path": str(plots["compare"]), "caption": "Training loss against tokens and against active training FLOPs."}},
    ]
    for key, p in plots.items():
        if key.endswith("/expert_load"):
            blocks.append({"image": {"path": str(p), "caption": f"{key.split('/')[0]}: load per expert over training "
                                                                 "(1.0 = uniform), one panel per MoE layer."}})
        elif key.endswith("/balance"):
            blocks.append({"image": {"path": str(p), "caption": f"{key.split('/')[0]}: per MoE layer, the busiest "
                                                                 "expert's load over the mean and the fraction of "
                                                                 "experts under a quarter of the balanced share."}})
    sections.append({"title": "2. Training", "blocks": blocks})

    eval_rows = []
    for n, e in ev.items():
        c = e.get("contamination") or {}
        eval_rows.append([n, _acc(e["cloze"]), _acc(e["letter"]), _pct(chance),
                          round(e["bits_per_byte"]["heldout_textbook"], 3), round(e["bits_per_byte"]["heldout_web"], 3),
                          f"{c.get('contaminated', '?')}/{c.get('items', '?')} quiz items"])
    letters = [[n, ", ".join(f"{k}: {v}" for k, v in e["predicted_letters"].items())] for n, e in ev.items()]
    sections.append({"title": "3. Evaluation", "blocks": [
        {"table": {"headers": ["model", "quiz cloze", "quiz letter", "chance", "bits/byte textbook", "bits/byte web",
                               "contamination of its training data"], "rows": eval_rows,
                   "caption": "Accuracy ± standard error over the quiz items (one seed; `benchmarks/bench_demo.py` "
                              "gathers several seeds' summaries)."}},
        "**Cloze** scores each answer text's log-likelihood after `Question: …\\nAnswer:`; **letter** scoring "
        "(lm-evaluation-harness's MMLU method) scores the letters A–D after the listed choices. Models this small "
        "tend to pick one letter whatever the question, so letter accuracy sits near chance:",
        {"table": {"headers": ["model", "letters picked"], "rows": letters}},
    ]})

    if "dense-filtered" in ev and "quality_filter" in cl:
        sections[-1]["blocks"] += _filter_blocks(cl["quality_filter"], tr, ev)
    sections[-1]["blocks"] += _moe_blocks(tr, ev)
    if summary.get("twins"):
        sections[-1]["blocks"] += _twin_blocks(summary["twins"], plots)

    pt = summary.get("posttrain")
    if pt:
        sections.append(_posttrain_section(pt, plots, chance))

    sh = summary.get("ship") or {}
    if sh.get("status") == "done":
        qrows = [["fp32", f"{sh['fp32']['weight_bytes'] / 2**20:.2f} MiB", round(sh["fp32"]["ppl"], 3), "–",
                  _pct(sh["fp32"]["cloze_acc"]), "–"]]
        for r in sh["quantized"]:
            qrows.append([r["variant"], f"{r['weight_bytes_quant'] / 2**20:.2f} MiB", round(r["ppl_quant"], 3),
                          f"{r['greedy_agreement']:.3f}", _pct(r["cloze_acc"]), f"{r['max_layer_error']:.2e}"])
        gens = [[g["question"], g["answer"], g["greedy"], g["sampled"]] for g in sh["generations"]]
        ex = sh["exports"]
        sections.append({"title": f"5. Ship: {sh['model']}", "blocks": [
            {"table": {"headers": ["weights", "size", "held-out perplexity", "greedy agreement with fp32", "quiz cloze",
                                   "largest per-layer error"], "rows": qrows,
                       "caption": "Weight-only quantization of attention, MLP and expert weights; embeddings, LM head, "
                                  "norms and router stay fp32 (and dominate the size of a model this small)."}},
            f"Exported to Hugging Face format (`{ex['hf']}`) and to GGUF q8_0 for llama.cpp (`{ex['gguf']}`, "
            f"{ex['gguf_bytes'] / 2**20:.2f} MiB, every tensor read back and checked).",
            {"table": {"headers": ["question", "answer", "greedy", f"sampled (T={sh['sampling']['temperature']}, "
                                   f"top-p {sh['sampling']['top_p']})"], "rows": gens,
                       "caption": "Quiz questions answered by the generation engine."}},
        ]})

    sections.append({"title": "6. Cost: the demo models beside the real ones", "blocks": [
        {"table": model_cost_table(_model_configs(summary) + list(REAL_PRESETS), COST_SEQ_LEN)},
        "The same accounting gives Arctic's 17.3B active of 478.6B total parameters: the hybrid's promise is the "
        "active column, which is what each token pays for.",
    ]})

    notes = summary.get("notes", [])
    sections.append({"title": "7. What the numbers say", "blocks": [
        {"text": "\n".join(f"- {'**yes**' if n['shows'] else '**no**' if n['shows'] is False else '–'}: {n['text']}"
                           for n in notes)}]})

    t = summary["timings"]
    return {
        "title": "effilm demo: efficient language models, both routes, end to end" + quick,
        "subtitle": "Synthetic textbook data and a Dense-MoE hybrid, trained, evaluated and shipped on a CPU.",
        "run_info": {"command": "effilm demo" + (" --quick" if summary.get("quick") else ""),
                     "seed": summary["seed"], "effilm": summary["effilm_version"],
                     "machine": f"{platform.machine()}, {platform.python_version()}",
                     "total": f"{t['total']['wall_s']:.0f} s wall, {t['total']['cpu_s']:.0f} s CPU"},
        "timings": [{"stage": k, "seconds": v["wall_s"]} for k, v in t.items() if k not in ("total", "report")],
        "sections": sections,
        "scale_notes": {
            "shown": [n["text"] for n in notes if n["shows"]] + [
                "The whole path runs and is checked: data with planted leaks found, training with exact resume, "
                "evaluation the harness's way, quantization with its quality delta, exports read back."],
            "not_shown": [n["text"] for n in notes if n["shows"] is False] + [
                "Nothing about models of real size: a few hundred thousand parameters trained for minutes on "
                f"{syn['facts']['count']} facts cannot show emergent ability, and these accuracies say nothing "
                "about MMLU.",
                "MoE efficiency at scale: on a CPU at this size the expert dispatch costs more than it saves."],
        },
    }


def write_demo_report(summary: dict, out_dir: Path) -> tuple[Path, Path]:
    from effilm.reports.render import render_report

    plots = _plots(summary, Path(out_dir) / "plots")
    return render_report(build_report(summary, plots), out_dir)
