"""Sparse upcycling: the weights of an MoE model that computes the same function as a dense one.

``upcycle_state(dense_state, dense_cfg, moe_cfg, up)`` maps a dense model's weights (effilm key
names) onto the upcycled architecture ``moe_cfg`` (from ``UpcycleConfig.architecture``). The dense
MLP (gate, up and down projections of width F) is cut into G slices of width F/G; a SwiGLU MLP is
the sum of its slices, since each hidden unit's gate and up rows and down column act alone.
Expert e starts from one slice, taken in turn from the slices the layer's experts use (n of them).

* **M** (the MoE replaces the MLP): ``moe_norm`` is the MLP's norm and the experts use all G
  slices. With n = 1 every expert is the whole MLP and the router is random (normal,
  ``init_std``): the top-k weights are renormalised to sum to 1, so any choice of experts gives
  the MLP's output, and different tokens reach different experts, which then diverge. With n > 1
  each token needs every slice once: the router starts at zero (all scores equal) and a selection
  bias of ``TIE_BREAK`` on the first K experts (K/n copies of each slice) picks them for every
  token; each weight is then 1/K, so the down projections are scaled by n. The bias decides only
  where scores tie; under loss-free balancing it is then updated like any selection bias.
* **H**, ``residual='full'`` (Arctic: the dense MLP stays as the residual MLP beside a new parallel
  MoE): the MoE reads the block's input, not the attention output the MLP reads, so it cannot take
  over part of the MLP's work exactly; it starts as a zero function. Its experts' gate/up are MLP
  slices (a warm start), their down projections zero, the router random. The down projections get
  gradients from step 0, the rest from step 1 (as with zero-initialised residual branches).
* **H**, ``residual='slice'`` (the active width kept at the dense width): slice 0 stays the residual
  MLP and the experts take the other G - 1 slices as in M layers. The function is then the dense
  one up to those slices reading the block's input instead of the attention output: close to it
  when the attention's update is small against the residual stream, not equal.

Only torch and the config are imported here.
"""

from __future__ import annotations

import torch

from effilm.config.model import ModelConfig, UpcycleConfig
from effilm.models.moe import TIE_BREAK


def upcycle_state(state: dict[str, torch.Tensor], dense: ModelConfig, moe: ModelConfig,
                  up: UpcycleConfig) -> dict[str, torch.Tensor]:  # fmt: skip
    """The upcycled model's weights (effilm key names) from the dense model's ``state``."""
    G, E, K = up.granularity, moe.moe.num_experts, moe.moe.top_k
    F_, D = dense.ffn_dim, dense.d_model
    Fg = F_ // G
    gen = torch.Generator().manual_seed(up.seed)
    out = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for i, shape in enumerate(moe.layers):
        p = f"layers.{i}"
        mine = {k: v for k, v in state.items() if k.startswith(p + ".")}
        mlp_keys = {k for k in mine if k.startswith((f"{p}.mlp.", f"{p}.mlp_norm."))}
        out.update({k: v for k, v in mine.items() if k not in mlp_keys})
        if shape.kind == "D":
            out.update({k: mine[k] for k in mlp_keys})
            continue
        dtype = state[f"{p}.mlp.gate_up.weight"].dtype
        gate_up, down = state[f"{p}.mlp.gate_up.weight"].float(), state[f"{p}.mlp.down.weight"].float()
        gate, upw = gate_up[:F_], gate_up[F_:]
        cut = [slice(g * Fg, (g + 1) * Fg) for g in range(G)]
        for k in mlp_keys:
            if k.startswith(f"{p}.mlp_norm."):
                if shape.kind == "H":
                    out[k] = mine[k]
                out[k.replace(".mlp_norm.", ".moe_norm.")] = mine[k].clone()
        if shape.kind == "H" and up.residual == "slice":  # slice 0 is the residual MLP, the rest the experts
            out[f"{p}.mlp.gate_up.weight"] = torch.cat([gate[cut[0]], upw[cut[0]]]).to(dtype)
            out[f"{p}.mlp.down.weight"] = down[:, cut[0]].contiguous().to(dtype)
            slices = cut[1:]
        else:
            if shape.kind == "H":
                out.update({k: mine[k] for k in mlp_keys if k.startswith(f"{p}.mlp.")})
            slices = cut
        n = len(slices)
        chosen = [slices[e % n] for e in range(E)]
        shares = up.shares_work(shape.kind)
        out[f"{p}.moe.experts.w_gate_up"] = torch.stack([torch.cat([gate[c], upw[c]]) for c in chosen]).to(dtype)
        out[f"{p}.moe.experts.w_down"] = (
            torch.stack([down[:, c] * n for c in chosen]) if shares else torch.zeros(E, D, Fg)
        ).to(dtype)
        tie = shares and n > 1  # each token must get every slice once: equal scores, the tie-break picks
        router = torch.zeros(E, D) if tie else torch.randn(E, D, generator=gen) * dense.init_std
        out[f"{p}.moe.router.weight"] = router.to(dtype)
        if moe.moe.has_selection_bias:
            bias = torch.zeros(E)
            if tie:
                bias[:K] = TIE_BREAK
            out[f"{p}.moe.router_bias"] = bias
    return out
