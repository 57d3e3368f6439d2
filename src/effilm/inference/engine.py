"""The generation engine: batched prefill and decode over a preallocated KV cache, with sampling.

Prompts of different lengths are left-padded into one batch. Padding is masked out of attention
and every sequence gets its own positions (0 at its first real token), so a sequence's tokens do
not depend on its batch-mates: greedy batched output equals one-prompt-at-a-time output. Each
sequence stops on its own (EOS, a stop string, ``max_new_tokens`` or cancellation). A decode step
reads one int per sequence back to the host (the chosen token) and nothing else.

``Engine`` is the contract the server (``effilm serve``) builds on; ``load_generator`` serves the
``local`` synth backend and ``effilm.generate`` is the one-call Python API.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from effilm.errors import EffilmError
from effilm.inference.sampling import SamplingParams

__all__ = ["SamplingParams", "Completion", "StreamEvent", "Engine", "load_generator", "generate"]

# Tokens that end a turn in common chat formats; a model that emits one has finished its answer.
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>")
# Finished rows keep riding in the batch (cheap) until at most this fraction of rows is still
# running; then the batch is compacted (one index_select per cache tensor).
COMPACT_BELOW = 0.5


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # every generated token, the EOS that ended the sequence included
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int


@dataclass
class StreamEvent:
    index: int  # which prompt of the batch
    text: str  # new text since the last event for this index ("" allowed)
    token_id: int | None
    finish_reason: str | None  # set on the last event of that sequence


class _Detok:
    """Incremental detokenisation of one sequence, holding back text that may still change: an
    incomplete UTF-8 character, or a tail that could be the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the text already committed
        self.text = ""  # committed text (may hold a partial stop string not yet sent)
        self.sent = 0  # characters of ``text`` already emitted

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to emit now, whether a stop string was reached)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            if self.stop:
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[: min(hits)]
                    return self.flush(final=False), True
        safe = len(self.text) - self._held_back()
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out, False

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self, final: bool = True) -> str:
        """Everything not yet emitted (at the end of a sequence, partial characters included)."""
        if final and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix:self.read])
            self.text += self._decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Engine:
    """Batched generation for an effilm ``Transformer`` and an ``effilm.data.tokenizer.Tokenizer``.

    ``tokenizer=None`` gives a token-ids-only engine (prompts as id lists, empty texts, no stop
    strings), which is what benchmarks of the raw decode loop use.

    On the CPU the engine stores the model's linear and expert weights transposed in memory, in
    place (``effilm.inference.decode.use_cpu_layout``: same values, shapes and memory; the CPU's matrix-vector
    kernel reads that layout up to twice as fast). ``cpu_layout=False`` leaves the model as it is.

    ``quant_kernel`` sets the kernel of a quantized model's layers, in place
    (``effilm.models.quantized.set_kernel``): ``"fast"`` (the default) runs the packed int8 / int4
    CPU kernels with bf16 activations (within bf16 rounding of the exact path, 2-4x faster per
    projection), ``"exact"`` the fp32 reference that parity checks use. Models without quantized
    layers are unaffected.
    """

    def __init__(self, model, tokenizer, device=None, name: str | None = None, eos_ids=(), fast: bool = True,
                 cpu_layout: bool = True, quant_kernel: str = "fast"):
        from effilm.inference.decode import supports, use_cpu_layout
        from effilm.models.quantized import set_kernel

        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.name = name or getattr(model.cfg, "name", None) or "effilm"
        self.max_context = int(model.cfg.max_seq_len)
        # the inference-only steps of effilm.inference.decode, unless off or the model has modules they do not know
        self.fast = bool(fast) and supports(model)
        if cpu_layout and self.device.type == "cpu":
            use_cpu_layout(model)  # in place: same values and memory, weights transposed in memory
        self.quant_kernel = quant_kernel
        self.fast_quant_weights = set_kernel(model, quant_kernel)  # in place; how many run the fast kernels
        # drop finished sequences from the running batch once at most this fraction is still active
        self.compact_below = COMPACT_BELOW
        ids = {int(i) for i in eos_ids}
        for i in (getattr(tokenizer, "eos_id", None), model.cfg.eos_token_id):
            if i is not None:
                ids.add(int(i))
        for t in END_OF_TURN_TOKENS:
            tid = tokenizer.token_to_id(t) if hasattr(tokenizer, "token_to_id") else None
            if tid is not None:
                ids.add(int(tid))
        self.eos_ids = frozenset(ids)
        pad = getattr(tokenizer, "pad_id", None)
        self.pad_id = int(pad) if pad is not None else min(self.eos_ids, default=0)

    # ----- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path, device=None, dtype=None, quant_kernel: str = "fast") -> Engine:
        """An engine for an effilm checkpoint or HF model directory that holds tokenizer files."""
        from effilm.formats.load import load_model_and_tokenizer

        path = Path(path)
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        model, tok = load_model_and_tokenizer(path, device=device, dtype=dtype)
        return cls(model, tok, name=path.resolve().name, eos_ids=_generation_config_eos(path),
                   quant_kernel=quant_kernel)

    # ----- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise EffilmError(f"{self.name} has no tokenizer: pass prompts as token-id lists")
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered by the tokenizer's chat template (with the
        assistant's generation prompt). EffilmError when the tokenizer has no template."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise EffilmError(f"the tokenizer of {self.name} has no chat template; send a plain prompt instead")
        if not isinstance(messages, list) or not messages:
            raise EffilmError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        for n, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise EffilmError(f"messages[{n}] must be an object with string 'role' and 'content'")
        from effilm.data.chat import render_chat

        return self.encode(render_chat(template, messages, self.tokenizer))

    # ----- generation ----------------------------------------------------------------------------
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Generate for every prompt (text or token ids) as one batch; completions in prompt order."""
        ids, plist, limits = self._prepare(prompts, params)
        texts = [[] for _ in ids]
        tokens: list[list[int]] = [[] for _ in ids]
        reasons: list[str | None] = [None] * len(ids)
        for ev in self._run(ids, plist, limits, None):
            texts[ev.index].append(ev.text)
            if ev.token_id is not None:
                tokens[ev.index].append(ev.token_id)
            if ev.finish_reason:
                reasons[ev.index] = ev.finish_reason
        return [Completion("".join(t), tok, r or "length", len(p)) for t, tok, r, p in zip(texts, tokens, reasons, ids)]

    def stream(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
               cancelled: Callable[[int], bool] | None = None) -> Iterator[StreamEvent]:
        """Events as tokens are generated. Bad input raises here, before the first event.
        ``cancelled(i)`` is polled every step; True ends sequence i with finish_reason 'cancelled'."""
        ids, plist, limits = self._prepare(prompts, params)
        return self._run(ids, plist, limits, cancelled)

    def _prepare(self, prompts, params):
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise EffilmError("prompts must be a non-empty list of strings or token-id lists")
        ids = []
        vocab = self.model.cfg.vocab_size
        for n, p in enumerate(prompts):
            if isinstance(p, str):
                p = self.encode(p)
            elif not (isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)):
                raise EffilmError(f"prompt {n} must be a string or a list of token ids")
            if not p:
                raise EffilmError(f"prompt {n} is empty")
            if any(t < 0 or t >= vocab for t in p):
                raise EffilmError(f"prompt {n} holds a token id outside the vocabulary [0, {vocab})")
            if len(p) >= self.max_context:
                raise EffilmError(f"prompt {n} has {len(p)} tokens; the context window is {self.max_context} "
                                  "(leave room for at least one new token)")
            ids.append(list(p))
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(ids)
        if len(params) != len(ids) or not all(isinstance(p, SamplingParams) for p in params):
            raise EffilmError(f"expected one SamplingParams or a list of {len(ids)}, got {len(params)} item(s)")
        if self.tokenizer is None and any(p.stop for p in params):
            raise EffilmError("stop strings need a tokenizer; this engine has none")
        limits = [min(p.max_new_tokens, self.max_context - len(i)) for p, i in zip(params, ids)]
        return ids, list(params), limits

    def _run(self, ids, params, limits, cancelled) -> Iterator[StreamEvent]:
        import torch

        from effilm.inference.sampling import LogitsPipeline

        model, dev = self.model, self.device
        B, lens = len(ids), [len(i) for i in ids]
        P = max(lens)
        padded = min(lens) != P
        cache = model.new_cache(B, P + max(limits))
        inp = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, cache.max_len, dtype=torch.bool)
        for i, p in enumerate(ids):
            inp[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):P] = True
        inp, mask = inp.to(dev), mask.to(dev)
        pos0 = torch.tensor(lens, device=dev)[:, None]
        pipeline = LogitsPipeline(params, model.cfg.vocab_size, dev, ids)
        plan = self._plan()
        detoks = [_Detok(self.tokenizer, p.stop) for p in params]
        active = set(range(B))
        # inference mode is entered around the tensor work only, never across a yield: the
        # caller's code between events must not run (or leave the generator) in inference mode
        with torch.inference_mode():
            positions = (mask[:, :P].long().cumsum(1) - 1).clamp(min=0) if padded else None
            logits = self._prefill(inp, cache, positions, mask if padded else None)
        rows = list(range(B))  # batch row -> sequence index; finished rows are dropped in bulk
        step = 0
        while True:
            with torch.inference_mode():
                nxt = pipeline.step(logits)
                pipeline.observe(nxt)
                chosen = nxt.tolist()  # the one host sync per step
            still = []
            for r, i in enumerate(rows):
                if i not in active:
                    continue
                tok, d = chosen[r], detoks[i]
                if tok in self.eos_ids:
                    text = d.flush()
                    d.ids.append(tok)
                    yield StreamEvent(i, text, tok, "stop")
                    continue
                text, hit = d.push(tok)
                if hit:
                    yield StreamEvent(i, text, tok, "stop")
                elif len(d.ids) >= limits[i]:
                    yield StreamEvent(i, text + d.flush(), tok, "length")
                elif cancelled is not None and cancelled(i):
                    yield StreamEvent(i, text, tok, None)
                    yield StreamEvent(i, "", None, "cancelled")
                else:
                    yield StreamEvent(i, text, tok, None)
                    still.append(i)
            active = set(still)
            if not active:
                return
            step += 1
            with torch.inference_mode():
                if len(active) <= len(rows) * self.compact_below:
                    keep = [r for r, i in enumerate(rows) if i in active]
                    rows = [rows[r] for r in keep]
                    idx = torch.tensor(keep, device=dev)
                    cache.k = [k.index_select(0, idx) for k in cache.k]
                    cache.v = [v.index_select(0, idx) for v in cache.v]
                    mask, pos0, nxt = mask.index_select(0, idx), pos0.index_select(0, idx), nxt.index_select(0, idx)
                    pipeline.select(keep)
                if padded:
                    mask[:, P + step - 1] = True
                    logits = self._decode(nxt, cache, pos0 + (step - 1), mask, plan)
                else:
                    logits = self._decode(nxt, cache, None, None, plan)

    def _prefill(self, inp, cache, positions, mask):
        if self.fast:
            from effilm.inference.decode import prefill

            return prefill(self.model, inp, cache, positions, mask)
        return self.model(inp, cache=cache, positions=positions, attention_mask=mask).logits[:, -1]

    def _plan(self):
        """The fast decode step's weight views and constants for this generation (None: no fast path)."""
        if not self.fast:
            return None
        from effilm.inference.decode import DecodePlan

        return DecodePlan(self.model)

    def _decode(self, tokens, cache, positions, mask, plan=None):
        if self.fast:
            from effilm.inference.decode import decode_step

            return decode_step(self.model, tokens, cache, positions, mask, plan)
        return self.model(tokens[:, None], cache=cache, positions=positions, attention_mask=mask).logits[:, -1]


def _generation_config_eos(path: Path) -> list[int]:
    """EOS ids listed in an HF ``generation_config.json`` (an int or a list), if there is one."""
    f = path / "generation_config.json"
    if not f.is_file():
        return []
    try:
        v = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        raise EffilmError(f"{f}: not a valid JSON object") from None
    v = v if isinstance(v, list) else [v]
    return [int(i) for i in v if isinstance(i, int)]


def _parse_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise EffilmError(f"dtype {name!r} is not one of {sorted(table)}")
    return table[name]


class _SynthGenerator:
    """The ``local`` synth backend's protocol over an Engine: sequence i of a batch uses seed + i."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[str]:
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=None if seed is None else seed + i) for i in range(len(prompts))]
        return [c.text for c in self.engine.generate(list(prompts), params)]


def load_generator(checkpoint: str | os.PathLike) -> _SynthGenerator:
    """The generator the ``local`` synth backend calls (``effilm.synth.local``)."""
    return _SynthGenerator(Engine.load(checkpoint))


def generate(model_or_path, prompts, tokenizer=None, **sampling):
    """One call: ``effilm.generate("ckpt", "Once", max_new_tokens=20, temperature=0.7, seed=1)``.

    ``model_or_path`` is a model directory, an ``Engine``, or a model (then pass ``tokenizer``).
    ``prompts`` is a string (returns one ``Completion``) or a list (returns a list). The keyword
    arguments are the fields of ``SamplingParams``.
    """
    if isinstance(model_or_path, Engine):
        engine = model_or_path
    elif isinstance(model_or_path, (str, os.PathLike)):
        engine = Engine.load(model_or_path)
    else:
        if tokenizer is None:
            raise EffilmError("effilm.generate(model, ...) needs tokenizer= when given a model object")
        engine = Engine(model_or_path, tokenizer)
    single = isinstance(prompts, str)
    out = engine.generate([prompts] if single else list(prompts), SamplingParams(**sampling))
    return out[0] if single else out
