"""Training throughput: effilm's training step against transformers' on the same model and batch.

A tiny Phi-3-style dense model and a tiny Mixtral-style MoE model are built in effilm, exported with
``effilm.formats.hf.save_hf`` and loaded by transformers (``Phi3ForCausalLM``, ``MixtralForCausalLM``), so
both sides train the same architecture from the same weights. One step is forward + loss (with the
MoE auxiliary loss on both sides) + backward + gradient clipping + AdamW, on ``batch x seq``
tokens. effilm's step is the trainer's own code (``effilm.train.objectives.LanguageModeling``); for the
MoE model a second effilm arm, ``effilm[loss-free]``, trains with loss-free balancing (no Switch loss;
the selection biases move after each step) and its step time is reported against the Switch arm's. For the MoE model
transformers' eager and grouped_mm experts implementations are timed (batched_mm gathers a
weight matrix per assignment, several GiB at these sizes, and is left out).

The floor is pure matmul: every linear layer of the model at its *active* shape (for the MoE, the
T*k rows its experts see), forward and both backward matmuls, no attention, norms or optimizer.

Arms are interleaved round by round; each figure is the median over rounds. Ratios are reported
against the arms measured in the same run.

Run: PYTHONPATH=src python benchmarks/bench_train.py [--quick] [--out benchmarks/results/bench_train.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

RESULTS = Path(__file__).resolve().parent / "results"  # every benchmark writes its JSON here (--out)

ROOT = Path(__file__).resolve().parents[1]


def model_configs(quick: bool) -> dict:
    from effilm.config.model import ModelConfig, MoEConfig

    d, layers = (128, 2) if quick else (256, 4)
    common = dict(vocab_size=4096, d_model=d, n_layers=layers, n_heads=8, max_seq_len=1024, init_std=0.02)
    return {
        "phi3-dense": (ModelConfig(name="bench-phi3", n_kv_heads=8, ffn_dim=688, rope_theta=10000.0,
                                   hf_architecture="Phi3ForCausalLM", **common), "Phi3ForCausalLM"),
        "mixtral-moe": (ModelConfig(name="bench-mixtral", n_kv_heads=4, ffn_dim=688, layer_pattern="M",
                                    moe=MoEConfig(num_experts=8, top_k=2, expert_ffn_dim=352, aux_loss_coef=0.02),
                                    **common), "MixtralForCausalLM"),
    }


def effilm_step_fn(model, opt, tokens, clip):
    """One training step as the trainer takes it; under loss-free balancing (the model's
    ``moe.balance``), the Switch loss leaves the loss and the selection biases move after the step."""
    import torch

    from effilm.models.moe import update_selection_biases
    from effilm.train.objectives import LanguageModeling, StepContext
    from effilm.train.parallel import Dist

    batch = SimpleNamespace(tokens=tokens, doc_ids=None)
    objective = LanguageModeling()
    ctx = StepContext(torch.device("cpu"), global_count=objective.global_count([batch], Dist()))
    moe = model.cfg.moe
    loss_free = moe is not None and moe.balance == "loss_free"

    def step():
        out = objective.micro_loss(model, batch, ctx)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if loss_free:
            update_selection_biases(model, torch.stack([s.counts_E for s in out.routing]), moe.bias_update_rate)
        return float(out.loss.detach())

    return step


def hf_step_fn(model, opt, tokens, clip):
    import torch

    inputs = tokens[:, :-1].contiguous()

    def step():
        out = model(input_ids=inputs, labels=inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def floor_fn(cfg, n_tokens: int):
    """Matmuls of every linear at its active shape: y = x W^T, dX = dY W, dW = dY^T X."""
    import torch

    shapes = []  # (rows, in, out)
    hd = cfg.head_dim or cfg.d_model // cfg.n_heads
    for s in cfg.layers:
        q, kv = s.n_heads * hd, s.n_kv_heads * hd
        shapes += [(n_tokens, cfg.d_model, q + 2 * kv), (n_tokens, q, cfg.d_model)]
        if s.kind == "D":
            shapes += [(n_tokens, cfg.d_model, 2 * s.ffn_dim), (n_tokens, s.ffn_dim, cfg.d_model)]
        else:
            rows, f = n_tokens * cfg.moe.top_k, cfg.moe.expert_ffn_dim
            shapes += [(rows, cfg.d_model, 2 * f), (rows, f, cfg.d_model), (n_tokens, cfg.d_model, cfg.moe.num_experts)]
    shapes.append((n_tokens, cfg.d_model, cfg.vocab_size))
    g = torch.Generator().manual_seed(0)
    bufs = [(torch.randn(r, i, generator=g), torch.randn(o, i, generator=g), torch.randn(r, o, generator=g))
            for r, i, o in shapes]

    def step():
        for x, w, dy in bufs:
            torch.mm(x, w.t())
            torch.mm(dy, w)
            torch.mm(dy.t(), x)
        return 0.0

    return step


def bench_model(name: str, cfg, arch: str, batch: int, seq: int, rounds: int, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from effilm.formats.hf import save_hf
    from effilm.models.transformer import build_model

    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    arms = {}
    model = build_model(cfg, seed=0).train()
    arms["effilm"] = effilm_step_fn(model, torch.optim.AdamW(model.parameters(), lr=1e-4), tokens, 1.0)
    if cfg.has_moe:  # the same model and weights with loss-free balancing instead of the Switch loss
        lf_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, balance="loss_free"))
        lf = build_model(lf_cfg, seed=0).train()
        arms["effilm[loss-free]"] = effilm_step_fn(lf, torch.optim.AdamW(lf.parameters(), lr=1e-4), tokens, 1.0)
    # batched_mm gathers one full expert weight matrix per assignment (several GiB at these sizes,
    # 15 GiB resident in a trial run): it is left out, as in bench_moe.py
    impls = ["eager", "grouped_mm"] if cfg.has_moe else [None]
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, Path(tmp) / "hf", arch=arch)
        for impl in impls:
            kw = {"experts_implementation": impl} if impl else {}
            extra = {"output_router_logits": True, "router_aux_loss_coef": cfg.moe.aux_loss_coef} if cfg.has_moe else {}
            hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32, **kw, **extra).train()
            label = f"transformers[{impl}]" if impl else "transformers"
            arms[label] = hf_step_fn(hf, torch.optim.AdamW(hf.parameters(), lr=1e-4), tokens, 1.0)
    arms["matmul floor"] = floor_fn(cfg, batch * seq)
    # same starting loss: the two sides compute the same model
    for fn in arms.values():  # warm-up
        fn()
    times = {k: [] for k in arms}
    for _ in range(rounds):
        for k, fn in arms.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tok = batch * seq
    hf_arms = [k for k in med if k.startswith("transformers")]
    fastest_hf = min(hf_arms, key=med.get)
    return {
        "model": name, "arch": arch, "batch": batch, "seq": seq, "tokens_per_step": n_tok,
        "total_params": cfg.num_params(), "active_params": cfg.num_active_params(),
        "seconds_per_step": med, "tokens_per_s": {k: n_tok / v for k, v in med.items()},
        "all_times": times, "fastest_transformers": fastest_hf,
        "speedup_vs_fastest_transformers": med[fastest_hf] / med["effilm"],
        "speedup_vs_each_transformers": {k: med[k] / med["effilm"] for k in hf_arms},
        "floor_fraction": med["matmul floor"] / med["effilm"],
        **({"loss_free_over_switch": med["effilm[loss-free]"] / med["effilm"]} if "effilm[loss-free]" in med else {}),
    }


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer rounds (smoke run)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS / "bench_train.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    batch, seq = (4, 128) if args.quick else (8, 256)
    results = []
    for name, (cfg, arch) in model_configs(args.quick).items():
        r = bench_model(name, cfg, arch, batch, seq, rounds, 1 if args.quick else 2)
        results.append(r)
        print(f"\n{name} ({arch}): {r['active_params'] / 1e6:.2f}M active / {r['total_params'] / 1e6:.2f}M total params, "
              f"{batch}x{seq} tokens per step, median of {rounds} interleaved rounds")
        print(f"  {'arm':26s} {'s/step':>8s} {'tok/s':>9s}  effilm speed-up")
        for k, v in r["seconds_per_step"].items():
            ratio = f"{v / r['seconds_per_step']['effilm']:.2f}x" if k != "effilm" else ""
            print(f"  {k:26s} {v:8.3f} {r['tokens_per_s'][k]:9.0f}  {ratio}")
        print(f"  effilm vs fastest transformers ({r['fastest_transformers']}): {r['speedup_vs_fastest_transformers']:.2f}x; "
              f"effilm reaches {100 * r['floor_fraction']:.0f}% of the matmul floor's speed")
        if "loss_free_over_switch" in r:
            print(f"  loss-free balancing step time / Switch-loss step time: {r['loss_free_over_switch']:.3f} "
                  "(target: within 3%)")
    meta = {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "quick": args.quick,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
