"""Token shards: tokenize documents into shards, open shards safely.

Documents come from the one input reader, :mod:`effilm.data.inputs` (JSONL, parquet and text,
gzipped or not). Empty documents are skipped and counted in the manifest; a record without the text field, or
with a non-string one, is an error naming ``file:line``.

A dataset directory written by ``tokenize_files`` holds

* ``shard_NNNNN.bin``: the raw token ids (``uint16`` when the vocabulary has at most 65536 ids,
  else ``uint32``), each document followed by EOS; documents never straddle shards;
* ``shard_NNNNN.idx.npy``: int64 document start offsets into the shard, plus the end (n_docs + 1);
* ``manifest.json``: format version, dtype, EOS id, vocab size, tokenizer sha256, every input
  file with its sha256 and counts, and every shard with its token/document counts and the sha256
  of its ``.bin`` and ``.idx.npy``.

``TokenDataset(path)`` opens such a directory, checks every shard against the manifest (sizes
always, sha256 unless ``verify=False``) and memory-maps the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from dataclasses import asdict
from pathlib import Path

from effilm.config.data import TokenizeConfig
from effilm.data.inputs import expand_inputs, iter_file
from effilm.errors import EffilmError
from effilm.io import atomic_dir, sha256_file
from effilm.outputs import claim_dir

FORMAT = "effilm.tokens"
FORMAT_VERSION = 1
COMMAND = "data tokenize"  # the marker of its output directories (effilm.outputs)
# Batches in flight per worker process: bounds memory while keeping workers busy.
INFLIGHT_PER_WORKER = 4


# ---------------------------------------------------------------- tokenizing into shards

_WORKER: dict = {}


def _worker_init(tokenizer_dir: str) -> None:
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["RAYON_NUM_THREADS"] = "1"
    from effilm.data.tokenizer import load_tokenizer

    _WORKER["tok"] = load_tokenizer(tokenizer_dir)


def _encode(tok, texts: list[str], eos_id: int, dtype: str):
    """Encode ``texts``; return the flat ids (EOS after each document) and per-document lengths.
    Documents longer than ``LONG_TEXT_CHARS`` are encoded piece by piece (bounded memory)."""
    import numpy as np

    from effilm.data.tokenizer import LONG_TEXT_CHARS

    short = [t for t in texts if len(t) <= LONG_TEXT_CHARS]
    encoded = iter(tok.encode_batch(short))
    parts, lengths = [], []
    joined: list[int] = []
    for t in texts:
        if len(t) <= LONG_TEXT_CHARS:
            x = next(encoded)
            joined.extend(x)  # list.extend runs in C; one numpy conversion per run of short documents
            joined.append(eos_id)
            lengths.append(len(x) + 1)
            continue
        if joined:
            parts.append(np.array(joined, dtype=dtype))
            joined = []
        pieces = tok.encode_pieces(t)
        parts += [p.astype(dtype) for p in pieces] + [np.array([eos_id], dtype=dtype)]
        lengths.append(sum(len(p) for p in pieces) + 1)
    if joined or not parts:
        parts.append(np.array(joined, dtype=dtype))
    return np.concatenate(parts), np.array(lengths, dtype=np.int64)


def _worker_encode(texts: list[str], eos_id: int, dtype: str):
    return _encode(_WORKER["tok"], texts, eos_id, dtype)


class _ShardWriter:
    """Streams token batches into numbered shards inside the dataset's temporary directory."""

    def __init__(self, root: Path, shard_tokens: int, dtype: str, masks: bool = False):
        self.root, self.shard_tokens, self.dtype, self.masks = root, shard_tokens, dtype, masks
        self.shards: list[dict] = []
        self._fh = None

    def _open(self) -> None:
        n = len(self.shards)
        self._name = f"shard_{n:05d}"
        self._fh = open(self.root / f"{self._name}.bin", "wb")
        self._hash = hashlib.sha256()
        if self.masks:  # one uint8 per token: 1 where the loss counts (chat data's assistant turns)
            self._mfh = open(self.root / f"{self._name}.mask.bin", "wb")
            self._mhash = hashlib.sha256()
        self._starts = [0]

    def add(self, flat, lengths, mask=None) -> None:
        import numpy as np

        pos = 0
        while pos < len(lengths):
            if self._fh is None:
                self._open()
            room = self.shard_tokens - self._starts[-1]
            # Whole documents until the shard reaches shard_tokens (at least one per shard).
            cum = np.cumsum(lengths[pos:])
            take = max(1, int(np.searchsorted(cum, room, side="left")) + 1)
            take = min(take, len(lengths) - pos)
            a = int(lengths[:pos].sum())
            b = a + int(cum[take - 1])
            data = flat[a:b].tobytes()
            self._fh.write(data)
            self._hash.update(data)
            if self.masks:
                mdata = mask[a:b].astype(np.uint8).tobytes()
                self._mfh.write(mdata)
                self._mhash.update(mdata)
            for length in lengths[pos : pos + take]:
                self._starts.append(self._starts[-1] + int(length))
            pos += take
            if self._starts[-1] >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        import numpy as np

        self._fh.close()
        self._fh = None
        extra = {}
        if self.masks:
            self._mfh.close()
            extra = {"mask": f"{self._name}.mask.bin", "mask_sha256": self._mhash.hexdigest()}
        idx = np.asarray(self._starts, dtype=np.int64)
        idx_path = self.root / f"{self._name}.idx.npy"
        np.save(idx_path, idx)
        self.shards.append(
            {
                "data": f"{self._name}.bin",
                "index": idx_path.name,
                "documents": len(idx) - 1,
                "tokens": int(idx[-1]),
                "sha256": self._hash.hexdigest(),
                "index_sha256": sha256_file(idx_path),
                **extra,
            }
        )

    def finish(self) -> list[dict]:
        if self._fh is not None:
            self._close()
        return self.shards


def _batches(files: list[Path], cfg: TokenizeConfig, stats: list[dict]):
    """Yield ``(file_index, texts)`` batches of non-empty documents, counting skipped ones."""
    for fi, f in enumerate(files):
        texts: list[str] = []
        for doc in iter_file(f, cfg.text_field, cfg.text_split):
            text = doc.text
            if not text.strip():
                stats[fi]["skipped_empty"] += 1
                continue
            texts.append(text)
            if len(texts) == cfg.batch_docs:
                yield fi, texts
                texts = []
        if texts:
            yield fi, texts


def _masked_batches(files, tok, cfg: TokenizeConfig, dtype: str):
    """``(file_index, flat ids, lengths, flat mask)`` batches of ``cfg.batch_docs`` records of chat
    data or preference pairs (JSONL, ``cfg.chat`` or ``cfg.preferences``), each record's documents
    through :func:`_chat_documents` or :func:`_preference_documents`."""
    import numpy as np

    from effilm.data.inputs import input_kind
    from effilm.io import iter_jsonl

    kind, documents, what = (("chat", _chat_documents, "'messages' (or 'prompt' and 'completion')") if cfg.chat else
                             ("preference", _preference_documents, "'prompt', 'chosen' and 'rejected'"))
    for fi, f in enumerate(files):
        if input_kind(f) != "jsonl":
            raise EffilmError(f"{f}: {kind} data must be JSONL records with {what}")
        ids_b, mask_b, lengths, records = [], [], [], 0
        for lineno, rec in iter_jsonl(f):
            for ids, mask in documents(tok, rec, f"{f}:{lineno}"):
                ids_b += ids
                mask_b += mask
                lengths.append(len(ids))
            records += 1
            if records == cfg.batch_docs:
                yield fi, np.array(ids_b, dtype=dtype), np.array(lengths, dtype=np.int64), np.array(mask_b, dtype=np.uint8)
                ids_b, mask_b, lengths, records = [], [], [], 0
        if lengths:
            yield fi, np.array(ids_b, dtype=dtype), np.array(lengths, dtype=np.int64), np.array(mask_b, dtype=np.uint8)


def _chat_documents(tok, rec, where: str) -> list[tuple[list[int], list[int]]]:
    """One document: the conversation rendered by the tokenizer's chat template, then EOS (mask 0)."""
    from effilm.data.chat import conversation, encode_chat

    ids, mask = encode_chat(tok, conversation(rec, where), where)
    return [([*ids, tok.eos_id], [*mask, 0])]


def _preference_documents(tok, rec, where: str) -> list[tuple[list[int], list[int]]]:
    """Two documents, prompt + chosen then prompt + rejected, each masked on its completion
    (:mod:`effilm.data.preferences`), without an EOS added: pair ``i`` is documents ``2i``, ``2i + 1``."""
    from effilm.data.preferences import encode_preference

    c, cm, r, rm = encode_preference(tok, rec, where)
    return [(c, cm), (r, rm)]


def tokenize_files(inputs, tokenizer_dir, out, cfg: TokenizeConfig | None = None, progress=None,
                   overwrite: bool = False) -> dict:
    """Tokenize ``inputs`` with the tokenizer in ``tokenizer_dir`` into a dataset at ``out``.

    The dataset directory appears atomically, complete with its ``manifest.json``; the output is
    byte-identical for any ``cfg.workers``. An earlier dataset at ``out`` is replaced only with
    ``overwrite``; any other non-empty directory never (:func:`effilm.outputs.claim_dir`).
    Returns the manifest.
    """
    import numpy as np

    from effilm.data.tokenizer import load_tokenizer

    cfg = cfg or TokenizeConfig()
    files = expand_inputs(inputs)
    out = claim_dir(out, COMMAND, sources=[*files, tokenizer_dir], overwrite=overwrite)
    tok = load_tokenizer(tokenizer_dir)
    if tok.eos_id is None:
        raise EffilmError(f"tokenizer {tokenizer_dir} has no EOS token; documents need one between them")
    dtype = "uint16" if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    stats = [
        {"path": str(f), "sha256": sha256_file(f), "bytes": f.stat().st_size, "documents": 0, "tokens": 0,
         "skipped_empty": 0}
        for f in files
    ]

    def record(fi, flat, lengths, writer):
        stats[fi]["documents"] += len(lengths)
        stats[fi]["tokens"] += int(lengths.sum())
        writer.add(flat, lengths)
        if progress is not None:
            progress(len(lengths), int(lengths.sum()))

    with atomic_dir(out, mark=COMMAND) as tmp:
        masked = cfg.chat or cfg.preferences
        writer = _ShardWriter(tmp, cfg.shard_tokens, dtype, masks=masked)
        if masked:  # conversations (or preference pairs) through the chat template, with their loss masks
            for fi, flat, lengths, mask in _masked_batches(files, tok, cfg, dtype):
                stats[fi]["documents"] += len(lengths)
                stats[fi]["tokens"] += int(lengths.sum())
                writer.add(flat, lengths, mask)
                if progress is not None:
                    progress(len(lengths), int(lengths.sum()))
        elif cfg.workers == 1:
            for fi, texts in _batches(files, cfg, stats):
                record(fi, *_encode(tok, texts, tok.eos_id, dtype), writer)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # safe beside the tokenizers thread pool and torch
            with ctx.Pool(cfg.workers, initializer=_worker_init, initargs=(str(tok.path),)) as pool:
                pending: deque = deque()
                for fi, texts in _batches(files, cfg, stats):
                    pending.append((fi, pool.apply_async(_worker_encode, (texts, tok.eos_id, dtype))))
                    if len(pending) >= cfg.workers * INFLIGHT_PER_WORKER:
                        fj, res = pending.popleft()
                        record(fj, *res.get(), writer)
                while pending:
                    fj, res = pending.popleft()
                    record(fj, *res.get(), writer)
        shards = writer.finish()
        if not shards:
            raise EffilmError(f"no non-empty documents in {len(files)} input file(s); nothing to write")
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype,
            "eos_id": tok.eos_id,
            "vocab_size": tok.vocab_size,
            "tokenizer": {"path": str(Path(tok.path).resolve()), "sha256": tok.sha256},
            "config": {k: v for k, v in asdict(cfg).items() if k != "workers"},
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "inputs": stats,
            "shards": shards,
            "loss_mask": masked,
            "preferences": cfg.preferences,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


# ---------------------------------------------------------------- opening a dataset


class TokenDataset:
    """A tokenized dataset directory, checked against its manifest and memory-mapped.

    ``document(i)`` returns document ``i``'s tokens (EOS included) as a read-only view;
    ``doc_lengths`` holds every document's length, in manifest order.
    """

    def __init__(self, path, verify: bool = True):
        import numpy as np

        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not self.path.is_dir():
            raise EffilmError(f"token dataset not found: {self.path} (create it with `effilm data tokenize`)")
        if not mpath.is_file():
            raise EffilmError(f"{self.path}: no manifest.json; not a token dataset (create it with `effilm data tokenize`)")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EffilmError(f"{mpath}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
            raise EffilmError(f"{mpath}: format {m.get('format')!r} v{m.get('version')}; expected {FORMAT} v{FORMAT_VERSION}")
        self.manifest = m
        self.dtype = np.dtype(m["dtype"])
        self.eos_id = int(m["eos_id"])
        self.vocab_size = int(m["vocab_size"])
        self.tokenizer_sha256 = m["tokenizer"]["sha256"]
        self.has_loss_mask = bool(m.get("loss_mask"))
        self.preferences = bool(m.get("preferences"))  # documents 2i, 2i + 1: pair i's chosen, rejected
        self._shards, self._masks = [], []
        shard_of, starts, lengths = [], [], []
        for si, s in enumerate(m["shards"]):
            data, index = self.path / s["data"], self.path / s["index"]
            for f in (data, index):
                if not f.is_file():
                    raise EffilmError(f"{self.path}: shard file {f.name} is missing")
            want = s["tokens"] * self.dtype.itemsize
            if data.stat().st_size != want:
                raise EffilmError(
                    f"shard {data}: {data.stat().st_size} bytes, manifest says {want}; the shard is truncated or corrupt"
                )
            if verify:
                for f, key in ((data, "sha256"), (index, "index_sha256")):
                    got = sha256_file(f)
                    if got != s[key]:
                        raise EffilmError(
                            f"shard {f}: sha256 {got[:16]}... does not match the manifest's {s[key][:16]}...;"
                            " the file is corrupt or was modified (re-run `effilm data tokenize`)"
                        )
            idx = np.load(index)
            if (idx.ndim != 1 or len(idx) != s["documents"] + 1 or idx[0] != 0 or idx[-1] != s["tokens"]
                    or np.any(np.diff(idx) <= 0)):
                raise EffilmError(f"shard index {index}: document offsets disagree with the manifest")
            self._shards.append(np.memmap(data, dtype=self.dtype, mode="r") if s["tokens"] else None)
            if self.has_loss_mask:
                self._masks.append(self._open_mask(s, verify))
            shard_of.append(np.full(len(idx) - 1, si, dtype=np.int32))
            starts.append(idx[:-1])
            lengths.append(np.diff(idx))
        if not self._shards:
            raise EffilmError(f"{mpath}: lists no shards")
        self.doc_shard = np.concatenate(shard_of)
        self.doc_start = np.concatenate(starts).astype(np.int64)
        self.doc_lengths = np.concatenate(lengths).astype(np.int64)

    @property
    def num_documents(self) -> int:
        return len(self.doc_lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    @property
    def content_sha256(self) -> str:
        """One hash over every shard's checksum: changes whenever any token changes."""
        h = hashlib.sha256()
        for s in self.manifest["shards"]:
            mask = f":{s['mask_sha256']}" if "mask_sha256" in s else ""
            h.update(f"{s['sha256']}:{s['index_sha256']}{mask};".encode())
        return h.hexdigest()

    def document(self, i: int):
        s = int(self.doc_start[i])
        return self._shards[int(self.doc_shard[i])][s : s + int(self.doc_lengths[i])]

    def document_mask(self, i: int):
        """Document ``i``'s loss mask (uint8, 1 where the loss counts), or None without masks."""
        if not self.has_loss_mask:
            return None
        s = int(self.doc_start[i])
        return self._masks[int(self.doc_shard[i])][s : s + int(self.doc_lengths[i])]

    def _open_mask(self, s: dict, verify: bool):
        import numpy as np

        f = self.path / s.get("mask", "")
        if "mask" not in s or not f.is_file():
            raise EffilmError(f"{self.path}: shard {s['data']} has no loss-mask file (the manifest says it should)")
        if f.stat().st_size != s["tokens"]:
            raise EffilmError(f"shard mask {f}: {f.stat().st_size} bytes for {s['tokens']} tokens; truncated or corrupt")
        if verify and sha256_file(f) != s["mask_sha256"]:
            raise EffilmError(f"shard mask {f}: sha256 does not match the manifest; re-run `effilm data tokenize`")
        return np.memmap(f, dtype=np.uint8, mode="r") if s["tokens"] else None
