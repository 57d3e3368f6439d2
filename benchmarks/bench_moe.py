"""One MoE layer against the dense floor and transformers' experts, forward and forward+backward.

Arms, timed in one process, interleaved (the order rotates every repeat), median of the repeats:
- effilm_fast: ``effilm.models.moe.experts_sorted`` with the kernel ``impl='auto'`` picks
  (``prefers_grouped_mm``: grouped_mm on CUDA and in fp32 on CPU);
- effilm_loop: the same with the per-expert loop kernel (hand-written backward) forced;
- effilm_reference: ``effilm.models.moe.experts_reference``;
- hf_eager, hf_batched_mm, hf_grouped_mm: transformers 5.x ``MixtralExperts`` with
  ``config._experts_implementation`` set to each (the ``@use_experts_implementation`` dispatch);
- dense_floor: a dense SwiGLU MLP over T*K rows of width F, the same active FLOPs with no routing.

All MoE arms use the same weights and the same routing (top-k ids and weights computed once from a
fixed fp32 router). Forward+backward back-propagates a fixed output gradient into the input, both
expert weights and the routing weights. Shapes: a scaled-down Arctic, D=512, F=352, top-2.
fp32 on CPU, bf16 on CUDA. Arms whose warm-up run takes more than --slow-s CPU seconds are timed once
(flagged in ``timed_once``).
hf_batched_mm gathers one weight matrix per assignment; it is skipped when that would exceed
--max-gather-gb (it is, at the issue's T).

Run: PYTHONPATH=src python benchmarks/bench_moe.py            (full sweep; see docs/BENCHMARKS.md)
     PYTHONPATH=src python benchmarks/bench_moe.py --quick    (smoke run of every arm at T=64)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("effilm_fast", "effilm_loop", "effilm_reference", "hf_eager", "hf_batched_mm", "hf_grouped_mm",
        "dense_floor")
HF_ARMS = ("hf_eager", "hf_batched_mm", "hf_grouped_mm")


def make_case(T, E, D, F_, K, skew_experts, skew_bias, device, dtype, seed=0):
    """Weights, input and routing for one case; routing from a fixed fp32 router (+ a skew bias)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_gu = torch.randn(E, 2 * F_, D, generator=g) * D**-0.5
    w_d = torch.randn(E, D, F_, generator=g) * F_**-0.5
    router = torch.randn(E, D, generator=g) * D**-0.5
    logits = x @ router.t()
    if skew_experts:
        logits[:, :skew_experts] += skew_bias
    topk_w, topk_ids = logits.softmax(-1).topk(K, dim=-1)
    topk_w = topk_w / topk_w.sum(-1, keepdim=True)
    grad_out = torch.randn(T, D, generator=g)
    hot = int((topk_ids < skew_experts).sum()) / topk_ids.numel() if skew_experts else None
    to = dict(device=device, dtype=dtype)
    return dict(x=x.to(**to), w_gu=w_gu.to(**to), w_d=w_d.to(**to), topk_ids=topk_ids.to(device),
                topk_w=topk_w.to(device), grad_out=grad_out.to(**to), hot_fraction=hot)


def build_arm(arm, case, K):
    """Returns fn(backward: bool) running the arm once, and a function returning its output."""
    import torch
    import torch.nn.functional as F

    from effilm.models.moe import experts_reference, experts_sorted
    from effilm.models.moe_kernels import prefers_grouped_mm

    x0, w_gu0, w_d0 = case["x"], case["w_gu"], case["w_d"]
    ids, w0, grad_out = case["topk_ids"], case["topk_w"], case["grad_out"]
    cuda = x0.is_cuda
    if arm == "dense_floor":
        T, D = x0.shape
        x_nd = x0.repeat_interleave(K, 0).requires_grad_(True)
        w_gu = w_gu0[0].clone().requires_grad_(True)
        w_d = w_d0[0].clone().requires_grad_(True)
        g = grad_out.repeat_interleave(K, 0)
        leaves = [x_nd, w_gu, w_d]

        def call():
            gate, up = F.linear(x_nd, w_gu).chunk(2, dim=-1)
            return F.linear(F.silu(gate) * up, w_d)
    else:
        x = x0.clone().requires_grad_(True)
        topk_w = w0.clone().requires_grad_(True)
        g = grad_out
        if arm.startswith("hf_"):
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralExperts

            E, two_f, D = w_gu0.shape
            cfg = MixtralConfig(hidden_size=D, intermediate_size=two_f // 2, num_local_experts=E,
                                num_experts_per_tok=K)
            cfg._experts_implementation = arm[len("hf_"):]
            mod = MixtralExperts(cfg).to(device=x0.device, dtype=x0.dtype)
            with torch.no_grad():
                mod.gate_up_proj.copy_(w_gu0)
                mod.down_proj.copy_(w_d0)
            leaves = [x, topk_w, mod.gate_up_proj, mod.down_proj]

            def call():
                return mod(x, ids, topk_w)
        else:
            w_gu = w_gu0.clone().requires_grad_(True)
            w_d = w_d0.clone().requires_grad_(True)
            leaves = [x, topk_w, w_gu, w_d]
            if arm == "effilm_reference":
                def call():
                    return experts_reference(x, ids, topk_w, w_gu, w_d)
            else:
                use_gmm = arm == "effilm_fast" and prefers_grouped_mm(x0)

                def call():
                    return experts_sorted(x, ids, topk_w, w_gu, w_d, use_grouped_mm=use_gmm)

    def run(backward):
        for p in leaves:
            p.grad = None
        if backward:
            call().backward(g)
        else:
            with torch.no_grad():
                call()
        if cuda:
            torch.cuda.synchronize()

    def output():
        with torch.no_grad():
            return call()

    return run, output


def time_arms(arms, case, K, backward, repeats, slow_s):
    """Interleaved timing: every repeat runs each arm once, rotating the order.

    Returns the median wall-clock seconds and the median process CPU seconds of each arm (with one
    torch thread on a shared machine, CPU time is the steadier measure of the work done), and the
    arms timed once because their warm-up run exceeded ``slow_s``.
    """
    runners = {a: build_arm(a, case, K)[0] for a in arms}
    wall = {a: [] for a in arms}
    cpu = {a: [] for a in arms}

    def once(a):
        t0, c0 = time.perf_counter(), time.process_time()
        runners[a](backward)
        wall[a].append(time.perf_counter() - t0)
        cpu[a].append(time.process_time() - c0)

    for a in arms:  # warm-up (allocator, thread pool, lazy inits); kept only for the slow arms
        once(a)
    single = sorted(a for a in arms if cpu[a][0] > slow_s)  # CPU time: wall-clock swings on a shared host
    timed = [a for a in arms if a not in single]
    for a in timed:
        wall[a].clear()
        cpu[a].clear()
    for r in range(repeats):
        shift = r % max(len(timed), 1)
        for a in timed[shift:] + timed[:shift]:
            once(a)
    med = statistics.median
    return {a: med(v) for a, v in wall.items()}, {a: med(v) for a, v in cpu.items()}, single


def check_agreement(arms, case, K):
    """Max |output - reference| of each arm (the dense floor computes something else)."""
    ref = build_arm("effilm_reference", case, K)[1]().float()
    return {a: float((build_arm(a, case, K)[1]().float() - ref).abs().max()) for a in arms
            if a not in ("dense_floor", "effilm_reference")}


def batched_mm_gb(T, K, D, F_, itemsize):
    return T * K * 3 * F_ * D * itemsize / 2**30  # gate_up (2F x D) + down (D x F) per assignment


def matmul_rate(device, dtype, n=4096, reps=5):
    """Measured dense matmul rate of this device/dtype in TFLOP/s (median of reps)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ts = []
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts[1:]) / 1e12


def machine(device):
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    else:
        cpu = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
               if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        info["cpu"] = cpu[0] if cpu else platform.processor()
        info["logical_cpus"] = len(cpu)
    return info


def summarise(rows):
    """Per row, from wall-clock ("ms") and CPU time ("cpu_ms"): effilm_fast / dense_floor, fastest
    transformers impl / effilm_fast, and effilm_fast against the smallest-E balanced row."""
    out = []
    for r in rows:
        s = {k: r[k] for k in ("T", "E", "routing", "mode")}
        base = [b for b in rows if b["T"] == r["T"] and b["mode"] == r["mode"] and b["routing"] == "balanced"
                and b["E"] == min(x["E"] for x in rows if x["T"] == r["T"])]
        for key, tag in (("ms", ""), ("cpu_ms", "_cpu")):
            t = r[key]
            if "effilm_fast" not in t:
                continue
            if "dense_floor" in t:
                s["fast_over_floor" + tag] = t["effilm_fast"] / t["dense_floor"]
            hf = {a: t[a] for a in HF_ARMS if a in t}
            if hf:
                best = min(hf, key=hf.get)
                s["fastest_hf" + tag] = best
                s["fastest_hf_over_fast" + tag] = hf[best] / t["effilm_fast"]
            if base:
                s["fast_growth_vs_smallest_E" + tag] = t["effilm_fast"] / base[0][key]["effilm_fast"]
        out.append(s)
    return out


def print_table(rows, summary, arms):
    nan = float("nan")
    head = f"{'T':>5} {'E':>4} {'routing':>8} {'mode':>7} " + " ".join(f"{a[:14]:>14}" for a in arms)
    head += f" {'fast/floor':>10} {'hf/fast':>8} {'growth':>7} {'cpu:f/fl':>8} {'hf/f':>5} {'grow':>5}"
    print(head)
    for r, s in zip(rows, summary):
        cells = " ".join(f"{r['ms'][a]:>14.1f}" if a in r["ms"] else f"{'-':>14}" for a in arms)
        ratios = f" {s.get('fast_over_floor', nan):>10.2f} {s.get('fastest_hf_over_fast', nan):>8.2f}"
        ratios += f" {s.get('fast_growth_vs_smallest_E', nan):>7.2f} {s.get('fast_over_floor_cpu', nan):>8.2f}"
        ratios += f" {s.get('fastest_hf_over_fast_cpu', nan):>5.2f} {s.get('fast_growth_vs_smallest_E_cpu', nan):>5.2f}"
        print(f"{r['T']:>5} {r['E']:>4} {r['routing']:>8} {r['mode']:>7} {cells}{ratios}")
    print("times: median wall-clock ms. fast/floor = effilm_fast / dense_floor; hf/fast = fastest transformers "
          "impl / effilm_fast; growth = effilm_fast / effilm_fast at the smallest E (balanced); cpu: the same "
          "ratios from process CPU time")


def plot(rows, arms, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effilm.io import atomic_open

    Ts = sorted({r["T"] for r in rows})
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(len(modes), len(Ts), figsize=(5.5 * len(Ts), 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, T in enumerate(Ts):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r["T"] == T and r["mode"] == mode and r["routing"] == "balanced"),
                         key=lambda r: r["E"])
            for a in arms:
                pts = [(r["E"], r["ms"][a]) for r in sel if a in r["ms"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=a)
            ax.set(xscale="log", yscale="log", xlabel="experts E", ylabel="ms (median)", title=f"T={T}, {mode}")
            ax.set_xticks([r["E"] for r in sel], [str(r["E"]) for r in sel])
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: T=64, E in 8,16 (+skew at 16), 1 repeat")
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192], help="token counts")
    ap.add_argument("--E", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="expert counts")
    ap.add_argument("--D", type=int, default=512, help="model width")
    ap.add_argument("--F", type=int, default=352, help="expert width")
    ap.add_argument("--K", type=int, default=2, help="top-k")
    ap.add_argument("--skew-E", type=int, nargs="*", default=[128], help="E values also run with routing skew")
    ap.add_argument("--skew-experts", type=int, default=4, help="experts favoured by the skew bias")
    ap.add_argument("--skew-bias", type=float, default=2.0, help="logit bias added to the favoured experts")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per arm (median)")
    ap.add_argument("--slow-s", type=float, default=30.0,
                    help="arms whose warm-up takes more CPU seconds than this are timed once (flagged)")
    ap.add_argument("--max-gather-gb", type=float, default=2.0, help="skip hf_batched_mm above this gather size")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_moe[_quick|_cuda].json)")
    ap.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    args = ap.parse_args(argv)

    import torch

    from effilm.io import atomic_write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.quick:
        args.T, args.E, args.skew_E, args.repeats = [64], [8, 16], [16], 1
    suffix = "_quick" if args.quick else ("_cuda" if device == "cuda" else "")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"bench_moe{suffix}.json")
    png = Path(args.plot or out.with_suffix(".png"))
    D, F_, K = args.D, args.F, args.K
    rows, notes = [], []
    cases = [(T, E, "balanced") for T in args.T for E in args.E]
    cases += [(T, E, "skewed") for T in args.T for E in args.skew_E]
    for T, E, routing in cases:
        skew = args.skew_experts if routing == "skewed" else 0
        case = make_case(T, E, D, F_, K, skew, args.skew_bias, device, dtype)
        arms = list(args.arms)
        gb = batched_mm_gb(T, K, D, F_, case["x"].element_size())
        if "hf_batched_mm" in arms and gb > args.max_gather_gb:
            arms.remove("hf_batched_mm")
            notes.append(f"T={T} E={E}: hf_batched_mm skipped, it would gather {gb:.1f} GiB of expert weights")
        agree = check_agreement(arms, make_case(min(T, 256), E, D, F_, K, skew, args.skew_bias, device, dtype), K)
        for mode in args.modes:
            ms, cpu, single = time_arms(arms, case, K, mode == "fwd+bwd", args.repeats, args.slow_s)
            flops = 6 * T * K * D * F_ * (3 if mode == "fwd+bwd" else 1)
            row = {"T": T, "E": E, "routing": routing, "mode": mode, "ms": {a: v * 1e3 for a, v in ms.items()},
                   "cpu_ms": {a: v * 1e3 for a, v in cpu.items()},
                   "active_gflop": flops / 1e9, "tflops": {a: flops / v / 1e12 for a, v in ms.items()},
                   "timed_once": single, "max_abs_diff_vs_reference": agree}
            if case["hot_fraction"] is not None:
                row["hot_fraction"] = case["hot_fraction"]
            rows.append(row)
            print(f"T={T} E={E} {routing} {mode}: " + ", ".join(f"{a}={v * 1e3:.1f}ms" for a, v in ms.items()),
                  file=sys.stderr, flush=True)
    summary = summarise(rows)
    shown = [a for a in ARMS if any(a in r["ms"] for r in rows)]
    print_table(rows, summary, shown)
    for n in notes:
        print(n)
    result = {"machine": machine(device), "dtype": str(dtype).replace("torch.", ""),
              "shape": {"D": D, "F": F_, "K": K}, "repeats": args.repeats, "rows": rows, "summary": summary,
              "notes": notes, "command": " ".join(["python", "benchmarks/bench_moe.py", *(argv or sys.argv[1:])])}
    if device == "cuda":
        result["matmul_tflops_measured"] = matmul_rate(device, dtype)
        print(f"measured {result['dtype']} matmul rate: {result['matmul_tflops_measured']:.1f} TFLOP/s")
    atomic_write_json(out, result)
    plot(rows, shown, png)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
