"""Private twin benchmarks: fresh items of the same templates as a public benchmark effilm can
generate, which no training corpus can contain.

n-gram decontamination sees verbatim leaks only. A model that saw a benchmark paraphrased, or was
tuned to its style, scores higher on the public items than on equally hard items it cannot have
seen; :mod:`effilm.eval.twins` measures that gap. This module writes the two sets:

* ``quiz``: the procedural MMLU-format quiz. Its items ask about facts the corpora teach, so a twin
  must ask about a fact the corpora teach too, or a clean model would lose points for knowledge
  it was never given. The seed's facts are therefore split relation by relation
  (``procedural.quiz_split``): the public quiz asks ``public_share`` of them, the twins ask the
  held-back rest, each in the public quiz's phrasings (``domain_facts.QUIZ``) with fresh
  distractors and choice order drawn from ``twin_seed``. The corpora teach both parts alike. For
  the public part to be the quiz a corpus was checked against, synthesize with
  ``procedural.quiz_public_share`` equal to ``public_share`` (the demo does).
* ``math``: GSM8K-format arithmetic word problems (``domain_word``). Twin ``i`` uses public problem
  ``i``'s template with new names and numbers from ``twin_seed``.

``make_twins`` writes ``public.jsonl``, ``twins.jsonl``, ``dev.jsonl`` (few-shot examples, disjoint
from both) and ``twins.json``: the kind, the generator's settings and seeds, and each file's item
count and sha256, which :func:`effilm.eval.twins.evaluate_twins` checks and copies into its report.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from effilm.errors import ConfigError, EffilmError
from effilm.io import atomic_dir

KINDS = ("quiz", "math")
SPEC_FILE = "twins.json"
FILES = {"public": "public.jsonl", "twins": "twins.jsonl", "dev": "dev.jsonl"}
SCHEMA = 1
COMMAND = "twin make"  # the output marker of the directory it writes


@dataclass
class TwinConfig:
    kind: str = field(default="quiz", metadata={"help": f"the benchmark kind: {' or '.join(KINDS)}"})
    seed: int = field(default=0, metadata={"help": "the public benchmark's seed (for quiz: the procedural "
                                                   "recipe's seed, which also chose the corpus's facts)"})
    twin_seed: int = field(default=1, metadata={"help": "seed of the twins' draws (phrasing, distractors, "
                                                        "names, numbers)"})
    num_facts: int = field(default=200, metadata={"help": "quiz: facts the corpora teach (procedural.num_facts)"})
    public_share: float = field(default=0.5, metadata={"help": "quiz: share of the facts in the public quiz "
                                                               "(procedural.quiz_public_share); twins ask the rest"})
    questions_per_fact: int = field(default=1, metadata={"help": "quiz: items per fact"})
    items: int = field(default=200, metadata={"help": "math: public problems (and as many twins)"})
    dev_items: int = field(default=16, metadata={"help": "few-shot examples written to dev.jsonl (quiz: about facts "
                                                         "the corpora do not teach; none when they teach every one)"})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"twin.kind={self.kind!r} must be one of {', '.join(KINDS)}")
        for name in ("num_facts", "questions_per_fact", "items"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"twin.{name}={v!r} must be an integer >= 1")
        for name in ("seed", "twin_seed", "dev_items"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"twin.{name}={v!r} must be an integer >= 0")
        if not 0.0 < self.public_share < 1.0:
            raise ConfigError(f"twin.public_share={self.public_share} must lie in (0, 1): the twins ask the facts "
                              "the public quiz leaves out")

    def generator(self) -> dict:
        """The settings that determine the items (what ``twins.json`` records)."""
        keys = ("num_facts", "public_share", "questions_per_fact") if self.kind == "quiz" else ("items",)
        return {"kind": self.kind, "seed": self.seed, "twin_seed": self.twin_seed, "dev_items": self.dev_items,
                **{k: getattr(self, k) for k in keys}}


def quiz_sets(cfg: TwinConfig) -> dict[str, list[dict]]:
    """The public quiz (the very items ``procedural.generate_quiz`` writes), its twins (the
    held-back facts, phrased and distracted from ``twin_seed``) and few-shot examples about facts
    outside the seed's selection."""
    from effilm.synth import domain_facts as F
    from effilm.synth import procedural as P

    public = P.generate_quiz(cfg.num_facts, cfg.seed, cfg.questions_per_fact, cfg.public_share)
    _, held = P.quiz_split(cfg.num_facts, cfg.seed, cfg.public_share)
    twins = [it for f in held for it in
             P.quiz_items(f, random.Random(f"twin:{cfg.seed}:{cfg.twin_seed}:{f.id}"), cfg.questions_per_fact)]
    taught = {f.id for f in F.select_facts(cfg.num_facts, cfg.seed)}
    outside = [f for f in F.fact_universe() if f.id not in taught]
    random.Random(f"twin-dev:{cfg.seed}").shuffle(outside)
    dev = [it for f in outside[:cfg.dev_items] for it in P.quiz_items(f, random.Random(f"dev:{f.id}"))]
    return {"public": public, "twins": twins, "dev": dev}


def math_sets(cfg: TwinConfig) -> dict[str, list[dict]]:
    """Public word problems, a twin of each (same template, new names and numbers; never the
    same question) and few-shot examples from a third stream."""
    from effilm.synth.domain_word import TEMPLATES, generate_word_problems, word_problem

    public = generate_word_problems(cfg.items, cfg.seed)
    seen = {p.question for p in public}
    rng = random.Random(f"word-twin:{cfg.seed}:{cfg.twin_seed}")
    twins = []
    for p in public:
        for _ in range(100):
            t = word_problem(rng, p.template)
            if t.question not in seen:
                break
        else:
            raise EffilmError(f"math twins: template {p.template} gave no new question in 100 draws")
        seen.add(t.question)
        twins.append(t)
    dev_rng = random.Random(f"word-dev:{cfg.seed}")
    dev = []
    while len(dev) < cfg.dev_items:
        d = word_problem(dev_rng, len(dev) % len(TEMPLATES))
        if d.question not in seen:
            seen.add(d.question)
            dev.append(d)
    return {name: [p.record(f"{name}/{i}") for i, p in enumerate(items)]
            for name, items in (("public", public), ("twins", twins), ("dev", dev))}


def make_twins(cfg: TwinConfig, out: str | Path) -> dict:
    """Write the public set, its twins, the few-shot set and ``twins.json`` as the directory
    ``out`` (built aside and renamed into place; the caller claims ``out`` first, see
    :mod:`effilm.outputs`); returns the spec."""
    sets = quiz_sets(cfg) if cfg.kind == "quiz" else math_sets(cfg)
    if not sets["twins"]:
        raise EffilmError(f"twins: no fact is held back from the public quiz ({cfg.num_facts} facts, public_share "
                          f"{cfg.public_share}); raise num_facts or lower public_share")
    spec: dict = {"schema": SCHEMA, "generator": cfg.generator(), "files": {}}
    with atomic_dir(out, mark=COMMAND) as tmp:
        for name, items in sets.items():
            text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
            (tmp / FILES[name]).write_text(text, encoding="utf-8")
            spec["files"][name] = {"path": FILES[name], "items": len(items),
                                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    return spec
