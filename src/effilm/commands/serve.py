"""``effilm serve``: the OpenAI-compatible server. Flags map one-to-one onto ``ServeConfig``."""

from __future__ import annotations

from effilm.config.reader import add_arguments, from_args


def cmd_serve(args) -> int:
    from effilm.serve.app import ServeConfig, serve

    return serve(from_args(ServeConfig, args))


def register(sub) -> None:
    import argparse

    from effilm.serve.app import ServeConfig  # a plain dataclass: its help text is the flags' help

    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL over an OpenAI-compatible API: POST /v1/completions and "
        "/v1/chat/completions (stream: true for SSE), GET /v1/models and GET /health. Concurrent "
        "requests are batched through effilm's engine; beyond --max-concurrency they queue, and "
        "beyond --max-queue they get 429. Binds to 127.0.0.1 unless --host says otherwise. "
        "SIGTERM (or Ctrl-C) stops accepting, lets running requests finish and exits 0.",
        epilog="example: EFFILM_KEY=s3cret effilm serve runs/tiny --api-key-env EFFILM_KEY --port 8000\n"
        "then: curl -H 'Authorization: Bearer s3cret' localhost:8000/v1/completions "
        "-H 'Content-Type: application/json' -d '{\"model\": \"tiny\", \"prompt\": \"Once\", \"max_tokens\": 8}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p, ServeConfig, positional=("model",))
    p.set_defaults(func=cmd_serve)
