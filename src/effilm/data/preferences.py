"""Preference data for DPO: a prompt, a chosen and a rejected answer, through the chat template.

A record is ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``
(JSONL). A string prompt is one user turn; a string answer is one assistant turn; messages are in
OpenAI's format (as for chat data, :mod:`effilm.data.chat`), and the answers hold assistant turns
only.

Each side is tokenized the way TRL's ``DPOTrainer`` does for conversational data: the prompt is
rendered with the generation prompt, prompt + answer without it, and the answer's tokens (its
*completion*, where the loss and the log-probabilities are taken) are those after the longest
common prefix of the two renderings (shared by both answers), so the end-of-turn tokens and
whatever else the template writes after the answer belong to the completion.
"""

from __future__ import annotations

from effilm.data.chat import ROLES, render_chat
from effilm.errors import EffilmError

FIELDS = ("prompt", "chosen", "rejected")


def _messages(value, role: str, where: str, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise EffilmError(f"{where}: {field!r} must be a string or a non-empty list of messages")
    out = []
    for n, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or set(m) - {"role", "content", "name"}:
            raise EffilmError(f"{where}: {field}[{n}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise EffilmError(f"{where}: {field}[{n}] has role {m['role']!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise EffilmError(f"{where}: {field}[{n}].content must be a string")
        if field != "prompt" and m["role"] != "assistant":
            raise EffilmError(f"{where}: {field}[{n}] has role {m['role']!r}; an answer holds assistant turns only")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def preference(record, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """``(prompt, chosen, rejected)`` messages of a preference record, checked; errors name ``where``."""
    if not isinstance(record, dict):
        raise EffilmError(f"{where}: a preference record must be a JSON object with {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise EffilmError(f"{where}: a preference record needs {', '.join(FIELDS)}; missing {', '.join(missing)} "
                          f"(fields: {', '.join(map(str, record)) or 'none'})")  # fmt: skip
    prompt = _messages(record["prompt"], "user", where, "prompt")
    chosen = _messages(record["chosen"], "assistant", where, "chosen")
    rejected = _messages(record["rejected"], "assistant", where, "rejected")
    if chosen == rejected:
        raise EffilmError(f"{where}: 'chosen' and 'rejected' are the same answer, so there is no preference to learn")
    return prompt, chosen, rejected


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_preference(tokenizer, record, where: str = "record") -> tuple[list[int], list[int], list[int], list[int]]:
    """``(chosen_ids, chosen_mask, rejected_ids, rejected_mask)``: prompt + answer tokens, with 1 on
    the answer's completion tokens (see the module docstring)."""
    prompt, chosen, rejected = preference(record, where)
    template = tokenizer.chat_template
    if not template:
        raise EffilmError(f"{where}: the tokenizer {tokenizer.path} has no chat template")

    def ids(messages, gen: bool) -> list[int]:
        try:
            text = render_chat(template, messages, tokenizer, add_generation_prompt=gen)
        except EffilmError as exc:
            raise EffilmError(f"{where}: {exc}") from None
        return list(tokenizer.backend.encode(text, add_special_tokens=False).ids)

    p, c, r = ids(prompt, True), ids(prompt + chosen, False), ids(prompt + rejected, False)
    n = min(_common_prefix(p, c), _common_prefix(p, r))
    if n == len(c) or n == len(r):
        raise EffilmError(f"{where}: an answer renders to no tokens after the prompt")
    if c == r:
        raise EffilmError(f"{where}: 'chosen' and 'rejected' render to the same tokens")
    return c, [0] * n + [1] * (len(c) - n), r, [0] * n + [1] * (len(r) - n)
