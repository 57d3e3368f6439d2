"""The synthesis driver: shards, the manifest, resume, workers and the dry run.

Output layout for ``--out DIR``::

    DIR/manifest.json           recipe hash, backend, and per stream each shard's range, count, sha256
    DIR/<stream>/shard-00000.jsonl
    DIR/quiz.jsonl              (procedural) the held-out MMLU-format quiz
    DIR/chat/, DIR/preferences/ (procedural) SFT conversations and DPO pairs, when the recipe asks
    DIR/cache/                  (openai) request cache

A shard is written atomically and then recorded in the manifest (also written atomically), so a
crash leaves only whole shards. On a re-run, shards whose file still matches its checksum are
skipped and the rest are rebuilt: every record is a pure function of the recipe and its index,
and teacher replies come back from the request cache, so nothing is produced twice or paid twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from effilm.config.reader import option
from effilm.errors import ConfigError, EffilmError
from effilm.io import atomic_open, atomic_write_json, iter_jsonl, sha256_file
from effilm.synth.recipe import Recipe, check_teacher_recipe

MANIFEST = "manifest.json"
SCHEMA = 1


@dataclass
class Stream:
    name: str
    total: int


def streams_for(recipe: Recipe, limit: int | None) -> list[Stream]:
    def cap(n: int) -> int:
        return n if limit is None else min(n, limit)

    if recipe.backend == "procedural":
        out = [Stream("textbook", cap(recipe.procedural.records))]
        for name, n in (("web", recipe.procedural.web_records), ("chat", recipe.procedural.chat_records),
                        ("preferences", recipe.procedural.preference_records)):  # fmt: skip
            if n:
                out.append(Stream(name, cap(n)))
        return out
    return [Stream("records", cap(recipe.records))]


def shard_ranges(total: int, size: int) -> list[tuple[str, int, int]]:
    return [(f"shard-{i:05d}.jsonl", s, min(s + size, total)) for i, s in enumerate(range(0, total, size))]


def write_shard(path: Path, records) -> dict:
    """Stream ``records`` into ``path`` atomically; return its manifest entry."""
    h, count, nbytes = hashlib.sha256(), 0, 0
    with atomic_open(path, "wb") as fh:
        for rec in records:
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            fh.write(line)
            h.update(line)
            count += 1
            nbytes += len(line)
    return {"count": count, "sha256": h.hexdigest(), "bytes": nbytes}


def _procedural_shard(task) -> tuple[str, str, dict]:
    """Worker: build one procedural shard (top-level so multiprocessing can pickle it)."""
    recipe, stream, name, start, end, path = task
    from effilm.synth import procedural

    gen = {"textbook": procedural.generate_corpus, "web": procedural.generate_web_corpus,
           "chat": procedural.generate_chat, "preferences": procedural.generate_preferences}[stream]  # fmt: skip
    recs = gen(end - start, recipe.procedural.num_facts, recipe.seed, start=start, cfg=recipe.procedural)
    entry = write_shard(Path(path), recs)
    return stream, name, {"start": start, "end": end, **entry}


@dataclass
class SynthOptions:
    """How one ``effilm synth`` invocation runs a recipe (the recipe says what to make)."""

    limit: int | None = option(None, "At most this many records per stream (a prefix of the full run).")
    workers: int = option(1, "Processes for procedural shards.")
    dry_run: bool = option(False, "Print the requests and tokens the run would cost; send and write nothing.")

    def __post_init__(self):
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"limit={self.limit} must be >= 0")
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers} must be >= 1")


class Run:
    def __init__(self, recipe: Recipe, out: str | Path, options: SynthOptions | None = None, *,
                 api_key_env: str | None = None, log=None, generator=None):
        options = options or SynthOptions()
        self.recipe, self.out = recipe, Path(out)
        self.limit, self.workers = options.limit, options.workers
        self.api_key_env = api_key_env or recipe.openai.api_key_env
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.generator = generator  # a local-backend Generator; tests pass one in
        self.streams = streams_for(recipe, self.limit)
        self.hash = recipe.content_hash()
        if recipe.backend != "procedural":
            check_teacher_recipe(recipe)
            if self.workers > 1:
                self.log("note: --workers applies to procedural shards; teacher backends run one process "
                         "and overlap requests with [openai] concurrency instead")

    # -- manifest --------------------------------------------------------------------------
    def load_manifest(self) -> dict:
        path = self.out / MANIFEST
        if not path.exists():
            return {"schema": SCHEMA, "recipe_hash": self.hash, "backend": self.recipe.backend,
                    "recipe_name": self.recipe.name, "seed": self.recipe.seed, "streams": {}}
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EffilmError(f"{path}: corrupt manifest ({exc.msg}); move the directory aside") from None
        if m.get("recipe_hash") != self.hash:
            raise EffilmError(f"{self.out} was written by a different recipe (hash {str(m.get('recipe_hash'))[:12]} "
                              f"vs {self.hash[:12]}); choose a new --out to start a fresh run")
        return m

    def save_manifest(self, m: dict) -> None:
        for st in m["streams"].values():
            want = {n for n, _, _ in shard_ranges(st["total"], self.recipe.shard_size)}
            st["complete"] = want <= set(st["shards"])
            st["records"] = sum(e["count"] for n, e in st["shards"].items() if n in want)
        atomic_write_json(self.out / MANIFEST, m)

    def pending(self, m: dict) -> list[tuple[Stream, str, int, int]]:
        todo = []
        for st in self.streams:
            entry = m["streams"].setdefault(st.name, {"total": st.total, "shards": {}})
            entry["total"] = st.total
            for name, start, end in shard_ranges(st.total, self.recipe.shard_size):
                done = entry["shards"].get(name)
                path = self.out / st.name / name
                if done and (done["start"], done["end"]) == (start, end) and path.is_file() \
                        and sha256_file(path) == done["sha256"]:
                    continue
                entry["shards"].pop(name, None)
                todo.append((st, name, start, end))
        return todo

    # -- running ---------------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> dict:
        from effilm.outputs import claim_dir, mark

        # a new or empty directory, or an earlier synth output (which this run resumes); nothing else
        claim_dir(self.out, "synth", resumable=True, what="--out")
        m = self.load_manifest()
        todo = self.pending(m)
        if dry_run:
            return self.dry_run(todo)
        self.out.mkdir(parents=True, exist_ok=True)
        mark(self.out, "synth")
        summary = {"written_shards": 0, "skipped_shards": sum(len(shard_ranges(s.total, self.recipe.shard_size))
                                                              for s in self.streams) - len(todo)}
        if self.recipe.backend == "procedural":
            self._run_procedural(m, todo, summary)
        else:
            self._run_teacher(m, todo, summary)
        self.save_manifest(m)
        summary["complete"] = all(st["complete"] for st in m["streams"].values())
        summary["records"] = {k: v["records"] for k, v in m["streams"].items()}
        return summary

    def _record(self, m, stream, name, entry, summary):
        m["streams"][stream]["shards"][name] = entry
        summary["written_shards"] += 1
        self.save_manifest(m)
        self.log(f"  {stream}/{name}: {entry['count']} records")

    def _run_procedural(self, m, todo, summary):
        tasks = [(self.recipe, st.name, name, s, e, str(self.out / st.name / name)) for st, name, s, e in todo]
        if self.workers > 1 and len(tasks) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(self.workers, len(tasks))) as pool:
                for stream, name, entry in pool.imap_unordered(_procedural_shard, tasks):
                    self._record(m, stream, name, entry, summary)
        else:
            for t in tasks:
                self._record(m, *_procedural_shard(t), summary)
        if self.recipe.procedural.quiz:
            from effilm.synth import procedural

            quiz = self.out / "quiz.jsonl"
            entry = write_shard(quiz, procedural.generate_quiz(
                self.recipe.procedural.num_facts, self.recipe.seed,
                public_share=self.recipe.procedural.quiz_public_share))
            m["quiz"] = {"file": "quiz.jsonl", **entry}

    def _teacher_backend(self):
        if self.recipe.backend == "local":
            from effilm.synth.local import LocalBackend, load_generator

            return LocalBackend(self.recipe, self.generator or load_generator(self.recipe.local.checkpoint))
        from effilm.synth.openai_backend import BudgetMeter, OpenAIBackend, RequestCache

        key = os.environ.get(self.api_key_env)
        if key is None:
            self.log(f"note: ${self.api_key_env} is not set; sending requests without an API key")
        self.meter = BudgetMeter(self.recipe.budget)
        return OpenAIBackend(self.recipe, RequestCache(self.out / "cache"), self.meter, key)

    def _run_teacher(self, m, todo, summary):
        import asyncio

        from effilm.synth.openai_backend import BudgetExhausted
        from effilm.synth.prompts import make_job

        backend = self._teacher_backend()
        try:
            for st, name, s, e in todo:
                jobs = [make_job(self.recipe, i) for i in range(s, e)]
                recs = asyncio.run(backend.run(jobs)) if self.recipe.backend == "openai" else backend.run(jobs)
                entry = write_shard(self.out / st.name / name, recs)
                self._record(m, st.name, name, {"start": s, "end": e, **entry}, summary)
        except BudgetExhausted as exc:
            summary["stopped"] = str(exc)
            hint = ("check the server and the recipe's [openai] settings" if exc.failing
                    else "re-run with a larger budget to resume")  # fmt: skip
            self.log(f"stopped: {exc}. Replies received so far are cached; {hint}.")
        finally:
            if self.recipe.backend == "openai":
                mt = self.meter
                summary["usage"] = {"requests": mt.requests, "tokens": mt.tokens, "cache_hits": mt.cache_hits,
                                    "retries": mt.retries, "errors": dict(mt.errors)}

    def dry_run(self, todo) -> dict:
        """What the run would do: records per stream and, for openai, requests and tokens to pay."""
        plan = {"backend": self.recipe.backend, "shards_to_write": len(todo),
                "records_to_write": sum(e - s for _, _, s, e in todo)}
        if self.recipe.backend == "openai":
            from effilm.synth.openai_backend import RequestCache, build_request, estimate_tokens, request_key
            from effilm.synth.prompts import make_job

            cache = RequestCache(self.out / "cache")
            reqs = toks = hits = 0
            for _, _, s, e in todo:
                for i in range(s, e):
                    job = make_job(self.recipe, i)
                    if cache.has(request_key(*build_request(self.recipe, job))):
                        hits += 1
                    else:
                        reqs, toks = reqs + 1, toks + estimate_tokens(self.recipe, job)
            b = self.recipe.budget
            plan.update({"requests": reqs, "max_tokens": toks, "cached": hits,
                         "budget_max_requests": b.max_requests, "budget_max_tokens": b.max_tokens,
                         "fits_budget": (not b.max_requests or reqs <= b.max_requests)
                         and (not b.max_tokens or toks <= b.max_tokens)})
        return plan


def read_records(path: str | Path):
    """Records of every shard under a run directory (or a single JSONL file), streamed."""
    path = Path(path)
    files = sorted(path.rglob("shard-*.jsonl")) if path.is_dir() else [path]
    for f in files:
        for _, rec in iter_jsonl(f):
            yield rec


def print_run_result(result: dict, dry_run: bool) -> int:
    """Print a teacher run's result (``effilm synth``, ``effilm annotate``) as the CLI shows it and
    return its exit status: 0 when complete (or a dry run), 3 when requests are still outstanding."""
    if dry_run:
        print("dry run (nothing sent, nothing written):")
        for k, v in result.items():
            print(f"  {k:22s} {v}")
        return 0
    print(json.dumps(result, indent=2))
    return 0 if result.get("complete") else 3
