"""Plain-language notes for the demo's summary, computed from its numbers.

Each note is ``{"topic", "shows", "text"}``: ``shows`` is True when the numbers support a claim,
False when they do not, and None for a statement of scope. Every comparison says which way it came
out; a difference counts as real only when it exceeds ``significance_z`` standard errors (the
standard error of a difference of two independent accuracies).
"""

from __future__ import annotations

import math

from effilm.demo.config import MOE_RUNS

MOE_LABELS = {"arctic-textbook": "Switch loss", "arctic-loss-free": "loss-free balancing",
              "arctic-upcycled": "upcycled from the dense model"}


def _diff(a: dict, b: dict, z: float) -> tuple[float, float, bool]:
    """(a - b, its standard error, whether |a - b| > z * se) for two accuracy dicts."""
    se = math.sqrt((a.get("stderr") or 0.0) ** 2 + (b.get("stderr") or 0.0) ** 2)
    d = a["acc"] - b["acc"]
    return d, se, abs(d) > z * se if se > 0 else d != 0


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _letter_verdict(ev: dict, chance: float, z: float) -> tuple[list[float], list[str], list[str]]:
    """(share of each model's most-picked letter, the models that pick one letter >= 90% of the
    time, the others clearly above chance). A model that answers one letter almost always scores
    that letter's share of the answer key: above chance by the key's imbalance, not by knowledge."""
    top = [max(ev[m]["predicted_letters"].values()) / max(sum(ev[m]["predicted_letters"].values()), 1) for m in ev]
    fixed = [m for t, m in zip(top, ev) if t >= 0.9]
    above = [m for m in ev if ev[m]["letter"]["acc"] - chance > z * (ev[m]["letter"]["stderr"] or 0.0)
             and m not in fixed]
    return top, fixed, above


def build_notes(summary: dict, z: float, cloze_target: float) -> list[dict]:
    ev, tr = summary["evaluate"], summary["train"]
    chance = summary["synthesize"]["quiz"]["chance"]
    n_items = summary["synthesize"]["quiz"]["items"]
    notes: list[dict] = []

    def note(topic: str, shows, text: str) -> None:
        notes.append({"topic": topic, "shows": shows, "text": text})

    tb = ev["dense-textbook"]["cloze"]
    d, se, sig = _diff(tb, {"acc": chance, "stderr": 0.0}, z)
    note("cloze_vs_chance", sig and d > 0,
         f"The textbook-trained dense model answers {_pct(tb['acc'])} of {n_items} held-out quiz questions by cloze "
         f"scoring, against {_pct(chance)} chance ({'clearly above' if sig and d > 0 else 'not clearly above'} "
         f"chance at {z:g} standard errors; the issue's target is {_pct(cloze_target)}: "
         f"{'met' if tb['acc'] >= cloze_target else 'not met'} on this seed).")

    web = ev["dense-web"]["cloze"]
    d, se, sig = _diff(tb, web, z)
    which = "beat" if d > 0 else "did not beat"
    note("textbook_vs_web", sig and d > 0,
         f"Phi thesis in miniature: at equal tokens ({tr['dense-textbook']['tokens']:,}) and equal size, the model "
         f"trained web-then-textbook {which} the web-only model on the quiz: cloze {_pct(tb['acc'])} vs "
         f"{_pct(web['acc'])} (difference {100 * d:+.1f} points, standard error {100 * se:.1f}; "
         f"{'a real difference' if sig else 'within noise'}). The textbook corpus also teaches the question-and-answer "
         f"form; the web text only states the facts in loose prose.")

    if "dense-filtered" in ev and "quality_filter" in summary["clean"]:
        _filter_note(note, summary, z)

    de, td = ev["dense-textbook"], tr["dense-textbook"]
    moe = [m for m in MOE_RUNS if m in ev]
    best = min(moe, key=lambda m: ev[m]["bits_per_byte"]["heldout_textbook"])
    ar, ta = ev[best], tr[best]
    d, se, sig = _diff(ar["cloze"], de["cloze"], z)
    bpb_a, bpb_d = ar["bits_per_byte"]["heldout_textbook"], de["bits_per_byte"]["heldout_textbook"]
    arms = "; ".join(f"{MOE_LABELS.get(m, m)} {ev[m]['bits_per_byte']['heldout_textbook']:.4f}" for m in moe)
    cost = ta.get("cpu_s_total", ta["cpu_s"]) / max(td["cpu_s"], 1e-9)
    note("moe_vs_dense", bpb_a < bpb_d,
         f"At equal active parameters ({ta['active_params']:,} vs {td['active_params']:,}) and equal tokens, Arctic "
         f"hybrids with {ta['total_params']:,} parameters in total ({ta['total_params'] / td['total_params']:.1f}x the "
         f"dense model) reach held-out textbook bits per byte of {arms}, against the dense model's {bpb_d:.4f} "
         f"(lower is better). The best, {MOE_LABELS.get(best, best)}, is "
         f"{'ahead of' if bpb_a < bpb_d else 'behind'} dense by {abs(bpb_d - bpb_a):.4f} ("
         f"{'lower is better: MoE ahead' if bpb_a < bpb_d else 'lower is better: dense ahead'}); on the quiz it "
         f"{'beat' if d > 0 and sig else 'did worse than' if sig else 'did not clearly differ from'} the dense model "
         f"(cloze {_pct(ar['cloze']['acc'])} vs {_pct(de['cloze']['acc'])}), at {cost:.2f}x its CPU time. One seed "
         "at one learning rate: the three-seed verdict with each arm's rate tuned is benchmarks/moe_vs_dense.py's "
         "(docs/ARCHITECTURE.md gives its figures).")

    letters = [ev[m]["letter"]["acc"] for m in ev]
    top, fixed, above = _letter_verdict(ev, chance, z)
    if not above:
        verdict = (f"none clearly above chance ({_pct(chance)}) on merit: models this small have not learned to map "
                   "an answer to its letter, which is why cloze scoring (the answer text itself) is the measure at "
                   "this scale")
    else:
        verdict = (f"clearly above chance ({_pct(chance)}) for {', '.join(above)}: some letter-to-answer mapping is "
                   "being learned, though cloze scoring remains the measure at this scale")
    if fixed:
        verdict += (f"; {', '.join(fixed)} answer one letter at least 90% of the time, so their letter score is just "
                    "how often that letter is the key")
    note("letter_scoring", bool(above),
         f"Letter scoring (A-D, the harness's MMLU method) gives {', '.join(_pct(a) for a in letters)} for "
         f"{', '.join(ev)}, {verdict}. The most-picked letter takes {', '.join(_pct(t) for t in top)} of each "
         "model's answers (25% would be no preference).")

    pl = summary["clean"]["planted_leak_check"]
    note("decontamination", pl["exact"],
         f"Decontamination at effilm's defaults found {len(pl['found_items'])} quiz item(s) in a copy of the textbook "
         f"corpus where {len(pl['planted'])} were planted ({'exactly those' if pl['exact'] else 'NOT exactly those'}; "
         f"missed {len(pl['missed'])}, false positives {len(pl['false_positives'])}). The quiz is templated: the "
         "matched fraction of an item's text alone would also confirm "
         f"{len(pl['without_distinguishing_words']['false_positives'])} unplanted items that share a question template "
         "with a leaked one; the defaults also require each item's distinguishing words (the entity its "
         "template-mates lack) beside the hits. The corpora the models trained on hold "
         f"{sum(c['decontam']['after_cleaning']['contaminated'] for c in summary['clean']['corpora'].values())} quiz "
         "items after cleaning, so the quiz scores are not memorised test items.")

    if summary.get("twins"):
        _twin_note(note, summary["twins"])

    pt = summary.get("posttrain")
    if pt:
        _posttrain_notes(note, pt, chance, n_items, z)

    note("scale", None,
         "What this does not show: anything at real scale. These are models of about "
         f"{td['total_params'] / 1e6:.1f}M parameters trained for minutes on one CPU on {summary['synthesize']['facts']['count']} "
         "procedurally generated facts; the quiz asks the same facts in held-out phrasings, so it measures recall "
         "and transfer of the question form, not general knowledge or reasoning. One seed per run: the spread across "
         "seeds is measured by the slow test (three seeds), not by this run.")
    return notes


def _twin_note(note, tw: dict) -> None:
    """Whether the public-versus-twin gap flags the deliberately contaminated model and not the clean
    textbook one."""
    models = tw["models"]
    bad = next(n for n, m in models.items() if m["label"] != "clean")
    conf = f"{round(100 * tw['bootstrap']['confidence'])}% CI"

    def gap(n: str) -> str:
        a = models[n]["gaps"]["acc"]
        return (f"{_pct(a['public_acc'])} on the public items and {_pct(a['twin_acc'])} on the twins, a gap of "
                f"{100 * a['gap']:+.1f} points ({conf} [{100 * a['ci'][0]:+.1f}, {100 * a['ci'][1]:+.1f}]): "
                f"{'flagged' if models[n]['flagged'] else 'not flagged'}")

    clean = [n for n, m in models.items() if m["label"] == "clean"]
    caught = models[bad]["flagged"] and not models["dense-textbook"]["flagged"]
    others = [n for n in clean if n != "dense-textbook"]
    note("twins", caught,
         f"Private twins: {bad}, trained with the public quiz items in {_pct(tw['leak']['share'])} of its last "
         f"{tw['contaminated_run']['tokens']:,} tokens (deliberately contaminated), scores {gap(bad)}. The clean "
         f"textbook model scores {gap('dense-textbook')}"
         + "".join(f"; {n}, also clean, {gap(n)}" for n in others) + ". "
         + ("The gap tells the contaminated model from the clean ones without reading any corpus; "
            if caught else "So on this seed the gap does NOT separate the contaminated model from the clean textbook "
            "one; ")
         + f"n-gram decontamination also finds this leak ({models[bad]['ngram_contaminated']} items) because it is "
         "verbatim, but a paraphrased leak, or tuning to the benchmark's style, would show only in the gap.")


def between(f: float, w: float, t: float) -> str:
    """Where ``f`` lands on the way from the web-only model's ``w`` to the textbook model's ``t``."""
    if t == w:
        return "level with both" if f == w else ("above both" if f > w else "below both")
    frac = (f - w) / (t - w)
    if frac < 0:
        return f"on the far side of web-only from web-then-textbook ({100 * frac:.0f}% of the way)"
    if frac > 1:
        return f"past web-then-textbook ({100 * frac:.0f}% of the way from web-only)"
    return f"{100 * frac:.0f}% of the way from web-only to web-then-textbook"


def fact_statements(summary: dict) -> dict | None:
    """Statements of each fact (on average) that dense-web and dense-filtered read in training:
    per stage, the epochs of its corpus times the facts that corpus states, over the facts. None
    when the summary lacks the counts."""
    tok, tr = summary.get("tokenize"), summary["train"]
    qf = summary["clean"]["quality_filter"]
    try:
        facts = {"web_filtered": qf["kept"]["facts_per_document"] * qf["kept"]["documents"]}
        facts["web"] = facts["web_filtered"] + qf["dropped"]["facts_per_document"] * qf["dropped"]["documents"]
        tokens = {k: tok["datasets"][k]["tokens"] for k in facts}
        n = summary["synthesize"]["facts"]["count"]
    except (KeyError, TypeError):
        return None
    return {m: round(sum(st["tokens"] / tokens[src] * facts[src] / n for st in tr[m]["stages"] for src in st["mixture"]))
            for m in ("dense-web", "dense-filtered")}  # fmt: skip


def _filter_note(note, summary: dict, z: float) -> None:
    """What the learned quality filter kept, and whether web-then-filtered-web beat web only."""
    ev, tr, qf = summary["evaluate"], summary["train"], summary["clean"]["quality_filter"]
    f, w, t = (ev[m] for m in ("dense-filtered", "dense-web", "dense-textbook"))
    d, se, sig = _diff(f["cloze"], w["cloze"], z)
    kept, dropped, clf = qf["kept"], qf["dropped"], qf["classifier"]
    bpb = {k: ", ".join(f"{e['bits_per_byte'][k]:.3f}" for e in (w, f, t)) for k in ("heldout_textbook", "heldout_web")}
    note("filtered_web", sig and d > 0,
         f"Heavily filtered web, FineWeb-Edu's recipe in miniature: a hashed n-gram classifier trained on "
         f"{qf['annotations']['scored']} procedurally annotated web records (F1 {clf['f1']:.2f} at threshold "
         f"{clf['threshold']:g} on {clf['split']['test']} held out) kept the top {_pct(qf['keep_fraction'])} of the web "
         f"corpus ({qf['kept_documents']} of {qf['input_documents']} documents, score at least {qf['score_cutoff']:.2f}): "
         f"{kept['facts_per_document']} facts and {kept['noise_lines_per_document']} distractor lines per document, "
         f"against {dropped['facts_per_document']} and {dropped['noise_lines_per_document']} in those dropped. At equal "
         f"tokens ({tr['dense-filtered']['tokens']:,}), the model trained web then filtered web "
         f"{'beat' if d > 0 else 'did not beat'} the web-only model on the quiz: cloze {_pct(f['cloze']['acc'])} vs "
         f"{_pct(w['cloze']['acc'])} (difference {100 * d:+.1f} points, standard error {100 * se:.1f}; "
         f"{'a real difference' if sig else 'within noise'}); web then textbook scores {_pct(t['cloze']['acc'])}, so "
         f"filtering lands {between(f['cloze']['acc'], w['cloze']['acc'], t['cloze']['acc'])}. Held-out bits per byte "
         f"(web-only, filtered, textbook; lower is better): textbook text {bpb['heldout_textbook']}, web text "
         f"{bpb['heldout_web']}. " + _why(fact_statements(summary), d, sig) +
         " One seed; the three-seed verdict is the slow test's (docs/ARCHITECTURE.md).")


def _why(seen: dict | None, d: float, sig: bool) -> str:
    """Why filtering did or did not move the quiz: the facts' exposure, and the form the quiz asks in."""
    text = "The filter buys density, not a new form: the kept web text still states facts in loose prose"
    if seen:
        text += (f"; each fact is stated about {seen['dense-filtered']} times in what the filtered model reads against "
                 f"{seen['dense-web']} for web only")
    if sig and d > 0:
        text += (". Density buys some recall, but web text never asks in the question-and-answer form the quiz "
                 "uses, which the textbook's exercises teach")
    else:
        text += (". When both already see each fact that often, more statements of it add little: what the quiz "
                 "needs is the question-and-answer form, which the textbook's exercises teach and web text does not")
    return text + "."


def _posttrain_notes(note, pt: dict, chance: float, n_items: int, z: float) -> None:
    """Chat-form quiz before and after post-training, and whether letter scoring moved."""
    from effilm.demo.config import POSTTRAIN_LABELS as LABELS

    ev = pt["evaluate"]
    em = {m: ev[m]["chat_exact_match"] for m in ev}
    d, se, sig = _diff(em["dpo"], em["base"], z)
    ds, _, ssig = _diff(em["sft"], em["base"], z)
    dd, dse, dsig = _diff(em["dpo"], em["sft"], z)
    text = (f"Post-training and the chat form: asked the {n_items} quiz questions as free-form chat turns (greedy, "
            f"exact match after normalising), the textbook model answers {_pct(em['base']['acc'])}, after SFT "
            f"{_pct(em['sft']['acc'])}, after SFT + DPO {_pct(em['dpo']['acc'])} "
            f"({'a real gain' if sig and d > 0 else 'no clear gain'} over the base model). The chat data asks about "
            "the same facts in exercise and conversational phrasings, never the quiz's (quiz items found in it: "
            f"{pt['data']['chat']['contaminated'] + pt['data']['preferences']['contaminated']}). DPO's change over SFT "
            f"is {100 * dd:+.1f} points (standard error {100 * dse:.1f}: "
            f"{'a real gain' if dsig and dd > 0 else 'a real loss' if dsig else 'within noise'})")
    if ssig and ds > 0 and not dsig:
        text += ("; SFT already taught the model to give the answers it knew (see cloze) as a chat turn, which "
                 "leaves DPO, on pairs about the same facts, little to add")
    note("posttrain_chat", sig and d > 0, text + ".")
    top, fixed, above = _letter_verdict(ev, chance, z)
    verdict = (f"moves {', '.join(LABELS[m] for m in above)} clearly above chance" if above
               else "does not move letter scoring clearly above chance on merit")
    if fixed:
        verdict += f" ({', '.join(LABELS[m] for m in fixed)} answer one letter at least 90% of the time)"
    note("posttrain_letter", bool(above),
         f"Letter scoring (A-D) of the same three models: {', '.join(_pct(ev[m]['letter']['acc']) for m in ev)} "
         f"(base, SFT, SFT + DPO) against {_pct(chance)} chance: post-training {verdict}; the chat data never shows "
         "lettered choices.")
