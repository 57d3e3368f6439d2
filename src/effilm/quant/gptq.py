"""Calibrated quantization: GPTQ (Frantar et al., 2022), written for effilm's modules.

GPTQ quantizes a weight ``W`` [out, in] one input column at a time and spreads each column's
rounding error over the columns not yet quantized, using the inverse Hessian ``H = X^T X`` of the
layer's inputs ``X``; this minimises the *output* error ``||W X - Q X||``, which round-to-nearest
ignores. Group scales are fixed when a group's first column is reached, from the already-updated
weights. Hessians come from one pass of the full-precision model over the calibration tokens
(every layer sees fp inputs). Stacked experts get one Hessian per expert, from the tokens the
router sends there; the down projection's Hessian uses that expert's SwiGLU activations. An
expert no calibration token reached gets an identity Hessian, which reduces GPTQ to RTN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from effilm.config.quant import QuantConfig
from effilm.models.quantized import Codes, check_shape, group_params, quantize_values

GPTQ_BLOCK = 128  # columns per lazy-update block; a multiple of every group size


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, name: str = "weight") -> Codes:
    """GPTQ codes for ``w`` [out, in] given the input Hessian ``H`` [in, in]."""
    g = check_shape(name, w.shape, cfg.group_size, cfg.bits)
    W = w.detach().float().clone()
    H = H.double().clone()
    n_out, n_in = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += cfg.gptq_damp * torch.diag(H).mean() * torch.eye(n_in, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    scale_dtype = getattr(torch, cfg.scale_dtype)
    Q = torch.empty_like(W)
    scales = torch.empty(n_out, n_in // g)
    zeros = torch.empty(n_out, n_in // g) if cfg.asym else None
    s = z = None
    block = GPTQ_BLOCK
    for b0 in range(0, n_in, block):  # lazy batch updates: rank-1 within a block, one matmul after
        b1 = min(b0 + block, n_in)
        W1, Hinv1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        Err = torch.zeros_like(W1)
        for j in range(b1 - b0):
            i = b0 + j
            if i % g == 0:  # groups never straddle blocks (block % g == 0, or one group per row)
                src = W1[:, j : j + g] if g <= block else W[:, i : i + g]
                s, z = group_params(src, cfg.bits, cfg.asym, scale_dtype)
                scales[:, i // g] = s[:, 0]
                if zeros is not None:
                    zeros[:, i // g] = z[:, 0]
            col = W1[:, j : j + 1]
            q = quantize_values(col, s, z, cfg.bits)
            Q[:, i : i + 1] = q
            dq = (q - z) * s if z is not None else q * s
            err = (col - dq) / Hinv1[j, j]
            W1[:, j + 1 :] -= err * Hinv1[j : j + 1, j + 1 :]
            Err[:, j : j + 1] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    return Codes(Q, scales, zeros)


class HessianCollector:
    """Forward hooks accumulating ``X^T X`` for every target module during calibration passes."""

    def __init__(self, model, targets: list[str]):
        self.H: dict[str, torch.Tensor | list] = {}
        self.handles = []
        for name in targets:
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            else:  # stacked experts: hook the MoE layer that owns them, to see its routing
                moe = model.get_submodule(name.rpartition(".")[0])
                self.handles.append(moe.register_forward_pre_hook(self._moe_hook(name, moe)))

    def _linear_hook(self, name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            h = self.H.get(name)
            self.H[name] = x.T @ x if h is None else h + x.T @ x

        return hook

    def _moe_hook(self, name, moe):
        def hook(module, args):
            x_TD = args[0].reshape(-1, args[0].shape[-1]).float()
            _, _, _, topk_ids_TK = moe.route(x_TD)
            w_gu, w_d = moe.experts.w_gate_up.float(), moe.experts.w_down.float()
            E, F2, D = w_gu.shape
            if name not in self.H:
                self.H[name] = [torch.zeros(E, D, D), torch.zeros(E, w_d.shape[2], w_d.shape[2])]
            H_gu, H_d = self.H[name]
            for e in range(E):
                tok = (topk_ids_TK == e).any(-1).nonzero().squeeze(1)
                if tok.numel() == 0:
                    continue
                x_nD = x_TD[tok]
                H_gu[e] += x_nD.T @ x_nD
                gate, up = F.linear(x_nD, w_gu[e]).chunk(2, dim=-1)
                h_nF = F.silu(gate) * up
                H_d[e] += h_nF.T @ h_nF

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def gptq_codes(model, targets: list[str], calib_ids: torch.Tensor, cfg: QuantConfig) -> dict:
    """GPTQ codes for every target, from one fp pass over ``calib_ids`` [N, T]."""
    calib_ids = calib_ids[: max(1, cfg.calib_max_tokens // calib_ids.shape[1])]
    collector = HessianCollector(model, targets)
    try:
        for row in calib_ids:
            model(row[None])
    finally:
        collector.close()
    codes = {}
    for name in targets:
        module = model.get_submodule(name)
        H = collector.H.get(name)
        if isinstance(module, nn.Linear):
            if H is None:
                H = torch.zeros(module.in_features, module.in_features)
            codes[name] = gptq_quantize(module.weight, H, cfg, name)
        else:
            E, D, Fw = module.w_gate_up.shape[0], module.w_gate_up.shape[2], module.w_down.shape[2]
            H_gu, H_d = H if H is not None else (torch.zeros(E, D, D), torch.zeros(E, Fw, Fw))
            gu = [gptq_quantize(module.w_gate_up[e], H_gu[e], cfg, f"{name}.w_gate_up[{e}]") for e in range(len(H_gu))]
            dn = [gptq_quantize(module.w_down[e], H_d[e], cfg, f"{name}.w_down[{e}]") for e in range(len(H_d))]
            codes[name] = (_stack(gu), _stack(dn))
    return codes


def _stack(cs: list[Codes]) -> Codes:
    zeros = None if cs[0].zeros is None else torch.stack([c.zeros for c in cs])
    return Codes(torch.stack([c.q for c in cs]), torch.stack([c.scales for c in cs]), zeros)
