"""The OpenAI wire format for ``effilm serve``: request validation, error bodies and response shapes.

Everything here is plain Python over dicts, so it is testable without a server. A request that
cannot be served raises ``APIError``, which the server turns into OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from effilm.errors import ConfigError, EffilmError, closest

MAX_STOP_STRINGS = 4  # OpenAI's limit on the number of stop sequences
MAX_TEMPERATURE = 2.0  # OpenAI's documented range is [0, 2]


class APIError(Exception):
    """A request the server refuses; ``body()`` is OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class GenRequest:
    """A validated request: the prompt as token ids plus the engine's sampling parameters."""

    kind: str  # "completion" or "chat"
    model: str
    prompt_ids: list[int]
    params: object  # effilm.inference.engine.SamplingParams
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


MAX_JSON_DEPTH = 32  # no request field nests deeper than a few levels


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion (a deep body must not crash the server)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_json(raw: bytes) -> dict:
    """The request body as a dict. Anything JSON allows but a server must not take is a 400:
    nesting deeper than ``MAX_JSON_DEPTH``, integers of thousands of digits, NaN and Infinity,
    numbers out of float range, and strings that are not valid Unicode (lone surrogates)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise bad(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a huge int, NaN, 1e999
        raise bad(f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    if _depth(body) > MAX_JSON_DEPTH:
        raise bad(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)", code="invalid_json")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad("request body holds a string that is not valid Unicode (a lone surrogate such as \\ud800)",
                  code="invalid_json") from None
    return body


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


def _typed(body: dict, name: str, tp, default=None, required: bool = False):
    """``body[name]`` checked against ``tp`` (null counts as absent); ints are accepted as floats."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"'{name}' is a required property", param=name, code="missing_required_parameter")
        return default
    ok = isinstance(value, tp) and not (isinstance(value, bool) and tp in (int, float))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise bad(f"'{name}' must be {_TYPE_NAMES[tp]}, got {type(value).__name__} {json.dumps(value)[:40]}",
                  param=name, code="invalid_type")
    return value


# Fields we accept; the second group only at their "off" values (anything else is unsupported).
_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
           "stream_options", "user", "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
           "metadata", "store"}
_FIELDS = {"completion": _COMMON | {"prompt", "echo", "best_of", "suffix"},
           "chat": _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}}
_OFF_VALUES = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "echo": (False,),
               "logprobs": (False, 0), "top_logprobs": (0,), "suffix": ("",), "logit_bias": ({},)}


def _check_fields(body: dict, kind: str) -> None:
    allowed = _FIELDS[kind]
    for key in body:
        if key not in allowed:
            hint = closest(key, sorted(allowed))
            raise bad(f"unrecognized request argument supplied: {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""),
                      param=key, code="unknown_parameter")
    for key, off in _OFF_VALUES.items():
        if body.get(key) is not None and body[key] not in off:
            raise bad(f"'{key}'={json.dumps(body[key])[:40]} is not supported by this server (only {off[0]!r})",
                      param=key, code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("only response_format {'type': 'text'} is supported", param="response_format",
                  code="unsupported_parameter")


def _check_model(body: dict, served: str) -> str:
    model = _typed(body, "model", str, required=True)
    if model != served:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")
    return model


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a non-empty string or an array of non-empty strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    return tuple(stop)


def _sampling(body: dict, n_prompt: int, max_context: int, default_max_tokens: int, kind: str):
    """SamplingParams from the body, with the context-window checks OpenAI makes."""
    from effilm.inference.engine import SamplingParams

    name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, name, int)
    prompt_param = "messages" if kind == "chat" else "prompt"
    if n_prompt >= max_context:
        raise bad(f"This model's maximum context length is {max_context} tokens, but the prompt is {n_prompt} tokens "
                  "(no room left for the completion)", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_context - n_prompt)
    elif max_tokens < 1:
        raise bad(f"'{name}' must be at least 1, got {max_tokens}", param=name, code="invalid_value")
    elif n_prompt + max_tokens > max_context:
        raise bad(f"This model's maximum context length is {max_context} tokens. However, you requested "
                  f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                  f"Please reduce the prompt or '{name}'.", param=name, code="context_length_exceeded")
    temperature = _typed(body, "temperature", float, 1.0)  # OpenAI's default
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad(f"'temperature' must be in [0, {MAX_TEMPERATURE:g}], got {temperature}", param="temperature",
                  code="invalid_value")
    top_p = _typed(body, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], got {top_p}", param="top_p", code="invalid_value")
    top_k = _typed(body, "top_k", int, 0)
    if top_k < 0:
        raise bad(f"'top_k' must be >= 0 (0 = off), got {top_k}", param="top_k", code="invalid_value")
    rep = _typed(body, "repetition_penalty", float, 1.0)
    if rep <= 0:
        raise bad(f"'repetition_penalty' must be > 0, got {rep}", param="repetition_penalty", code="invalid_value")
    seed = _typed(body, "seed", int)
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=rep, seed=seed, stop=_stop(body))
    except ConfigError as exc:  # the engine's own validation: name its field in the reply
        raise bad(f"invalid sampling parameters: {exc}", code="invalid_value") from None


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _typed(body, "stream", bool, False)
    opts = _typed(body, "stream_options", dict, {})
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("'stream_options.include_usage' must be a boolean", param="stream_options", code="invalid_type")
    return stream, include and stream


def _prompt_ids(body: dict, engine, vocab_size: int) -> list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is a required property", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = engine.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad_ids = [t for t in prompt if not 0 <= t < vocab_size]
        if bad_ids:
            raise bad(f"'prompt' token id {bad_ids[0]} is outside the vocabulary [0, {vocab_size})", param="prompt",
                      code="invalid_value")
        ids = list(prompt)
    elif isinstance(prompt, list):
        raise bad("'prompt' must be a string, an array of token ids, or an array holding one of those "
                  "(this server takes one prompt per request)", param="prompt", code="invalid_type")
    else:
        raise bad(f"'prompt' must be a string or an array of token ids, got {type(prompt).__name__}", param="prompt",
                  code="invalid_type")
    if not ids:
        raise bad("'prompt' is empty", param="prompt", code="invalid_value")
    return ids


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is a required property", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object", param=where, code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"'{where}.role' must be one of system, developer, user, assistant; got {json.dumps(role)}",
                      param=f"{where}.role", code="invalid_value")
        if isinstance(content, list):  # content parts: only text parts can go to a text model
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"'{where}.content' parts must be {{'type': 'text', 'text': str}}",
                              param=f"{where}.content", code="invalid_type")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string or an array of text parts", param=f"{where}.content",
                      code="invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_completion(body: dict, engine, served: str, vocab_size: int, default_max_tokens: int) -> GenRequest:
    _check_fields(body, "completion")
    model = _check_model(body, served)
    ids = _prompt_ids(body, engine, vocab_size)
    stream, include = _stream_flags(body)
    params = _sampling(body, len(ids), engine.max_context, default_max_tokens, "completion")
    return GenRequest("completion", model, ids, params, stream, include)


def parse_chat(body: dict, engine, served: str, default_max_tokens: int) -> GenRequest:
    _check_fields(body, "chat")
    model = _check_model(body, served)
    messages = _messages(body)
    stream, include = _stream_flags(body)
    try:
        ids = engine.chat_prompt(messages)
    except EffilmError as exc:
        raise bad(f"cannot build a chat prompt: {exc}", param="messages", code="chat_template_error") from None
    params = _sampling(body, len(ids), engine.max_context, default_max_tokens, "chat")
    return GenRequest("chat", model, ids, params, stream, include)


# ----- responses ----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(req: GenRequest, text: str, finish_reason: str, n_completion: int) -> dict:
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj, prefix = "text_completion", "cmpl-"
    return {"id": prefix + req.id, "object": obj, "created": req.created, "model": req.model, "choices": [choice],
            "usage": usage(len(req.prompt_ids), n_completion)}


def chunk(req: GenRequest, text: str | None, finish_reason: str | None, role: bool = False,
          usage_only: dict | None = None) -> dict:
    """One SSE chunk. ``usage_only``: the final usage chunk (empty ``choices``)."""
    if req.kind == "chat":
        obj, prefix = "chat.completion.chunk", "chatcmpl-"
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        obj, prefix = "text_completion", "cmpl-"
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out = {"id": prefix + req.id, "object": obj, "created": req.created, "model": req.model,
           "choices": [] if usage_only is not None else [choice]}
    if req.include_usage:
        out["usage"] = usage_only
    return out


def sse(data) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
