"""The generation engine: batched prefill and decode over a preallocated KV cache, with sampling.

Prompts of different lengths are left-padded into one batch. Padding is masked out of attention
and every sequence gets its own positions (0 at its first real token), so a sequence's tokens do
not depend on its batch-mates: greedy batched output equals one-prompt-at-a-time output. On the
CPU's fast path the padding is not run at all: the prefill packs the rows' real tokens
(``effilm.inference.decode.prefill_packed``) into the left-padded cache. Each
sequence stops on its own (EOS, a stop string, ``max_new_tokens`` or cancellation). A decode step
reads one int per sequence back to the host (the chosen token) and nothing else.

Shared prompt prefixes run once. When every prompt of a batch starts with the same tokens (the
few-shot examples of an eval task, a system prompt) at least ``SHARED_PREFIX_MIN`` of them, the
prefix is prefilled as a batch of one and its keys and values are copied into every row; only
the rest of each prompt runs as a batch. Rows stay left-padded, so row i holds its prefix at the
slots after its own padding: slots [pad_i, n) get the prefix's first n - pad_i positions, and the
batched prefill covers slots [n, P) of every row (for a shorter row that re-computes the last
pad_i tokens of its prefix, at their own positions). Masks, positions and sliding windows are
those of a full prefill; only the float rounding of the split prefill differs. The decode steps
then attend to the prefix once for all rows (``effilm.inference.decode.SharedKV``; fp32 on the
CPU, not when a sliding window could cut into the prefix): each row's cache is read from slot n
on, its slots before pad_i + n masked.

``Engine(prefix_cache=True)`` also keeps the longest prompt's keys and values of the last call
and reuses their common part with the next batch's prompts (consecutive eval batches share their
few-shot prefix; one-prompt batches too). The kept cache assumes the weights do not change:
``clear_prefix_cache()`` after changing them. ``eval_engine`` is the engine of the eval tasks'
generation: prefix cache on, and ``generate_batches`` forms their batches longest prompt first.

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

__all__ = ["SamplingParams", "Completion", "StreamEvent", "Engine", "eval_engine", "load_generator", "generate"]

# Tokens that end a turn in common chat formats; a model that emits one has finished its answer.
END_OF_TURN_TOKENS = ("<|end|>", "<|im_end|>", "<|eot_id|>")
# Finished rows keep riding in the batch (cheap) until at most this fraction of rows is still
# running; then the batch is compacted (one index_select per cache tensor).
COMPACT_BELOW = 0.5
# A prefix shared by every prompt of a batch (or held by the prefix cache) runs once when it is at
# least this many tokens long.
SHARED_PREFIX_MIN = 16
# On the CPU the fast steps read oneDNN's blocked copy of the fp32 linear weights when they take at
# most this many bytes (the copy lives as long as the engine keeps its plan); 0 turns it off.
PACK_BYTES = 2 << 30


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
        # for the stop-string checks, computed once: the longest stop string, every proper prefix
        # of one, and the characters those prefixes end with (most texts end with none of them)
        self.longest = max((len(s) for s in stop), default=0)
        self.prefixes = {s[:k] for s in stop for k in range(1, len(s))}
        self.ends = {p[-1] for p in self.prefixes}

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to emit now, whether a stop string was reached)."""
        ids = self.ids
        ids.append(token)
        before = self._decode(ids[self.prefix:self.read])
        now = self._decode(ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            start = max(0, len(self.text) - self.longest)
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(ids)
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
        text = self.text
        if not text or text[-1] not in self.ends:
            return 0
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            if text[-k:] in self.prefixes:
                return k
        return 0

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

    ``share_prefix`` (default on) prefills a prefix common to a batch's prompts once;
    ``prefix_cache`` (default off) keeps the last batch's prompt keys and values for the next call
    (see the module's docstring). Both leave the tokens as they are, up to float rounding.
    """

    def __init__(self, model, tokenizer, device=None, name: str | None = None, eos_ids=(), fast: bool = True,
                 cpu_layout: bool = True, quant_kernel: str = "fast", share_prefix: bool = True,
                 prefix_cache: bool = False):
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
        self.share_prefix, self.prefix_cache = bool(share_prefix), bool(prefix_cache)
        self.shared_min = SHARED_PREFIX_MIN
        self._prefix = None  # (prompt ids, per-layer keys, values [1, H_kv, n, hd]) of the last batch
        self.pack_bytes = PACK_BYTES
        self._plan_cache = self._plan_key = None  # the fast steps' DecodePlan and the weights it was made for
        self.prefilled_tokens = 0  # prompt slots run through the model (padding too, where it runs), for tests
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

    def generate_batches(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                         batch_size: int = 8) -> list[Completion]:
        """``generate`` in batches of ``batch_size``, formed longest prompt first (as
        lm-evaluation-harness orders its requests: rows of a batch then need little padding);
        completions in prompt order. ``params``: one for all, or one per prompt."""
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise EffilmError("prompts must be a non-empty list of strings or token-id lists")
        if batch_size < 1:
            raise EffilmError(f"batch_size must be >= 1, got {batch_size}")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise EffilmError(f"expected one SamplingParams or a list of {len(prompts)}, got {len(params)} item(s)")
        ids = [self.encode(p) if isinstance(p, str) else p for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable: ties keep their order
        out: list[Completion | None] = [None] * len(ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, c in zip(chunk, self.generate([ids[i] for i in chunk], [params[i] for i in chunk]), strict=True):
                out[i] = c
        return out

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
            first = [P - len(p) for p in ids] if padded else None  # each row's first real slot
            logits, n, pk, pv = self._prefill_prompts(ids, inp, cache, positions, mask if padded else None, plan,
                                                      first)
            shared = None
            if n and plan is not None and self._decode_shares(cache):
                from effilm.inference.decode import SharedKV

                shared = SharedKV(n, [k[0, :, :n] for k in pk], [v[0, :, :n] for v in pv])
                if padded:  # the decode steps read slots n.. only: a row's re-held prefix is masked there
                    for i, p in enumerate(ids):
                        mask[i, :P - len(p) + n] = False
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
                    logits = self._decode(nxt, cache, pos0 + (step - 1), mask, plan, shared)
                else:
                    logits = self._decode(nxt, cache, None, None, plan, shared)

    def clear_prefix_cache(self) -> None:
        """Forget the kept prompt keys and values (``prefix_cache``) and the kept decode plan, e.g.
        after changing the weights."""
        self._prefix = None
        self._plan_cache = self._plan_key = None

    def _can_share(self, longest: int) -> bool:
        """Whether a split prefill gives the numbers of a whole one: not for LongRoPE past its
        original length, whose frequencies depend on the longest position of the batch."""
        cfg = self.model.cfg
        return not (cfg.rope_type == "longrope" and longest > cfg.rope_original_max_seq_len)

    def _prefill_prompts(self, ids, inp, cache, positions, mask, plan=None, first=None):
        """Prefill the left-padded batch ``inp`` [B, P] into ``cache``; logits [B, V] of each row's
        last position. A prefix common to the prompts runs once (``_shared_prefix``) and is copied
        into each row after its padding; the batch then prefills slots [n, P) only. ``first``:
        each row's first real slot, when the batch is padded (``_prefill`` then skips the padding)."""
        import torch

        B, P = inp.shape
        if not self.share_prefix or not self._can_share(P):
            return self._prefill(inp, cache, positions, mask, plan, first), 0, None, None
        n, pk, pv = self._shared_prefix(ids, plan)
        if n:
            by_pad: dict[int, list[int]] = {}  # rows with the same padding take one copy per tensor
            for row, p in enumerate(ids):
                if P - len(p) < n:
                    by_pad.setdefault(P - len(p), []).append(row)
            for pad, rows in by_pad.items():
                sel = slice(None) if len(rows) == B else torch.tensor(rows, device=inp.device)
                for layer in range(len(cache.k)):
                    cache.k[layer][sel, :, pad:n] = pk[layer][:, :, :n - pad]
                    cache.v[layer][sel, :, pad:n] = pv[layer][:, :, :n - pad]
            cache.length = n
            inp = inp[:, n:]
            positions = positions[:, n:] if positions is not None else None
        logits = self._prefill(inp, cache, positions, mask, plan, first)
        if self.prefix_cache:  # keep the longest prompt (the row without padding) for the next call
            row = max(range(B), key=lambda r: len(ids[r]))
            keep = len(ids[row]) - 1
            if keep >= self.shared_min:
                self._prefix = (ids[row][:keep], [k[row:row + 1, :, :keep].clone() for k in cache.k],
                                [v[row:row + 1, :, :keep].clone() for v in cache.v])
        return logits, n, pk, pv

    def _decode_shares(self, cache) -> bool:
        """Whether decode steps attend to a shared prefix once for all rows (``SharedKV``): fp32 on
        the CPU (where it was measured), and no sliding window that could cut into the prefix."""
        import torch

        window = self.model.cfg.sliding_window
        k = cache.k[0]
        return (k.device.type == "cpu" and k.dtype == torch.float32
                and (window is None or window >= cache.max_len))

    def _shared_prefix(self, ids, plan=None):
        """(n, keys, values): the first n tokens of every prompt (at least one token of each left
        after them) with their keys and values [1, H_kv, >= n, hd] per layer, or (0, None, None).
        Within a batch of two or more, n is the prompts' common prefix; the kept prefix
        (``prefix_cache``) gives its common part with them, and only the rest runs, as a batch of
        one. A one-prompt batch shares only what the kept prefix holds."""
        first = ids[0]
        n = min(len(p) for p in ids) - 1
        for p in ids[1:]:
            k = 0
            while k < n and p[k] == first[k]:
                k += 1
            n = k
        kept, m = self._prefix if self.prefix_cache else None, 0
        if kept is not None:
            kept_ids, limit = kept[0], min(n, len(kept[0]))
            while m < limit and kept_ids[m] == first[m]:
                m += 1
        if len(ids) == 1 or n < self.shared_min:
            n = m
        if n < self.shared_min:
            return 0, None, None
        if m >= n:
            return n, kept[1], kept[2]
        import torch

        part = self.model.new_cache(1, n)
        if m:
            for layer in range(len(part.k)):
                part.k[layer][:, :, :m] = kept[1][layer][:, :, :m]
                part.v[layer][:, :, :m] = kept[2][layer][:, :, :m]
            part.length = m
        self._prefill(torch.tensor([first[m:n]], device=self.device), part, None, None, plan)
        return n, part.k, part.v

    def _prefill(self, inp, cache, positions, mask, plan=None, first=None):
        """Run ``inp`` [B, T] into ``cache`` from its length; logits of each row's last position.
        ``first`` (each row's first real slot, for a left-padded batch): on the fast path on the
        CPU only the real tokens run (``effilm.inference.decode.prefill_packed``)."""
        if self.fast and first is not None and self.device.type == "cpu":
            from effilm.inference.decode import prefill_packed

            end = cache.length + inp.shape[1]
            self.prefilled_tokens += sum(end - max(cache.length, f) for f in first)
            return prefill_packed(self.model, inp, cache, first, plan)
        self.prefilled_tokens += inp.shape[0] * inp.shape[1]
        if self.fast:
            from effilm.inference.decode import prefill

            return prefill(self.model, inp, cache, positions, mask, plan)
        return self.model(inp, cache=cache, positions=positions, attention_mask=mask).logits[:, -1]

    def _plan(self):
        """The fast steps' weight views and constants (None: no fast path), kept from call to call
        while every parameter is the same tensor with the same data and version (an in-place change,
        e.g. an optimizer step, bumps the version; ``clear_prefix_cache`` drops it too). On the CPU
        it holds oneDNN's blocked copy of the fp32 linear weights, up to ``pack_bytes`` of them."""
        if not self.fast:
            return None
        from effilm.inference.decode import DecodePlan

        try:
            key = tuple((id(p), p.data_ptr(), p._version) for p in self.model.parameters())
        except RuntimeError:  # inference tensors have no version counter: no reuse
            key = None
        if key is None or self._plan_key != key:
            pack = self.pack_bytes if self.device.type == "cpu" else 0
            self._plan_cache, self._plan_key = DecodePlan(self.model, pack), key
        return self._plan_cache

    def _decode(self, tokens, cache, positions, mask, plan=None, shared=None):
        if self.fast:
            from effilm.inference.decode import decode_step

            return decode_step(self.model, tokens, cache, positions, mask, plan, shared)
        return self.model(tokens[:, None], cache=cache, positions=positions, attention_mask=mask).logits[:, -1]


def eval_engine(model, tokenizer) -> Engine:
    """The engine of an eval task's generation (gsm8k, code, chat) on a model the caller keeps:
    its weights left as they are (no CPU re-layout) and quantized layers on the exact kernel
    (scores are the fp32 reference), with the prompt-prefix cache on (the weights do not change
    during a task, and its prompts share their few-shot prefix)."""
    return Engine(model, tokenizer, cpu_layout=False, quant_kernel="exact", prefix_cache=True)


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
