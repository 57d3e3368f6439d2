"""The ``openai`` backend: any OpenAI-compatible chat or completions endpoint, over async httpx.

* A semaphore caps the requests in flight (``openai.concurrency``).
* 429, 5xx, timeouts, transport errors and malformed replies are retried with exponential
  backoff and jitter; a ``Retry-After`` header (seconds or an HTTP date) sets the delay instead.
* ``BudgetMeter`` caps requests and tokens for the run; it refuses to *start* a request that
  could overrun, so the cap is never exceeded.
* ``RequestCache`` stores every good reply on disk under the SHA-256 of the request, written
  atomically, so a re-run or a resumed run never pays twice for the same request.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from effilm.errors import EffilmError
from effilm.io import atomic_write_json
from effilm.synth.prompts import Job
from effilm.synth.recipe import Budget, Recipe
from effilm.synth.records import count_tokens, make_record


class BudgetExhausted(EffilmError):
    """The run reached its request or token cap; finished work is kept and a re-run resumes.
    ``failing`` is set when the cap stopped the retries of a request that kept failing: then the
    failure (an unreachable server, say), not the budget, is what the user must fix."""

    def __init__(self, msg: str, failing: bool = False):
        super().__init__(msg)
        self.failing = failing


class RetryableError(Exception):
    def __init__(self, msg: str, retry_after: float | None = None):
        super().__init__(msg)
        self.retry_after = retry_after


def request_key(url: str, body: dict) -> str:
    return hashlib.sha256(json.dumps({"url": url, "body": body}, sort_keys=True).encode()).hexdigest()


class RequestCache:
    """Replies on disk, one JSON file per request hash, written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # cannot happen with atomic writes; treat as a miss
            return None

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def put(self, key: str, value: dict) -> None:
        atomic_write_json(self._path(key), value, indent=None)


@dataclass
class BudgetMeter:
    budget: Budget
    requests: int = 0
    tokens: int = 0
    reserved: int = 0
    cache_hits: int = 0
    retries: int = 0
    errors: dict = field(default_factory=dict)

    def reserve(self, estimate: int) -> None:
        b = self.budget
        if b.max_requests and self.requests >= b.max_requests:
            raise BudgetExhausted(f"request cap reached ({self.requests}/{b.max_requests} requests sent)")
        if b.max_tokens and self.tokens + self.reserved + estimate > b.max_tokens:
            raise BudgetExhausted(f"token cap reached ({self.tokens} spent + {self.reserved} in flight, "
                                  f"next request may need {estimate}, cap {b.max_tokens})")
        self.requests += 1
        self.reserved += estimate

    def settle(self, estimate: int, actual: int) -> None:
        self.reserved -= estimate
        self.tokens += actual


def build_request(recipe: Recipe, job: Job) -> tuple[str, dict]:
    cfg, s = recipe.openai, recipe.sampling
    body: dict = {"model": cfg.model, "temperature": s.temperature, "top_p": s.top_p,
                  "max_tokens": s.max_tokens, "seed": job.seed}
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": job.prompt}]
        path = "/chat/completions"
    else:
        body["prompt"] = job.prompt
        path = "/completions"
    return cfg.base_url.rstrip("/") + path, body


def estimate_tokens(recipe: Recipe, job: Job) -> int:
    return count_tokens(job.prompt) + recipe.sampling.max_tokens


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _extract(endpoint: str, data) -> tuple[str, str | None, dict]:
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        raise RetryableError("malformed reply: no choices[0] text") from None
    if not isinstance(text, str):
        raise RetryableError("malformed reply: completion text is not a string")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return text, choice.get("finish_reason"), usage


class OpenAIBackend:
    def __init__(self, recipe: Recipe, cache: RequestCache, meter: BudgetMeter, api_key: str | None,
                 rng: random.Random | None = None):
        self.recipe, self.cfg = recipe, recipe.openai
        self.cache, self.meter, self.api_key = cache, meter, api_key
        self.rng = rng or random.Random()
        self.sem: asyncio.Semaphore | None = None

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.cfg.retry_after_max_s)
        cap = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt))
        return cap / 2 + self.rng.uniform(0, cap / 2)  # "equal jitter"

    async def _attempt(self, client, url: str, body: dict) -> dict:
        import httpx

        try:
            resp = await client.post(url, json=body)
        except httpx.TimeoutException:
            raise RetryableError("timeout") from None
        except httpx.TransportError as exc:
            raise RetryableError(f"transport error: {type(exc).__name__}") from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise RetryableError(f"HTTP {resp.status_code}", _parse_retry_after(resp.headers.get("retry-after")))
        if resp.status_code >= 400:
            raise EffilmError(f"{url}: HTTP {resp.status_code} (not retried): {resp.text[:200]}")
        try:
            data = resp.json()
        except ValueError:
            raise RetryableError("malformed reply: not JSON") from None
        text, finish, usage = _extract(self.cfg.endpoint, data)
        return {"text": text, "finish_reason": finish, "usage": usage}

    async def complete(self, client, job: Job) -> tuple[dict, bool]:
        """The reply for ``job``, from the cache or the server; ``(reply, was_cached)``."""
        url, body = build_request(self.recipe, job)
        key = request_key(url, body)
        hit = self.cache.get(key)
        if hit is not None:
            self.meter.cache_hits += 1
            return hit, True
        estimate = estimate_tokens(self.recipe, job)
        last = "no attempt"
        for attempt in range(self.cfg.max_retries + 1):
            async with self.sem:
                try:
                    self.meter.reserve(estimate)
                except BudgetExhausted as exc:
                    if not attempt:
                        raise
                    # the cap stopped the retries of a failing request: the failure is the news
                    raise BudgetExhausted(f"{url}: {last} on every one of {attempt} attempt(s) for {job.id}; the "
                                          f"retries then stopped at the {exc}", failing=True) from None  # fmt: skip
                reply = None
                try:
                    reply = await self._attempt(client, url, body)
                except RetryableError as exc:
                    last, delay = str(exc), self.backoff(attempt, exc.retry_after)
                    self.meter.errors[last.split(":")[0]] = self.meter.errors.get(last.split(":")[0], 0) + 1
                finally:
                    u = (reply or {}).get("usage") or {}
                    actual = int(u.get("total_tokens") or 0) or (
                        estimate - self.recipe.sampling.max_tokens + count_tokens(reply["text"]) if reply else 0)
                    self.meter.settle(estimate, actual)
            if reply is not None:
                self.cache.put(key, reply)
                return reply, False
            if attempt < self.cfg.max_retries:
                self.meter.retries += 1
                await asyncio.sleep(delay)
        raise EffilmError(f"{url}: request for {job.id} failed after {self.cfg.max_retries + 1} attempts ({last})")

    def to_record(self, job: Job, reply: dict) -> dict:
        s = self.recipe.sampling
        usage = reply.get("usage") or {}
        return make_record(
            job.id, reply["text"], backend="openai", model=self.cfg.model, prompt=job.prompt,
            topic=job.topic, audience=job.audience, style=job.style, kind=job.kind,
            injected_words=list(job.words), seed=job.seed,
            sampling={"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens},
            prompt_tokens=usage.get("prompt_tokens"),
            extra={"topic_id": job.topic_id, "finish_reason": reply.get("finish_reason"),
                   "completion_tokens": usage.get("completion_tokens")},
        )

    async def run(self, jobs: list[Job]) -> list[dict]:
        """Records for ``jobs`` in order. Raises ``BudgetExhausted`` once the cap is hit; the
        replies already received are in the cache, so nothing paid for is lost."""
        replies = await self.replies(jobs)
        return [self.to_record(j, r) for j, r in zip(jobs, replies, strict=True)]

    async def replies(self, jobs: list[Job]) -> list[dict]:
        """The replies (``text``, ``finish_reason``, ``usage``) for ``jobs`` in order, from the
        cache or the server (``effilm annotate`` parses them itself). Raises as :meth:`run`."""
        import httpx

        self.sem = asyncio.Semaphore(self.cfg.concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, headers=headers, limits=limits) as client:
            # Let every started request finish (and land in the cache) even when one fails.
            replies = await asyncio.gather(*(self.complete(client, j) for j in jobs), return_exceptions=True)
        failures = [r for r in replies if isinstance(r, BaseException)]
        if failures:
            hard = [f for f in failures if not isinstance(f, BudgetExhausted)]
            raise (hard or failures)[0]
        return [r for r, _cached in replies]
