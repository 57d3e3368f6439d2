"""Model and MoE configs: plain dataclasses of serialisable fields.

Derived values (per-layer widths, head dims) are computed in ``__post_init__`` and kept out of
the serialised fields. Every check that can fail raises ``ConfigError`` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import effilm.config.cost as cost
from effilm.config.presets import preset_dict
from effilm.config.reader import build, choice
from effilm.config.reader import option as _f
from effilm.errors import ConfigError

ROUTERS = ("softmax_topk", "sparsemixer")
AUX_CONVENTIONS = ("switch", "hf")
EXPERT_IMPLS = ("auto", "reference", "sorted", "grouped_mm")
BALANCING = ("aux_loss", "loss_free")
UPCYCLE_RESIDUALS = ("full", "slice")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu_tanh", "gegelu")
ROPE_TYPES = ("default", "longrope")
LAYER_LETTERS = {"D": "dense MLP", "M": "MoE replaces the MLP", "H": "Arctic hybrid: dense residual MLP + parallel MoE"}


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor``, never more than 10% below it (OpenELM, MobileNet)."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return int(new)


@dataclass
class MoEConfig:
    """A mixture-of-experts MLP: router, experts and the auxiliary losses."""

    num_experts: int = _f(8, "Number of experts E in each MoE layer.")
    top_k: int = _f(2, "Experts each token is routed to (K).")
    expert_ffn_dim: int = _f(0, "Width F of each SwiGLU expert.")
    router: str = _f("softmax_topk", f"Routing rule: one of {ROUTERS}. 'sparsemixer' is PhiMoE's (top-2 only).")
    renormalize: bool = _f(True, "Renormalise the top-k softmax weights to sum to 1 (Mixtral, Arctic).")
    router_jitter_eps: float = _f(0.01, "sparsemixer: relative logit gap under which experts stay candidates.")
    aux_loss_coef: float = _f(0.001, "Weight of the Switch load-balancing loss in the training loss.")
    z_loss_coef: float = _f(0.0, "Weight of the ST-MoE router z-loss mean(logsumexp(logits)^2).")
    aux_loss_convention: str = _f(
        "switch",
        f"One of {AUX_CONVENTIONS}: 'switch' gives 1.0 at perfect balance (Megatron, DeepSpeed); "
        "'hf' gives top_k (transformers' load_balancing_loss_func).",
    )
    capacity_factor: float | None = _f(
        None, "Training only: per-expert capacity = ceil(cf * T * K / E); overflow is dropped. None = dropless."
    )
    impl: str = _f("auto", f"Expert kernel: one of {EXPERT_IMPLS}. 'auto' = grouped_mm on CUDA and for fp32 on CPU, the sorted loop kernel otherwise.")
    balance: str = _f(
        "aux_loss",
        f"Load balancing: one of {BALANCING}. 'aux_loss' trains on the Switch loss (aux_loss_coef); 'loss_free' "
        "(Wang et al. 2024, DeepSeek-V3) adds a per-expert bias to the router scores when choosing the top-k, moved "
        "after each optimizer step by bias_update_rate * sign(mean load - expert load); the Switch loss is then "
        "reported but not trained on.",
    )
    bias_update_rate: float = _f(0.001, "loss_free balancing: the step gamma of each expert's selection bias.")
    selection_bias: bool = _f(
        False, "Keep a per-expert selection bias (buffer router_bias) added to the router scores when choosing the "
        "top-k, never in the mixing weights. Always on with balance='loss_free'; upcycling sets it for fine-grained "
        "experts, where it stays fixed.",
    )

    def __post_init__(self) -> None:
        _check_pos(self, "num_experts", "top_k", "expert_ffn_dim")
        if self.top_k > self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k} exceeds moe.num_experts={self.num_experts}")
        _check_choice(self, "router", ROUTERS)
        _check_choice(self, "aux_loss_convention", AUX_CONVENTIONS)
        _check_choice(self, "impl", EXPERT_IMPLS)
        if self.router == "sparsemixer" and self.top_k != 2:
            raise ConfigError(f"moe.top_k={self.top_k}: the sparsemixer router is defined for top_k=2 only")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor={self.capacity_factor} must be positive or None")
        for name in ("aux_loss_coef", "z_loss_coef", "router_jitter_eps", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name}={getattr(self, name)} must be >= 0")
        _check_choice(self, "balance", BALANCING)
        if self.has_selection_bias and self.router == "sparsemixer":
            why = "balance='loss_free'" if self.balance == "loss_free" else "selection_bias=true"
            raise ConfigError(f"moe.{why} needs the softmax_topk router; the sparsemixer router has no selection bias")

    @property
    def has_selection_bias(self) -> bool:
        """Whether each MoE layer holds a ``router_bias`` buffer (loss-free balancing or upcycling)."""
        return self.selection_bias or self.balance == "loss_free"

    @property
    def trained_aux_coef(self) -> float:
        """The Switch loss's weight in the training loss: aux_loss_coef, or 0 under loss-free balancing."""
        return self.aux_loss_coef if self.balance == "aux_loss" else 0.0


@dataclass
class UpcycleConfig:
    """Sparse upcycling: a dense model's MLPs become experts (``effilm upcycle``, ``[model.upcycle]``)."""

    experts: int = _f(8, "Experts E in each new MoE layer.")
    top_k: int = _f(2, "Experts each token is routed to (K).")
    pattern: str = _f(
        "M", "Layer mix of the upcycled model, tiled over the layers: M (each dense MLP becomes an MoE), H (Arctic "
        "hybrid: a dense residual MLP beside a new parallel MoE), or a mix with D such as DM."
    )
    granularity: int = _f(
        1, "G: the dense MLP is cut into G slices of width F/G; each expert starts as one slice (G=1: a full copy)."
    )
    residual: str = _f(
        "full", f"H layers, one of {UPCYCLE_RESIDUALS}: 'full' keeps the whole dense MLP as the residual MLP and starts "
        "the MoE at zero (the same function exactly); 'slice' keeps slice 0 as the residual MLP and makes the experts "
        "from the other G-1 slices, so the active width stays the dense width (the same function up to the MoE "
        "reading the block input, see docs/ARCHITECTURE.md).",
    )
    seed: int = _f(0, "Seed of the new routers' random initialisation.")

    def __post_init__(self) -> None:
        for name in ("experts", "top_k", "granularity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"upcycle.{name}={getattr(self, name)} must be at least 1")
        if self.top_k > self.experts:
            raise ConfigError(f"upcycle: top_k={self.top_k} exceeds experts={self.experts} (each token needs K distinct experts)")
        if not self.pattern or set(self.pattern) - set(LAYER_LETTERS) or not set(self.pattern) & {"M", "H"}:
            raise ConfigError(f"upcycle.pattern={self.pattern!r}: use M, H or a mix with D such as DM (at least one M or H)")
        choice(self, "upcycle", "residual", UPCYCLE_RESIDUALS)
        if self.residual == "slice" and (self.granularity < 2 or "H" not in self.pattern):
            raise ConfigError("upcycle.residual='slice' needs H layers and granularity >= 2 (slice 0 stays the residual MLP)")
        for kind in sorted(set(self.pattern) - {"D"}):
            n = self.expert_slices(kind)
            if self.experts % n:
                raise ConfigError(f"upcycle: experts={self.experts} must be a multiple of the {n} slices experts start "
                                  f"from in {kind} layers (granularity={self.granularity}; each slice the same number "
                                  "of experts)")  # fmt: skip
            if n > 1 and self.shares_work(kind) and self.top_k % n:
                raise ConfigError(f"upcycle: top_k={self.top_k} must be a multiple of the {n} expert slices in {kind} "
                                  "layers: each token needs every slice of the dense MLP to compute the same function")  # fmt: skip

    def expert_slices(self, kind: str) -> int:
        """How many distinct dense-MLP slices the experts of a ``kind`` (M/H) layer start from."""
        return self.granularity - 1 if kind == "H" and self.residual == "slice" else self.granularity

    def shares_work(self, kind: str) -> bool:
        """Whether a ``kind`` layer's experts carry part of the dense MLP (else the MoE starts at zero)."""
        return kind == "M" or self.residual == "slice"

    def architecture(self, dense: dict, where: str = "upcycle") -> dict:
        """The ``ModelConfig`` fields of the upcycled model from those of the dense model ``dense``."""
        src = build(ModelConfig, {k: v for k, v in dense.items() if k != "upcycle"}, where)
        if set(src.layer_pattern) != {"D"}:
            raise ConfigError(f"{where}: the source is already an MoE model (layer_pattern={src.layer_pattern!r}); "
                              "upcycling starts from a dense model")  # fmt: skip
        if src.activation != "silu" or src.mlp_bias:
            raise ConfigError(f"{where}: experts are SwiGLU without biases; the source's MLP is "
                              f"{src.activation}{' with biases' if src.mlp_bias else ''}")  # fmt: skip
        if src.ffn_multipliers is not None:
            raise ConfigError(f"{where}: the source's MLP widths vary by layer (OpenELM scaling); experts share one width")
        F_ = src.ffn_dim
        if F_ % self.granularity:
            raise ConfigError(f"{where}: granularity={self.granularity} does not divide the dense MLP width {F_}")
        out = {k: v for k, v in src.to_dict().items() if k not in ("upcycle", "init_from")}
        out["layer_pattern"] = self.pattern
        out["residual_ffn_dim"] = F_ // self.granularity if self.residual == "slice" else None  # None: ffn_dim
        out["hf_architecture"] = None
        tie_break = any(self.expert_slices(k) > 1 and self.shares_work(k) for k in set(self.pattern) - {"D"})
        out["moe"] = dict(num_experts=self.experts, top_k=self.top_k, expert_ffn_dim=F_ // self.granularity,
                          router="softmax_topk", renormalize=True, selection_bias=tie_break)  # fmt: skip
        return out


@dataclass(frozen=True)
class LayerShape:
    """The derived shape of one layer."""

    kind: str  # D, M or H
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # dense MLP width (D), residual MLP width (H), 0 for M


@dataclass
class ModelConfig:
    """A decoder-only transformer: dense, MoE or Arctic hybrid, with optional OpenELM scaling."""

    name: str = _f("custom", "Free-form name; never used to switch behaviour.")
    vocab_size: int = _f(32000, "Vocabulary size.")
    d_model: int = _f(512, "Hidden size D.")
    n_layers: int = _f(8, "Number of transformer blocks.")
    n_heads: int = _f(8, "Query heads (per layer unless qkv_multipliers is set).")
    n_kv_heads: int | None = _f(None, "Key/value heads for GQA; None = n_heads.")
    head_dim: int | None = _f(None, "Per-head dimension; None = d_model // n_heads.")
    ffn_dim: int = _f(1408, "Width of the dense MLP in D layers.")
    residual_ffn_dim: int | None = _f(None, "Width of the residual dense MLP in H layers; None = ffn_dim.")
    activation: str = _f("silu", f"Gated MLP activation: one of {ACTIVATIONS} (silu = SwiGLU).")
    gegelu_limit: float = _f(20.0, "Clamp limit of the gegelu activation (Phi-3-small).")
    layer_pattern: str = _f("D", "Layer mix, one letter per layer, tiled: D dense, M MoE, H Arctic hybrid.")
    moe: MoEConfig | None = _f(None, "MoE settings; required when layer_pattern has M or H.")
    norm: str = _f("rmsnorm", f"Normalisation: one of {NORMS}.")
    norm_eps: float = _f(1e-5, "Epsilon of every norm.")
    norm_bias: bool = _f(False, "LayerNorm has a bias (ignored for rmsnorm).")
    attn_bias: bool = _f(False, "Bias on the Q, K and V projections.")
    attn_out_bias: bool = _f(False, "Bias on the attention output projection.")
    mlp_bias: bool = _f(False, "Bias on the dense MLP projections.")
    lm_head_bias: bool = _f(False, "Bias on the LM head.")
    tie_embeddings: bool = _f(False, "Share the input embedding with the LM head.")
    qk_norm: bool = _f(False, "RMSNorm over each head of Q and K before RoPE (OpenELM).")
    rope_theta: float = _f(10000.0, "RoPE base.")
    rope_type: str = _f("default", f"RoPE variant: one of {ROPE_TYPES}.")
    rope_partial_factor: float = _f(1.0, "Fraction of each head's dims that RoPE rotates.")
    rope_short_factor: list[float] | None = _f(None, "LongRoPE: per-frequency factors up to the original context.")
    rope_long_factor: list[float] | None = _f(None, "LongRoPE: per-frequency factors past the original context.")
    rope_original_max_seq_len: int | None = _f(None, "LongRoPE: the pretraining context length.")
    rope_short_mscale: float | None = _f(None, "LongRoPE attention scale at short context; None = derived.")
    rope_long_mscale: float | None = _f(None, "LongRoPE attention scale at long context; None = derived.")
    max_seq_len: int = _f(2048, "Maximum context length (positions).")
    sliding_window: int | None = _f(None, "Attend to at most this many most recent keys (self included).")
    qkv_multipliers: list[float] | None = _f(None, "OpenELM layer-wise scaling: (lo, hi) of the QKV multiplier.")
    ffn_multipliers: list[float] | None = _f(None, "OpenELM layer-wise scaling: (lo, hi) of the FFN multiplier.")
    num_gqa_groups: int = _f(1, "OpenELM: query heads per KV head under layer-wise scaling.")
    ffn_dim_divisor: int = _f(256, "OpenELM: FFN widths are rounded to a multiple of this.")
    init_std: float = _f(0.02, "Std of the normal initialisation of weights.")
    hf_architecture: str | None = _f(None, "Transformers class to export as; None = chosen from the layout.")
    bos_token_id: int | None = _f(None, "BOS token id, written into exported configs.")
    eos_token_id: int | None = _f(None, "EOS token id, written into exported configs.")
    pad_token_id: int | None = _f(None, "PAD token id, written into exported configs.")
    attention_block_sparse: bool = _f(
        False, "Phi-3-small's block-sparse attention. Informational: effilm runs dense attention in its place."
    )
    upcycle: UpcycleConfig | None = _f(
        None, "With init_from: the dense source becomes an MoE model at step 0 (sparse upcycling; the same function "
        "as the source, see docs/ARCHITECTURE.md). The architecture fields come from the source and this table.",
    )
    init_from: str | None = _f(
        None, "Start from the weights in this directory (an effilm checkpoint or a Hugging Face directory that "
        "effilm.load reads); the architecture comes from it (a run file's [model] table is expanded by "
        "effilm.config.hf.expand_init_from). Applies at step 0 only: --resume continues from the run's own "
        "checkpoints.",
    )

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = build(MoEConfig, self.moe, "moe")
        if isinstance(self.upcycle, dict):
            self.upcycle = build(UpcycleConfig, self.upcycle, "upcycle")
        if self.upcycle is not None and not self.init_from:
            raise ConfigError("model.upcycle needs model.init_from: the dense model to upcycle")
        for name in ("rope_short_factor", "rope_long_factor", "qkv_multipliers", "ffn_multipliers"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, [float(x) for x in v])
        _check_pos(self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "num_gqa_groups")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check_pos(self, "n_kv_heads")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"n_heads={self.n_heads} does not divide d_model={self.d_model}; set head_dim explicitly"
                )
            self.head_dim = self.d_model // self.n_heads
        _check_pos(self, "head_dim")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        _check_choice(self, "norm", NORMS)
        _check_choice(self, "activation", ACTIVATIONS)
        _check_choice(self, "rope_type", ROPE_TYPES)
        if not self.layer_pattern or set(self.layer_pattern) - set(LAYER_LETTERS):
            raise ConfigError(
                f"layer_pattern={self.layer_pattern!r}: use letters from {sorted(LAYER_LETTERS)} "
                f"({'; '.join(f'{k}: {v}' for k, v in LAYER_LETTERS.items())})"
            )
        if self.n_layers % len(self.layer_pattern) and len(self.layer_pattern) != 1:
            raise ConfigError(
                f"layer_pattern={self.layer_pattern!r} (length {len(self.layer_pattern)}) does not tile "
                f"n_layers={self.n_layers}"
            )
        needs_moe = any(c in "MH" for c in self.layer_pattern)
        if needs_moe and self.moe is None:
            raise ConfigError(f"layer_pattern={self.layer_pattern!r} has MoE layers but moe is not set")
        if any(c in "DH" for c in self.layer_pattern) and self.ffn_dim <= 0 and self.ffn_multipliers is None:
            raise ConfigError(f"ffn_dim={self.ffn_dim} must be positive for dense (D/H) layers")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window={self.sliding_window} must be positive or None")
        if not 0 < self.rope_partial_factor <= 1:
            raise ConfigError(f"rope_partial_factor={self.rope_partial_factor} must be in (0, 1]")
        rot = self.rotary_dim
        if rot % 2:
            raise ConfigError(f"rotary dim {rot} (head_dim * rope_partial_factor) must be even")
        if self.rope_type == "longrope":
            if self.rope_original_max_seq_len is None:
                raise ConfigError("rope_original_max_seq_len is required when rope_type='longrope'")
            for name in ("rope_short_factor", "rope_long_factor"):
                v = getattr(self, name)
                if v is None or len(v) != rot // 2:
                    got = None if v is None else len(v)
                    raise ConfigError(f"{name} needs {rot // 2} values (rotary dim / 2), got {got}")
        if (self.qkv_multipliers is None) != (self.ffn_multipliers is None):
            raise ConfigError("qkv_multipliers and ffn_multipliers must be set together (OpenELM scaling)")
        for name in ("qkv_multipliers", "ffn_multipliers"):
            v = getattr(self, name)
            if v is not None and len(v) != 2:
                raise ConfigError(f"{name} must be a pair (lo, hi), got {v}")
        if self.qkv_multipliers is not None and self.d_model % self.head_dim:
            raise ConfigError(f"head_dim={self.head_dim} must divide d_model={self.d_model} for OpenELM scaling")
        object.__setattr__(self, "_layers", self._derive_layers())

    # ----- derived values -------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope_partial_factor)

    @property
    def layers(self) -> list[LayerShape]:
        return self._layers  # type: ignore[attr-defined]

    @property
    def has_moe(self) -> bool:
        return any(s.kind in "MH" for s in self.layers)

    def _derive_layers(self) -> list[LayerShape]:
        kinds = [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers)]
        if self.qkv_multipliers is None:
            res = self.residual_ffn_dim if self.residual_ffn_dim is not None else self.ffn_dim
            widths = {"D": self.ffn_dim, "M": 0, "H": res}
            return [LayerShape(k, self.n_heads, self.n_kv_heads, widths[k]) for k in kinds]
        shapes = []
        qkv = _linspace_round(*self.qkv_multipliers, self.n_layers)
        ffn = _linspace_round(*self.ffn_multipliers, self.n_layers)
        for i, kind in enumerate(kinds):
            q_dim = make_divisible(self.d_model * qkv[i], self.head_dim * self.num_gqa_groups)
            heads = q_dim // self.head_dim
            if heads % self.num_gqa_groups:
                raise ConfigError(f"layer {i}: {heads} heads not divisible by num_gqa_groups={self.num_gqa_groups}")
            width = 0 if kind == "M" else make_divisible(ffn[i] * self.d_model, self.ffn_dim_divisor)
            shapes.append(LayerShape(kind, heads, heads // self.num_gqa_groups, width))
        return shapes

    # ----- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model") -> ModelConfig:
        """The config from plain data (``to_dict``'s output, a ``[model]`` table with an optional
        ``preset``), through the one config reader."""
        return build(cls, d, where)

    __config_extra_keys__ = ("preset",)

    @classmethod
    def __config_expand__(cls, d: dict, where: str = "model") -> dict:
        """``preset = NAME`` starts from that preset; the other keys override it, and a ``moe``
        table merges into the preset's."""
        preset = d.pop("preset", None)
        if preset is None:
            return d
        base = preset_dict(preset)
        moe = d.pop("moe", None)
        if isinstance(moe, dict) and isinstance(base.get("moe"), dict):
            base["moe"] = {**base["moe"], **moe}
        elif moe is not None:
            base["moe"] = moe
        return {**base, **d}

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        """Preset ``name`` (see ``effilm.config.presets``), with ``overrides`` of any field."""
        return build(cls, {**preset_dict(name), **overrides}, "model")

    # ----- cost accounting (see effilm.config.cost) -----------------------------------------
    def num_params(self) -> int:
        return cost.num_params(self)

    def num_active_params(self) -> int:
        return cost.num_active_params(self)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return cost.flops_per_token(self, seq_len)


def _linspace_round(lo: float, hi: float, n: int) -> list[float]:
    if n == 1:
        return [round(lo, 2)]
    return [round(lo + (hi - lo) * i / (n - 1), 2) for i in range(n)]


def _check_pos(obj, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            prefix = "moe." if isinstance(obj, MoEConfig) else ""
            raise ConfigError(f"{prefix}{name}={v!r} must be a positive integer")


def _check_choice(obj, name: str, choices) -> None:
    choice(obj, "moe" if isinstance(obj, MoEConfig) else "model", name, choices)


def longrope_mscale(factor: float, original: int) -> float:
    """LongRoPE's default attention scale sqrt(1 + ln(s) / ln(original)), 1 when s <= 1."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
