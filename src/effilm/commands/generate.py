"""``effilm generate``: stream a completion from a model directory to the terminal."""

from __future__ import annotations

import argparse
import sys

from effilm.config.reader import add_arguments, from_args


def cmd_generate(args) -> int:
    from effilm.inference.engine import Engine, SamplingParams

    # parameters first: a bad value is reported before the (slower) model load
    params = from_args(SamplingParams, args)
    engine = Engine.load(args.model, dtype=args.dtype, quant_kernel=args.quant_kernel)
    prompt = engine.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    out = sys.stdout
    if args.echo and not args.chat:
        out.write(args.prompt)
    reason = None
    for ev in engine.stream([prompt], params):
        if ev.text:
            out.write(ev.text)
            out.flush()
        reason = ev.finish_reason or reason
    out.write("\n")
    out.flush()
    if args.verbose:
        print(f"[finish_reason: {reason}]", file=sys.stderr)
    return 0


def register(sub) -> None:
    from effilm.inference.sampling import SamplingParams

    p = sub.add_parser(
        "generate",
        help="generate text from a model, streamed to the terminal",
        description="Generate a completion for PROMPT with effilm's engine and stream it to the terminal. "
        "MODEL is an effilm checkpoint or Hugging Face model directory that also holds the tokenizer "
        "files (tokenizer.json). Temperature 0 is greedy decoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="model directory (effilm checkpoint or HF) with tokenizer.json")
    p.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    add_arguments(p, SamplingParams, group_title="sampling")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast the weights to this dtype (default: as stored)")
    p.add_argument("--quant-kernel", choices=["fast", "exact"], default="fast",
                   help="kernel of quantized layers: 'fast' runs the packed int8/int4 CPU kernels with bf16 "
                   "activations (within bf16 rounding of 'exact'), 'exact' the fp32 reference")
    p.add_argument("-v", "--verbose", action="store_true", help="print the finish reason to stderr")
    p.set_defaults(func=cmd_generate)
