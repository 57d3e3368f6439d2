"""Data configs: tokenizer training, tokenization into shards, sources, stages and mixtures.

Plain dataclasses of serialisable fields. Every check that can fail raises ``ConfigError``
naming the field; :mod:`effilm.config.reader` builds them from data (unknown keys rejected with a
did-you-mean hint), so a TOML run file maps one-to-one onto these classes::

    [data]
    seq_len = 1024
    seed = 0

    [[data.sources]]
    name = "web"
    path = "tokens/web"

    [[data.stages]]
    name = "stage1"
    tokens = 1_000_000_000
    mixture = { web = 1.0 }

    [[data.stages]]
    name = "stage2"
    tokens = 200_000_000
    mixture = { "web-filtered" = 0.6, synthetic = 0.4 }
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from effilm.config.reader import build
from effilm.config.reader import option as _f
from effilm.errors import ConfigError, closest

TEXT_SPLITS = ("paragraph", "line", "file")
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|end|>"
# Phi-3 style turns: "<|user|>\n...<|end|>\n<|assistant|>\n". Roles outside CHAT_ROLES raise.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _check_pos(obj, where: str, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{where}.{name}={v!r} must be a positive integer")


@dataclass
class TokenizerTrainConfig:
    """Byte-level BPE training (``effilm tokenizer train``)."""

    vocab_size: int = _f(32000, "Final vocabulary size, special tokens included.")
    text_field: str = _f("text", "JSONL / parquet field that holds the document text.")
    text_split: str = _f("paragraph", f"Plain-text documents: one of {TEXT_SPLITS} (blank-line blocks, single lines or whole files).")
    min_frequency: int = _f(2, "A pair must occur this often to be merged.")
    eos_token: str = _f(EOS_TOKEN, "End-of-text token; also used as BOS (GPT-2 convention).")
    pad_token: str = _f(PAD_TOKEN, "Padding token.")
    chat_tokens: bool = _f(True, "Add <|system|>, <|user|>, <|assistant|> and <|end|> as special tokens.")
    chat_template: str = _f(DEFAULT_CHAT_TEMPLATE, "Jinja chat template stored in tokenizer_config.json ('' for none).")
    model_max_length: int = _f(4096, "model_max_length written to tokenizer_config.json.")

    def __post_init__(self) -> None:
        _check_pos(self, "tokenizer", "vocab_size", "min_frequency", "model_max_length")
        if self.text_split not in TEXT_SPLITS:
            raise ConfigError(f"tokenizer.text_split={self.text_split!r} must be one of {TEXT_SPLITS}")
        if self.vocab_size < 256 + len(self.special_tokens()):
            raise ConfigError(
                f"tokenizer.vocab_size={self.vocab_size} must hold the 256 byte tokens plus "
                f"{len(self.special_tokens())} special tokens"
            )
        if not self.eos_token or not self.pad_token or self.eos_token == self.pad_token:
            raise ConfigError("tokenizer.eos_token and tokenizer.pad_token must be distinct, non-empty strings")

    def special_tokens(self) -> list[str]:
        extra = [f"<|{r}|>" for r in CHAT_ROLES] + [END_OF_TURN] if self.chat_tokens else []
        return [self.eos_token, self.pad_token, *extra]


@dataclass
class TokenizeConfig:
    """Turning text files into token shards (``effilm data tokenize``)."""

    text_field: str = _f("text", "JSONL / parquet field that holds the document text.")
    text_split: str = _f("paragraph", f"Plain-text documents: one of {TEXT_SPLITS} (blank-line blocks, single lines or whole files).")
    shard_tokens: int = _f(1 << 26, "Start a new shard once the current one holds at least this many tokens.")
    workers: int = _f(1, "Tokenizer processes; output is identical for any number.")
    batch_docs: int = _f(512, "Documents encoded per call (and per work item sent to a worker).")
    chat: bool = _f(False, "Chat data: JSONL records with 'messages' (or 'prompt' and 'completion') rendered by the "
                    "tokenizer's chat template, with a per-token loss mask (1 on assistant turns) beside the shards.")
    preferences: bool = _f(False, "Preference data for DPO: JSONL records with 'prompt', 'chosen' and 'rejected', "
                           "each pair rendered by the chat template with its answers' tokens masked in.")

    def __post_init__(self) -> None:
        _check_pos(self, "tokenize", "shard_tokens", "workers", "batch_docs")
        if self.text_split not in TEXT_SPLITS:
            raise ConfigError(f"tokenize.text_split={self.text_split!r} must be one of {TEXT_SPLITS}")
        if not self.text_field:
            raise ConfigError("tokenize.text_field must be a non-empty field name")
        if self.chat and self.preferences:
            raise ConfigError("tokenize: give chat or preferences, not both")


@dataclass
class SourceConfig:
    """One named source: a token dataset directory written by ``effilm data tokenize``."""

    name: str = _f("", "Name that stage mixtures refer to.")
    path: str = _f("", "Token dataset directory (holds manifest.json and the shards).")
    val_sequences: int = _f(0, "Packed sequences (pairs, for preference data) held out for validation; their documents never reach training.")
    verify: bool = _f(True, "Check every shard's sha256 against the manifest when the loader opens it.")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("data.sources[].name must be a non-empty string")
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"data.sources[{self.name!r}].path must be a non-empty path")
        if isinstance(self.val_sequences, bool) or not isinstance(self.val_sequences, int) or self.val_sequences < 0:
            raise ConfigError(f"data.sources[{self.name!r}].val_sequences={self.val_sequences!r} must be an integer >= 0")


@dataclass
class StageConfig:
    """One training stage: a token budget and a weighted mixture of named sources."""

    name: str = _f("", "Stage name, reported by the loader (e.g. 'stage1').")
    tokens: int = _f(0, "Token budget: the stage lasts ceil(tokens / (global_batch * seq_len)) optimizer steps.")
    mixture: dict[str, float] = _f(
        help="Source name -> weight (any positive scale: 60/40 and 0.6/0.4 are the same).", factory=dict
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("data.stages[].name must be a non-empty string")
        where = f"data.stages[{self.name!r}]"
        _check_pos(self, where, "tokens")
        if not isinstance(self.mixture, dict) or not self.mixture:
            raise ConfigError(f"{where}.mixture must map at least one source name to a weight")
        for src, w in self.mixture.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ConfigError(f"{where}.mixture[{src!r}]={w!r}: weights must be positive numbers")

    def weights(self) -> dict[str, float]:
        """The mixture normalised to sum to 1."""
        total = float(sum(self.mixture.values()))
        return {k: float(v) / total for k, v in self.mixture.items()}


@dataclass
class DataConfig:
    """Sources, the stage schedule and packing: everything the staged loader needs."""

    sources: list[SourceConfig] = _f(help="Named token datasets.", factory=list)
    stages: list[StageConfig] = _f(help="Stages in order; each draws from its mixture until its budget.", factory=list)
    seq_len: int = _f(1024, "Sequence length; each packed row holds seq_len + 1 tokens (inputs and shifted targets).")
    seed: int = _f(0, "Seed for mixture draws, epoch shuffles and the validation split.")
    doc_ids: bool | None = _f(None, "Return per-row document ids so the model masks attention across documents; "
                              "None = on for chat data (sources with loss masks), off otherwise.")

    def __post_init__(self) -> None:
        self.sources = [build(SourceConfig, s, "data.sources[]") for s in self.sources]
        self.stages = [build(StageConfig, s, "data.stages[]") for s in self.stages]
        _check_pos(self, "data", "seq_len")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"data.seed={self.seed!r} must be an integer >= 0")
        if not self.sources:
            raise ConfigError("data.sources must list at least one source")
        if not self.stages:
            raise ConfigError("data.stages must list at least one stage")
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.sources: duplicate source name(s) {dup}")
        stage_names = [s.name for s in self.stages]
        dup = sorted({n for n in stage_names if stage_names.count(n) > 1})
        if dup:
            raise ConfigError(f"data.stages: duplicate stage name(s) {dup}")
        for st in self.stages:
            for src in st.mixture:
                if src not in names:
                    near = closest(src, names)
                    hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
                    raise ConfigError(
                        f"data.stages[{st.name!r}].mixture names unknown source {src!r}{hint}; sources are {names}"
                    )

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise ConfigError(f"no data source named {name!r}")

    def to_dict(self) -> dict:
        return asdict(self)
