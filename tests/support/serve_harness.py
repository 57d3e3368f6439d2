"""Helpers for the server tests: a tiny model directory, a server subprocess, an SSE reader.

Run as a script, this file serves a model through ``effilm.serve.app.serve`` with an engine whose
steps are slowed down (``--step-delay S``), so tests of queueing, disconnects and shutdown see
requests still running when they act. Everything else is the real engine and the real server.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path

import httpx
from repo import REPO

ROOT = REPO
SRC = str(ROOT / "src")
SERVED = "tiny"  # the model directory's name, which the server uses as the model id
MAX_CONTEXT = 256


def make_model_dir(root: Path) -> Path:
    """A tiny dense model plus a real BPE tokenizer (with a chat template), saved as ROOT/tiny."""
    from engine_fixtures import add_tokenizer, make_tokenizer, tiny

    from effilm.formats.checkpoint import save

    tok = make_tokenizer(root)
    model = tiny("tiny-dense", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=MAX_CONTEXT)
    return add_tokenizer(save(model, root / SERVED), tok)


class ServerProcess:
    """``effilm serve`` in a subprocess on 127.0.0.1 and a free port; ``stop()`` ends it."""

    def __init__(self, model_dir: Path, *args: str, step_delay: float = 0.0, env: dict | None = None,
                 log: Path | None = None, timeout_s: float = 60.0):
        base = [sys.executable, __file__, "--step-delay", str(step_delay)] if step_delay else \
            [sys.executable, "-m", "effilm", "serve"]
        cmd = [*base, str(model_dir), "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *args]
        full_env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
        self.log_path = log or Path(model_dir).parent / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.base_url = self._wait_for_url(timeout_s)
        self.url = self.base_url.removesuffix("/v1")
        self._wait_healthy(timeout_s)

    def _wait_for_url(self, timeout_s: float) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if sel.select(timeout=0.1):
                line = self.proc.stdout.readline()
                if " on http://" in line:
                    return line.split(" on ", 1)[1].split()[0]
        raise RuntimeError(f"server did not start in {timeout_s}s: {self.log_path.read_text()[-2000:]}")

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server never became healthy")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


def sse_events(lines) -> list:
    """The ``data:`` payloads of an SSE stream, JSON-decoded (``[DONE]`` kept as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class SlowEngine:
    """The real engine with a pause before every step (tests need requests that stay running)."""

    def __init__(self, engine, delay_s: float):
        self._engine, self._delay = engine, delay_s

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream(self, prompts, params, cancelled=None):
        last = None
        for ev in self._engine.stream(prompts, params, cancelled=cancelled):
            if last is None or ev.index <= last:  # a new step begins
                time.sleep(self._delay)
            last = ev.index
            yield ev


def main(argv: list[str]) -> int:
    import argparse
    import dataclasses

    from effilm.inference.engine import Engine
    from effilm.serve.app import ServeConfig, serve

    p = argparse.ArgumentParser()
    p.add_argument("--step-delay", type=float, required=True)
    p.add_argument("model")
    for f in dataclasses.fields(ServeConfig):
        if f.name != "model":
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    delay = args.pop("step_delay")
    cfg = ServeConfig(**args)
    return serve(cfg, engine=SlowEngine(Engine.load(cfg.model), delay))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main(sys.argv[1:]))
