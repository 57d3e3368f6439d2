"""``effilm annotate``: score documents with a teacher, for the learned quality filter.

Python API (what the demo calls)::

    from effilm.synth.annotate import AnnotateConfig, annotate
    summary = annotate(["web/"], "ann/", AnnotateConfig(backend="procedural"))

Backends: ``openai`` and ``local`` ask a teacher model with the rubric's prompt through synth's
own clients (``OpenAIBackend`` with its request cache, budget and retries; ``LocalBackend`` over
effilm's engine); ``procedural`` scores effilm's procedural records from what the generator knows
(:func:`effilm.synth.rubric.procedural_score`), offline. A reply with no valid score is asked again
with a new seed (``score_retries`` times), then recorded with ``score: null`` and the reason: never
dropped.

Output, like ``effilm synth``: ``DIR/shard-NNNNN.jsonl`` (records ``id``, the text, ``score`` and
``annotation``: backend, rubric, scale, attempts, the reply or the reason), each written
atomically and listed in ``DIR/manifest.json`` with its checksum; ``DIR/cache/`` holds the
openai replies. A re-run resumes: whole shards are skipped, and replies come from the cache, so
nothing is paid twice. ``dry_run`` counts the requests and tokens the run would still send.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from effilm.config.reader import option
from effilm.data.inputs import expand_inputs, iter_file
from effilm.errors import ConfigError, EffilmError
from effilm.io import atomic_write_json, sha256_file
from effilm.synth.prompts import Job
from effilm.synth.recipe import Budget, LocalConfig, OpenAIConfig, Recipe, Sampling
from effilm.synth.rubric import Rubric, load_rubric, procedural_score
from effilm.synth.runner import write_shard

BACKENDS = ("procedural", "openai", "local")
MANIFEST = "manifest.json"
REPLY_CHARS = 600  # characters of each reply kept in the annotation record


@dataclass
class AnnotateConfig:
    """How ``effilm annotate`` scores a corpus (the teacher settings are synth's)."""

    backend: str = option("procedural", f"Who scores: one of {BACKENDS}.")
    rubric: str = option("", "Rubric TOML (prompt and scale); empty: the bundled 0-5 educational rubric.")
    text_field: str = option("text", "Record field holding the text.")
    shard_size: int = option(1000, "Documents per output shard (the unit of resume).")
    score_retries: int = option(2, "Extra requests, each with a new seed, for a reply with no valid score "
                                   "before the document is recorded as unscored.")
    limit: int | None = option(None, "Annotate at most this many documents (a prefix of the corpus).")
    seed: int = option(0, "Base seed of the teacher's sampling.")
    dry_run: bool = option(False, "Print the requests and tokens the run would cost; send and write nothing.")
    quiet: bool = option(False, "No progress bar.")
    sampling: Sampling = option(factory=lambda: Sampling(temperature=0.0, max_tokens=256), help="[sampling]")
    budget: Budget = option(factory=Budget, help="[budget]")
    openai: OpenAIConfig = option(factory=OpenAIConfig, help="[openai]")
    local: LocalConfig = option(factory=LocalConfig, help="[local]")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} must be one of {BACKENDS}")
        if self.shard_size < 1 or self.score_retries < 0:
            raise ConfigError("shard_size must be >= 1 and score_retries >= 0")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit={self.limit} must be >= 0")

    def teacher_recipe(self) -> Recipe:
        """The synth recipe the teacher clients read (endpoint, sampling, budget)."""
        return Recipe(name="annotate", seed=self.seed, backend=self.backend, inject_words=0, sampling=self.sampling,
                      budget=self.budget, openai=self.openai, local=self.local)  # fmt: skip


def _documents(files, text_field: str, limit: int | None):
    n = 0
    for f in files:
        for doc in iter_file(f, text_field):
            if limit is not None and n >= limit:
                return
            n += 1
            yield doc


class Annotator:
    def __init__(self, inputs, out, cfg: AnnotateConfig | None = None, *, generator=None, log=None):
        self.cfg = cfg or AnnotateConfig()
        self.files = expand_inputs(inputs)
        self.out = Path(out)
        self.rubric: Rubric = load_rubric(self.cfg.rubric, need_prompt=self.cfg.backend != "procedural")
        self.recipe = self.cfg.teacher_recipe()
        self.generator = generator
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.meter = None

    # -- identity and manifest ---------------------------------------------------------------
    def key(self) -> str:
        teacher = {"procedural": {}, "openai": {k: getattr(self.cfg.openai, k) for k in ("base_url", "model", "endpoint")},
                   "local": {"checkpoint": self.cfg.local.checkpoint}}[self.cfg.backend]  # fmt: skip
        d = {"rubric": self.rubric.content_hash(), "backend": self.cfg.backend, "teacher": teacher,
             "sampling": dataclasses.asdict(self.cfg.sampling) if self.cfg.backend != "procedural" else None,
             "seed": self.cfg.seed, "text_field": self.cfg.text_field, "shard_size": self.cfg.shard_size,
             "score_retries": self.cfg.score_retries, "inputs": [sha256_file(f) for f in self.files]}  # fmt: skip
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def load_manifest(self, key: str) -> dict:
        path = self.out / MANIFEST
        if not path.exists():
            return {"schema": 1, "key": key, "backend": self.cfg.backend, "rubric": self.rubric.name,
                    "scale": list(self.rubric.scale), "inputs": [str(f) for f in self.files], "shards": {}}
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EffilmError(f"{path}: corrupt manifest ({exc.msg}); move the directory aside") from None
        if m.get("key") != key:
            raise EffilmError(f"{self.out} holds annotations of other inputs, rubric or teacher settings; choose a "
                              "new --out to start a fresh run")  # fmt: skip
        return m

    # -- scoring -----------------------------------------------------------------------------
    def _record(self, doc, score, extra: dict) -> dict:
        rec = doc.record or {}
        ann = {"backend": self.cfg.backend, "rubric": self.rubric.name, "scale": list(self.rubric.scale),
               "source": doc.where, **extra}  # fmt: skip
        return {"id": rec.get("id", doc.where), self.cfg.text_field: doc.text, "score": score, "annotation": ann}

    def _job(self, doc, attempt: int, index: int) -> Job:
        seed = (self.cfg.seed * 1_000_003 + index * 101 + attempt) % (2**31)
        return Job(index=index, id=f"annotate-{index:09d}", prompt=self.rubric.render(doc.text), topic="",
                   topic_id=0, audience="", style="", kind="annotate", words=(), seed=seed)  # fmt: skip

    def _ask(self, backend, jobs: list[Job]) -> list[str]:
        if self.cfg.backend == "openai":
            import asyncio

            return [r["text"] for r in asyncio.run(backend.replies(jobs))]
        return [r["text"] for r in backend.run(jobs)]

    def score_shard(self, backend, docs: list, start: int) -> list[dict]:
        if self.cfg.backend == "procedural":
            out = []
            for doc in docs:
                score, basis = procedural_score(doc.record or {}, self.rubric, doc.where)
                out.append(self._record(doc, score, {"model": None, "attempts": 0, "basis": basis}))
            return out
        results: dict[int, tuple] = {}
        pending = list(range(len(docs)))
        last: dict[int, tuple[str, str]] = {}
        for attempt in range(self.cfg.score_retries + 1):
            if not pending:
                break
            replies = self._ask(backend, [self._job(docs[i], attempt, start + i) for i in pending])
            still = []
            for i, reply in zip(pending, replies, strict=True):
                score, reason = self.rubric.parse(reply)
                if score is None:
                    last[i] = (reply, reason)
                    still.append(i)
                else:
                    results[i] = (score, {"attempts": attempt + 1, "reply": reply[:REPLY_CHARS]})
            pending = still
        model = self.cfg.openai.model if self.cfg.backend == "openai" else self.cfg.local.checkpoint
        out = []
        for i, doc in enumerate(docs):
            if i in results:
                score, extra = results[i]
            else:
                reply, reason = last[i]
                score, extra = None, {"attempts": self.cfg.score_retries + 1, "reply": reply[:REPLY_CHARS],
                                      "unscored": reason}  # fmt: skip
            out.append(self._record(doc, score, {"model": model, **extra}))
        return out

    def _backend(self):
        if self.cfg.backend == "procedural":
            return None
        if self.cfg.backend == "local":
            from effilm.synth.local import LocalBackend, load_generator

            return LocalBackend(self.recipe, self.generator or load_generator(self.cfg.local.checkpoint))
        from effilm.synth.openai_backend import BudgetMeter, OpenAIBackend, RequestCache

        key = os.environ.get(self.cfg.openai.api_key_env)
        if key is None:
            self.log(f"note: ${self.cfg.openai.api_key_env} is not set; sending requests without an API key")
        self.meter = BudgetMeter(self.cfg.budget)
        return OpenAIBackend(self.recipe, RequestCache(self.out / "cache"), self.meter, key)

    # -- running -----------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        from effilm.outputs import claim_dir, mark
        from effilm.synth.openai_backend import BudgetExhausted

        claim_dir(self.out, "annotate", sources=self.files, resumable=True, what="--out")
        key = self.key()
        m = self.load_manifest(key)
        if self.cfg.dry_run:
            return self.dry_run(m)
        self.out.mkdir(parents=True, exist_ok=True)
        mark(self.out, "annotate")
        backend = self._backend()
        summary = {"written_shards": 0, "skipped_shards": 0}
        bar = tqdm(unit="doc", desc="annotate", disable=self.cfg.quiet)
        try:
            for name, start, docs in self._shards():
                if self._done(m, name, start, len(docs)):
                    summary["skipped_shards"] += 1
                    bar.update(len(docs))
                    continue
                recs = self.score_shard(backend, docs, start)
                entry = write_shard(self.out / name, recs)
                scored = sum(r["score"] is not None for r in recs)
                m["shards"][name] = {"start": start, "end": start + len(docs), **entry, "scored": scored,
                                     "unscored": len(recs) - scored}  # fmt: skip
                atomic_write_json(self.out / MANIFEST, m)
                summary["written_shards"] += 1
                bar.update(len(docs))
            m["complete"] = True
        except BudgetExhausted as exc:
            summary["stopped"] = str(exc)
            m["complete"] = False
            hint = "check the server and the [openai] settings" if exc.failing else "re-run with a larger budget to resume"
            self.log(f"stopped: {exc}. Replies received so far are cached; {hint}.")
        finally:
            bar.close()
        atomic_write_json(self.out / MANIFEST, m)
        shards = m["shards"].values()
        summary.update({"complete": m["complete"], "documents": sum(e["count"] for e in shards),
                        "scored": sum(e["scored"] for e in shards), "unscored": sum(e["unscored"] for e in shards),
                        "out": str(self.out)})  # fmt: skip
        if self.meter is not None:
            mt = self.meter
            summary["usage"] = {"requests": mt.requests, "tokens": mt.tokens, "cache_hits": mt.cache_hits,
                                "retries": mt.retries, "errors": dict(mt.errors)}  # fmt: skip
        return summary

    def _shards(self):
        """``(name, start, documents)`` per shard of the (limited) corpus, streamed."""
        size, buf, start = self.cfg.shard_size, [], 0
        for doc in _documents(self.files, self.cfg.text_field, self.cfg.limit):
            buf.append(doc)
            if len(buf) == size:
                yield f"shard-{start // size:05d}.jsonl", start, buf
                start, buf = start + size, []
        if buf:
            yield f"shard-{start // size:05d}.jsonl", start, buf

    def _done(self, m: dict, name: str, start: int, count: int) -> bool:
        e = m["shards"].get(name)
        path = self.out / name
        return bool(e) and (e["start"], e["end"]) == (start, start + count) and path.is_file() \
            and sha256_file(path) == e["sha256"]

    def dry_run(self, m: dict) -> dict:
        plan = {"backend": self.cfg.backend, "rubric": self.rubric.name, "shards_to_write": 0, "documents_to_score": 0}
        if self.cfg.backend == "openai":
            from effilm.synth.openai_backend import RequestCache, build_request, estimate_tokens, request_key

            cache = RequestCache(self.out / "cache")
            plan.update({"requests": 0, "max_tokens": 0, "cached": 0})
        for name, start, docs in self._shards():
            if self._done(m, name, start, len(docs)):
                continue
            plan["shards_to_write"] += 1
            plan["documents_to_score"] += len(docs)
            if self.cfg.backend == "openai":
                for i, doc in enumerate(docs):
                    job = self._job(doc, 0, start + i)
                    if cache.has(request_key(*build_request(self.recipe, job))):
                        plan["cached"] += 1
                    else:
                        plan["requests"] += 1
                        plan["max_tokens"] += estimate_tokens(self.recipe, job)
        if self.cfg.backend == "openai":
            b = self.cfg.budget
            plan.update({"budget_max_requests": b.max_requests, "budget_max_tokens": b.max_tokens,
                         "fits_budget": (not b.max_requests or plan["requests"] <= b.max_requests)
                         and (not b.max_tokens or plan["max_tokens"] <= b.max_tokens),
                         "note": "first attempts only; unparseable replies cost up to score_retries more requests"})
        return plan


def annotate(inputs, out, cfg: AnnotateConfig | None = None, *, generator=None, log=None) -> dict:
    """Score the documents of ``inputs`` into the directory ``out``; returns the summary (or, with
    ``cfg.dry_run``, the plan). ``generator`` drives the local backend (tests pass a stub)."""
    return Annotator(inputs, out, cfg, generator=generator, log=log).run()
