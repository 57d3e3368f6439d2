"""GGUF export for llama.cpp, written with the ``gguf`` package, and a read-back verifier.

Architectures (llama.cpp names):

* ``llama``: dense layers (``D``), and Mixtral-style MoE layers (``M``, softmax top-k with
  renormalised weights) in llama.cpp's MoE layout (``ffn_gate_inp``, ``ffn_{gate,up,down}_exps``);
* ``arctic``: Arctic hybrid layers (``H``): the residual MLP as ``ffn_{gate,up,down}`` (width =
  hidden size, as llama.cpp expects), the parallel MoE reading the block input through
  ``ffn_norm_exps``.

Both use llama.cpp's "normal" RoPE, which rotates adjacent pairs; effilm (like HF) rotates halves,
so the Q and K rows of each head are permuted as HF's converter does (half i -> pair i).
Anything llama.cpp's graphs for these architectures cannot express (biases, LayerNorm, QK norm,
partial or scaled RoPE, sliding windows, per-layer head counts, mixed layer kinds, other routers)
is a clear error rather than a silently different model.

The tokenizer goes in as ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE) with tokens, token
types, merges and special ids; rows past the tokenizer's size (a padded embedding) are ``[PAD{i}]``
tokens of type UNUSED.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from effilm.errors import EffilmError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
QK_BLOCK = 32  # llama.cpp's block width for q8_0 / q4_0
# a q8_0 / q4_0 value lies within this fraction of its block's max |x| after a round trip
BLOCK_TOLERANCE = {"q8_0": 1 / 127, "q4_0": 1 / 7, "f16": 1e-3, "f32": 0.0}


def choose_arch(cfg) -> str:
    """``llama`` or ``arctic`` for ``cfg``, or an EffilmError naming what llama.cpp cannot run."""
    problems = []
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm!r} (llama.cpp's llama/arctic graphs use RMSNorm)")
    if cfg.activation != "silu":
        problems.append(f"activation={cfg.activation!r} (SwiGLU only)")
    for name in ("attn_bias", "attn_out_bias", "mlp_bias", "lm_head_bias", "qk_norm"):
        if getattr(cfg, name):
            problems.append(f"{name}=True")
    if cfg.rope_type != "default" or cfg.rope_partial_factor != 1.0:
        problems.append("scaled or partial RoPE")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        # a window at least as long as the context never masks anything: the export is exact
        problems.append(f"sliding_window={cfg.sliding_window} (shorter than the context, {cfg.max_seq_len})")
    if cfg.qkv_multipliers is not None:
        problems.append("OpenELM layer-wise scaling (per-layer head counts)")
    kinds = {s.kind for s in cfg.layers}
    if len(kinds) > 1:
        problems.append(f"mixed layer kinds {sorted(kinds)} (one kind per model)")
    if cfg.has_moe and (cfg.moe.router != "softmax_topk" or not cfg.moe.renormalize):
        problems.append(f"moe.router={cfg.moe.router!r}, renormalize={cfg.moe.renormalize} (llama.cpp: softmax top-k, renormalised)")
    kind = next(iter(kinds))
    if kind == "H" and any(s.ffn_dim != cfg.d_model for s in cfg.layers):
        problems.append("Arctic residual MLP width != d_model (llama.cpp's arctic requires equal)")
    if kind == "H" and cfg.n_heads * (cfg.head_dim or cfg.d_model // cfg.n_heads) != cfg.d_model:
        problems.append("Arctic with n_heads x head_dim != d_model (llama.cpp's arctic graph assumes equal)")
    if problems:
        raise EffilmError("cannot export to GGUF: " + "; ".join(problems))
    return "arctic" if kind == "H" else "llama"


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order to interleaved pairs (HF convert's ``permute``)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, 2, out // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _name(tensor, bid: int | None = None, suffix: str = "weight") -> str:
    import gguf

    base = gguf.TENSOR_NAMES[tensor]
    return (base.format(bid=bid) if bid is not None else base) + f".{suffix}"


def gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array in torch/numpy order) for every tensor of ``model``."""
    import gguf

    T = gguf.MODEL_TENSOR
    cfg = model.cfg
    hd = cfg.head_dim
    from effilm.formats.hf import refuse_routing_bias

    refuse_routing_bias(model, "GGUF")
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    if any(k.endswith((".q", ".scales")) for k in sd):
        raise EffilmError("cannot export an effilm-quantized checkpoint to GGUF: export the fp model with --type q8_0/q4_0")
    out = [(_name(T.TOKEN_EMBD), sd["embed.weight"])]
    for i, s in enumerate(cfg.layers):
        p = f"layers.{i}"
        q_rows, kv_rows = s.n_heads * hd, s.n_kv_heads * hd
        q, k, v = np.split(sd[f"{p}.attn.qkv.weight"], [q_rows, q_rows + kv_rows])
        out += [
            (_name(T.ATTN_NORM, i), sd[f"{p}.attn_norm.weight"]),
            (_name(T.ATTN_Q, i), permute_rotary(q, s.n_heads)),
            (_name(T.ATTN_K, i), permute_rotary(k, s.n_kv_heads)),
            (_name(T.ATTN_V, i), v),
            (_name(T.ATTN_OUT, i), sd[f"{p}.attn.o.weight"]),
        ]
        if s.kind in "DH":
            gate, up = np.split(sd[f"{p}.mlp.gate_up.weight"], 2)
            out += [(_name(T.FFN_NORM, i), sd[f"{p}.mlp_norm.weight"]), (_name(T.FFN_GATE, i), gate),
                    (_name(T.FFN_UP, i), up), (_name(T.FFN_DOWN, i), sd[f"{p}.mlp.down.weight"])]  # fmt: skip
        if s.kind in "MH":
            norm = T.FFN_NORM if s.kind == "M" else T.FFN_NORM_EXP
            gate, up = np.split(sd[f"{p}.moe.experts.w_gate_up"], 2, axis=1)
            out += [(_name(norm, i), sd[f"{p}.moe_norm.weight"]), (_name(T.FFN_GATE_INP, i), sd[f"{p}.moe.router.weight"]),
                    (_name(T.FFN_GATE_EXP, i), gate), (_name(T.FFN_UP_EXP, i), up),
                    (_name(T.FFN_DOWN_EXP, i), sd[f"{p}.moe.experts.w_down"])]  # fmt: skip
    out.append((_name(T.OUTPUT_NORM), sd["norm.weight"]))
    if not cfg.tie_embeddings:  # llama.cpp reuses token_embd when output.weight is absent
        out.append((_name(T.OUTPUT), sd["lm_head.weight"]))
    return [(n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in out]


def storage_type(name: str, array: np.ndarray, qtype: str) -> str:
    """The type a tensor is stored as: 1-D tensors and the router stay f32 (as llama.cpp does);
    a row not a multiple of 32 falls back from q8_0/q4_0 to f16."""
    if array.ndim < 2 or "ffn_gate_inp" in name or qtype == "f32":
        return "f32"
    if qtype in ("q8_0", "q4_0") and array.shape[-1] % QK_BLOCK:
        return "f16"
    return qtype


def _tokenizer_metadata(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    import gguf

    from effilm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    spec = json.loads((tok.path / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise EffilmError(f"{tok.path}/tokenizer.json: GGUF export supports byte-level BPE tokenizers, got {model.get('type')!r}")
    if tok.vocab_size > vocab_size:
        raise EffilmError(f"tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for ident, add in ((tok.bos_id, writer.add_bos_token_id), (tok.eos_id, writer.add_eos_token_id),
                       (tok.pad_id, writer.add_pad_token_id)):  # fmt: skip
        if ident is not None:
            add(ident)
    writer.add_add_bos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def gguf_name(name: str) -> str:
    """The ``general.name`` to write. llama.cpp (0.3.x) switches to Phi-3's own vocabulary handling
    when the name contains "phi3" or "phi-3" (any case) and then fails to load a byte-level BPE
    vocabulary ("unordered_map::at"); such a name is written with "phi_3" instead."""
    return re.sub(r"(?i)(phi)-?(3)", r"\1_\2", name)


def export_gguf(model, out, qtype: str = "f16", tokenizer_dir=None, name: str | None = None) -> Path:
    """Write ``model`` to ``out`` as GGUF (atomically: a temp file renamed into place)."""
    import gguf

    if qtype not in GGUF_TYPES:
        raise EffilmError(f"--type {qtype!r} is not one of {list(GGUF_TYPES)}")
    cfg = model.cfg
    arch = choose_arch(cfg)
    tensors = gguf_tensors(model)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(gguf_name(name or cfg.name))
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layers)
        shape = cfg.layers[0]
        writer.add_feed_forward_length(cfg.moe.expert_ffn_dim if shape.kind in "MH" else shape.ffn_dim)
        writer.add_head_count(shape.n_heads)
        writer.add_head_count_kv(shape.n_kv_heads)
        if cfg.head_dim * shape.n_heads != cfg.d_model:
            writer.add_key_length(cfg.head_dim)
            writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.rotary_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        if cfg.has_moe:
            writer.add_expert_count(cfg.moe.num_experts)
            writer.add_expert_used_count(cfg.moe.top_k)
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]  # fmt: skip
        writer.add_file_type(ftype)
        if tokenizer_dir is not None:
            _tokenizer_metadata(writer, Path(tokenizer_dir), cfg.vocab_size)
        for tname, array in tensors:
            st = storage_type(tname, array, qtype)
            if st == "f32":
                writer.add_tensor(tname, array)
            elif st == "f16":
                writer.add_tensor(tname, array.astype(np.float16))
            else:
                gtype = getattr(gguf.GGMLQuantizationType, st.upper())
                writer.add_tensor(tname, gguf.quants.quantize(array, gtype), raw_dtype=gtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def verify_gguf(path, model, qtype: str) -> dict:
    """Read ``path`` back with ``gguf.GGUFReader`` and check every tensor's name, shape and values
    against ``model`` (quantized types dequantized with ``gguf.quants``, within the block tolerance).
    Returns {"tensors": n, "max_rel_err": worst error / block max}; raises EffilmError on a mismatch."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    got = {t.name: t for t in reader.tensors}
    expected = gguf_tensors(model)
    names = [n for n, _ in expected]
    if sorted(got) != sorted(names):
        raise EffilmError(f"{path}: tensor names differ: missing {sorted(set(names) - set(got))}, extra {sorted(set(got) - set(names))}")
    worst = 0.0
    for tname, want in expected:
        t = got[tname]
        if tuple(int(d) for d in reversed(t.shape)) != want.shape:
            raise EffilmError(f"{path}: {tname} has shape {tuple(reversed(t.shape))}, expected {want.shape}")
        st = storage_type(tname, want, qtype)
        if t.tensor_type.name.lower() != st:
            raise EffilmError(f"{path}: {tname} stored as {t.tensor_type.name}, expected {st}")
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape).astype(np.float32)
        blocks = want.reshape(-1, QK_BLOCK) if want.size % QK_BLOCK == 0 else want.reshape(1, -1)
        scale = np.repeat(np.abs(blocks).max(axis=1, keepdims=True), blocks.shape[1], axis=1).reshape(want.shape)
        err = np.abs(values - want)
        tol = BLOCK_TOLERANCE[st] * scale + 1e-7
        if not (err <= tol).all():
            raise EffilmError(f"{path}: {tname} values differ beyond {st} tolerance (max err {err.max():.3g})")
        worst = max(worst, float((err / np.maximum(scale, 1e-12)).max()))
    return {"tensors": len(expected), "max_rel_err": worst, "arch": reader.fields["general.architecture"].contents()}
