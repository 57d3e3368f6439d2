"""The one input reader: every command that reads text documents (tokenize, tokenizer training,
dedup, filters, decontamination, the training pre-check) goes through here.

Formats, picked by suffix (the text formats may end in ``.gz``):

* ``.jsonl`` / ``.ndjson``: one JSON object per line; the text sits in ``text_field``;
* ``.parquet``: the ``text_field`` column, read in record batches (a null is an empty text);
* ``.txt`` / ``.md`` / ``.text``: split by ``text_split``: ``paragraph`` (blocks of lines
  separated by blank lines), ``line`` (each line is a document) or ``file`` (the whole file).

Inputs are files, directories or glob patterns. A directory that holds ``shard-*.jsonl`` files
(an ``effilm synth`` output, say) stands for those shards, so its quiz and manifest are never read
as training text; any other directory stands for every supported file below it (hidden files and
``*.json`` metadata are skipped). Every problem is an ``EffilmError`` naming the file, and the
line where there is one.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from effilm.config.data import TEXT_SPLITS
from effilm.errors import EffilmError
from effilm.io import iter_jsonl, read_lines, read_text

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".text")
PARQUET_SUFFIXES = (".parquet",)
SHARD_GLOB = "shard-*.jsonl*"


@dataclass(frozen=True)
class Document:
    """One document of an input file: where it is, its text and (JSONL) its whole record."""

    path: Path
    line: int  # 1-based: the JSONL line, the first line of a text block, or the parquet row
    text: str
    record: dict | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def as_record(self, text_field: str = "text") -> dict:
        """The JSONL record, or for text and parquet a new one: ``{"id": where, text_field: text}``."""
        return self.record if self.record is not None else {"id": self.where, text_field: self.text}


def input_kind(path: Path) -> str:
    """``jsonl``, ``text`` or ``parquet``; an unsupported suffix is an error naming the file."""
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise EffilmError(
        f"{path}: unsupported input format; use {', '.join(JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES)}"
        " (text formats may end in .gz)"
    )


def _directory_files(d: Path) -> list[Path]:
    shards = sorted(f for f in d.rglob(SHARD_GLOB) if f.is_file() and not f.name.startswith("."))
    if shards:
        return shards
    return sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".") and f.suffix != ".json")


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The files named by ``inputs`` (paths, directories or glob patterns), in a stable order,
    each once. Every input must exist and every file must have a supported suffix."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in str(item) for ch in "*?[") and not p.exists():
            found = sorted(Path(m) for m in glob.glob(str(item), recursive=True) if Path(m).is_file())
            if not found:
                raise EffilmError(f"input pattern {str(item)!r} matches no file")
            files.extend(found)
        elif p.is_dir():
            found = _directory_files(p)
            if not found:
                raise EffilmError(f"input directory {p} holds no input file")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise EffilmError(f"input file not found: {p}")
    if not files:
        raise EffilmError("no input files given")
    seen, unique = set(), []
    for f in files:
        input_kind(f)
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def iter_file(path: str | os.PathLike, text_field: str = "text", text_split: str = "paragraph") -> Iterator[Document]:
    """Every document of one input file."""
    path = Path(path)
    if text_split not in TEXT_SPLITS:
        raise EffilmError(f"text_split={text_split!r} must be one of {TEXT_SPLITS}")
    if path.is_dir():
        raise EffilmError(f"{path}: is a directory, not a file")
    if not path.is_file():
        raise EffilmError(f"input file not found: {path}")
    kind = input_kind(path)
    if kind == "jsonl":
        for lineno, rec in iter_jsonl(path):
            if text_field not in rec:
                raise EffilmError(
                    f"{path}:{lineno}: no field {text_field!r} (fields: {', '.join(map(str, rec)) or 'none'});"
                    " choose one with --text-field"
                )
            text = rec[text_field]
            if not isinstance(text, str):
                raise EffilmError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
            yield Document(path, lineno, text, rec)
    elif kind == "parquet":
        yield from _iter_parquet(path, text_field)
    else:
        yield from _iter_text(path, text_split)


def iter_inputs(inputs, text_field: str = "text", text_split: str = "paragraph") -> Iterator[Document]:
    """Every document of every file named by ``inputs`` (see :func:`expand_inputs`)."""
    for f in expand_inputs(inputs):
        yield from iter_file(f, text_field, text_split)


def iter_records(inputs, text_field: str = "text") -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for every document of ``inputs``: JSONL records as they are, other
    formats as ``{"id": where, text_field: text}`` (see :meth:`Document.as_record`)."""
    return ((d.where, d.as_record(text_field)) for d in iter_inputs(inputs, text_field))


def word_boundaries_cut(text: str, max_chars: int) -> Iterator[tuple[int, str]]:
    """``(start, piece)`` pieces of ``text``, each about ``max_chars`` long at most, cut just before
    a single space that begins a word (``"... end| word ..."``). Whitespace splitting and byte-level
    pre-tokenizers see the same words in the pieces as in the whole, so long documents can be
    processed piece by piece in bounded memory. A stretch with no such space is cut where it must."""
    n, start = len(text), 0
    while n - start > max_chars:
        lo, target = start + max_chars // 2, start + max_chars
        cut = -1
        j = text.rfind(" ", lo, target + 1)
        while j > lo:
            if not text[j - 1].isspace() and j + 1 < n and not text[j + 1].isspace():
                cut = j
                break
            j = text.rfind(" ", lo, j)
        if cut < 0:
            cut = target
        yield start, text[start:cut]
        start = cut
    yield start, text[start:]


def _iter_text(path: Path, text_split: str) -> Iterator[Document]:
    if text_split == "file":
        yield Document(path, 1, read_text(path))
        return
    if text_split == "line":
        for lineno, line in read_lines(path):
            yield Document(path, lineno, line.rstrip("\r\n"))
        return
    block: list[str] = []
    start = 1
    for lineno, line in read_lines(path):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            yield Document(path, start, "".join(block).rstrip("\n"))
            block = []
    if block:
        yield Document(path, start, "".join(block).rstrip("\n"))


def _iter_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for a bad file
        raise EffilmError(f"{path}: not a readable parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise EffilmError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); choose one with --text-field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                text = ""
            if not isinstance(text, str):
                raise EffilmError(f"{path}: row {row}: column {text_field!r} is {type(text).__name__}, not a string")
            yield Document(path, row, text)
