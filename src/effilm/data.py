"""The data pipeline the trainer consumes: token shards, packing and the staged loader.

This module re-exports the public names of ``effilm.data_shards`` (files -> shards) and
``effilm.data_loader`` (shards -> batches); import from here.

Loader API (for the trainer)
----------------------------
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
  ``effilm.tokenizer`` does the same for a tokenizer directory).
"""

from __future__ import annotations

from effilm.data_loader import Batch, SourceStream, StagedLoader, block_causal_mask, pack_documents
from effilm.data_shards import TokenDataset, expand_inputs, iter_documents, tokenize_files

__all__ = [
    "Batch",
    "SourceStream",
    "StagedLoader",
    "TokenDataset",
    "block_causal_mask",
    "expand_inputs",
    "iter_documents",
    "pack_documents",
    "tokenize_files",
]
