"""Chat data: conversations rendered by the tokenizer's own chat template, with a loss mask.

A record is ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
(OpenAI's format, several turns allowed) or ``{"prompt": str | messages, "completion": str}``.
:func:`render_chat` renders a Jinja template the way transformers does (sandboxed, trimmed
blocks, ``raise_exception``, the tokenizer's ``bos_token``/``eos_token``), and the ids are the
rendered text's tokens without added special tokens, as transformers' ``apply_chat_template``.

The loss mask (:func:`encode_chat`) is 1 on every assistant turn's content and on the token that
ends that turn (the end-of-turn token), 0 elsewhere. It works for any template, not only those
with ``{% generation %}`` tags: the conversation is rendered prefix by prefix, and each assistant
turn's span is where the rendering of the messages up to it (with the generation prompt) stops and
where its content ends in the rendering that includes it.
"""

from __future__ import annotations

from effilm.errors import EffilmError

ROLES = ("system", "user", "assistant")


def _generation_tag():
    """The ``{% generation %}...{% endgeneration %}`` block some templates use to mark assistant
    output: rendered as its body (the mask is found by rendering prefixes, not from the tags)."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def render_chat(template: str, messages: list[dict], tokenizer=None, add_generation_prompt: bool = True) -> str:
    """Render a Jinja chat template the way transformers does (sandboxed, trimmed blocks)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise EffilmError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag()])
    env.globals["raise_exception"] = raise_exception
    names = {}
    if tokenizer is not None:
        for key in ("bos", "eos", "pad"):
            tid = getattr(tokenizer, f"{key}_id", None)
            names[f"{key}_token"] = tokenizer.decode([tid]) if tid is not None else ""
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **names)
    except TemplateError as exc:
        raise EffilmError(f"chat template failed: {exc}") from None


def conversation(record: dict, where: str) -> list[dict]:
    """The messages of a chat record (``messages``, or ``prompt`` + ``completion``), checked: known
    roles, string contents, at least one assistant turn. Errors name ``where`` (file:line)."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "completion" in record:
        prompt = record["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(messages, list):
            raise EffilmError(f"{where}: 'prompt' must be a string or a list of messages")
        messages = [*messages, {"role": "assistant", "content": record["completion"]}]
    else:
        raise EffilmError(f"{where}: a chat record needs 'messages', or 'prompt' and 'completion' "
                          f"(fields: {', '.join(map(str, record)) or 'none'})")  # fmt: skip
    if not isinstance(messages, list) or not messages:
        raise EffilmError(f"{where}: 'messages' must be a non-empty list")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m:
            raise EffilmError(f"{where}: messages[{n}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise EffilmError(f"{where}: messages[{n}] has role {m['role']!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise EffilmError(f"{where}: messages[{n}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise EffilmError(f"{where}: no assistant turn, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode_chat(tokenizer, messages: list[dict], where: str = "conversation") -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of a conversation: its rendering's token ids, and 1 on each assistant
    turn's content and end-of-turn token (see the module docstring)."""
    template = tokenizer.chat_template
    if not template:
        raise EffilmError(f"{where}: the tokenizer {tokenizer.path} has no chat template")
    try:
        text = render_chat(template, messages, tokenizer, add_generation_prompt=False)
    except EffilmError as exc:
        raise EffilmError(f"{where}: {exc}") from None
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], tokenizer, add_generation_prompt=True)
        upto = render_chat(template, messages[: i + 1], tokenizer, add_generation_prompt=False)
        at = -1
        for body in (m["content"], m["content"].strip()):  # as given, or as a trimming template prints it
            at = upto.find(body, len(before)) if body else len(before)
            if at >= 0:
                break
        # the turn must render the same whether or not later turns follow (a template may end the
        # conversation with an EOS once the last message is out: only what comes after may differ)
        if not text.startswith(before) or at < 0 or not text.startswith(upto[: at + len(body)]):
            raise EffilmError(f"{where}: the chat template renders earlier turns differently once later ones follow, "
                              "so the assistant turns cannot be located; mask them with {% generation %} tags")  # fmt: skip
        spans.append((len(before), at + len(body)))
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), enc.offsets
    mask = [0] * len(ids)
    for start, end in spans:
        k = next((j for j, (s, _) in enumerate(offsets) if s >= start), len(ids))
        while k < len(ids) and offsets[k][0] < end:
            mask[k] = 1
            k += 1
        if k < len(ids):
            mask[k] = 1  # the token that ends the assistant's turn
    return ids, mask
