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

    from effilm.demo.config import DemoConfig
    from effilm.formats.convert import ConvertConfig

    p = sub.add_parser(
        "convert",
        help="convert between effilm, Hugging Face and GGUF formats",
        description="Convert a model directory. --to hf writes a directory transformers' AutoModelForCausalLM "
        "loads; --to effilm writes an effilm checkpoint; --to gguf writes a llama.cpp GGUF file (--type). "
        "SRC may be effilm or HF; its tokenizer files travel with the model.",
    )
    p.add_argument("src", help="source model directory (effilm or HF)")
    p.add_argument("dst", help="destination directory (a .gguf file for --to gguf)")
    add_arguments(p, ConvertConfig)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at DST")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "demo",
        help="run the end-to-end demo (data -> clean -> tokenize -> train 3 models -> evaluate)",
        description="The end-to-end demo on built-in data: synthesize a textbook corpus, a web-like corpus and a "
        "held-out MMLU-format quiz; clean them (dedup, filters, decontamination against the quiz, plus a "
        "planted-leak check); train a BPE tokenizer and shards; train tiny-dense on web text, tiny-dense web-then-"
        "textbook and a tiny Arctic hybrid (same active parameters) at equal token budgets; evaluate all three "
        "(quiz letter and cloze accuracy vs chance, bits per byte, contamination status); ship the best one and "
        "write OUT/report.html. Writes OUT/summary.json with per-stage wall and CPU times and plain-language "
        "notes on what the numbers show. About 5 minutes on a 2-core CPU; --quick takes well under one. Every "
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


def cmd_convert(args: argparse.Namespace) -> int:
    from effilm.formats.convert import ConvertConfig, convert

    print(convert(args.src, args.dst, from_args(ConvertConfig, args), overwrite=args.overwrite))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from effilm.demo.config import DemoConfig
    from effilm.demo.run import run_demo

    return run_demo(args.out, quick=args.quick, config=args.config, overrides=given(args, DemoConfig),
                    overwrite=args.overwrite)
