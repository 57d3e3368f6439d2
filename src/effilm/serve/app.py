"""``effilm serve``: an OpenAI-compatible HTTP server over effilm's engine (Starlette + uvicorn).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` over
SSE), ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``. Every route but
``/health`` checks the API key when one is configured. Requests are validated in
``serve_api``; batching and the concurrency/queue bounds live in ``serve_scheduler``.

Shutdown on SIGTERM: uvicorn stops accepting, lets in-flight requests finish for up to
``shutdown_timeout_s`` (then cancels them), the scheduler stops its workers, and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from effilm.errors import ConfigError, EffilmError
from effilm.serve.api import (
    APIError,
    GenRequest,
    chunk,
    full_response,
    parse_chat,
    parse_completion,
    parse_json,
    sse,
    usage,
)
from effilm.serve.scheduler import EngineFailed, QueueFull, Scheduler

OPEN_PATHS = ("/health",)  # served without the API key (load balancers, probes)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass
class ServeConfig:
    model: str = field(default="", metadata={"help": "effilm checkpoint or Hugging Face model directory (with tokenizer files)"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to bind; the default is reachable from this machine only"})
    port: int = field(default=8000, metadata={"help": "TCP port (0 picks a free one; the chosen URL is printed)"})
    api_key_env: str = field(default="", metadata={"help": "environment variable holding the API key; when set, every route but /health needs 'Authorization: Bearer KEY'"})
    max_concurrency: int = field(default=8, metadata={"help": "sequences generated at once (the engine's batch bound)"})
    max_queue: int = field(default=32, metadata={"help": "requests allowed to wait for a slot; beyond that the server answers 429"})
    max_body_bytes: int = field(default=1_048_576, metadata={"help": "largest request body accepted; larger ones get 413"})
    max_batches: int = field(default=2, metadata={"help": "engine batches run at once (each in its own thread); new requests join the next batch"})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "how long the scheduler waits for more requests to join a batch"})
    default_max_tokens: int = field(default=256, metadata={"help": "completion length when a request gives no max_tokens (capped by the context)"})
    shutdown_timeout_s: float = field(default=30.0, metadata={"help": "on SIGTERM, how long in-flight requests may take to finish before they are cancelled"})
    retry_after_s: int = field(default=1, metadata={"help": "Retry-After seconds sent with a 429"})
    served_model_name: str = field(default="", metadata={"help": "model id in /v1/models and requests (default: the directory name)"})
    device: str = field(default="auto", metadata={"help": "torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1' ..."})
    log_level: str = field(default="info", metadata={"help": f"uvicorn log level, one of {LOG_LEVELS}"})
    header_timeout_s: float = field(default=10.0, metadata={"help": "a connection must send a request's complete headers within this many seconds of connecting (or of its previous response), else it is closed (slow clients hold no connection forever)"})
    body_timeout_s: float = field(default=30.0, metadata={"help": "once the headers are in, the whole request body must arrive within this many seconds, else the connection is closed"})
    max_connections: int = field(default=256, metadata={"help": "open connections at most; beyond that new requests get 503"})
    quant_kernel: str = field(default="fast", metadata={"help": "kernel of a quantized model's layers: 'fast' (packed int8/int4 CPU kernels, bf16 activations, within bf16 rounding of 'exact') or 'exact' (the fp32 reference)"})

    def __post_init__(self):
        if not self.model:
            raise ConfigError("model: a model directory is required")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_concurrency", "max_batches", "max_body_bytes", "default_max_tokens", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "batch_wait_ms", "shutdown_timeout_s", "retry_after_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.quant_kernel not in ("fast", "exact"):
            raise ConfigError(f"quant_kernel must be 'fast' or 'exact', got {self.quant_kernel!r}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")


def resolve_api_key(env_name: str) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise EffilmError(f"--api-key-env {env_name}: the environment variable {env_name} is not set or is empty")
    return key


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----- the ASGI app -------------------------------------------------------------------------------
def error_response(err: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class APIKeyMiddleware:
    """Pure ASGI (streaming-safe): 401 in OpenAI's shape unless ``Authorization: Bearer KEY``."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None and scope["path"] not in OPEN_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request, limit: int) -> bytes:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        # also what keeps a browser's cross-site "simple" POST off a key-less local server
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, f"invalid Content-Length header {length!r}", code="invalid_request")
        if int(length) > limit:
            raise APIError(413, f"request body of {int(length)} bytes exceeds the server's limit of {limit} bytes",
                           code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(413, f"request body exceeds the server's limit of {limit} bytes", code="request_too_large")
        parts.append(part)
    return b"".join(parts)


class _Cancelling:
    """A streaming response that cancels its ticket however it ends (a disconnect included)."""

    def __init__(self, response, scheduler: Scheduler, ticket):
        self.response, self.scheduler, self.ticket = response, scheduler, ticket

    async def __call__(self, scope, receive, send):
        try:
            await self.response(scope, receive, send)
        finally:
            self.scheduler.cancel(self.ticket)


class Server:
    """The app's state: one engine, one scheduler, the served name and the limits."""

    def __init__(self, engine, cfg: ServeConfig, api_key: str | None):
        self.engine, self.cfg, self.api_key = engine, cfg, api_key
        self.name = cfg.served_model_name or engine.name
        self.vocab_size = _vocab_size(engine)
        self.scheduler: Scheduler | None = None
        self.started = int(time.time())

    # lifespan: the scheduler lives on uvicorn's event loop
    async def lifespan(self, app):
        self.scheduler = Scheduler(self.engine, self.cfg.max_concurrency, self.cfg.max_queue,
                                   self.cfg.batch_wait_ms / 1000, self.cfg.max_batches)
        self.scheduler.start()
        try:
            yield
        finally:
            await self.scheduler.close(self.cfg.shutdown_timeout_s)

    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.name, **self.scheduler.stats()})

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.started, "owned_by": "effilm",
                "max_model_len": self.engine.max_context}

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        if request.path_params["model"] != self.name:
            raise APIError(404, f"The model '{request.path_params['model']}' does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(self._model_card())

    async def completions(self, request):
        body = parse_json(await read_body(request, self.cfg.max_body_bytes))
        req = parse_completion(body, self.engine, self.name, self.vocab_size, self.cfg.default_max_tokens)
        return await self._generate(request, req)

    async def chat(self, request):
        body = parse_json(await read_body(request, self.cfg.max_body_bytes))
        req = parse_chat(body, self.engine, self.name, self.cfg.default_max_tokens)
        return await self._generate(request, req)

    async def _generate(self, request, req: GenRequest):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            ticket = self.scheduler.submit(req.prompt_ids, req.params)
        except QueueFull as exc:
            raise APIError(429, f"server overloaded: {exc}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
        if req.stream:
            stream = StreamingResponse(self._sse(req, ticket), media_type="text/event-stream",
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            return _Cancelling(stream, self.scheduler, ticket)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, self.scheduler, ticket))
        try:
            text, n, finish = [], 0, None
            while finish is None:
                ev = await ticket.events.get()
                if ev is None or isinstance(ev, EngineFailed):
                    raise APIError(500, f"generation failed: {ev or 'cancelled'}", type="server_error",
                                   code="engine_error")
                text.append(ev.text)
                n += ev.token_id is not None
                finish = ev.finish_reason
        finally:
            watcher.cancel()
            self.scheduler.cancel(ticket)
        return JSONResponse(full_response(req, "".join(text), _finish(finish), n))

    async def _sse(self, req: GenRequest, ticket):
        if req.kind == "chat":
            yield sse(chunk(req, None, None, role=True))
        n = 0
        while True:
            ev = await ticket.events.get()
            if ev is None or isinstance(ev, EngineFailed):
                err = APIError(500, f"generation failed: {ev or 'cancelled'}", type="server_error", code="engine_error")
                yield sse(err.body())
                break
            n += ev.token_id is not None
            if ev.text and ev.finish_reason is None:
                yield sse(chunk(req, ev.text, None))
            elif ev.finish_reason is not None:
                yield sse(chunk(req, ev.text or None, _finish(ev.finish_reason)))
                if req.include_usage:
                    yield sse(chunk(req, None, None, usage_only=_usage(req, n)))
                break
        yield sse("[DONE]")

    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]

        async def on_api_error(request, exc: APIError):
            return error_response(exc)

        async def on_http_error(request, exc: HTTPException):
            kind = "not_found" if exc.status_code == 404 else "invalid_request"
            return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                           code=kind, headers=dict(exc.headers or {})))

        async def on_crash(request, exc: Exception):
            return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                                           code="internal_error"))

        app = Starlette(routes=routes, lifespan=contextlib.asynccontextmanager(self.lifespan),
                        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash})
        return APIKeyMiddleware(app, self.api_key)


def _finish(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def _usage(req: GenRequest, n: int) -> dict:
    return usage(len(req.prompt_ids), n)


def _vocab_size(engine) -> int:
    model = getattr(engine, "model", None)
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    return int(getattr(cfg, "vocab_size", 0) or 2**31)


async def _cancel_on_disconnect(request, scheduler: Scheduler, ticket) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            scheduler.cancel(ticket)
            return


# ----- running it ---------------------------------------------------------------------------------
def timed_protocol(header_timeout_s: float, body_timeout_s: float):
    """uvicorn's h11 protocol with request-read deadlines, which uvicorn does not have: a client
    must send a request's headers within ``header_timeout_s`` of connecting (or of the previous
    response on a kept-alive connection), and its body within ``body_timeout_s`` once the headers
    are in; otherwise the connection is closed. A request already being answered is never cut."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def _arm(self, seconds: float) -> None:
            timer = getattr(self, "_read_timer", None)
            if timer is not None:
                timer.cancel()
            self._read_timer = self.loop.call_later(seconds, self._read_timed_out)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._reading_body = False
            self._arm(header_timeout_s)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            state = self.conn.their_state
            if state is h11.SEND_BODY and not self._reading_body:  # the headers are in: the body's turn
                self._reading_body = True
                self._arm(body_timeout_s)
            elif state is not h11.SEND_BODY and state is not h11.IDLE and getattr(self, "_read_timer", None):
                self._read_timer.cancel()  # the whole request is in
                self._read_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # a kept-alive connection: the next request's deadline
                self._reading_body = False
                self._arm(header_timeout_s)

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_read_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        raise EffilmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(cfg: ServeConfig, engine=None, log=print) -> int:
    """Load the model, bind, serve until SIGTERM/SIGINT, shut down gracefully; returns 0."""
    import uvicorn

    api_key = resolve_api_key(cfg.api_key_env)
    if engine is None:
        from effilm.device import resolve_device
        from effilm.inference.engine import Engine

        engine = Engine.load(cfg.model, device=resolve_device(cfg.device), quant_kernel=cfg.quant_kernel)
    server = Server(engine, cfg, api_key)
    if not _is_loopback(cfg.host) and api_key is None:
        log(f"warning: listening on {cfg.host} without an API key; anyone who can reach it can use it "
            "(set --api-key-env)")
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    uv = uvicorn.Server(uvicorn.Config(server.app(), log_level=cfg.log_level, lifespan="on",
                                       timeout_graceful_shutdown=cfg.shutdown_timeout_s,
                                       http=timed_protocol(cfg.header_timeout_s, cfg.body_timeout_s),
                                       limit_concurrency=cfg.max_connections))
    log(f"effilm serve: model '{server.name}' on http://{shown}:{port}/v1 "
        f"(max_concurrency {cfg.max_concurrency}, max_queue {cfg.max_queue})")
    sys.stdout.flush()
    # uvicorn re-raises the signal it caught once it has shut down; a no-op handler makes that
    # re-raise harmless, so a graceful SIGTERM ends with exit status 0 instead of -15.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uv.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if not uv.started:
        raise EffilmError("the server failed to start (see the log above)")
    log("effilm serve: stopped")
    return 0
