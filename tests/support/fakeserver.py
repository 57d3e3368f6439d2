"""A scripted OpenAI-compatible HTTP server for tests and benchmarks (127.0.0.1 only).

It answers ``POST /v1/chat/completions`` and ``/v1/completions``. Each request takes the next
behaviour from ``script`` (then ``default``): ``ok``, ``429`` (with ``Retry-After``), ``500``,
``slow`` (sleeps ``slow_s`` before answering, to trip client timeouts), ``malformed`` (200 with
broken JSON) or ``empty`` (200 with no choices). Good answers are a deterministic function of the
prompt, and every request is logged so tests can count what was paid for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAIServer:
    def __init__(self, script: list[str] | None = None, default: str = "ok", latency_s: float = 0.0,
                 slow_s: float = 2.0, retry_after: str = "0"):
        self.script, self.default = list(script or []), default
        self.latency_s, self.slow_s, self.retry_after = latency_s, slow_s, retry_after
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @staticmethod
    def answer_for(prompt: str) -> str:
        h = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        return f"A short lesson ({h}). Water evaporates, condenses into clouds and falls as rain."

    def next_behaviour(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else self.default

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = json.loads(h.rfile.read(int(h.headers.get("content-length", 0))) or b"{}")
        what = self.next_behaviour()
        prompt = body["messages"][-1]["content"] if "messages" in body else body.get("prompt", "")
        with self.lock:
            self.log.append({"behaviour": what, "prompt": prompt, "t": time.monotonic(),
                             "body_sha": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest(),
                             "auth": h.headers.get("authorization")})
        if self.latency_s:
            time.sleep(self.latency_s)
        if what == "slow":
            time.sleep(self.slow_s)
        if what in ("429", "500"):
            payload, code = b'{"error": "try again"}', int(what)
        elif what == "malformed":
            payload, code = b'{"choices": [ {"message": ', 200
        elif what == "empty":
            payload, code = b'{"choices": []}', 200
        else:
            text = self.answer_for(prompt)
            choice = {"index": 0, "finish_reason": "stop"}
            choice.update({"message": {"role": "assistant", "content": text}} if "messages" in body else {"text": text})
            n_prompt, n_comp = len(prompt.split()), len(text.split())
            payload = json.dumps({"id": "x", "object": "chat.completion", "choices": [choice],
                                  "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_comp,
                                            "total_tokens": n_prompt + n_comp}}).encode()
            code = 200
        try:
            h.send_response(code)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(payload)))
            if code == 429:
                h.send_header("retry-after", self.retry_after)
            h.end_headers()
            h.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def answered(self) -> list[str]:
        """Body hashes of the requests that got a good answer (the ones a provider would bill)."""
        with self.lock:
            return [e["body_sha"] for e in self.log if e["behaviour"] in ("ok", "slow")]

    @property
    def base_url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes: avoid the 40 ms stall

            def do_POST(self):  # noqa: N802
                server.handle(self)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog of 5 resets connections under load

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None) -> int:
    """Serve until killed, printing the base URL first (benchmarks run it in its own process)."""
    import argparse

    ap = argparse.ArgumentParser(description="Scripted OpenAI-compatible server on 127.0.0.1 (tests, benchmarks)")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = ap.parse_args(argv)
    server = FakeOpenAIServer(latency_s=args.latency).start()
    print(server.base_url, flush=True)
    try:
        assert server.thread is not None
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
