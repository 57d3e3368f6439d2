"""The run's checkpoints: save, resume, keep the last K, and write the final model.

The file format is :mod:`effilm.train.state`'s; the gathering of sharded weights is
:mod:`effilm.train.parallel`'s. Every method that touches weights is collective under torchrun
(each rank calls it); only rank 0 writes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import effilm.train.state as ts
from effilm.errors import EffilmError
from effilm.train.parallel import Dist, gather_state, load_state


@dataclass
class Position:
    """Where a run stands: what a checkpoint restores besides weights, optimizer and data."""

    step: int = 0
    tokens: int = 0
    skips: int = 0  # consecutive non-finite steps skipped (train.nan_policy='skip')
    elapsed_s: float = 0.0  # training time before this process started
    resumed_from: int | None = None
    source: str | None = None  # the checkpoint resumed from


class Checkpointer:
    def __init__(self, run_dir: Path, run_dict: dict, model_cfg, keep_last: int, dist: Dist):
        self.run_dir, self.run_dict, self.model_cfg = Path(run_dir), run_dict, model_cfg
        self.keep_last, self.dist = keep_last, dist

    def existing(self) -> list[tuple[int, Path]]:
        return ts.list_checkpoints(self.run_dir)

    def restore(self, model, optimizer, loader) -> Position | None:
        """Continue from the newest checkpoint that verifies (partial saves are removed first);
        None when there is none. The checkpoint must come from the same model and data config."""
        found = ts.latest_valid(self.run_dir)
        if self.dist.is_main:
            ts.remove_partial(self.run_dir)
        if found is None:
            if self.dist.is_main:
                print(f"--resume: no valid checkpoint in {ts.checkpoint_root(self.run_dir)}; starting from step 0",
                      file=sys.stderr)  # fmt: skip
            return None
        path, state = found
        _check_same_run(path, self.run_dict)
        weights, optim = ts.load_checkpoint(path, state)
        load_state(model, optimizer, weights, optim, self.dist, str(path))
        loader.load_state_dict(state["loader"])
        ts.set_rng_state(state["rng"])
        return Position(step=state["step"], tokens=state["tokens"], skips=state.get("skips", 0),
                        elapsed_s=state.get("elapsed_s", 0.0), resumed_from=state["step"], source=str(path))  # fmt: skip

    def save(self, pos: Position, elapsed_s: float, model, optimizer, loader) -> Path | None:
        """Checkpoint step ``pos.step`` (atomically), then prune to the newest ``keep_last``."""
        state = gather_state(model, optimizer, self.dist)
        path = None
        if self.dist.is_main:
            trainer = {"tokens": pos.tokens, "loader": loader.state_dict(), "rng": ts.rng_state(), "skips": pos.skips,
                       "world_size": self.dist.world_size, "elapsed_s": elapsed_s}  # fmt: skip
            path = ts.save_checkpoint(self.run_dir, pos.step, state[0], self.model_cfg, state[1], trainer,
                                      self.run_dict, self.keep_last)  # fmt: skip
        self.dist.barrier()
        return path

    def save_final(self, model, step: int, tokenizer_dir: str | None) -> Path | None:
        """The trained model as a plain effilm checkpoint in RUN/final, with the tokenizer beside it."""
        from effilm.data.tokenizer import copy_tokenizer_files
        from effilm.formats.checkpoint import write_model_files
        from effilm.io import atomic_dir

        state = gather_state(model, None, self.dist, with_optimizer=False)
        if not self.dist.is_main:
            return None
        final_dir = self.run_dir / "final"
        with atomic_dir(final_dir) as tmp:
            write_model_files(tmp, state[0], self.model_cfg, extra={"run": self.run_dict, "step": step})
            if tokenizer_dir:
                copy_tokenizer_files(tokenizer_dir, tmp)
        return final_dir


def _check_same_run(path: Path, run_dict: dict) -> None:
    saved = json.loads((path / "config.json").read_text()).get("run", {})
    for key in ("model", "data"):
        if json.dumps(saved.get(key), sort_keys=True) != json.dumps(run_dict[key], sort_keys=True):
            raise EffilmError(
                f"{path}: the checkpoint was written with a different [{key}] config; resuming would not "
                "continue the same run (use a new out_dir, or restore the original config)"
            )
