"""The ``chat:FILE`` task: free-form questions asked through the model's chat template, answered
by greedy generation, scored by normalised exact match.

A record (JSONL, one per line) is one of:

- MMLU-format: ``question``, ``choices`` and ``answer`` (an index): the question is asked without
  its choices and the reference is the correct choice's text;
- ``question`` (a string) or ``messages`` (OpenAI format, ending with a user turn), with ``answer``
  (a string) or ``answers`` (a list of acceptable strings).

``subject`` and ``id`` are optional, as for MMLU-format tasks. Normalisation follows the usual
exact-match convention of reading-comprehension benchmarks: lower case, punctuation removed, the
articles *a*, *an* and *the* removed, whitespace collapsed. The model's output is taken up to its
end-of-turn (or end-of-text) token, or ``max_new_tokens``.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from effilm.errors import EffilmError

ROLES = ("system", "user", "assistant")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


@dataclass
class ChatItem:
    """One free-form question. ``source`` is ``file:line``."""

    messages: list[dict]
    answers: list[str]
    subject: str
    source: str
    uid: str = ""

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def answer_text(self) -> str:
        return self.answers[0]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(output: str, answers: list[str]) -> bool:
    out = normalize_answer(output)
    return any(out == normalize_answer(a) for a in answers)


def chat_item(rec: dict, src: str, bad) -> ChatItem | None:
    """A :class:`ChatItem` from one record, or None after ``bad(src, reason)``."""
    if "messages" in rec:
        messages = rec["messages"]
        if not isinstance(messages, list) or not messages:
            return bad(src, "field 'messages' must be a non-empty list")
        for n, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return bad(src, f"messages[{n}] must have role system, user or assistant and string content")
        if messages[-1]["role"] != "user":
            return bad(src, "the last message must be the user's question")
    elif isinstance(rec.get("question"), str) and rec["question"].strip():
        messages = [{"role": "user", "content": rec["question"]}]
    else:
        return bad(src, "needs 'question' (a non-empty string) or 'messages'")
    if "answers" in rec:
        answers = rec["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            return bad(src, "field 'answers' must be a non-empty list of strings")
    elif isinstance(rec.get("answer"), str):
        answers = [rec["answer"]]
    elif "choices" in rec and "answer" in rec:  # MMLU-format: the correct choice's text
        choices, answer = rec["choices"], rec["answer"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            return bad(src, "field 'choices' is not a list of strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            return bad(src, f"answer {answer!r} is not an index in 0..{len(choices) - 1}")
        answers = [choices[answer]]
    else:
        return bad(src, "needs 'answer' (a string, or an index into 'choices') or 'answers'")
    if not any(normalize_answer(a) for a in answers):
        return bad(src, "every answer is empty once normalised")
    return ChatItem(messages, list(answers), str(rec.get("subject") or "general"), src, str(rec.get("id", "")))


def score_chat(model, tokenizer, items: list[ChatItem], *, batch_size: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers for every item, in batches of ``batch_size`` (longest prompt first; a shared
    system prompt or few-shot turns run once: :func:`effilm.inference.engine.eval_engine`), and one
    record per item, in the items' order: the output, the references and whether they match."""
    from effilm.inference.engine import eval_engine
    from effilm.inference.sampling import SamplingParams

    if not getattr(tokenizer, "chat_template", None):
        raise EffilmError("chat tasks need a tokenizer with a chat template; this model's tokenizer has none")
    engine = eval_engine(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    prompts = [engine.chat_prompt(it.messages) for it in items]
    outs = engine.generate_batches(prompts, params, batch_size)
    return [{"id": it.uid, "subject": it.subject, "source": it.source, "question": it.question, "output": out.text,
             "finish_reason": out.finish_reason, "answers": it.answers, "correct": exact_match(out.text, it.answers)}
            for it, out in zip(items, outs, strict=True)]
