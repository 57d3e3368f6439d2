"""Tokenizers: train a byte-level BPE, load any HF tokenizer directory, check it against a model.

* ``train_tokenizer(inputs, out, cfg)`` streams documents from JSONL (optionally .gz), plain text
  or parquet files into the ``tokenizers`` BPE trainer and writes ``tokenizer.json``,
  ``tokenizer_config.json`` and ``special_tokens_map.json`` (transformers' ``AutoTokenizer`` loads
  the directory). ``<|endoftext|>`` is both BOS and EOS (GPT-2 convention), ``<|pad|>`` pads, and
  the Phi-3 style chat tokens plus a chat template are added unless switched off.
* ``load_tokenizer(path)`` reads any directory holding a ``tokenizer.json`` (or the file itself)
  without importing transformers and returns a ``Tokenizer`` with ``encode``, ``decode``,
  ``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``, ``chat_template`` and ``sha256``.
* ``check_vocab(tokenizer, model_vocab_size)`` fails with a clear message when token ids could fall
  outside the model's embedding table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from effilm.config.data import TokenizerTrainConfig
from effilm.data.inputs import word_boundaries_cut
from effilm.errors import EffilmError
from effilm.io import atomic_dir, sha256_file
from effilm.outputs import claim_dir

# Token names tried, in order, when a tokenizer directory has no tokenizer_config.json entry.
_EOS_FALLBACKS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
_BOS_FALLBACKS = ("<s>", "<bos>", "<|begin_of_text|>")
_PAD_FALLBACKS = ("<|pad|>", "<pad>", "[PAD]")


# The files that make a tokenizer directory (effilm's own and HF's), copied beside a model.
LONG_TEXT_CHARS = 1 << 20  # documents longer than this are encoded and trained on piece by piece
BOUNDARY_CHECK_CHARS = 256  # characters either side of a cut whose encoding is compared with the joined text
TRAINING_REPORT = "training_report.json"  # what the tokenizer was trained on, and the vocabulary it reached
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer_files(src, dst) -> None:
    """Copy whichever of TOKENIZER_FILES ``src`` holds into ``dst``."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def train_tokenizer(inputs, out, cfg: TokenizerTrainConfig | None = None, overwrite: bool = False) -> Path:
    """Train a byte-level BPE on ``inputs`` (files, directories or globs) and save it to ``out``
    (an earlier tokenizer there is replaced only with ``overwrite``; see :mod:`effilm.outputs`)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from effilm.data.inputs import expand_inputs, iter_file

    cfg = cfg or TokenizerTrainConfig()
    files = expand_inputs(inputs)
    out = claim_dir(out, "tokenizer train", sources=files, overwrite=overwrite)

    seen = {"documents": 0, "chars": 0}

    def texts():
        for f in files:
            for doc in iter_file(f, cfg.text_field, cfg.text_split):
                if doc.text.strip():
                    seen["documents"] += 1
                    seen["chars"] += len(doc.text)
                # a long document in pieces cut before words: the same words counted, in bounded memory
                yield from (piece for _, piece in word_boundaries_cut(doc.text, LONG_TEXT_CHARS))

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=cfg.special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    if not seen["documents"]:
        raise EffilmError(f"no text in {len(files)} input file(s) ({', '.join(map(str, files[:3]))}"
                          f"{' ...' if len(files) > 3 else ''}): nothing to train a tokenizer on")  # fmt: skip
    if tok.get_vocab_size() < 256 + len(cfg.special_tokens()):
        raise EffilmError(f"tokenizer training on {len(files)} file(s) produced too small a vocabulary")
    reached = tok.get_vocab_size()
    report = {"requested_vocab_size": cfg.vocab_size, "vocab_size": reached, **seen,
              "inputs": [str(f) for f in files]}  # fmt: skip
    if reached < cfg.vocab_size:
        import warnings

        report["note"] = (f"the text allowed only {reached} tokens of the {cfg.vocab_size} requested (too little "
                          f"text, or min_frequency={cfg.min_frequency} too high)")  # fmt: skip
        warnings.warn(f"tokenizer {out}: {report['note']}", stacklevel=2)

    out = Path(out)
    special = {
        "bos_token": cfg.eos_token,
        "eos_token": cfg.eos_token,
        "unk_token": cfg.eos_token,
        "pad_token": cfg.pad_token,
    }
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.model_max_length,
    }
    if cfg.chat_tokens:
        tok_config["additional_special_tokens"] = cfg.special_tokens()[2:]
    if cfg.chat_template:
        tok_config["chat_template"] = cfg.chat_template
    with atomic_dir(out, mark="tokenizer train") as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        (tmp / TRAINING_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


def _token_name(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@dataclass
class Tokenizer:
    """A loaded tokenizer: a thin wrapper over ``tokenizers.Tokenizer`` plus its special ids."""

    path: Path
    backend: object
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None
    chat_template: str | None
    sha256: str

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (added tokens included)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS are added."""
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        fast = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        return [e.ids for e in fast(list(texts), add_special_tokens=False)]

    def encode_pieces(self, text: str, piece_chars: int | None = None):
        """The token ids of a long ``text`` as a list of arrays, encoded piece by piece in bounded
        memory (one piece's encoding at a time). Each cut is checked to be a token boundary for
        this tokenizer (the ids around it equal the ids of the joined text); a tokenizer that merges
        across every candidate cut is an error rather than a silently different encoding."""
        import numpy as np

        out = []
        pieces = list(word_boundaries_cut(text, piece_chars or LONG_TEXT_CHARS))
        for k, (start, piece) in enumerate(pieces):
            if k:
                left, right = text[max(0, start - BOUNDARY_CHECK_CHARS):start], piece[:BOUNDARY_CHECK_CHARS]
                if self.encode(left) + self.encode(right) != self.encode(left + right):
                    raise EffilmError(
                        f"{self.path}: this tokenizer merges tokens across spaces, so a document of {len(text):,} "
                        f"characters cannot be encoded in pieces; split such documents before tokenizing"
                    )
            out.append(np.asarray(self.backend.encode(piece, add_special_tokens=False).ids, dtype=np.int64))
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def load_tokenizer(path) -> Tokenizer:
    """Load an HF tokenizer directory (or a ``tokenizer.json`` file) without transformers."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise EffilmError(f"no tokenizer at {path}: expected a directory holding tokenizer.json")
    try:
        backend = HFTokenizer.from_file(str(file))
    except Exception as exc:  # the Rust error names the JSON problem
        raise EffilmError(f"{file}: not a valid tokenizer.json ({exc})") from None
    directory = file.parent
    config: dict = {}
    cfg_file = directory / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            config = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EffilmError(f"{cfg_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    smap = directory / "special_tokens_map.json"
    if smap.is_file():
        try:
            for k, v in json.loads(smap.read_text(encoding="utf-8")).items():
                config.setdefault(k, v)
        except json.JSONDecodeError as exc:
            raise EffilmError(f"{smap}: not valid JSON ({exc.msg}, line {exc.lineno})") from None

    def special(key: str, fallbacks) -> int | None:
        name = _token_name(config.get(key))
        candidates = [name] if name else list(fallbacks)
        for c in candidates:
            tid = backend.token_to_id(c)
            if tid is not None:
                return int(tid)
        return None

    template = config.get("chat_template")
    jinja = directory / "chat_template.jinja"  # transformers >= 4.50 may store it beside the config
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return Tokenizer(
        path=directory,
        backend=backend,
        eos_id=special("eos_token", _EOS_FALLBACKS),
        bos_id=special("bos_token", _BOS_FALLBACKS),
        pad_id=special("pad_token", _PAD_FALLBACKS),
        chat_template=template if isinstance(template, str) else None,
        sha256=sha256_file(file),
    )


def check_vocab(tokenizer, model_vocab_size: int, strict: bool = False) -> None:
    """Raise unless every token id fits the model's embedding table.

    A model may pad its vocabulary (Phi-3: 32011 tokens, 32064 embeddings), so by default a model
    vocabulary at least as large as the tokenizer's passes; ``strict=True`` demands equality.
    ``tokenizer`` is a ``Tokenizer`` or a path to load.
    """
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    n = tok.vocab_size
    if n > model_vocab_size or (strict and n != model_vocab_size):
        rule = "equal" if strict else "at most"
        raise EffilmError(
            f"tokenizer {tok.path} has {n} tokens but the model's vocab_size is {model_vocab_size}; "
            f"the tokenizer's vocabulary must be {rule} the model's (retrain the tokenizer or set "
            f"model vocab_size >= {n})"
        )
