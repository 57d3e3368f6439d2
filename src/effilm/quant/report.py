"""The quantization report: quality on held-out text, weight error per layer, bytes and peak RSS.

* perplexity of the fp32 and quantized models over non-overlapping windows of held-out tokens;
* greedy-token agreement: the fraction of held-out positions where the quantized model's arg-max
  next token equals the fp32 model's (teacher-forced on the same text);
* per layer, the largest element-wise weight error ``max |w - dq(q(w))|`` over its quantized
  tensors, and the largest relative error ``||w - dq||_F / ||w||_F``;
* stored weight bytes before and after, and the peak RSS of a fresh process that loads each
  checkpoint through ``effilm.formats.load.load`` and runs one forward pass.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from effilm.models.quantized import QuantExperts, QuantLinear, target_names, weights_of
from effilm.quant.quantize import weight_bytes


def windows(ids: torch.Tensor | list[int], seq_len: int) -> torch.Tensor:
    """A 1-D token sequence cut into [N, seq_len] windows (the tail that does not fill one is dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"need at least {seq_len} tokens of text, got {ids.numel()}")
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def _logits(model, ids_NT: torch.Tensor) -> list[torch.Tensor]:
    return [model(row[None]).logits[0].float() for row in ids_NT]


@torch.no_grad()
def quality(fp_model, q_model, ids_NT: torch.Tensor) -> dict:
    """Perplexity of both models and their greedy-token agreement on ``ids_NT``."""
    nll_fp = nll_q = agree = n = 0.0
    for row, lf, lq in zip(ids_NT, _logits(fp_model, ids_NT), _logits(q_model, ids_NT)):
        target = row[1:]
        nll_fp += torch.nn.functional.cross_entropy(lf[:-1], target, reduction="sum").item()
        nll_q += torch.nn.functional.cross_entropy(lq[:-1], target, reduction="sum").item()
        agree += (lf.argmax(-1) == lq.argmax(-1)).sum().item()
        n += target.numel()
    positions = ids_NT.numel()
    return {
        "eval_tokens": int(positions),
        "ppl_fp32": float(torch.tensor(nll_fp / n).exp()),
        "ppl_quant": float(torch.tensor(nll_q / n).exp()),
        "greedy_agreement": agree / positions,
    }


@torch.no_grad()
def layer_errors(fp_model, q_model) -> list[dict]:
    """Per layer: the largest absolute and relative weight error over its quantized tensors."""
    rows: dict[str, dict] = {}
    for name in target_names(fp_model):
        qm = q_model.get_submodule(name)
        if isinstance(qm, QuantLinear):
            dqs = (qm.qweight.dequantize(),)
        elif isinstance(qm, QuantExperts):
            dqs = (qm.w_gate_up, qm.w_down)
        else:
            continue
        layer = ".".join(name.split(".")[:2])
        row = rows.setdefault(layer, {"layer": layer, "max_abs_err": 0.0, "max_rel_err": 0.0, "worst": ""})
        for w, dq in zip(weights_of(fp_model.get_submodule(name)), dqs):
            w = w.float()
            abs_err = (w - dq).abs().max().item()
            rel = ((w - dq).norm() / w.norm().clamp_min(1e-12)).item()
            if abs_err > row["max_abs_err"]:
                row["max_abs_err"], row["worst"] = abs_err, name
            row["max_rel_err"] = max(row["max_rel_err"], rel)
    return list(rows.values())


_RSS_PROBE = """
import json, resource, sys, torch
torch.set_num_threads(1)
from effilm.formats.load import load
model = load(sys.argv[1])
ids = torch.arange(int(sys.argv[2]))[None] % model.cfg.vocab_size
with torch.no_grad():
    model(ids)
# VmHWM is this process's own high-water mark; ru_maxrss would carry the parent's over fork + exec
hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"peak_rss_bytes": hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def peak_rss(checkpoint, seq_len: int = 64) -> int:
    """Peak RSS (bytes) of a fresh Python process that loads ``checkpoint`` and runs one forward."""
    import os

    import effilm

    src = os.path.dirname(os.path.dirname(effilm.__file__))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(checkpoint), str(seq_len)],
                         capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"peak-RSS probe failed for {checkpoint}: {out.stderr.strip().splitlines()[-1:]}")
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_bytes"])


def build_report(fp_model, q_model, spec: dict, eval_ids_NT: torch.Tensor | None = None,
                 fp_path=None, q_path=None) -> dict:  # fmt: skip
    """The report dict; quality needs ``eval_ids_NT``, peak RSS needs both checkpoint paths."""
    report = {
        "method": spec["method"],
        "bits": spec["bits"],
        "group_size": spec["group_size"],
        "asym": spec["asym"],
        "full_precision": spec["full_precision"],
        "weight_bytes_fp32": weight_bytes(fp_model),
        "weight_bytes_quant": weight_bytes(q_model),
    }
    if eval_ids_NT is not None:
        report.update(quality(fp_model, q_model, eval_ids_NT))
    if fp_path is not None and q_path is not None:
        report["peak_rss_fp32"] = peak_rss(fp_path)
        report["peak_rss_quant"] = peak_rss(q_path)
    report["layers"] = layer_errors(fp_model, q_model)
    return report


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(reports: list[dict]) -> str:
    """One table row per report (several methods side by side), then per-layer errors."""
    head = f"{'method':6s} {'bits':>4s} {'group':>5s} {'asym':>5s} {'weights':>12s} {'peak RSS':>12s} {'ppl fp32':>9s} {'ppl q':>9s} {'agree':>6s}"
    lines = [head, "-" * len(head)]
    for r in reports:
        ppl_fp = f"{r['ppl_fp32']:.3f}" if "ppl_fp32" in r else "-"
        ppl_q = f"{r['ppl_quant']:.3f}" if "ppl_quant" in r else "-"
        agree = f"{r['greedy_agreement']:.4f}" if "greedy_agreement" in r else "-"
        rss = _mib(r["peak_rss_quant"]) if "peak_rss_quant" in r else "-"
        lines.append(f"{r['method']:6s} {r['bits']:>4d} {str(r['group_size'] or 'chan'):>5s} {str(r['asym']):>5s} "
                     f"{_mib(r['weight_bytes_quant']):>12s} {rss:>12s} {ppl_fp:>9s} {ppl_q:>9s} {agree:>6s}")  # fmt: skip
    r0 = reports[0]
    base = f"fp32 weights {_mib(r0['weight_bytes_fp32'])}"
    if "peak_rss_fp32" in r0:
        base += f", fp32 peak RSS {_mib(r0['peak_rss_fp32'])}"
    lines += [base, "", "largest weight error per layer (max |w - dq|; max relative Frobenius error):"]
    for r in reports:
        cells = "  ".join(f"{row['layer']}: {row['max_abs_err']:.2e}/{row['max_rel_err']:.3f}" for row in r["layers"])
        lines.append(f"  {r['method']:6s} {cells}")
    lines.append(f"({r0['full_precision']})")
    return "\n".join(lines)
