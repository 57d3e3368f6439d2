"""The ``procedural`` backend: textbook and web-like corpora plus a held-out quiz, no model needed.

Every record is a pure function of ``(seed, index)`` and the generator's arguments, so a run is
deterministic, shards can be generated in any order by any worker, and a resumed run rebuilds
exactly the records it lacks.

Python API (what the demo calls)::

    from effilm.synth import procedural
    facts = procedural.select_facts(200, seed=0)
    for rec in procedural.generate_corpus(2000, num_facts=200, seed=0): ...
    for rec in procedural.generate_web_corpus(2000, num_facts=200, seed=0): ...
    for rec in procedural.generate_chat(1000, num_facts=200, seed=0): ...          # SFT conversations
    for rec in procedural.generate_preferences(1000, num_facts=200, seed=0): ...   # DPO pairs
    quiz = procedural.generate_quiz(num_facts=200, seed=0)   # MMLU-format dicts

The chat and preference records ask about the same facts in the exercise and conversational
phrasings (``domain_facts.CHAT``), never the quiz's, so a chat-form quiz measures whether the model
learned to answer, not the questions.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from effilm.errors import ConfigError
from effilm.synth import domain_facts as F
from effilm.synth import domain_math, domain_python, domain_units
from effilm.synth.records import make_record
from effilm.synth.voice import AUDIENCES, EXERCISE_HEADINGS, STYLES, Voice

COMPUTED = {**domain_math.GENERATORS, **domain_units.GENERATORS, **domain_python.GENERATORS}
COMPUTED_TOPICS = {**domain_math.TOPICS, **domain_units.TOPICS, **domain_python.TOPICS}
ALL_DOMAINS = ("facts", *COMPUTED)
select_facts = F.select_facts


@dataclass
class ProceduralConfig:
    """Sizes and mix of the procedural corpora; the ``[procedural]`` table of a recipe."""

    num_facts: int = field(default=200, metadata={"help": "facts drawn from the bundled tables"})
    records: int = field(default=2000, metadata={"help": "textbook records to write"})
    web_records: int = field(default=2000, metadata={"help": "web-like records to write (0 for none)"})
    quiz: bool = field(default=True, metadata={"help": "write the held-out MMLU-format quiz"})
    quiz_public_share: float = field(default=1.0, metadata={
        "help": "share of the facts the quiz asks about; the others are taught but held back for private "
                "twin benchmarks (effilm twin make --kind quiz --public-share)"})
    domains: list[str] = field(default_factory=lambda: list(ALL_DOMAINS),
                               metadata={"help": f"domains to mix, from {list(ALL_DOMAINS)}"})
    facts_share: float = field(default=0.6, metadata={"help": "fraction of textbook records on table facts"})
    facts_per_record: int = field(default=6, metadata={"help": "facts taught by one textbook record"})
    restatements: int = field(default=2, metadata={"help": "wordings of each fact within one lesson"})
    problems_per_record: int = field(default=3, metadata={"help": "computed problems in one record"})
    web_facts_per_record: int = field(default=2, metadata={"help": "facts buried in one web record"})
    web_noise_sentences: int = field(default=4, metadata={"help": "distractor sentences per web record"})
    web_varied: bool = field(default=False, metadata={
        "help": "vary web records' quality: each states 0..2x web_facts_per_record facts among 0..2x "
                "web_noise_sentences distractors (seeded), so a learned quality filter has something to learn"})
    chat_records: int = field(default=0, metadata={"help": "chat conversations (SFT data) to write (0 for none)"})
    preference_records: int = field(default=0, metadata={"help": "preference pairs (DPO data) to write (0 for none)"})
    turns_per_chat: int = field(default=3, metadata={"help": "most question-and-answer turns in one conversation"})

    def __post_init__(self):
        for name in ("num_facts", "facts_per_record", "restatements", "problems_per_record",
                     "web_facts_per_record", "turns_per_chat"):
            if getattr(self, name) < 1:
                raise ConfigError(f"procedural.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("records", "web_records", "web_noise_sentences", "chat_records", "preference_records"):
            if getattr(self, name) < 0:
                raise ConfigError(f"procedural.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.quiz_public_share <= 1.0:
            raise ConfigError(f"procedural.quiz_public_share must lie in (0, 1], got {self.quiz_public_share}")
        if not 0.0 <= self.facts_share <= 1.0:
            raise ConfigError(f"procedural.facts_share must be in [0, 1], got {self.facts_share}")
        bad = [d for d in self.domains if d not in ALL_DOMAINS]
        if bad or not self.domains:
            raise ConfigError(f"procedural.domains: unknown {bad or 'empty list'}; choose from {list(ALL_DOMAINS)}")


def _facts_body(rng: random.Random, voice: Voice, facts: list[F.Fact], cfg: ProceduralConfig, kind: str) -> str:
    if kind == "lesson":
        sentences = []
        for _ in range(cfg.restatements):
            order = facts[:]
            rng.shuffle(order)
            sentences.extend(F.statement(rng, f) for f in order)
        body = voice.join(sentences)
        recap = [f"Question: {F.exercise_question(rng, f)}\nAnswer: {f.answer}" for f in facts[:2]]
        review = rng.choice(["Quick review", "Check your memory", "Self-test"])
        return f"{body}\n\n{review}:\n\n" + "\n\n".join(recap)
    lines = [rng.choice(EXERCISE_HEADINGS)]
    for n, f in enumerate(facts, 1):
        q = F.exercise_question(rng, f)
        if rng.random() < 0.5:
            lines.append(f"Question: {q}\nAnswer: {f.answer}")
        else:
            lines.append(f"Exercise {n}. {q}\nSolution: {F.statement(rng, f)} The answer is {f.answer}.")
    return "\n\n".join(lines)


def _computed_body(rng: random.Random, voice: Voice, domain: str, cfg: ProceduralConfig, kind: str) -> str:
    gen = COMPUTED[domain]
    problems = [gen(rng) for _ in range(cfg.problems_per_record)]
    if kind == "lesson":
        return "\n\n".join(domain_math.worked(rng, p) for p in problems)
    parts = [rng.choice(EXERCISE_HEADINGS)]
    parts += [domain_math.exercise(rng, n, p) for n, p in enumerate(problems, 1)]
    return "\n\n".join(parts)


def corpus_record(index: int, *, seed: int, facts: list[F.Fact], cfg: ProceduralConfig) -> dict:
    """Textbook record ``index``: a lesson or an exercise set, on table facts or a computed domain."""
    rng = random.Random(f"textbook:{seed}:{index}")
    audience, style = rng.choice(sorted(AUDIENCES)), rng.choice(sorted(STYLES))
    voice = Voice(rng, audience, style)
    kind = rng.choice(["lesson", "exercises"])
    computed = [d for d in cfg.domains if d != "facts"]
    use_facts = "facts" in cfg.domains and (not computed or rng.random() < cfg.facts_share)
    extra: dict = {}
    if use_facts:
        relation = rng.choice(sorted({f.relation for f in facts}))
        pool = [f for f in facts if f.relation == relation]
        chosen = rng.sample(pool, min(cfg.facts_per_record, len(pool)))
        topic_id, topic = f"facts/{relation}", F.TOPICS[relation]
        body = _facts_body(rng, voice, chosen, cfg, kind)
        extra["facts"] = [f.id for f in chosen]
    else:
        domain = rng.choice(computed)
        topic_id, topic = domain, COMPUTED_TOPICS[domain]
        body = _computed_body(rng, voice, domain, cfg, kind)
    text = voice.wrap(topic, body)
    return make_record(
        f"textbook-{seed}-{index:09d}", text, backend="procedural", model=None,
        prompt=f"procedural:{topic_id}/{kind}", topic=topic_id, audience=audience, style=style,
        kind=kind, injected_words=[], seed=seed, sampling={}, extra=extra or None,
    )


_NOISE = [
    "Click here to subscribe to our newsletter!", "Posted {n} days ago by user{n}.",
    "Sponsored: cheap flights and hotel deals, book now.", "Reply | Share | Report",
    "the weather was awful all weekend tbh", "Cookies help us deliver our services.",
    "anyone know a good pizza place near the station?", "Top 10 tips you won't believe, number {n} is wild.",
    "edit: fixed a typo", "Read more >>", "my cat knocked the coffee over again",
    "Loading comments...", "Related posts: {n} things to do this summer",
]


def web_record(index: int, *, seed: int, facts: list[F.Fact], cfg: ProceduralConfig) -> dict:
    """Web-like record ``index``: the same facts in loose prose, buried among distractor text."""
    rng = random.Random(f"web:{seed}:{index}")
    n_facts, n_noise = cfg.web_facts_per_record, cfg.web_noise_sentences
    if cfg.web_varied:  # its own stream, so the default records stay exactly as they were
        vary = random.Random(f"web-quality:{seed}:{index}")
        n_facts, n_noise = vary.randint(0, 2 * n_facts), vary.randint(0, 2 * n_noise)
        if n_facts + n_noise == 0:
            n_noise = 1
    chosen = rng.sample(facts, min(n_facts, len(facts)))
    lines = [rng.choice(_NOISE).format(n=rng.randint(2, 99)) for _ in range(n_noise)]
    for f in chosen:
        lines.insert(rng.randint(0, len(lines)), F.web_statement(rng, f))
    text = "\n".join(lines)
    # what the generator knows, for the procedural annotator: facts stated and distractor lines
    return make_record(
        f"web-{seed}-{index:09d}", text, backend="procedural", model=None, prompt="procedural:web",
        topic="web", audience="web", style="web", kind="web", injected_words=[], seed=seed,
        sampling={}, extra={"facts": [f.id for f in chosen], "noise_lines": n_noise},
    )


SYSTEM_PROMPTS = ["Answer with just the answer.", "You are a helpful tutor. Answer briefly.",
                  "Give short, exact answers."]  # fmt: skip


def _question(rng: random.Random, facts: list[F.Fact], domains: list[str]) -> tuple[str, str, str | None]:
    """``(question, answer, fact id or None)``: a table fact asked in an exercise or chat phrasing
    (never a quiz phrasing), or a computed problem."""
    computed = [d for d in domains if d != "facts"]
    if "facts" in domains and (not computed or rng.random() < 0.75):
        f = rng.choice(facts)
        return F.chat_question(rng, f), f.answer, f.id
    p = COMPUTED[rng.choice(computed)](rng)
    return p.question, str(p.answer), None


def _transcript(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def chat_record(index: int, *, seed: int, facts: list[F.Fact], cfg: ProceduralConfig) -> dict:
    """Chat record ``index``: one to ``turns_per_chat`` question-and-answer turns (``messages`` in
    OpenAI's format); the assistant answers with the bare answer. ``text`` is a plain transcript,
    for the tools that read text (dedup, decontam)."""
    rng = random.Random(f"chat:{seed}:{index}")
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    taught = []
    for _ in range(rng.randint(1, cfg.turns_per_chat)):
        question, answer, fact = _question(rng, facts, cfg.domains)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": f"{answer}."}]
        taught += [fact] if fact else []
    rec = make_record(
        f"chat-{seed}-{index:09d}", _transcript(messages), backend="procedural", model=None, prompt="procedural:chat",
        topic="chat", audience="chat", style="chat", kind="chat", injected_words=[], seed=seed, sampling={},
        extra={"facts": taught},
    )  # fmt: skip
    return {"id": rec["id"], "messages": messages, **{k: v for k, v in rec.items() if k != "id"}}


def preference_record(index: int, *, seed: int, facts: list[F.Fact], cfg: ProceduralConfig) -> dict:
    """Preference record ``index``: a table-fact question (exercise or chat phrasing), the right answer as
    ``chosen`` and a plausible wrong one as ``rejected``: half the time (where there is one) the
    answer to another question about the same subject (its atomic number when asked for its
    symbol), otherwise the quiz's kind of distractor."""
    rng = random.Random(f"prefs:{seed}:{index}")
    f = rng.choice(facts)
    prompt = [{"role": "user", "content": F.chat_question(rng, f)}]
    confusions = F.other_relations(f)
    wrong = rng.choice(confusions) if confusions and rng.random() < 0.5 else F.distractors(rng, f, 1)[0]
    rec = make_record(
        f"prefs-{seed}-{index:09d}", _transcript(prompt), backend="procedural", model=None, prompt="procedural:prefs",
        topic="prefs", audience="chat", style="chat", kind="preference", injected_words=[], seed=seed, sampling={},
        extra={"facts": [f.id]},
    )  # fmt: skip
    return {"id": rec["id"], "prompt": prompt, "chosen": f"{f.answer}.", "rejected": f"{wrong}.",
            **{k: v for k, v in rec.items() if k != "id"}}  # fmt: skip


def _config(cfg: ProceduralConfig | None, **overrides) -> ProceduralConfig:
    import dataclasses

    base = cfg or ProceduralConfig()
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _records(make, n_records: int, num_facts: int, seed: int, start: int, cfg) -> Iterator[dict]:
    """``make(i, ...)`` for records ``start .. start+n_records-1`` over the seed's facts."""
    cfg = _config(cfg, num_facts=num_facts)
    facts = F.select_facts(cfg.num_facts, seed)
    for i in range(start, start + n_records):
        yield make(i, seed=seed, facts=facts, cfg=cfg)


def generate_corpus(n_records: int, num_facts: int = 200, seed: int = 0, *, start: int = 0,
                    cfg: ProceduralConfig | None = None) -> Iterator[dict]:
    """Yield textbook records ``start .. start+n_records-1`` (deterministic given the seed)."""
    return _records(corpus_record, n_records, num_facts, seed, start, cfg)


def generate_web_corpus(n_records: int, num_facts: int = 200, seed: int = 0, *, start: int = 0,
                        cfg: ProceduralConfig | None = None) -> Iterator[dict]:
    """Yield web-like records ``start .. start+n_records-1`` (deterministic given the seed)."""
    return _records(web_record, n_records, num_facts, seed, start, cfg)


def generate_chat(n_records: int, num_facts: int = 200, seed: int = 0, *, start: int = 0,
                  cfg: ProceduralConfig | None = None) -> Iterator[dict]:
    """Yield chat records ``start .. start+n_records-1`` (deterministic given the seed)."""
    return _records(chat_record, n_records, num_facts, seed, start, cfg)


def generate_preferences(n_records: int, num_facts: int = 200, seed: int = 0, *, start: int = 0,
                         cfg: ProceduralConfig | None = None) -> Iterator[dict]:
    """Yield preference records ``start .. start+n_records-1`` (deterministic given the seed)."""
    return _records(preference_record, n_records, num_facts, seed, start, cfg)


def quiz_split(num_facts: int, seed: int, public_share: float = 1.0) -> tuple[list[F.Fact], list[F.Fact]]:
    """The seed's facts (``select_facts`` order) split into the public quiz's and the held-back
    ones, relation by relation: each relation keeps ``round(public_share * n)`` of its ``n`` facts
    public (at least one, and at least one held back when ``public_share < 1`` and ``n > 1``), so
    both parts have the same mix of relations. The held-back facts are taught by the corpora like
    the others but never quizzed: the private twins (:mod:`effilm.synth.twins`) ask about them."""
    if not 0.0 < public_share <= 1.0:
        raise ConfigError(f"quiz public_share must lie in (0, 1], got {public_share}")
    facts = F.select_facts(num_facts, seed)
    if public_share == 1.0:
        return facts, []
    held: set[str] = set()
    for rel in sorted({f.relation for f in facts}):
        ids = [f.id for f in facts if f.relation == rel]
        random.Random(f"quiz-split:{seed}:{rel}").shuffle(ids)
        n = len(ids)
        keep = min(max(1, round(public_share * n)), n - 1) if n > 1 else n
        held.update(ids[keep:])
    return [f for f in facts if f.id not in held], [f for f in facts if f.id in held]


def quiz_items(f: F.Fact, rng: random.Random, questions_per_fact: int = 1) -> list[dict]:
    """MMLU-format items about fact ``f``: a phrasing from ``domain_facts.QUIZ`` drawn by ``rng``
    (then the next ones), three plausible distractors, the choices shuffled."""
    first = rng.randrange(len(F.QUIZ[f.relation]))
    items = []
    for q in range(questions_per_fact):
        choices = [f.answer, *F.distractors(rng, f, 3)]
        rng.shuffle(choices)
        items.append({"question": F.quiz_question(first + q, f), "subject": F.SUBJECTS[f.relation],
                      "choices": choices, "answer": choices.index(f.answer)})
    return items


def generate_quiz(num_facts: int = 200, seed: int = 0, questions_per_fact: int = 1,
                  public_share: float = 1.0) -> list[dict]:
    """The held-out quiz: one MMLU-format item per fact and phrasing, in ``select_facts`` order.

    Items are ``{"question", "subject", "choices" (4), "answer" (0-3)}``. The phrasings come
    from ``domain_facts.QUIZ``, which the corpora never use; distractors are plausible (capitals
    of the same continent, symbols sharing a letter, nearby atomic numbers). With
    ``public_share < 1`` the quiz asks only the public part of :func:`quiz_split` (an item does not
    depend on the share: it is seeded by its fact).
    """
    if questions_per_fact < 1:
        raise ConfigError(f"questions_per_fact must be at least 1, got {questions_per_fact}")
    public, _ = quiz_split(num_facts, seed, public_share)
    return [it for f in public for it in quiz_items(f, random.Random(f"quiz:{seed}:{f.id}"), questions_per_fact)]
