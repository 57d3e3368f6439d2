"""Plain-language notes for the demo's summary, computed from its numbers.

Each note is ``{"topic", "shows", "text"}``: ``shows`` is True when the numbers support a claim,
False when they do not, and None for a statement of scope. Every comparison says which way it came
out; a difference counts as real only when it exceeds ``significance_z`` standard errors (the
standard error of a difference of two independent accuracies).
"""

from __future__ import annotations

import math


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

    ar, de = ev["arctic-textbook"], ev["dense-textbook"]
    d, se, sig = _diff(ar["cloze"], de["cloze"], z)
    ta, td = tr["arctic-textbook"], tr["dense-textbook"]
    bpb_a, bpb_d = ar["bits_per_byte"]["heldout_textbook"], de["bits_per_byte"]["heldout_textbook"]
    note("moe_vs_dense", sig and d > 0,
         f"At equal active parameters ({ta['active_params']:,} vs {td['active_params']:,}) and equal tokens, the "
         f"Arctic hybrid with {ta['total_params']:,} parameters in total ({ta['total_params'] / td['total_params']:.1f}x "
         f"the dense model) {'beat' if d > 0 and sig else 'did worse than' if sig else 'did not clearly differ from'} "
         f"the dense model: cloze "
         f"{_pct(ar['cloze']['acc'])} vs {_pct(de['cloze']['acc'])}, held-out textbook bits per byte {bpb_a:.3f} vs "
         f"{bpb_d:.3f} ({'lower is better: MoE ahead' if bpb_a < bpb_d else 'lower is better: dense ahead'}). "
         f"It cost {ta['cpu_s'] / max(td['cpu_s'], 1e-9):.2f}x the dense model's CPU time to train here.")

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
