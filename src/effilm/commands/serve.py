"""``effilm serve``: the OpenAI-compatible server. Flags map one-to-one onto ``ServeConfig``."""

from __future__ import annotations

import argparse
import dataclasses


def cmd_serve(args) -> int:
    from effilm.serve.app import ServeConfig, serve

    names = [f.name for f in dataclasses.fields(ServeConfig)]
    cfg = ServeConfig(**{n: getattr(args, n) for n in names})
    return serve(cfg)


def register(sub) -> None:
    # ServeConfig is a plain dataclass with no heavy imports, so its help text is the flags' help.
    from effilm.serve.app import ServeConfig

    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible API: POST /v1/completions and "
        "/v1/chat/completions (stream: true for SSE), GET /v1/models and GET /health. Concurrent "
        "requests are batched through effilm's engine; beyond --max-concurrency they queue, and "
        "beyond --max-queue they get 429. Binds to 127.0.0.1 unless --host says otherwise. "
        "SIGTERM (or Ctrl-C) stops accepting, lets running requests finish and exits 0.",
        epilog="example: EFFILM_KEY=s3cret effilm serve runs/tiny --api-key-env EFFILM_KEY --port 8000\n"
        "then: curl -H 'Authorization: Bearer s3cret' localhost:8000/v1/completions "
        "-d '{\"model\": \"tiny\", \"prompt\": \"Once\", \"max_tokens\": 8}'",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(ServeConfig):
        if f.name == "model":
            p.add_argument("model", help=f.metadata["help"])
            continue
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, dest=f.name, type=type(f.default), default=f.default, help=f.metadata["help"])
    p.set_defaults(func=cmd_serve)
