"""Hugging Face interop: declarative key maps and config conversion, both ways.

Supported: LlamaForCausalLM (and Mistral's identical layout), Phi3ForCausalLM, MixtralForCausalLM,
PhimoeForCausalLM, Snowflake's ArcticForCausalLM (key layout and config.json field names of
Snowflake's modeling_arctic.py) and Apple's OpenELMForCausalLM (the ``transformer.*`` layout of the
apple/OpenELM-* checkpoints; transformers has no class for it: Apple's own remote code and mlx-lm
read it). MoE experts use the per-expert ``experts.{e}.w1/w2/w3`` layout
that Hub checkpoints use (transformers 5 converts it to its fused layout on load).

Each rule maps one effilm tensor to a list of HF tensors: ``parts`` are concatenated along dim 0
(Q|K|V, gate|up), and ``per_expert`` rules repeat the parts for every expert and stack them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from effilm.config.hf import choose_architecture, config_from_hf, config_to_hf
from effilm.config.model import ModelConfig
from effilm.errors import CheckpointError, EffilmError


@dataclass(frozen=True)
class Rule:
    ours: str
    parts: tuple[str, ...]  # HF names; with per_expert, templates holding "{e}"
    sizes: tuple[int, ...]  # rows of each part (dim 0)
    num_experts: int = 0  # > 0: stacked over experts


# ----- key maps --------------------------------------------------------------------------------
def key_rules(cfg: ModelConfig, arch: str) -> list[Rule]:
    if arch == "OpenELMForCausalLM":
        return _openelm_rules(cfg)
    d, hd = cfg.d_model, cfg.head_dim
    layernorm_bias = cfg.norm == "layernorm" and cfg.norm_bias
    rules: list[Rule] = []

    def norm(ours: str, theirs: str) -> None:
        rules.append(Rule(f"{ours}.weight", (f"{theirs}.weight",), (d,)))
        if layernorm_bias:
            rules.append(Rule(f"{ours}.bias", (f"{theirs}.bias",), (d,)))

    def linear(ours: str, parts: list[str], sizes: list[int], bias: bool) -> None:
        rules.append(Rule(f"{ours}.weight", tuple(f"{p}.weight" for p in parts), tuple(sizes)))
        if bias:
            rules.append(Rule(f"{ours}.bias", tuple(f"{p}.bias" for p in parts), tuple(sizes)))

    moe_prefix = "block_sparse_moe"
    for i, s in enumerate(cfg.layers):
        o, p = f"layers.{i}", f"model.layers.{i}"
        q, kv = s.n_heads * hd, s.n_kv_heads * hd
        norm(f"{o}.attn_norm", f"{p}.input_layernorm")
        if arch == "Phi3ForCausalLM":
            linear(f"{o}.attn.qkv", [f"{p}.self_attn.qkv_proj"], [q + 2 * kv], cfg.attn_bias)
        else:
            linear(f"{o}.attn.qkv", [f"{p}.self_attn.{n}_proj" for n in "qkv"], [q, kv, kv], cfg.attn_bias)
        linear(f"{o}.attn.o", [f"{p}.self_attn.o_proj"], [d], cfg.attn_out_bias)
        if s.kind == "D":
            norm(f"{o}.mlp_norm", f"{p}.post_attention_layernorm")
            if arch == "Phi3ForCausalLM":
                linear(f"{o}.mlp.gate_up", [f"{p}.mlp.gate_up_proj"], [2 * s.ffn_dim], cfg.mlp_bias)
                linear(f"{o}.mlp.down", [f"{p}.mlp.down_proj"], [d], cfg.mlp_bias)
            elif arch == "ArcticForCausalLM":
                mp = f"{p}.{moe_prefix}.mlp"
                linear(f"{o}.mlp.gate_up", [f"{mp}.w1", f"{mp}.w3"], [s.ffn_dim, s.ffn_dim], False)
                linear(f"{o}.mlp.down", [f"{mp}.w2"], [d], False)
            else:
                linear(f"{o}.mlp.gate_up", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [s.ffn_dim] * 2, cfg.mlp_bias)
                linear(f"{o}.mlp.down", [f"{p}.mlp.down_proj"], [d], cfg.mlp_bias)
        if s.kind == "H":
            norm(f"{o}.mlp_norm", f"{p}.residual_layernorm")
            rp = f"{p}.residual_mlp"
            linear(f"{o}.mlp.gate_up", [f"{rp}.w1", f"{rp}.w3"], [s.ffn_dim, s.ffn_dim], False)
            linear(f"{o}.mlp.down", [f"{rp}.w2"], [d], False)
        if s.kind in "MH":
            m = cfg.moe
            norm(f"{o}.moe_norm", f"{p}.post_attention_layernorm")
            rules.append(Rule(f"{o}.moe.router.weight", (f"{p}.{moe_prefix}.gate.weight",), (m.num_experts,)))
            ep = f"{p}.{moe_prefix}.experts.{{e}}"
            f_ = m.expert_ffn_dim
            rules.append(Rule(f"{o}.moe.experts.w_gate_up", (f"{ep}.w1.weight", f"{ep}.w3.weight"), (f_, f_), m.num_experts))
            rules.append(Rule(f"{o}.moe.experts.w_down", (f"{ep}.w2.weight",), (d,), m.num_experts))
    rules.append(Rule("embed.weight", ("model.embed_tokens.weight",), (cfg.vocab_size,)))
    norm("norm", "model.norm")
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",), (cfg.vocab_size,)))
    if cfg.lm_head_bias:
        rules.append(Rule("lm_head.bias", ("lm_head.bias",), (cfg.vocab_size,)))
    return rules


def refuse_routing_bias(model, fmt: str) -> None:
    """A clear error when ``model`` routes with a selection bias (loss-free balancing) that the
    format ``fmt`` has no tensor for: the export would pick other experts. A bias no larger than
    upcycling's tie-break (``models.moe.TIE_BREAK``) only orders exact ties and is left out."""
    from effilm.models.moe import routing_bias_layers

    layers = routing_bias_layers(model)
    if layers:
        raise EffilmError(
            f"this model chooses experts with a selection bias (loss-free balancing; MoE "
            f"layers {layers}); the {fmt} format has no place for it, so the export would route differently. Keep "
            "it in effilm's format (generate, serve, eval and quantize read it), or train with moe.balance='aux_loss'"
        )


def _openelm_rules(cfg: ModelConfig) -> list[Rule]:
    """OpenELM stores what effilm fuses the same way: one ``qkv_proj`` ([Q|K|V] by heads) and one
    ``proj_1`` ([gate|up], gate first); per-head ``q_norm``/``k_norm``; the head only when untied."""
    d, hd = cfg.d_model, cfg.head_dim
    rules = [Rule("embed.weight", ("transformer.token_embeddings.weight",), (cfg.vocab_size,))]
    for i, s in enumerate(cfg.layers):
        o, p = f"layers.{i}", f"transformer.layers.{i}"
        rules += [Rule(f"{o}.attn_norm.weight", (f"{p}.attn_norm.weight",), (d,)),
                  Rule(f"{o}.attn.qkv.weight", (f"{p}.attn.qkv_proj.weight",), ((s.n_heads + 2 * s.n_kv_heads) * hd,)),
                  Rule(f"{o}.attn.o.weight", (f"{p}.attn.out_proj.weight",), (d,)),
                  Rule(f"{o}.mlp_norm.weight", (f"{p}.ffn_norm.weight",), (d,)),
                  Rule(f"{o}.mlp.gate_up.weight", (f"{p}.ffn.proj_1.weight",), (2 * s.ffn_dim,)),
                  Rule(f"{o}.mlp.down.weight", (f"{p}.ffn.proj_2.weight",), (d,))]  # fmt: skip
        if cfg.qk_norm:
            rules += [Rule(f"{o}.attn.q_norm.weight", (f"{p}.attn.q_norm.weight",), (hd,)),
                      Rule(f"{o}.attn.k_norm.weight", (f"{p}.attn.k_norm.weight",), (hd,))]  # fmt: skip
    rules.append(Rule("norm.weight", ("transformer.norm.weight",), (d,)))
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",), (cfg.vocab_size,)))
    return rules


def to_hf_state(model, arch: str) -> dict[str, torch.Tensor]:
    refuse_routing_bias(model, f"Hugging Face {arch}")
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for r in key_rules(model.cfg, arch):
        t = sd[r.ours].detach().cpu()
        if r.num_experts:
            for e in range(r.num_experts):
                for name, piece in zip(r.parts, t[e].split(list(r.sizes), dim=0)):
                    out[name.format(e=e)] = piece.contiguous()
        else:
            for name, piece in zip(r.parts, t.split(list(r.sizes), dim=0)):
                out[name] = piece.contiguous()
    return out


def from_hf_state(cfg: ModelConfig, arch: str, hf: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    rules = key_rules(cfg, arch)
    wanted = []
    for r in rules:
        names = [n.format(e=e) for e in range(r.num_experts) for n in r.parts] if r.num_experts else list(r.parts)
        wanted.extend(names)
    missing = [n for n in wanted if n not in hf]
    ignorable = ("rotary_emb.inv_freq",)
    unexpected = sorted(set(hf) - set(wanted) - ({"lm_head.weight"} if cfg.tie_embeddings else set()))
    unexpected = [n for n in unexpected if not n.endswith(ignorable)]
    from effilm.formats.checkpoint import raise_tensor_problems

    raise_tensor_problems(f"{source} ({arch})", missing, unexpected)
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        try:
            if r.num_experts:
                out[r.ours] = torch.stack(
                    [torch.cat([_checked(hf, n.format(e=e), rows, source) for n, rows in zip(r.parts, r.sizes)])
                     for e in range(r.num_experts)]
                )  # fmt: skip
            else:
                out[r.ours] = torch.cat([_checked(hf, n, rows, source) for n, rows in zip(r.parts, r.sizes)])
        except RuntimeError as exc:  # concatenating mismatched widths
            raise CheckpointError(f"{source}: mis-shaped tensors for {r.ours} ({', '.join(r.parts)}): {exc}") from None
    return out


def _checked(hf: dict, name: str, rows: int, source: str) -> torch.Tensor:
    t = hf[name]
    if t.shape[0] != rows:
        raise CheckpointError(f"{source}: mis-shaped tensor {name}: {tuple(t.shape)}, expected {rows} rows")
    return t


# ----- config conversion ---------------------------------------------------------------------
# ----- public API ------------------------------------------------------------------------------
def save_hf(model, path: str | os.PathLike, arch: str | None = None, dtype: torch.dtype | None = None,
            tokenizer_dir: str | os.PathLike | None = None, mark: str | None = None) -> Path:
    """Write a directory that transformers' AutoModelForCausalLM loads (config.json + safetensors),
    with the tokenizer files of ``tokenizer_dir`` when given."""
    cfg = model.cfg
    arch = arch or choose_architecture(cfg)
    hf_cfg = config_to_hf(cfg, arch)
    state = to_hf_state(model, arch)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
        hf_cfg["dtype"] = str(dtype).replace("torch.", "")
    return write_model_dir(path, state, hf_cfg, "pt", tokenizer_dir, mark)


def write_model_dir(path, state: dict[str, torch.Tensor], config: dict, weights_format: str,
                    tokenizer_dir: str | os.PathLike | None = None, mark: str | None = None) -> Path:  # fmt: skip
    """Atomically write a Hugging Face-style model directory: ``model.safetensors`` (its metadata
    ``format`` = ``weights_format``), ``config.json``, ``generation_config.json`` with the config's
    special token ids, and the tokenizer files of ``tokenizer_dir`` when given (HF and MLX exports)."""
    from safetensors.torch import save_file

    from effilm.io import atomic_dir

    path = Path(path)
    with atomic_dir(path, mark=mark) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": weights_format})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_dir is not None:
            from effilm.data.tokenizer import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_dir, tmp)
    return path


def load_hf(path: str | os.PathLike, device=None, dtype=None):
    """Load a Hugging Face model directory into an effilm model (eval mode)."""
    from effilm.formats.checkpoint import load_safetensors_dir, load_state_checked, read_config
    from effilm.models.transformer import build_model

    path = Path(path)
    h = read_config(path)
    cfg, arch = config_from_hf(h, f"{path}/config.json")
    state = from_hf_state(cfg, arch, load_safetensors_dir(path), str(path))
    model = build_model(cfg, device=device, init=False)
    load_state_checked(model, state, str(path))
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


