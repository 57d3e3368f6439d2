"""Model commands: presets, params, convert, demo."""

from __future__ import annotations

import argparse
import json

from effilm.config.cost import human_bytes, human_count
from effilm.config.reader import add_arguments, from_args, given


def register(sub) -> None:
    p = sub.add_parser("presets", help="list the model presets", description="List every named model preset.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser(
        "params",
        help="cost of a preset: parameters, FLOPs, memory, KV cache",
        description="Print a preset's total and active parameters, forward FLOPs per token, weight memory at "
        "fp32/bf16/int8/int4 and KV-cache bytes per token. NAME is a preset or a model directory.",
    )
    p.add_argument("name", help="preset name (see `effilm presets`) or a checkpoint/HF directory")
    p.add_argument("--seq-len", type=int, default=None, help="context length for attention FLOPs (default: max_seq_len)")
    p.add_argument("--json", action="store_true", help="print JSON (keys include total_params, active_params)")
    p.set_defaults(func=cmd_params)

    from effilm.config.plan import DEVICES, FORMATS

    p = sub.add_parser(
        "plan", help="will a model fit on a device, in which weight format, and how fast will it decode",
        description="For each weight format (" + ", ".join(FORMATS) + "): total memory (weights, the KV cache "
        "at --context for --batch sequences, and --overhead), whether it fits in --memory, and the predicted "
        "decode tokens/s per sequence: --bandwidth divided by the bytes one step reads (the active weights: "
        "routed experts only for MoE models; and the KV cache). Named devices (approximate): "
        + "; ".join(f"{d.name}: {d.note}" for d in DEVICES.values()) + ". --measure runs the model's own "
        "decode (effilm's engine at fp32, int8 and int4, and llama.cpp on a q8_0 GGUF export when "
        "llama-cpp-python is installed) and prints measured beside predicted.",
    )
    p.add_argument("name", metavar="MODEL_OR_PRESET", help="preset name or a checkpoint/HF directory")
    p.add_argument("--device", choices=sorted(DEVICES), help="a named device (its memory and bandwidth)")
    p.add_argument("--memory", help="device memory, e.g. 8GiB or 16GB (overrides --device's)")
    p.add_argument("--bandwidth", help="memory bandwidth, e.g. 100GB/s (overrides --device's)")
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache per sequence (default 4096, "
                   "capped at the model's context window)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--overhead", type=float, default=0.10, help="activations and runtime, as a fraction (0.10)")
    p.add_argument("--measure", action="store_true", help="also measure decode speed on this machine")
    p.add_argument("--quant-kernel", choices=["fast", "exact"], default="fast",
                   help="--measure: kernel of the int8/int4 layers ('fast': packed CPU kernels, bf16 "
                   "activations; 'exact': the fp32 reference)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)

    from effilm.demo.config import DemoConfig
    from effilm.formats.convert import ConvertConfig

    p = sub.add_parser(
        "convert",
        help="convert between effilm, Hugging Face, GGUF and MLX formats",
        description="Convert a model directory. --to hf writes a directory transformers' AutoModelForCausalLM "
        "loads; --to effilm writes an effilm checkpoint; --to gguf writes a llama.cpp GGUF file (--type); "
        "--to mlx writes a directory mlx-lm loads, quantized in MLX's layout with --bits 4|8 --group-size "
        "32|64|128 (Arctic: use gguf). SRC may be effilm or HF; its tokenizer files travel with the model.",
    )
    p.add_argument("src", help="source model directory (effilm or HF)")
    p.add_argument("dst", help="destination directory (a .gguf file for --to gguf)")
    add_arguments(p, ConvertConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at DST")
    p.set_defaults(func=cmd_convert)

    from effilm.config.model import UpcycleConfig

    p = sub.add_parser(
        "upcycle",
        help="turn a dense model into an MoE or Arctic hybrid computing the same function (sparse upcycling)",
        description="Sparse upcycling: each dense MLP becomes --experts experts (copies, or 1/--granularity-wide "
        "slices), routed top --top-k. --pattern M replaces the MLPs by MoEs; H keeps each MLP as the residual MLP "
        "beside a new parallel MoE (Arctic). The upcycled model computes the dense model's function at step 0 "
        "(checked on random tokens and printed); train it like any MoE model, or upcycle inside a run with "
        "[model] init_from = SRC and a [model.upcycle] table. SRC may be effilm or HF; its tokenizer travels.",
    )
    p.add_argument("src", help="dense source model directory (effilm or HF)")
    p.add_argument("--out", required=True, help="destination directory (a new effilm checkpoint)")
    add_arguments(p, UpcycleConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier upcycle at --out")
    p.set_defaults(func=cmd_upcycle)

    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo (data -> clean -> tokenize -> train 6 models -> evaluate -> post-train -> ship)",
        description="The end-to-end demo on built-in data: synthesize a textbook corpus, a web-like corpus and a "
        "held-out MMLU-format quiz; clean them (dedup, filters, decontamination against the quiz, plus a "
        "planted-leak check, and a learned quality classifier that keeps the best web text); train a BPE tokenizer "
        "and shards; train tiny-dense on web text, web-then-filtered-web and web-then-textbook, and three tiny "
        "Arctic hybrids with the same active parameters (the Switch loss, loss-free "
        "balancing, and upcycled from the dense model partway) at equal token budgets; evaluate them all "
        "(quiz letter and cloze accuracy vs chance, bits per byte, contamination status); post-train the textbook "
        "model (SFT, DPO); ship the best exportable one and "
        "write OUT/report.html. Writes OUT/summary.json with per-stage wall and CPU times and plain-language "
        "notes on what the numbers show. About 7 minutes on a 2-core CPU; --quick takes about one. Every "
        "DemoConfig field can be set with a flag.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quick", action="store_true", help="small data and budgets, for CI (well under a minute)")
    p.add_argument("--config", default=None, metavar="TOML",
                   help="demo config file (every DemoConfig field; see configs/demo.toml and configs/demo-quick.toml)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo output in OUT (`make demo` does)")
    add_arguments(p, DemoConfig, group_title="demo settings (override --config and --quick)")
    p.set_defaults(func=cmd_demo)


def cmd_presets(args: argparse.Namespace) -> int:
    from effilm.config import ModelConfig
    from effilm.config.cost import num_active_params, num_params
    from effilm.config.presets import DESCRIPTIONS, preset_names

    rows = []
    for name in preset_names():
        cfg = ModelConfig.from_name(name)
        rows.append({"name": name, "total_params": num_params(cfg), "active_params": num_active_params(cfg),
                     "description": DESCRIPTIONS.get(name, "")})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'preset':18s} {'total':>10s} {'active':>10s}  description")
    for r in rows:
        print(f"{r['name']:18s} {human_count(r['total_params']):>10s} {human_count(r['active_params']):>10s}  {r['description']}")
    return 0


def _config_for(name: str):
    from pathlib import Path

    from effilm.config import ModelConfig

    if Path(name).is_dir():
        from effilm.config.hf import config_from_hf
        from effilm.formats.checkpoint import read_config

        meta = read_config(name)
        if meta.get("format") == "effilm":
            return ModelConfig.from_dict(meta["model"])
        return config_from_hf(meta, f"{name}/config.json")[0]
    return ModelConfig.from_name(name)


def cmd_params(args: argparse.Namespace) -> int:
    from effilm.config.cost import cost_summary
    from effilm.errors import ConfigError

    if args.seq_len is not None and args.seq_len <= 0:
        raise ConfigError(f"--seq-len={args.seq_len} must be positive")
    s = cost_summary(_config_for(args.name), args.seq_len)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['name']}  ({s['layers']} layers, pattern {s['layer_pattern']!r})")
    print(f"  total parameters       {s['total_params']:>18,d}  ({human_count(s['total_params'])})")
    print(f"  active per token       {s['active_params']:>18,d}  ({human_count(s['active_params'])})")
    print(f"  forward FLOPs / token  {s['flops_per_token']:>18,d}  ({human_count(s['flops_per_token'], 'FLOP')} at seq {s['seq_len']})")
    for k, v in s["weight_bytes"].items():
        print(f"  weights {k:5s}          {human_bytes(v):>18s}")
    for k, v in s["kv_cache_bytes_per_token"].items():
        print(f"  KV cache / token {k:5s} {human_bytes(v):>18s}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from effilm.config.cost import human_bytes
    from effilm.config.plan import DEVICES, Device, parse_bandwidth, parse_size, plan
    from effilm.errors import ConfigError

    base = DEVICES[args.device] if args.device else None
    if base is None and (args.memory is None or args.bandwidth is None):
        raise ConfigError("give --device NAME, or both --memory (e.g. 8GiB) and --bandwidth (e.g. 100GB/s)")
    if base is not None and args.memory is None and args.bandwidth is None:
        device = base
    else:
        memory = parse_size(args.memory, "--memory") if args.memory else base.memory
        bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else base.bandwidth
        device = Device("custom", int(memory), bandwidth, "as given")
    cfg = _config_for(args.name)
    context = min(args.context, cfg.max_seq_len)
    result = plan(cfg, device, context, args.batch, args.overhead)
    if args.measure:
        result["measured"] = _measure(args.name, cfg, context, args.batch, args.quant_kernel)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{cfg.name} on {device.name} ({human_bytes(device.memory)}, {device.bandwidth / 1e9:g} GB/s; "
          f"{device.note}); context {context}, batch {args.batch}, overhead {100 * args.overhead:g}%")
    measured = result.get("measured", {}).get("effilm", {})
    head = f"{'format':<11} {'weights':>10} {'KV cache':>10} {'total':>10} {'fits':>5} {'read/step':>10} {'tok/s':>9}"
    print(head + (f" {'measured':>9}" if measured else ""))
    for r in result["formats"]:
        line = (f"{r['format']:<11} {human_bytes(r['weight_bytes']):>10} {human_bytes(r['kv_cache_bytes']):>10} "
                f"{human_bytes(r['total_bytes']):>10} {'yes' if r['fits'] else 'no':>5} "
                f"{human_bytes(r['read_bytes_per_step']):>10} {r['tokens_per_s']:>9.1f}")
        if measured:
            m = measured.get(r["format"])
            line += f" {m:>9.1f}" if m is not None else f" {'-':>9}"
        print(line)
    if result.get("measured"):
        lc = result["measured"].get("llama_cpp")
        print("llama.cpp (q8_0 GGUF): " + (f"{lc['q8_0']:.1f} tok/s" if lc else "not installed (pip install "
                                            "llama-cpp-python to measure it)"))
        print("measured: effilm's engine on this machine, tokens/s per sequence (prefill excluded); predicted "
              "tok/s uses the device's bandwidth: pass --device ci-2core (or this machine's --bandwidth) to "
              "compare like with like")
    if not Path(args.name).is_dir():
        print("tokens/s: bandwidth-bound prediction per sequence, KV cache counted full; approximate")
    return 0


def _measure(name: str, cfg, context: int, batch: int, quant_kernel: str = "fast") -> dict:
    from pathlib import Path

    from effilm.config.cost import num_params
    from effilm.errors import EffilmError
    from effilm.quant.measure import llama_cpp_tokens_per_s, measure_formats

    if Path(name).is_dir():
        from effilm.formats.load import load

        model, tok_dir = load(name), (name if (Path(name) / "tokenizer.json").is_file() else None)
    else:
        if num_params(cfg) > 2e9:
            raise EffilmError(f"--measure: {name} has {num_params(cfg) / 1e9:.1f}B parameters; measure a model "
                              "that fits this machine (a tiny preset or a model directory)")
        from effilm.models.transformer import build_model

        model, tok_dir = build_model(cfg, seed=0).eval(), None
    out = {"effilm": measure_formats(model, context=context, batch=batch, quant_kernel=quant_kernel)}
    out["llama_cpp"] = llama_cpp_tokens_per_s(model, tok_dir, context=context) if tok_dir else None
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    from effilm.formats.convert import ConvertConfig, convert

    print(convert(args.src, args.dst, from_args(ConvertConfig, args), overwrite=args.overwrite))
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    from effilm.config.model import UpcycleConfig
    from effilm.formats.convert import upcycle

    print(upcycle(args.src, args.out, from_args(UpcycleConfig, args), overwrite=args.overwrite))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from effilm.demo.config import DemoConfig
    from effilm.demo.run import run_demo

    return run_demo(args.out, quick=args.quick, config=args.config, overrides=given(args, DemoConfig),
                    overwrite=args.overwrite)
