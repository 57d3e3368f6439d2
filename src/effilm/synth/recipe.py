"""Synthesis recipes: TOML files that map one-to-one onto these dataclasses.

A recipe names the seed topics (listed, or read from a file), the audiences and styles (each with
its own instruction), the output kinds, the words to inject, the sampling parameters, the budget
and the backend settings. Unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from effilm.config.reader import apply_overrides, build, read_file, tomllib
from effilm.errors import ConfigError
from effilm.io import read_text
from effilm.synth.procedural import ProceduralConfig

BACKENDS = ("procedural", "openai", "local")


@dataclass
class Instructed:
    """An audience, a style or an output kind: an id and its own instruction text."""

    id: str = field(default="", metadata={"help": "short identifier stored in provenance"})
    instruction: str = field(default="", metadata={"help": "text added to the prompt for this choice"})

    def __post_init__(self):
        if not self.id or not self.instruction:
            raise ConfigError(f"every audience/style/kind needs an 'id' and an 'instruction' (got id={self.id!r})")


@dataclass
class Sampling:
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling threshold"})
    max_tokens: int = field(default=600, metadata={"help": "completion tokens per request"})

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ConfigError(f"sampling.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class Budget:
    """Caps for one invocation; 0 means no cap. Cache hits cost nothing."""

    max_requests: int = field(default=0, metadata={"help": "HTTP requests this run may send (retries count)"})
    max_tokens: int = field(default=0, metadata={"help": "prompt+completion tokens this run may spend"})

    def __post_init__(self):
        for name in ("max_requests", "max_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"budget.{name} must be >= 0 (0 = no cap), got {getattr(self, name)}")


@dataclass
class OpenAIConfig:
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"help": "server root, ending in /v1"})
    model: str = field(default="teacher", metadata={"help": "model name sent with each request"})
    endpoint: str = field(default="chat", metadata={"help": "'chat' (/chat/completions) or 'completions'"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the key"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once"})
    timeout_s: float = field(default=60.0, metadata={"help": "per-request timeout in seconds"})
    max_retries: int = field(default=6, metadata={"help": "retries per request after the first attempt"})
    backoff_base_s: float = field(default=0.5, metadata={"help": "first retry delay; doubles each retry"})
    backoff_max_s: float = field(default=30.0, metadata={"help": "largest backoff delay"})
    retry_after_max_s: float = field(default=120.0, metadata={"help": "longest Retry-After honoured"})

    def __post_init__(self):
        if self.endpoint not in ("chat", "completions"):
            raise ConfigError(f"openai.endpoint must be 'chat' or 'completions', got {self.endpoint!r}")
        if self.concurrency < 1:
            raise ConfigError(f"openai.concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_base_s < 0:
            raise ConfigError("openai.max_retries, timeout_s and backoff_base_s must be non-negative")


@dataclass
class LocalConfig:
    checkpoint: str = field(default="", metadata={"help": "effilm checkpoint directory for the local engine"})
    batch_size: int = field(default=8, metadata={"help": "prompts generated together"})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"local.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Recipe:
    name: str = field(default="recipe", metadata={"help": "prefix of record ids"})
    seed: int = field(default=0, metadata={"help": "base seed; every record derives its own from it"})
    backend: str = field(default="procedural", metadata={"help": f"one of {BACKENDS}"})
    records: int = field(default=1000, metadata={"help": "prompts (teacher backends) to run"})
    shard_size: int = field(default=1000, metadata={"help": "records per output shard"})
    topics: list[str] = field(default_factory=list, metadata={"help": "seed topics, listed"})
    topics_file: str = field(default="", metadata={"help": "file of seed topics, one per line (relative to the recipe)"})
    audiences: list[Instructed] = field(default_factory=list, metadata={"help": "[[audiences]] id + instruction"})
    styles: list[Instructed] = field(default_factory=list, metadata={"help": "[[styles]] id + instruction"})
    kinds: list[Instructed] = field(default_factory=list, metadata={"help": "[[kinds]] output kinds; instruction may use {topic}"})
    inject_words: int = field(default=2, metadata={"help": "random words injected into each prompt"})
    vocabulary: list[str] = field(default_factory=list, metadata={"help": "words to inject from"})
    sampling: Sampling = field(default_factory=Sampling, metadata={"help": "[sampling]"})
    budget: Budget = field(default_factory=Budget, metadata={"help": "[budget]"})
    openai: OpenAIConfig = field(default_factory=OpenAIConfig, metadata={"help": "[openai]"})
    local: LocalConfig = field(default_factory=LocalConfig, metadata={"help": "[local]"})
    procedural: ProceduralConfig = field(default_factory=ProceduralConfig, metadata={"help": "[procedural]"})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.records < 0 or self.shard_size < 1:
            raise ConfigError("records must be >= 0 and shard_size >= 1")
        if self.inject_words < 0 or (self.inject_words and len(self.vocabulary) < self.inject_words
                                     and self.backend != "procedural"):
            raise ConfigError(f"inject_words={self.inject_words} needs at least that many words in vocabulary")

    def content_hash(self) -> str:
        """Hash of what decides each record's content (not counts, budgets or retry settings)."""
        d = dataclasses.asdict(self)
        d.pop("budget")
        d.pop("records")  # counts only extend or shorten a run: record i is the same either way
        for k in ("records", "web_records"):
            d["procedural"].pop(k)
        if not d["procedural"]["web_varied"]:  # added later: at its default, earlier runs keep their hash
            d["procedural"].pop("web_varied")
        d["openai"] = {k: d["openai"][k] for k in ("base_url", "model", "endpoint")}
        d["local"].pop("batch_size")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def load_recipe(path: str | Path | None = None, overrides=()) -> Recipe:
    """Read a recipe TOML (the bundled default when ``path`` is None) through the one config
    reader, with dotted ``overrides`` (``{"backend": "local", "openai.model": "m"}``) applied."""
    if path is None:
        text = resources.files("effilm.synth").joinpath("recipes", "default.toml").read_text(encoding="utf-8")
        where, base = "default.toml", Path(".")
        data = tomllib.loads(text)
    else:
        where, base = str(path), Path(path).parent
        data = read_file(path, "recipe")
    try:
        recipe = build(Recipe, apply_overrides(Recipe, data, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if recipe.topics_file:
        tf = (base / recipe.topics_file) if not Path(recipe.topics_file).is_absolute() else Path(recipe.topics_file)
        if not tf.is_file():
            raise ConfigError(f"{where}: topics_file {tf} does not exist")
        recipe.topics = recipe.topics + [t.strip() for t in read_text(tf).splitlines() if t.strip()]
    return recipe


def check_teacher_recipe(recipe: Recipe) -> None:
    """A teacher-model run needs topics, audiences, styles and kinds."""
    for name in ("topics", "audiences", "styles", "kinds"):
        if not getattr(recipe, name):
            raise ConfigError(f"the {recipe.backend} backend needs at least one entry in '{name}'")
