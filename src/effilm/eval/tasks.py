"""Benchmark formats: hendrycks CSV, MMLU directories, JSONL/parquet, held-out text.

A task SPEC names a format and a path, with optional comma-separated options::

    mmlu:DIR              DIR/{dev,val,test}/*.csv as MMLU ships them (evaluates ``test``)
    csv:FILE              one hendrycks CSV; few-shot examples from a sibling ``*_dev.csv``
    jsonl:FILE            records with question, subject, choices (list), answer (int)
    parquet:FILE          the same columns, as HF's MMLU parquet
    ppl:FILE              held-out text (one JSON record with ``text`` per line, or plain text)
    chat:FILE             free-form questions through the chat template, scored by normalised
                          exact match of the greedy answer (see :mod:`effilm.eval.chat`)
    gsm8k:FILE            math word problems (question, answer ending in ``#### N``), greedy
                          generation, lm-eval's strict-match and flexible-extract (:mod:`effilm.eval.gsm8k`)
    code:FILE             HumanEval-format problems (prompt, test, entry_point), completions run in a
                          sandbox and scored by pass@k (:mod:`effilm.eval.code_task`)

    options: ``split=val`` (which split to evaluate), ``dev=PATH`` (few-shot source in the same
    format), ``name=LABEL`` (the task's name in reports).  Example: ``jsonl:quiz.jsonl,dev=d.jsonl``.

Bad rows are skipped and reported (file and line) unless ``strict`` is set, which turns every
skip into an error. An unreadable file is always an error naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from effilm.errors import ConfigError, EffilmError, closest

KINDS = ("mmlu", "csv", "jsonl", "parquet", "ppl", "chat", "gsm8k", "code")
SPLITS = ("dev", "val", "test")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class TaskConfig:
    num_choices: int = field(default=4, metadata={"help": "choices every item must have (MMLU: 4)"})
    strict: bool = field(default=False, metadata={"help": "turn skipped bad rows into errors"})
    split: str = field(default="test", metadata={"help": "split to evaluate: dev, val or test"})
    dev_split: str = field(default="dev", metadata={"help": "split the few-shot examples come from"})

    def __post_init__(self):
        if not 2 <= self.num_choices <= len(LETTERS):
            raise ConfigError(f"num_choices: must be in 2..{len(LETTERS)}, got {self.num_choices}")
        for name in ("split", "dev_split"):
            if getattr(self, name) not in SPLITS:
                raise ConfigError(f"{name}: must be one of {', '.join(SPLITS)}, got {getattr(self, name)!r}")


@dataclass
class Item:
    """One multiple-choice question. ``source`` is ``file:line`` for messages and reports."""

    question: str
    choices: list[str]
    answer: int
    subject: str
    source: str
    uid: str = ""

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]


@dataclass
class Task:
    name: str
    kind: str
    spec: str
    items: list[Item] = field(default_factory=list)
    dev: dict[str, list[Item]] = field(default_factory=dict)  # subject -> few-shot pool, file order
    skipped: list[dict] = field(default_factory=list)  # {"source": "file:line", "reason": ...}
    files: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # ppl documents
    chat: list = field(default_factory=list)  # chat tasks: effilm.eval.chat.ChatItem
    math: list = field(default_factory=list)  # gsm8k tasks: effilm.eval.gsm8k.MathItem
    math_dev: list = field(default_factory=list)  # gsm8k tasks: the few-shot examples, file order
    code: list = field(default_factory=list)  # code tasks: effilm.eval.code_task.CodeItem

    @property
    def entries(self) -> list:
        """What is scored: the multiple-choice items, or a generation task's items (all have
        ``uid``, ``question`` and ``answer_text``)."""
        return {"chat": self.chat, "gsm8k": self.math, "code": self.code}.get(self.kind, self.items)

    def data_hash(self) -> str:
        """sha256 over every file read (name and content), in a fixed order."""
        from effilm.io import sha256_file

        h = hashlib.sha256()
        for f in sorted(set(self.files)):
            h.update(Path(f).name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
        return h.hexdigest()


@dataclass
class TaskSpec:
    kind: str
    path: str
    options: dict[str, str]

    @property
    def name(self) -> str:
        if "name" in self.options:
            return self.options["name"]
        p = Path(self.path)
        return f"{self.kind}:{p.name or p.parent.name}"


def parse_spec(spec: str) -> TaskSpec:
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise EffilmError(f"task spec {spec!r}: expected KIND:PATH, KIND one of {', '.join(KINDS)}")
    if kind not in KINDS:
        hint = closest(kind, KINDS)
        raise EffilmError(f"task spec {spec!r}: unknown kind {kind!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    path, *opts = rest.split(",")
    options = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in ("split", "dev", "name"):
            raise EffilmError(f"task spec {spec!r}: bad option {opt!r} (known: split=, dev=, name=)")
        options[key] = value
    return TaskSpec(kind, path, options)


class _Rows:
    """Collects skips; raises instead when strict."""

    def __init__(self, task: Task, cfg: TaskConfig):
        self.task, self.cfg = task, cfg

    def bad(self, source: str, reason: str) -> None:
        if self.cfg.strict:
            raise EffilmError(f"{source}: {reason}")
        self.task.skipped.append({"source": source, "reason": reason})


def subject_from_filename(path: str | os.PathLike) -> str:
    """``high_school_physics_test.csv`` -> ``high_school_physics``."""
    stem = Path(path).name
    for suffix in (".csv", ".gz"):
        stem = stem.removesuffix(suffix)
    for split in SPLITS:
        if stem.endswith("_" + split):
            return stem[: -len(split) - 1]
    return stem


def read_csv(path: str | os.PathLike, cfg: TaskConfig, rows: _Rows) -> list[Item]:
    """A hendrycks CSV: no header; question, one column per choice, answer letter."""
    from effilm.io import read_lines

    subject = subject_from_filename(path)
    want = cfg.num_choices + 2
    letters = LETTERS[: cfg.num_choices]
    items = []
    reader = csv.reader(line for _, line in read_lines(path))  # UTF-8, gzip and BOM handled there
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise EffilmError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
        src = f"{path}:{start}"
        start = reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != want:
            rows.bad(src, f"expected {want} columns (question, {cfg.num_choices} choices, answer), got {len(row)}")
            continue
        if not row[0].strip():
            rows.bad(src, "empty question")
            continue
        letter = row[-1].strip().upper()
        if len(letter) != 1 or letter not in letters:
            rows.bad(src, f"answer {row[-1]!r} is not one of {', '.join(letters)}")
            continue
        items.append(Item(row[0], list(row[1:-1]), letters.index(letter), subject, src))
    return items


def _record_item(rec: dict, src: str, cfg: TaskConfig, rows: _Rows) -> Item | None:
    for key in ("question", "choices", "answer"):
        if key not in rec:
            rows.bad(src, f"missing field {key!r}")
            return None
    q, choices, answer = rec["question"], rec["choices"], rec["answer"]
    if not isinstance(q, str):
        rows.bad(src, "field 'question' is not a string")
        return None
    if not q.strip():
        rows.bad(src, "empty question")
        return None
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        rows.bad(src, "field 'choices' is not a list of strings")
        return None
    if len(choices) != cfg.num_choices:
        rows.bad(src, f"has {len(choices)} choices, expected {cfg.num_choices}")
        return None
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        rows.bad(src, f"answer {answer!r} is not an index in 0..{len(choices) - 1}")
        return None
    subject = rec.get("subject") or "general"
    return Item(q, list(choices), answer, str(subject), src, str(rec.get("id", "")))


def read_jsonl_items(path, make, bad) -> list:
    """The valid records of a JSONL task file, each through ``make(record, "file:line", bad)``
    (which returns None after reporting a bad one)."""
    from effilm.io import iter_jsonl

    items = []
    for lineno, rec in iter_jsonl(path):
        item = make(rec, f"{path}:{lineno}", bad)
        if item is not None:
            items.append(item)
    return items


def read_records(path: str | os.PathLike, kind: str, cfg: TaskConfig, rows: _Rows) -> list[Item]:
    if kind == "jsonl":  # UTF-8, gzip and BOM handled by the one reader
        return read_jsonl_items(path, lambda rec, src, bad: _record_item(rec, src, cfg, rows), rows.bad)
    items = []
    try:
        import pyarrow.parquet as pq

        records = pq.read_table(path).to_pylist()
    except ImportError:
        raise EffilmError("parquet tasks need pyarrow: pip install 'effilm[data]'") from None
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise EffilmError(f"{path}: cannot read parquet ({exc})") from None
    for i, rec in enumerate(records):
        item = _record_item(rec, f"{path}:row {i}", cfg, rows)
        if item:
            items.append(item)
    return items


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise EffilmError(f"{path}: {what} not found")


def _group(items: list[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for it in items:
        out.setdefault(it.subject, []).append(it)
    return out


def _assign_uids(items: list) -> None:
    counts: dict[str, int] = {}
    for it in items:
        if not it.uid:
            n = counts.get(it.subject, 0)
            counts[it.subject] = n + 1
            it.uid = f"{it.subject}/{n}"


def load_task(spec: str | TaskSpec, cfg: TaskConfig | None = None) -> Task:
    """Parse a task SPEC into a :class:`Task` holding the evaluation items and few-shot pool."""
    cfg = cfg or TaskConfig()
    ts = parse_spec(spec) if isinstance(spec, str) else spec
    split = ts.options.get("split", cfg.split)
    if split not in SPLITS:
        raise EffilmError(f"task spec {ts.path!r}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    task = Task(ts.name, ts.kind, f"{ts.kind}:{ts.path}")
    rows = _Rows(task, cfg)
    path = Path(ts.path)
    _require(path, "task data")
    if ts.kind == "ppl":
        task.texts = read_texts(path)
        task.files.append(str(path))
        return task
    if ts.kind in ("chat", "gsm8k", "code"):  # generation tasks: JSONL records of their own kind
        from effilm.eval.chat import chat_item
        from effilm.eval.code_task import code_item
        from effilm.eval.gsm8k import math_item

        make = {"chat": chat_item, "gsm8k": math_item, "code": code_item}[ts.kind]
        items = read_jsonl_items(path, make, rows.bad)
        task.files.append(str(path))
        if not items:
            raise EffilmError(f"task {task.spec}: no valid items ({_first_problem(task)})")
        _assign_uids(items)
        if ts.kind == "chat":
            task.chat = items
            return task
        if ts.kind == "code":
            if "dev" in ts.options:
                raise EffilmError(f"task spec {ts.path!r}: code tasks take no few-shot examples (dev=)")
            task.code = items
            return task
        task.math = items
        dev = ts.options.get("dev")
        if dev:
            _require(Path(dev), "dev file")
            task.math_dev = read_jsonl_items(dev, make, rows.bad)
            task.files.append(dev)
        return task
    if ts.kind == "mmlu":
        if not path.is_dir():
            raise EffilmError(f"{path}: mmlu:DIR needs a directory with dev/, val/ and test/")
        split_dir = path / split
        _require(split_dir, f"split directory {split!r}")
        files = sorted(split_dir.glob("*.csv"))
        if not files:
            raise EffilmError(f"{split_dir}: no *.csv files")
        for f in files:
            task.items.extend(read_csv(f, cfg, rows))
            task.files.append(str(f))
        dev_dir = path / cfg.dev_split
        if dev_dir.is_dir():
            for f in sorted(dev_dir.glob("*.csv")):
                task.dev.setdefault(subject_from_filename(f), []).extend(read_csv(f, cfg, rows))
                task.files.append(str(f))
    elif ts.kind == "csv":
        task.items = read_csv(path, cfg, rows)
        task.files.append(str(path))
        dev = ts.options.get("dev")
        if dev is None:
            subject = subject_from_filename(path)
            for cand in (path.with_name(f"{subject}_{cfg.dev_split}.csv"),
                         path.parent.parent / cfg.dev_split / f"{subject}_{cfg.dev_split}.csv"):
                if cand.exists() and cand.resolve() != path.resolve():
                    dev = str(cand)
                    break
        if dev:
            _require(Path(dev), "dev file")
            task.dev = _group(read_csv(dev, cfg, rows))
            task.files.append(dev)
    else:
        items = read_records(path, ts.kind, cfg, rows)
        task.files.append(str(path))
        dev = ts.options.get("dev")
        if dev:
            _require(Path(dev), "dev file")
            task.dev = _group(read_records(dev, ts.kind, cfg, rows))
            task.files.append(dev)
        task.items = items
    if not task.items:
        raise EffilmError(f"task {task.spec}: no valid items in split {split!r} ({_first_problem(task)})")
    _assign_uids(task.items)
    return task


def _first_problem(task: Task) -> str:
    why = f"; first problem: {task.skipped[0]['source']}: {task.skipped[0]['reason']}" if task.skipped else ""
    return f"{len(task.skipped)} rows skipped{why}"


def read_texts(path: Path) -> list[str]:
    """Held-out text, through the one input reader: JSONL with a ``text`` field per line (one
    document each), parquet, or a plain text file (one document)."""
    from effilm.data.inputs import iter_file

    return [d.text for d in iter_file(path, "text", text_split="file")]
