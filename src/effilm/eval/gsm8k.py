"""The ``gsm8k:FILE`` task: grade-school math word problems, answered by greedy generation and
scored as lm-evaluation-harness's ``gsm8k`` task scores them.

Records (JSONL) hold ``question`` and ``answer``; the answer is the worked solution ending in
``#### <number>``, as GSM8K ships it. ``dev=PATH`` (same format) gives the few-shot examples, the
first ``shots`` of them (the harness's ``first_n`` sampler).

The harness's conventions, followed here:

- prompt: each example as ``Question: {question}\\nAnswer: {answer}``, joined by a blank line,
  then ``Question: {question}\\nAnswer:``;
- greedy generation until ``Question:``, ``</s>``, ``<|im_end|>`` or the end-of-text token, at
  most ``max_gen_toks`` tokens (256); the context is cut from the left to leave that room;
- ``strict-match``: the first ``#### <number>`` in the output; ``flexible-extract``: the last
  number-like run (``(-?[$0-9.,]{2,})|(-?[0-9]+)``); ``[invalid]`` when there is none;
- exact match after removing ``,``, ``$``, everything up to ``#### `` and a final ``.`` from both
  the extracted answer and the reference (the whole answer), ignoring case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from effilm.errors import EffilmError

STOP = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (re.compile(","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))
INVALID = "[invalid]"
FILTERS = {"strict-match": (STRICT, 0), "flexible-extract": (FLEXIBLE, -1)}


@dataclass
class MathItem:
    """One problem. ``answer`` is the whole reference solution; ``source`` is ``file:line``."""

    question: str
    answer: str
    subject: str
    source: str
    uid: str = ""

    @property
    def answer_text(self) -> str:
        return self.answer.rsplit("####", 1)[-1].strip()


def extract(text: str, pattern: re.Pattern, group_select: int) -> str:
    """The harness's regex filter: the ``group_select``-th match (the first non-empty group of a
    multi-group pattern), stripped; ``[invalid]`` without a match."""
    found = pattern.findall(text)
    if not found:
        return INVALID
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), INVALID)
    return m.strip()


def _clean(s: str) -> str:
    for rx in IGNORE:
        s = rx.sub("", s)
    return s.lower()


def exact_match(prediction: str, reference: str) -> bool:
    return _clean(prediction) == _clean(reference)


def math_item(rec: dict, src: str, bad) -> MathItem | None:
    q, a = rec.get("question"), rec.get("answer")
    if not isinstance(q, str) or not q.strip():
        return bad(src, "needs 'question' (a non-empty string)")
    if not isinstance(a, str) or "####" not in a:
        return bad(src, "needs 'answer': the solution ending in '#### <number>', as GSM8K ships it")
    if not a.rsplit("####", 1)[-1].strip():
        return bad(src, "nothing after '####' in 'answer'")
    return MathItem(q, a, str(rec.get("subject") or "math"), src, str(rec.get("id", "")))


def prompt(item: MathItem, shots: list[MathItem]) -> str:
    parts = [f"Question: {ex.question}\nAnswer: {ex.answer}" for ex in shots]
    return "\n\n".join([*parts, f"Question: {item.question}\nAnswer:"])


def score_gsm8k(model, tokenizer, items: list[MathItem], dev: list[MathItem], *, shots: int, batch_size: int,
                max_gen_toks: int, max_length: int = 0) -> list[dict]:
    """Greedy answers in batches on the engine; one record per item (in the items' order) with the
    output, each filter's extraction and whether it matches (``correct``: strict-match,
    ``correct_norm``: flexible-extract, the two metrics' keys in :func:`effilm.eval.report.aggregate`).

    Batches of ``batch_size`` prompts are formed longest first, as the harness orders its requests
    (less padding); the few-shot prefix every prompt starts with is prefilled once and kept across
    batches (:func:`effilm.inference.engine.eval_engine`)."""
    from effilm.inference.engine import eval_engine
    from effilm.inference.sampling import SamplingParams

    if shots > len(dev):
        raise EffilmError(f"gsm8k: shots={shots} but the few-shot source has {len(dev)} examples"
                          + ("" if dev else " (give one with dev=FILE, or --shots 0)"))
    engine = eval_engine(model, tokenizer)
    room = (max_length or engine.max_context) - max_gen_toks
    if room < 1:
        raise EffilmError(f"gsm8k: max_gen_toks={max_gen_toks} leaves no room for a prompt in a context of "
                          f"{max_length or engine.max_context} tokens")
    params = SamplingParams(max_new_tokens=max_gen_toks, temperature=0.0, stop=STOP)
    examples = dev[:shots]
    ids = [engine.encode(prompt(it, examples))[-room:] for it in items]  # cut from the left, as the harness does
    outs = engine.generate_batches(ids, params, batch_size)
    records = []
    for it, out in zip(items, outs, strict=True):
        got = {name: extract(out.text, rx, g) for name, (rx, g) in FILTERS.items()}
        records.append({"id": it.uid, "subject": it.subject, "source": it.source, "question": it.question,
                        "target": it.answer_text, "output": out.text, "finish_reason": out.finish_reason,
                        "extracted": got, "correct": exact_match(got["strict-match"], it.answer),
                        "correct_norm": exact_match(got["flexible-extract"], it.answer)})
    return records
