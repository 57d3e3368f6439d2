"""The MoE route's verdict: dense vs the Arctic hybrid at matched active compute.

Arms (each trained on the demo's data and token budget, web then textbook, equal active
parameters per token; the demo's model shapes, ``effilm.demo.config``):

* ``dense``: tiny-dense, MLP width ``ffn_mult * d``;
* ``arctic-switch`` / ``arctic-loss-free``: the Arctic hybrid from scratch (residual MLP of width d
  plus top-(ffn_mult-1) of ``num_experts`` experts of width d), with the Switch loss or with
  loss-free balancing;
* ``upcycled-switch`` / ``upcycled-loss-free``: the dense run of the same seed, taken at
  ``--upcycle-at`` of its steps, upcycled into the same hybrid (``[model.upcycle]``, pattern H,
  granularity ffn_mult, ``residual = "slice"``: slice 0 stays the residual MLP, the experts start as
  the other slices, so the active width is unchanged), then trained on the rest of the budget. The
  dense tokens count toward its budget, and toward its FLOPs and seconds in the plots.

Protocol: every arm's learning rate is picked from the same grid (``--lrs``) on seed 0 (the lowest
held-out textbook bits per byte); the verdict then uses seeds 1..``--seeds`` at each arm's best rate.
Each run is scored on held-out textbook and web bits per byte and the quiz by cloze (the demo's
evaluation). The verdict: the best MoE arm's mean textbook bits per byte is below dense's by more
than the standard error of the difference of the means (sqrt(se_dense^2 + se_moe^2), se = sample
std / sqrt(n)).

Writes ``--out`` (JSON: every run, the sweep, the per-seed table, the verdict) and a PNG beside it:
training loss against active training FLOPs and against wall-clock seconds (seed 1, best rate),
and each arm's bits per byte with its standard error.

Run: PYTHONPATH=src python benchmarks/moe_vs_dense.py [--quick] [--jobs 2] [--set KEY=VALUE ...]
     [--out benchmarks/results/moe_vs_dense.json] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("dense", "arctic-switch", "arctic-loss-free", "upcycled-switch", "upcycled-loss-free")
MOE_ARMS = ARMS[1:]


# ----------------------------------------------------------------------------- one run (in a worker process)
DEMO_RUN = {"dense": "dense-textbook", "arctic-switch": "arctic-textbook", "arctic-loss-free": "arctic-loss-free",
            "upcycled-switch": "arctic-upcycled", "upcycled-loss-free": "arctic-upcycled"}  # fmt: skip


def run_dict(cfg, arm: str, lr: float, seed: int, work: Path, tok: dict, upcycle_from: str | None = None) -> dict:
    """The run config of ``arm`` at learning rate ``lr`` and seed ``seed``: the demo's run of the
    same kind (``DemoConfig.run_dict``) with this arm's balancing, rate and seed."""
    c = dataclasses.replace(cfg, seed=seed, lr=lr)
    sources = {name: tok["datasets"][name]["path"] for name in ("web", "textbook")}
    d = c.run_dict(DEMO_RUN[arm], str(work / "runs" / f"{arm}-lr{lr:g}-s{seed}"), tok["tokenizer"], sources)
    balance = "loss_free" if arm.endswith("loss-free") else "aux_loss"
    if arm.startswith("arctic"):
        d["model"]["moe"]["balance"] = balance
    elif arm.startswith("upcycled"):
        d["model"] = c.upcycle_table(upcycle_from, balance)
    return d


def train_and_score(job: dict) -> dict:
    """Train one arm, evaluate it like the demo; returns the run's figures (also kept beside the run
    as ``RUN.result.json``, which ``--resume`` reuses)."""
    import torch

    from effilm.demo.config import DemoConfig
    from effilm.demo.train import evaluate_models, fresh_run, timed_train
    from effilm.reports.metrics import read_metrics

    cfg = DemoConfig(**job["cfg"])
    torch.set_num_threads(cfg.threads)
    d = job["run"]
    cached = Path(d["out_dir"] + ".result.json")
    if job.get("resume") and cached.is_file():
        return json.loads(cached.read_text())
    rc = fresh_run(d, Path(d["out_dir"] + ".json"), f"moe_vs_dense {job['name']}")
    run, _ = timed_train(rc, job["seed"])
    m = read_metrics(Path(d["out_dir"]) / "metrics.jsonl")
    curve = [{"step": r["step"], "loss": r["loss"], "active_flops": r["active_flops"], "elapsed_s": r["elapsed_s"]}
             for r in m.train]  # fmt: skip
    last = m.train[-1] if m.train else {}
    trained = {job["name"]: {"final_dir": run["final_dir"],
                             "stages": [{"mixture": s["mixture"]} for s in d["data"]["stages"]]}}  # fmt: skip
    ev = evaluate_models(cfg, job["synth"], job["clean"], trained, Path(d["out_dir"]) / "eval", log=lambda *a: None)
    e = ev[job["name"]]
    result = {
        "name": job["name"], "arm": job["arm"], "lr": job["lr"], "seed": job["seed"], "run_dir": d["out_dir"],
        "steps": run["steps"], "tokens": run["tokens"], "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
        "active_params": rc.model.num_active_params(), "total_params": rc.model.num_params(),
        "bpb_textbook": e["bits_per_byte"]["heldout_textbook"], "bpb_web": e["bits_per_byte"]["heldout_web"],
        "cloze": e["cloze"]["acc"], "final_loss": run["final_loss"], "curve": curve,
        "load_max_over_mean": last.get("load_max_over_mean"), "starved_frac": last.get("starved_frac"),
        "aux_loss": last.get("aux_loss"),
    }
    cached.write_text(json.dumps(result) + "\n")
    return result


# ----------------------------------------------------------------------------- the protocol
def _mean_se(xs: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(xs)
    return mean, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def _pool_map(jobs: list[dict], n: int, log) -> list[dict]:
    out = []
    if n <= 1:
        for j in jobs:
            out.append(train_and_score(j))
            log(out[-1])
        return out
    with ProcessPoolExecutor(max_workers=n) as ex:
        for r in ex.map(train_and_score, jobs):
            out.append(r)
            log(r)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo's quick data and budgets (a smoke run)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a DemoConfig field for the data and shapes (repeatable), e.g. --set web_varied=false")
    ap.add_argument("--lrs", default="1.5e-3,3e-3,6e-3", help="learning-rate grid, the same for every arm")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the verdict (1..N; seed 0 tunes the rate)")
    ap.add_argument("--upcycle-at", type=float, default=0.5, help="fraction of the dense run the upcycled arms start at")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    ap.add_argument("--work", default=None, help="working directory (default: a folder beside --out)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse --work's data and every run that finished (its RUN.result.json); train the rest")
    ap.add_argument("--out", default=str(RESULTS / "moe_vs_dense.json"))
    args = ap.parse_args(argv)

    from effilm.config.reader import load
    from effilm.demo.config import DemoConfig
    from effilm.demo.stages import clean, synthesize, tokenize

    cfg = DemoConfig.quick(args.set) if args.quick else load(DemoConfig, overrides=args.set)
    lrs = [float(x) for x in args.lrs.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    if unknown := set(arms) - set(ARMS):
        sys.exit(f"--arms: unknown {sorted(unknown)}; choose from {', '.join(ARMS)}")
    if any(a.startswith("upcycled") for a in arms) and "dense" not in arms:
        sys.exit("--arms: the upcycled arms start from the dense arm's runs; include dense")
    out = Path(args.out)
    work = Path(args.work) if args.work else out.with_suffix("").with_name(out.stem + "_work")
    if work.exists() and not (work / ".moe_vs_dense").is_file():
        sys.exit(f"--work {work}: exists and is not this benchmark's working directory")
    t0 = time.perf_counter()
    if args.resume and (work / "data.json").is_file():
        synth, cleaned, tok = json.loads((work / "data.json").read_text())
        print(f"data: reusing {work}", flush=True)
    else:  # an earlier run of this benchmark (its marker) is replaced
        if work.exists():
            import shutil

            shutil.rmtree(work)
        work.mkdir(parents=True)
        (work / ".moe_vs_dense").write_text("working directory of benchmarks/moe_vs_dense.py\n")
        print(f"data: the demo's {'quick' if args.quick else 'full'} corpora into {work}", flush=True)
        synth = synthesize(cfg, work / "data")
        cleaned = clean(cfg, synth, work / "clean")
        tok = tokenize(cfg, cleaned, work / "tokens")
        (work / "data.json").write_text(json.dumps([synth, cleaned, tok]) + "\n")
    cfg = dataclasses.replace(cfg, upcycle_at=args.upcycle_at)
    steps, up_steps = cfg.train_steps, cfg.upcycle_step

    def job(arm: str, lr: float, seed: int, dense_lr: float | None = None) -> dict:
        src = None
        if arm.startswith("upcycled"):
            src = str(work / "runs" / f"dense-lr{dense_lr:g}-s{seed}" / "checkpoints" / f"step-{up_steps:08d}")
        d = run_dict(cfg, arm, lr, seed, work, tok, src)
        return {"name": f"{arm}-lr{lr:g}-s{seed}", "arm": arm, "lr": lr, "seed": seed, "run": d,
                "cfg": dataclasses.asdict(cfg), "synth": synth, "clean": cleaned, "dense_lr": dense_lr,
                "resume": args.resume}

    def log(r: dict) -> None:
        bal = f" load max/mean {r['load_max_over_mean']}" if r["load_max_over_mean"] else ""
        print(f"  {r['name']:34s} bpb textbook {r['bpb_textbook']:.4f} web {r['bpb_web']:.4f} cloze "
              f"{r['cloze']:.3f} loss {r['final_loss']:.3f} {r['wall_s']:.0f}s{bal}", flush=True)

    runs: list[dict] = []
    base = [a for a in arms if not a.startswith("upcycled")]
    ups = [a for a in arms if a.startswith("upcycled")]
    print(f"1. rate sweep on seed 0: {base} x {lrs}", flush=True)
    runs += _pool_map([job(a, lr, 0) for a in base for lr in lrs], args.jobs, log)

    def best(arm: str) -> float:
        rs = [r for r in runs if r["arm"] == arm and r["seed"] == 0]
        return min(rs, key=lambda r: r["bpb_textbook"])["lr"]

    if ups:
        print(f"2. rate sweep on seed 0: {ups} x {lrs} (from dense at lr {best('dense'):g}, step {up_steps})", flush=True)
        runs += _pool_map([job(a, lr, 0, best("dense")) for a in ups for lr in lrs], args.jobs, log)
    best_lr = {a: best(a) for a in arms}
    seeds = list(range(1, args.seeds + 1))
    print(f"3. seeds {seeds} at each arm's best rate {best_lr}", flush=True)
    runs += _pool_map([job(a, best_lr[a], s) for a in base for s in seeds], args.jobs, log)
    if ups:
        runs += _pool_map([job(a, best_lr[a], s, best_lr["dense"]) for a in ups for s in seeds], args.jobs, log)

    table = {}
    for a in arms:
        rs = sorted((r for r in runs if r["arm"] == a and r["seed"] in seeds), key=lambda r: r["seed"])
        row = {"lr": best_lr[a], "seeds": [r["seed"] for r in rs]}
        for k in ("bpb_textbook", "bpb_web", "cloze", "wall_s"):
            row[k] = [r[k] for r in rs]
            row[k + "_mean"], row[k + "_se"] = _mean_se(row[k])
        row["load_max_over_mean"] = [r["load_max_over_mean"] for r in rs]
        row["starved_frac"] = [r["starved_frac"] for r in rs]
        row["active_params"], row["total_params"] = rs[0]["active_params"], rs[0]["total_params"]
        table[a] = row
    verdict = None
    moe = [a for a in arms if a in MOE_ARMS]
    if "dense" in table and moe:
        b = min(moe, key=lambda a: table[a]["bpb_textbook_mean"])
        gap = table["dense"]["bpb_textbook_mean"] - table[b]["bpb_textbook_mean"]
        se = math.sqrt(table["dense"]["bpb_textbook_se"] ** 2 + table[b]["bpb_textbook_se"] ** 2)
        verdict = {"best_moe_arm": b, "dense_bpb": table["dense"]["bpb_textbook_mean"],
                   "moe_bpb": table[b]["bpb_textbook_mean"], "gap": gap, "se_of_gap": se,
                   "moe_ahead_beyond_se": bool(gap > se)}  # fmt: skip
    import torch

    meta = {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "quick": args.quick, "lrs": lrs, "seeds": seeds, "tuning_seed": 0, "upcycle_at_step": up_steps,
            "steps": steps, "tokens_per_run": steps * cfg.tokens_per_step, "demo_config": dataclasses.asdict(cfg),
            "wall_s": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    result = {"meta": meta, "table": table, "verdict": verdict, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = plot(result, out.with_suffix(".png"))
    print(f"\nseeds {seeds}, best rate per arm; held-out bits per byte (lower is better) and quiz cloze, mean ± se")
    print(f"  {'arm':20s} {'lr':>7s} {'active':>9s} {'total':>9s} {'bpb textbook':>17s} {'bpb web':>17s} "
          f"{'cloze':>13s} {'max/mean load':>14s}")
    for a, row in table.items():
        loads = [max(x) for x in row["load_max_over_mean"] if x]
        print(f"  {a:20s} {row['lr']:7.1e} {row['active_params']:9,d} {row['total_params']:9,d} "
              f"{row['bpb_textbook_mean']:.4f} ± {row['bpb_textbook_se']:.4f} {row['bpb_web_mean']:.4f} ± "
              f"{row['bpb_web_se']:.4f} {row['cloze_mean']:.3f} ± {row['cloze_se']:.3f} "
              f"{statistics.fmean(loads) if loads else float('nan'):14.2f}")
    if verdict:
        v = verdict
        print(f"\nverdict: best MoE arm {v['best_moe_arm']}: {v['moe_bpb']:.4f} vs dense {v['dense_bpb']:.4f} "
              f"(gap {v['gap']:+.4f}, se {v['se_of_gap']:.4f}): "
              + ("MoE ahead by more than the standard error" if v["moe_ahead_beyond_se"] else
                 "NOT ahead by more than the standard error"))  # fmt: skip
    print(f"wrote {out} and {png} ({meta['wall_s']:.0f}s)")
    return 0


def plot(result: dict, path: Path) -> Path:
    """Loss against active FLOPs and wall seconds (first verdict seed), and bits per byte per arm."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_f, ax_w, ax_b = fig.subplots(1, 3)
    seed = result["meta"]["seeds"][0]
    runs = result["runs"]
    dense_at = {}  # the dense run's (flops, seconds) at the upcycling step, per (lr, seed)
    for r in runs:
        if r["arm"] == "dense":
            pt = [c for c in r["curve"] if c["step"] == result["meta"]["upcycle_at_step"]]
            if pt:
                dense_at[(r["lr"], r["seed"])] = (pt[0]["active_flops"], pt[0]["elapsed_s"])
    for i, (arm, row) in enumerate(result["table"].items()):
        r = next((x for x in runs if x["arm"] == arm and x["lr"] == row["lr"] and x["seed"] == seed), None)
        if r is None:
            continue
        f0, s0 = (0.0, 0.0)
        if arm.startswith("upcycled"):
            f0, s0 = dense_at.get((result["table"]["dense"]["lr"], seed), (0.0, 0.0))
        xs_f = [f0 + c["active_flops"] for c in r["curve"]]
        xs_w = [s0 + c["elapsed_s"] for c in r["curve"]]
        ys = [c["loss"] for c in r["curve"]]
        ax_f.plot(xs_f, ys, color=f"C{i}", label=arm, linewidth=1.2)
        ax_w.plot(xs_w, ys, color=f"C{i}", label=arm, linewidth=1.2)
        ax_b.errorbar([i], [row["bpb_textbook_mean"]], yerr=[row["bpb_textbook_se"]], fmt="o", color=f"C{i}", capsize=4)
    ax_f.set_xlabel("active training FLOPs")
    ax_w.set_xlabel("wall-clock seconds (upcycled: + the dense run's)")
    for ax in (ax_f, ax_w):
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=8)
    arms = list(result["table"])
    ax_b.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
    ax_b.set_ylabel("held-out textbook bits per byte (mean ± se)")
    ax_b.grid(alpha=0.3)
    fig.suptitle(f"dense vs Arctic hybrid at equal active parameters and tokens (seed {seed} curves; "
                 f"seeds {result['meta']['seeds']} for the points)")  # fmt: skip
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
