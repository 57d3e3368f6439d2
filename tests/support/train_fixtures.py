"""Tiny token datasets and run files for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = "alpha beta gamma delta river stone tree cloud fox dog cat mat quick brown lazy".split()


def docs(n: int, seed: int, tag: str) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{tag}{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(2, 30)))) for i in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def make_data(root: Path) -> Path:
    """A 300-token BPE tokenizer and two token sources, 'web' and 'syn', under ``root``."""
    from effilm.config.data import TokenizeConfig, TokenizerTrainConfig
    from effilm.data.shards import tokenize_files
    from effilm.data.tokenizer import train_tokenizer

    tok = train_tokenizer([write_jsonl(root / "t.jsonl", docs(100, 0, "t"))], root / "tok",
                          TokenizerTrainConfig(vocab_size=300))
    for i, (name, n) in enumerate({"web": 200, "syn": 100}.items()):
        tokenize_files([write_jsonl(root / f"{name}.jsonl", docs(n, i + 1, name))], tok, root / name,
                       TokenizeConfig(shard_tokens=2000))
    return root


_SMALL = """vocab_size = 320
d_model = 32
n_layers = 2
n_heads = 4
n_kv_heads = 2
ffn_dim = 64
"""
MODELS = {
    "dense": 'preset = "tiny-dense"\n' + _SMALL,
    "arctic": 'preset = "tiny-arctic"\n' + _SMALL + """residual_ffn_dim = 32
moe = { num_experts = 8, expert_ffn_dim = 16, capacity_factor = 1.5, z_loss_coef = 0.001 }
""",
}


def run_toml(root: Path, out: Path, model: str = "dense", stage_tokens: int = 1024, extra: str = "") -> str:
    """A two-stage run: web only, then web + syn; 8 sequences of 32 tokens per step."""
    return f"""out_dir = "{out}"
tokenizer = "{root / 'tok'}"
[model]
{MODELS[model]}
[data]
seq_len = 32
seed = 3
[[data.sources]]
name = "web"
path = "{root / 'web'}"
val_sequences = 4
[[data.sources]]
name = "syn"
path = "{root / 'syn'}"
[[data.stages]]
name = "s1"
tokens = {stage_tokens}
mixture = {{ web = 1 }}
[[data.stages]]
name = "s2"
tokens = {stage_tokens}
mixture = {{ web = 0.5, syn = 0.5 }}
[optim]
lr = 3e-3
warmup_steps = 2
[train]
global_batch = 8
micro_batch = 4
log_every = 2
eval_every = 4
save_every = 3
keep_last = 2
threads = 1
progress = false
{extra}
"""


def write_run(root: Path, out: Path, name: str = "run.toml", **kw) -> Path:
    path = root / name
    path.write_text(run_toml(root, out, **kw))
    return path
