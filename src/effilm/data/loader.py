"""Packing and the staged, resumable, rank-aware loader.

Packing
    A source is read as one stream: its documents (each ending in EOS) concatenated in a shuffled
    order, epoch after epoch, each epoch with its own deterministic permutation. The stream is cut
    into back-to-back rows of ``seq_len + 1`` tokens (inputs ``row[:-1]``, targets ``row[1:]``);
    row ``q`` of a source is stream tokens ``[q*(seq_len+1), (q+1)*(seq_len+1))``, so any row can
    be read without reading the ones before it. ``doc_ids`` number the documents inside a row from 0
    (a document's EOS belongs to it); ``block_causal_mask(doc_ids)`` turns them into a mask.

Schedule
    Stage ``i`` lasts ``ceil(stage.tokens / (global_batch * seq_len))`` optimizer steps. At global
    step ``k`` each of the ``global_batch`` rows draws its source from the stage mixture with an RNG
    seeded by ``(seed, k)``, so proportions hold in expectation; the source streams continue across
    stages. Rank ``r`` of ``world_size`` takes the contiguous rows ``[r*B/W, (r+1)*B/W)`` of the
    global batch and yields them as ``B / W / micro_batch`` micro-batches: one rank with batch B sees
    exactly the rows two ranks with B/2 see together.

Preference pairs (DPO)
    A source tokenized with ``--preferences`` holds pair ``i`` as documents ``2i`` (prompt + chosen)
    and ``2i + 1`` (prompt + rejected). Its rows are whole pairs, never packed: each epoch visits the
    training pairs in its own permutation, and a micro-batch of ``micro_batch`` pairs has ``tokens``
    ``[2 * micro_batch, L]`` (the chosen sides, then the rejected sides, right-padded to the longest
    side ``L`` <= ``seq_len + 1``), their ``loss_mask`` (the answers' tokens) and ``pairs`` (each
    pair's index in its source). ``val_sequences`` holds out that many pairs. A stage lasts
    ``ceil(tokens / (global_batch * seq_len))`` steps as for packed data: a pair counts as one row.

Loader API (for the trainer)
    ``StagedLoader(cfg: DataConfig, global_batch, micro_batch, rank=0, world_size=1, model_vocab_size=None)``

    * ``cfg`` is ``effilm.config.data.DataConfig`` (sources, stages, seq_len, seed, doc_ids).
      Construction opens every source's dataset and verifies shard checksums, so a missing file or a
      corrupt shard fails here, before training starts (``EffilmError`` naming the source and shard).
    * ``global_batch`` rows per optimizer step across all ranks; each rank gets
      ``global_batch / world_size`` of them as ``num_micro`` micro-batches of ``micro_batch`` rows.
    * Iterating yields ``Batch``: ``tokens`` int64 ``[micro_batch, seq_len + 1]`` (inputs
      ``tokens[:, :-1]``, targets ``tokens[:, 1:]``), ``doc_ids`` int32 of the same shape or None
      (``block_causal_mask(batch.doc_ids[:, :-1])`` gives the ``[B, T, T]`` mask), ``step``,
      ``micro``, ``num_micro``, ``stage`` (name) and ``sources`` (per row). Iteration ends after the
      last stage: ``total_steps`` optimizer steps, ``len(loader)`` micro-batches left.
    * Schedule: ``stage_bounds`` lists ``(name, first_step, end_step)`` per stage (for an LR schedule
      that restarts per stage); ``stage``, ``stage_index`` and ``step_in_stage`` describe the next batch.
    * ``state_dict()`` is a small JSON-serialisable dict (next step and micro-batch, rows consumed per
      source, and a fingerprint of the data setup); ``load_state_dict(state)`` makes a fresh loader
      yield exactly the batches the saved one would have yielded next. At a step boundary the state
      also resumes under another world size or micro-batch size.
    * ``validation_batches(micro_batch=None)`` returns ``{source: [Batch, ...]}``: each source's
      ``val_sequences`` held-out rows (documents never used for training), this rank's share.
    * ``vocab_size`` and ``eos_id`` come from the datasets' manifests; pass ``model_vocab_size`` to
      fail at construction when the data's ids would not fit the model (``check_vocab`` in
      ``effilm.data.tokenizer`` does the same for a tokenizer directory).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from effilm.errors import EffilmError

# Domain tags that keep the RNG streams for epochs, the validation split and mixture draws apart.
_EPOCH_KEY, _VAL_KEY, _MIX_KEY = 1, 2, 3
# Epoch permutations kept in memory per source (a row spans at most two epochs).
_EPOCH_CACHE = 2


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def pack_documents(docs, seq_len: int, eos_id: int | None = None, masks=None):
    """Pack an iterable of token sequences into rows of ``seq_len + 1`` tokens.

    If ``eos_id`` is given it is appended to every document that does not already end in it.
    Yields ``(tokens, doc_ids)`` numpy int64 / int32 arrays; a last partial row is dropped. With
    ``masks`` (an iterable of per-document loss masks, aligned with ``docs``), yields
    ``(tokens, doc_ids, loss_mask)`` with the masks packed the same way (an added EOS gets 0).
    """
    import numpy as np

    width = seq_len + 1
    buf_t: list = []
    buf_d: list = []
    buf_m: list = []
    have, local = 0, 0
    masks = iter(masks) if masks is not None else None
    for doc in docs:
        doc = np.asarray(doc, dtype=np.int64)
        mask = np.asarray(next(masks), dtype=np.uint8) if masks is not None else None
        if eos_id is not None and (len(doc) == 0 or doc[-1] != eos_id):
            doc = np.append(doc, eos_id)
            mask = np.append(mask, 0).astype(np.uint8) if mask is not None else None
        pos = 0
        while pos < len(doc):
            take = min(width - have, len(doc) - pos)
            buf_t.append(doc[pos : pos + take])
            buf_d.append(np.full(take, local, dtype=np.int32))
            if mask is not None:
                buf_m.append(mask[pos : pos + take])
            have += take
            pos += take
            if have == width:
                row = (np.concatenate(buf_t), np.concatenate(buf_d))
                yield (*row, np.concatenate(buf_m)) if masks is not None else row
                buf_t, buf_d, buf_m, have = [], [], [], 0
                local = 0
        if have:
            local += 1
        else:
            local = 0


def block_causal_mask(doc_ids):
    """Boolean ``[B, T, T]`` mask (True = may attend): causal and within the same document."""
    import torch

    doc_ids = torch.as_tensor(doc_ids)
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    return same & causal


def _epoch_order(items, seed: int, name: str, e: int):
    """``items`` in epoch ``e``'s order: a permutation seeded by the data seed, the source and the epoch."""
    import numpy as np

    return items[np.random.default_rng([seed, _EPOCH_KEY, _name_key(name), e]).permutation(len(items))]


def _cached_epoch(cache: dict, e: int, make):
    """``make(e)``, kept in ``cache`` with the last few epochs (the oldest goes first)."""
    if e not in cache:
        value = make(e)
        if len(cache) >= _EPOCH_CACHE:
            cache.pop(min(cache))
        cache[e] = value
    return cache[e]


class SourceStream:
    """The endless, epoch-shuffled token stream of one source's training documents."""

    def __init__(self, dataset, docs, seed: int, name: str):
        import numpy as np

        self.dataset, self.name, self.seed = dataset, name, seed
        self.docs = np.asarray(docs, dtype=np.int64)
        self.epoch_tokens = int(dataset.doc_lengths[self.docs].sum())
        if self.epoch_tokens == 0:
            raise EffilmError(f"source {name!r}: no training tokens left (all documents held out for validation?)")
        self._cache: dict[int, tuple] = {}

    def _epoch(self, e: int):
        import numpy as np

        def make(e):
            order = _epoch_order(self.docs, self.seed, self.name, e)
            return order, np.cumsum(self.dataset.doc_lengths[order])

        return _cached_epoch(self._cache, e, make)

    def read(self, start: int, n: int):
        """Stream tokens ``[start, start + n)``, their row-local document ids and their loss mask
        (all ones for a dataset without masks)."""
        import numpy as np

        tokens = np.empty(n, dtype=np.int64)
        ids = np.empty(n, dtype=np.int32)
        mask = np.ones(n, dtype=np.uint8)
        masked = self.dataset.has_loss_mask
        e, off = divmod(start, self.epoch_tokens)
        pos, local = 0, 0
        while pos < n:
            order, ends = self._epoch(e)
            j = int(np.searchsorted(ends, off, side="right"))
            while pos < n and j < len(order):
                doc = self.dataset.document(int(order[j]))
                begin = off - (int(ends[j]) - len(doc))
                take = min(len(doc) - begin, n - pos)
                tokens[pos : pos + take] = doc[begin : begin + take]
                if masked:
                    mask[pos : pos + take] = self.dataset.document_mask(int(order[j]))[begin : begin + take]
                ids[pos : pos + take] = local
                pos += take
                off += take
                local += 1
                j += 1
            e, off = e + 1, 0
        return tokens, ids, mask


class PairStream:
    """The endless, epoch-shuffled sequence of one preference source's training pairs."""

    def __init__(self, dataset, pairs, seed: int, name: str):
        import numpy as np

        self.dataset, self.name, self.seed = dataset, name, seed
        self.pairs = np.asarray(pairs, dtype=np.int64)
        if not len(self.pairs):
            raise EffilmError(f"source {name!r}: no training pairs left (all held out for validation?)")
        self._cache: dict[int, object] = {}

    def pair(self, q: int) -> int:
        """The pair index at position ``q`` of the stream."""
        e, i = divmod(q, len(self.pairs))
        return int(_cached_epoch(self._cache, e, lambda e: _epoch_order(self.pairs, self.seed, self.name, e))[i])


def pair_rows(datasets: list, pairs: list[int], pad_id: int):
    """``(tokens, loss_mask)`` numpy arrays ``[2n, L]`` for ``n`` pairs (``datasets[k]`` holds pair
    ``pairs[k]``): the chosen sides, then the rejected sides, right-padded with ``pad_id`` (mask 0)."""
    import numpy as np

    docs = [(ds, 2 * p) for ds, p in zip(datasets, pairs, strict=True)]
    docs += [(ds, 2 * p + 1) for ds, p in zip(datasets, pairs, strict=True)]
    width = max(int(ds.doc_lengths[d]) for ds, d in docs)
    tokens = np.full((len(docs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(docs), width), dtype=np.uint8)
    for i, (ds, d) in enumerate(docs):
        n = int(ds.doc_lengths[d])
        tokens[i, :n] = ds.document(d)
        mask[i, :n] = ds.document_mask(d)
    return tokens, mask


@dataclass
class Batch:
    """One micro-batch. ``tokens``: int64 ``[micro_batch, seq_len + 1]``; inputs ``tokens[:, :-1]``,
    targets ``tokens[:, 1:]``. ``doc_ids``: int32, same shape, or None when the config's ``doc_ids``
    is off. ``step`` is the optimizer step, ``micro`` the micro-batch within it (of ``num_micro``),
    ``stage`` the stage name and ``sources`` each row's source name."""

    tokens: object
    doc_ids: object
    step: int
    micro: int
    num_micro: int
    stage: str
    sources: list[str]
    loss_mask: object = None  # uint8 like tokens, 1 where the loss counts; when a source has masks (chat data)
    pairs: object = None  # preference data: int64 [micro_batch], each pair's index in its source


STATE_VERSION = 1


class StagedLoader:
    """Yields packed micro-batches following the stage schedule; deterministic and resumable.

    ``StagedLoader(cfg, global_batch, micro_batch, rank=0, world_size=1, datasets=None,
    model_vocab_size=None)``: opens (and checksums) every source before anything runs, and checks
    the data's vocabulary fits ``model_vocab_size`` when given. ``datasets`` may map source names to
    already opened ``TokenDataset``s. Iterate it for ``Batch`` objects; it stops after the last stage.
    """

    def __init__(self, cfg, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 datasets: dict | None = None, model_vocab_size: int | None = None):
        import numpy as np

        from effilm.data.shards import TokenDataset

        for name, v in (("global_batch", global_batch), ("micro_batch", micro_batch), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise EffilmError(f"loader: {name}={v!r} must be a positive integer")
        if not 0 <= rank < world_size:
            raise EffilmError(f"loader: rank={rank} must lie in [0, world_size={world_size})")
        if global_batch % world_size or (global_batch // world_size) % micro_batch:
            raise EffilmError(
                f"loader: global_batch={global_batch} must split into world_size={world_size} ranks of "
                f"whole micro-batches of {micro_batch} rows"
            )
        self.cfg, self.global_batch, self.micro_batch = cfg, global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.width = cfg.seq_len + 1
        self.num_micro = global_batch // world_size // micro_batch
        datasets = dict(datasets or {})
        for s in cfg.sources:
            if s.name not in datasets:
                try:
                    datasets[s.name] = TokenDataset(s.path, verify=s.verify)
                except EffilmError as exc:
                    raise EffilmError(f"data source {s.name!r}: {exc}") from None
        self.datasets = datasets
        shas = {n: d.tokenizer_sha256 for n, d in datasets.items()}
        if len(set(shas.values())) > 1:
            raise EffilmError(f"data sources were tokenized with different tokenizers (sha256 per source: {shas})")
        first = datasets[cfg.sources[0].name]
        self.vocab_size, self.eos_id = first.vocab_size, first.eos_id
        if model_vocab_size is not None and self.vocab_size > model_vocab_size:
            raise EffilmError(
                f"the data was tokenized with a {self.vocab_size}-token vocabulary but the model's vocab_size is "
                f"{model_vocab_size}; token ids would fall outside the embedding table"
            )
        self.source_names = [s.name for s in cfg.sources]
        self.has_loss_mask = any(d.has_loss_mask for d in datasets.values())
        kinds = {n: d.preferences for n, d in datasets.items()}
        if len(set(kinds.values())) > 1:
            raise EffilmError("data sources mix preference pairs with other data: "
                              f"{', '.join(n for n, k in kinds.items() if k)} hold pairs, the others do not")  # fmt: skip
        self.pairs = any(kinds.values())
        # documents are masked from each other by default when the data is chat data
        self.doc_ids = cfg.doc_ids if cfg.doc_ids is not None else self.has_loss_mask
        self.streams: dict[str, SourceStream] = {}
        self._val_rows: dict[str, tuple] = {}
        for s in cfg.sources:
            if self.pairs:
                train_pairs, val = self._split_pairs(s, datasets[s.name])
                self.streams[s.name] = PairStream(datasets[s.name], train_pairs, cfg.seed, s.name)
            else:
                train_docs, val = self._split(s, datasets[s.name])
                self.streams[s.name] = SourceStream(datasets[s.name], train_docs, cfg.seed, s.name)
            self._val_rows[s.name] = val
        tokens_per_step = global_batch * cfg.seq_len
        steps = [-(-st.tokens // tokens_per_step) for st in cfg.stages]
        self.stage_bounds = []  # (name, first step, end step)
        start = 0
        for st, n in zip(cfg.stages, steps, strict=True):
            self.stage_bounds.append((st.name, start, start + n))
            start += n
        self.total_steps = start
        self._probs = [
            np.array([st.weights().get(n, 0.0) for n in self.source_names], dtype=np.float64) for st in cfg.stages
        ]
        self.step, self.micro = 0, 0
        self.rows = {n: 0 for n in self.source_names}  # rows each source gave before self.step
        self._plan = None

    # ------------------------------------------------------------------ validation split
    def _split(self, s, ds):
        import numpy as np

        if s.val_sequences == 0:
            return np.arange(ds.num_documents), None
        need = s.val_sequences * self.width
        rng = np.random.default_rng([self.cfg.seed, _VAL_KEY, _name_key(s.name)])
        order = rng.permutation(ds.num_documents)
        cum = np.cumsum(ds.doc_lengths[order])
        k = int(np.searchsorted(cum, need, side="left")) + 1
        if k >= ds.num_documents:
            raise EffilmError(
                f"source {s.name!r}: val_sequences={s.val_sequences} needs {need} tokens, leaving no documents of "
                f"its {ds.num_tokens} tokens for training; lower val_sequences"
            )
        val_docs = order[:k]
        masks = [ds.document_mask(int(d)) for d in val_docs] if ds.has_loss_mask else None
        rows = list(pack_documents((ds.document(int(d)) for d in val_docs), self.cfg.seq_len, masks=masks))
        rows = rows[: s.val_sequences]
        tokens = np.stack([r[0] for r in rows])
        ids = np.stack([r[1] for r in rows])
        mask = np.stack([r[2] for r in rows]) if masks is not None else np.ones_like(tokens, dtype=np.uint8)
        return np.sort(order[k:]), (tokens, ids, mask)

    def _split_pairs(self, s, ds):
        """Training pair indices, and the held-out ones (``val_sequences`` pairs, fixed by the seed)."""
        import numpy as np

        n = ds.num_documents // 2
        longest = ds.doc_lengths.max()
        if longest > self.width:
            over = int((ds.doc_lengths.reshape(-1, 2).max(axis=1) > self.width).sum())
            raise EffilmError(
                f"source {s.name!r}: {over} of its {n} preference pairs have a side longer than data.seq_len + 1 = "
                f"{self.width} tokens (the longest: {longest}); raise data.seq_len or shorten them"
            )
        if s.val_sequences >= n:
            raise EffilmError(f"source {s.name!r}: val_sequences={s.val_sequences} holds out all {n} pairs, leaving "
                              "none for training; lower val_sequences")  # fmt: skip
        order = np.random.default_rng([self.cfg.seed, _VAL_KEY, _name_key(s.name)]).permutation(n)
        val = np.sort(order[: s.val_sequences])
        return np.sort(order[s.val_sequences :]), (val if s.val_sequences else None)

    def _pair_batch(self, names: list[str], pairs: list[int], step, micro, num_micro, stage) -> Batch:
        import torch

        tokens, mask = pair_rows([self.datasets[n] for n in names], pairs, self.eos_id)
        return Batch(tokens=torch.from_numpy(tokens), doc_ids=None, step=step, micro=micro, num_micro=num_micro,
                     stage=stage, sources=names, loss_mask=torch.from_numpy(mask),
                     pairs=torch.tensor(pairs, dtype=torch.int64))  # fmt: skip

    def validation_batches(self, micro_batch: int | None = None) -> dict[str, list[Batch]]:
        """Held-out rows per source (fixed by the seed), this rank's share, in micro-batches.

        Rows are split over ranks in contiguous blocks (``numpy.array_split``), so the ranks
        together cover every held-out row once. Sources without ``val_sequences`` are absent.
        """
        import numpy as np
        import torch

        mb = micro_batch or self.micro_batch
        out: dict[str, list[Batch]] = {}
        for name, val in self._val_rows.items():
            if val is None:
                continue
            held = len(val) if self.pairs else len(val[0])  # pair indices, or (tokens, ids, mask) rows
            rows = np.array_split(np.arange(held), self.world_size)[self.rank]
            batches = []
            if self.pairs:
                for i in range(0, len(rows), mb):
                    sel = [int(val[k]) for k in rows[i : i + mb]]
                    batches.append(self._pair_batch([name] * len(sel), sel, -1, i // mb, -(-len(rows) // mb),
                                                    "validation"))  # fmt: skip
                out[name] = batches
                continue
            for i in range(0, len(rows), mb):
                sel = rows[i : i + mb]
                batches.append(Batch(
                    tokens=torch.from_numpy(val[0][sel]),
                    doc_ids=torch.from_numpy(val[1][sel]) if self.doc_ids else None,
                    step=-1, micro=i // mb, num_micro=-(-len(rows) // mb), stage="validation",
                    sources=[name] * len(sel),
                    loss_mask=torch.from_numpy(val[2][sel]) if self.has_loss_mask else None,
                ))
            out[name] = batches
        return out

    # ------------------------------------------------------------------ schedule
    def stage_index_at(self, step: int) -> int:
        for i, (_, a, b) in enumerate(self.stage_bounds):
            if a <= step < b:
                return i
        raise IndexError(f"step {step} is past the last stage (total_steps={self.total_steps})")

    @property
    def stage_index(self) -> int:
        """Index of the stage the next batch comes from (the last stage once finished)."""
        return self.stage_index_at(min(self.step, self.total_steps - 1))

    @property
    def stage(self):
        """The ``StageConfig`` the next batch comes from."""
        return self.cfg.stages[self.stage_index]

    @property
    def step_in_stage(self) -> int:
        return self.step - self.stage_bounds[self.stage_index][1]

    def _draw(self, step: int):
        """Source index of every row of the global batch at ``step``."""
        import numpy as np

        p = self._probs[self.stage_index_at(step)]
        rng = np.random.default_rng([self.cfg.seed, _MIX_KEY, step])
        return rng.choice(len(p), size=self.global_batch, p=p)

    def _plan_step(self):
        """For the current step: per global row, its source index and that source's row number."""
        import numpy as np

        if self._plan is None or self._plan[0] != self.step:
            src = self._draw(self.step)
            q = np.empty(self.global_batch, dtype=np.int64)
            for si, name in enumerate(self.source_names):
                hit = np.flatnonzero(src == si)
                q[hit] = self.rows[name] + np.arange(len(hit))
            self._plan = (self.step, src, q)
        return self._plan[1], self._plan[2]

    # ------------------------------------------------------------------ iteration
    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        import numpy as np
        import torch

        if self.step >= self.total_steps:
            raise StopIteration
        src, q = self._plan_step()
        per_rank = self.global_batch // self.world_size
        lo = self.rank * per_rank + self.micro * self.micro_batch
        if self.pairs:
            names = [self.source_names[int(src[g])] for g in range(lo, lo + self.micro_batch)]
            pairs = [self.streams[n].pair(int(q[g])) for n, g in zip(names, range(lo, lo + self.micro_batch), strict=True)]
            batch = self._pair_batch(names, pairs, self.step, self.micro, self.num_micro,
                                     self.cfg.stages[self.stage_index].name)  # fmt: skip
            self._advance(src)
            return batch
        tokens = np.empty((self.micro_batch, self.width), dtype=np.int64)
        ids = np.empty((self.micro_batch, self.width), dtype=np.int32)
        mask = np.empty((self.micro_batch, self.width), dtype=np.uint8)
        names = []
        for i, g in enumerate(range(lo, lo + self.micro_batch)):
            name = self.source_names[int(src[g])]
            tokens[i], ids[i], mask[i] = self.streams[name].read(int(q[g]) * self.width, self.width)
            names.append(name)
        batch = Batch(
            tokens=torch.from_numpy(tokens),
            doc_ids=torch.from_numpy(ids) if self.doc_ids else None,
            step=self.step, micro=self.micro, num_micro=self.num_micro,
            stage=self.cfg.stages[self.stage_index].name, sources=names,
            loss_mask=torch.from_numpy(mask) if self.has_loss_mask else None,
        )
        self._advance(src)
        return batch

    def _advance(self, src) -> None:
        import numpy as np

        self.micro += 1
        if self.micro == self.num_micro:
            counts = np.bincount(src, minlength=len(self.source_names))
            for si, name in enumerate(self.source_names):
                self.rows[name] += int(counts[si])
            self.step, self.micro = self.step + 1, 0

    def __len__(self) -> int:
        """Micro-batches left to yield."""
        return (self.total_steps - self.step) * self.num_micro - self.micro

    # ------------------------------------------------------------------ state
    def _fingerprint(self) -> dict:
        c = self.cfg
        return {
            "seq_len": c.seq_len, "seed": c.seed, "global_batch": self.global_batch,
            "sources": {s.name: [s.val_sequences, self.datasets[s.name].content_sha256] for s in c.sources},
            "stages": [[st.name, st.tokens, st.weights()] for st in c.stages],
        }

    def state_dict(self) -> dict:
        """JSON-serialisable position: the next step and micro-batch, and rows taken per source."""
        return {
            "version": STATE_VERSION, "step": self.step, "micro": self.micro, "rows": dict(self.rows),
            "world_size": self.world_size, "micro_batch": self.micro_batch, "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. Another world size or micro-batch is allowed at a step boundary."""
        if state.get("version") != STATE_VERSION:
            raise EffilmError(f"loader state version {state.get('version')!r}; expected {STATE_VERSION}")
        fp = self._fingerprint()
        saved = state.get("fingerprint", {})
        diff = sorted(k for k in fp if _jsonish(fp[k]) != _jsonish(saved.get(k)))
        if diff:
            raise EffilmError(f"loader state was saved under a different data setup (changed: {', '.join(diff)})")
        if state["micro"] and (state["world_size"], state["micro_batch"]) != (self.world_size, self.micro_batch):
            raise EffilmError(
                "loader state was saved mid-step; resume it with the same world_size and micro_batch "
                f"({state['world_size']}, {state['micro_batch']})"
            )
        if set(state["rows"]) != set(self.source_names):
            raise EffilmError(f"loader state lists sources {sorted(state['rows'])}, config has {self.source_names}")
        self.step, self.micro = int(state["step"]), int(state["micro"])
        self.rows = {k: int(v) for k, v in state["rows"].items()}
        self._plan = None


def _jsonish(x):
    """Normalise tuples/lists and dict keys the way a JSON round trip does."""
    import json

    return json.loads(json.dumps(x))
