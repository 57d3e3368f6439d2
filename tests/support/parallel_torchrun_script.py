"""Run under ``torchrun --nproc_per_node=2`` by tests/test_parallel.py: joins through the torchrun
environment, runs one expert-parallel + FSDP forward/backward of a tiny MoE, and writes what each
rank saw to OUT_DIR/rank{R}.json."""

from __future__ import annotations

import json
import sys

import torch

from effilm.config import ModelConfig
from effilm.models.transformer import build_model
from effilm.train.parallel import apply_expert_parallel, apply_fsdp, full_state_dict, init_distributed


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist = init_distributed()
    cfg = ModelConfig.from_name("tiny-moe", n_layers=1)
    model = apply_fsdp(apply_expert_parallel(build_model(cfg, seed=0), dist), dist)
    ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(dist.rank))
    model(ids).logits.float().pow(2).mean().backward()
    state = full_state_dict(model, dist)
    dist.barrier()
    info = {
        "rank": dist.rank, "world": dist.world_size, "backend": dist.backend,
        "total": dist.all_reduce_float(dist.rank + 1),
        "local_experts": model.layers[0].moe.experts.w_gate_up.shape[0],
        "state_experts": tuple(state["layers.0.moe.experts.w_gate_up"].shape) if dist.is_main else None,
    }  # fmt: skip
    with open(f"{out_dir}/rank{dist.rank}.json", "w") as f:
        json.dump(info, f)
    dist.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
