"""The demo's sizes: one dataclass, a full and a quick (CI) setting, and the three run configs.

Everything the demo sizes has a named field here (facts, records, model widths, token budgets,
learning rate, threads...). ``DemoConfig.quick()`` shrinks the data and the budgets for CI; the
models keep the same shapes so the quick run exercises exactly the code of the full one.

The models share one shape rule: the dense MLP width is ``ffn_mult * d_model``; an Arctic hybrid
has a dense residual MLP of width ``d_model`` (Arctic's own constraint) plus ``top_k`` experts of
width ``d_model`` each, so with ``top_k = ffn_mult - 1`` both have the same *active* parameters per
token, while the hybrid holds ``num_experts`` experts in total. The upcycled hybrid cuts the dense
MLP into ``ffn_mult`` slices of width ``d_model``: slice 0 stays the residual MLP, the experts
start from the others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from effilm.config.reader import apply_overrides, build, load
from effilm.config.run import DPO_LOSSES
from effilm.errors import ConfigError

MODEL_NAMES = ("dense-web", "dense-textbook", "dense-filtered", "arctic-textbook", "arctic-loss-free", "arctic-upcycled")
# dense-filtered's second stage reads this source: the web corpus's top fraction by quality-classifier score
FILTERED_SOURCE = "web_filtered"
# the Arctic hybrids compared with dense-textbook at matched active compute, with their balancing
MOE_RUNS = {"arctic-textbook": "aux_loss", "arctic-loss-free": "loss_free", "arctic-upcycled": "loss_free"}
# the post-training stage's three models, in order
POSTTRAIN_LABELS = {"base": "base (textbook model)", "sft": "SFT", "dpo": "SFT + DPO"}
# `effilm demo --quick`: the fields the CI setting changes
QUICK = dict(num_facts=40, textbook_records=300, web_records=400, heldout_records=10, annotate_records=200,
             train_tokens=32_768, contaminated_tokens=8_192,
             vocab_size=512, warmup_steps=4, log_every=4, val_sequences=2, chat_records=300, preference_records=300,
             sft_tokens=32_768, dpo_tokens=8_192)


@dataclass
class DemoConfig:
    seed: int = field(default=0, metadata={"help": "seed of the data, the tokenizer order and the models"})
    # --- data
    num_facts: int = field(default=80, metadata={"help": "facts drawn from the bundled tables"})
    textbook_records: int = field(default=2400, metadata={"help": "textbook records (lessons and exercises)"})
    web_records: int = field(default=4000, metadata={"help": "web-like records (facts buried in noise)"})
    web_varied: bool = field(default=True, metadata={"help": "web-like records vary in quality (0-4 facts among 0-8 "
                                                             "distractor lines; false: 2 among 4 in every record)"})
    heldout_records: int = field(default=60, metadata={"help": "held-out records per corpus for bits per byte"})
    quiz_questions_per_fact: int = field(default=1, metadata={"help": "quiz items per fact (held-out phrasings)"})
    quiz_public_share: float = field(default=0.5, metadata={"help": "share of the taught facts the public quiz asks; "
                                                                    "the private twins ask the rest"})
    twin_seed: int = field(default=1, metadata={"help": "seed of the twins' phrasings and distractors"})
    contaminated_tokens: int = field(default=163_840, metadata={"help": "dense-contaminated: tokens dense-web is "
                                                                        "trained on further, with the leaked quiz"})
    contaminated_leak_share: float = field(default=0.25, metadata={"help": "dense-contaminated: share of those "
                                                                          "tokens drawn from the leaked quiz items"})
    planted_leaks: int = field(default=5, metadata={"help": "quiz items planted in a copy of the corpus"})
    # --- the learned quality filter (dense-filtered's data)
    annotate_records: int = field(default=1000, metadata={"help": "web-like records generated apart from the corpus, "
                                                                  "scored by the procedural annotator to train the "
                                                                  "quality classifier"})
    filter_keep_fraction: float = field(default=0.6, metadata={"help": "share of the cleaned web corpus kept, the top "
                                                                       "by quality-classifier score (0.6: the filtered "
                                                                       "stage reads it about 4 times)"})
    filter_examples: int = field(default=3, metadata={"help": "highest- and lowest-scored web documents quoted"})
    # --- tokenizer and shards
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size (special tokens included)"})
    # --- models (see the module docstring for the equal-active-parameters rule)
    d_model: int = field(default=128, metadata={"help": "hidden size of every demo model"})
    n_layers: int = field(default=2, metadata={"help": "transformer blocks"})
    n_heads: int = field(default=4, metadata={"help": "query heads"})
    n_kv_heads: int = field(default=2, metadata={"help": "key/value heads (GQA)"})
    ffn_mult: int = field(default=3, metadata={"help": "dense MLP width / d_model"})
    num_experts: int = field(default=16, metadata={"help": "experts per Arctic-hybrid layer"})
    upcycle_at: float = field(default=0.5, metadata={"help": "arctic-upcycled starts from dense-textbook at this "
                                                             "fraction of its steps, then trains the rest"})
    # --- training (equal token budgets for every model)
    seq_len: int = field(default=128, metadata={"help": "training sequence length"})
    global_batch: int = field(default=16, metadata={"help": "sequences per optimizer step"})
    train_tokens: int = field(default=819_200, metadata={"help": "training tokens per model (all stages)"})
    web_stage_fraction: float = field(default=0.2, metadata={"help": "two-stage runs: share of tokens in stage 1 (web)"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warmup steps"})
    val_sequences: int = field(default=8, metadata={"help": "packed sequences per source held out for val loss"})
    log_every: int = field(default=10, metadata={"help": "steps between metrics records"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads for training and evaluation"})
    # --- post-training (the textbook model: SFT on chat data, then DPO on preference pairs)
    posttrain_from: str = field(default="dense-textbook", metadata={"help": "the model post-training starts from"})
    chat_records: int = field(default=2000, metadata={"help": "chat conversations about the facts (exercise phrasings)"})
    preference_records: int = field(default=2000, metadata={"help": "preference pairs: right answer vs a plausible wrong one"})
    sft_tokens: int = field(default=524_288, metadata={"help": "SFT training tokens (packed conversations)"})
    sft_lr: float = field(default=1e-3, metadata={"help": "SFT peak learning rate"})
    dpo_tokens: int = field(default=65_536, metadata={"help": "DPO budget: steps = dpo_tokens / (global_batch * seq_len)"})
    dpo_lr: float = field(default=1e-4, metadata={"help": "DPO peak learning rate"})
    dpo_beta: float = field(default=0.5, metadata={"help": "DPO beta (strength of the pull towards the reference)"})
    dpo_loss: str = field(default="sigmoid", metadata={"help": "DPO loss: sigmoid, ipo or hinge"})
    chat_max_new_tokens: int = field(default=8, metadata={"help": "chat-form quiz: most tokens per greedy answer"})
    # --- evaluation
    eval_batch_size: int = field(default=32, metadata={"help": "rows per forward pass when scoring"})
    significance_z: float = field(default=2.0, metadata={"help": "a difference counts when it exceeds z standard errors"})
    cloze_target: float = field(default=0.5, metadata={"help": "the issue's target: textbook model cloze accuracy"})

    def __post_init__(self) -> None:
        for name in ("num_facts", "textbook_records", "web_records", "heldout_records", "quiz_questions_per_fact",
                     "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "num_experts", "seq_len",
                     "global_batch", "train_tokens", "val_sequences", "log_every", "threads", "eval_batch_size",
                     "annotate_records", "filter_examples", "contaminated_tokens",
                     "chat_records", "preference_records", "sft_tokens", "dpo_tokens", "chat_max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"demo.{name}={v!r} must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"demo.seed={self.seed!r} must be an integer >= 0")
        if self.planted_leaks < 1:
            raise ConfigError(f"demo.planted_leaks={self.planted_leaks} must be at least 1")
        if self.ffn_mult < 2:
            raise ConfigError(f"demo.ffn_mult={self.ffn_mult} must be >= 2 (residual MLP + at least one expert)")
        if self.num_experts <= self.ffn_mult - 1:
            raise ConfigError(f"demo.num_experts={self.num_experts} must exceed top_k = ffn_mult - 1 = {self.ffn_mult - 1}")
        if not 0.0 < self.upcycle_at < 1.0:
            raise ConfigError(f"demo.upcycle_at={self.upcycle_at} must lie in (0, 1)")
        if self.num_experts % (self.ffn_mult - 1):
            raise ConfigError(f"demo.num_experts={self.num_experts} must be a multiple of ffn_mult - 1 = "
                              f"{self.ffn_mult - 1} (arctic-upcycled: experts start as the dense MLP's slices)")
        if not isinstance(self.web_varied, bool):
            raise ConfigError(f"demo.web_varied={self.web_varied!r} must be true or false")
        if not 0.0 < self.filter_keep_fraction < 1.0:
            raise ConfigError(f"demo.filter_keep_fraction={self.filter_keep_fraction} must lie in (0, 1)")
        if not 0.0 < self.web_stage_fraction < 1.0:
            raise ConfigError(f"demo.web_stage_fraction={self.web_stage_fraction} must lie in (0, 1)")
        if not 0.0 < self.quiz_public_share < 1.0:
            raise ConfigError(f"demo.quiz_public_share={self.quiz_public_share} must lie in (0, 1): the twins ask "
                              "the facts the public quiz leaves out")
        if not 0.0 < self.contaminated_leak_share < 1.0:
            raise ConfigError(f"demo.contaminated_leak_share={self.contaminated_leak_share} must lie in (0, 1)")
        if self.twin_seed < 0 or isinstance(self.twin_seed, bool):
            raise ConfigError(f"demo.twin_seed={self.twin_seed!r} must be an integer >= 0")
        if self.planted_leaks > self.num_facts * self.quiz_questions_per_fact * self.quiz_public_share:
            raise ConfigError(f"demo.planted_leaks={self.planted_leaks} exceeds the public quiz's size (about "
                              f"num_facts x quiz_questions_per_fact x quiz_public_share)")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError("demo.d_model must divide by n_heads, and n_heads by n_kv_heads")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("demo.lr must be positive and demo.warmup_steps >= 0")
        for name in ("sft_lr", "dpo_lr", "dpo_beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ConfigError(f"demo.{name}={v!r} must be a positive number")
        if self.posttrain_from not in MODEL_NAMES:
            raise ConfigError(f"demo.posttrain_from={self.posttrain_from!r} must be one of {', '.join(MODEL_NAMES)}")
        if self.dpo_loss not in DPO_LOSSES:
            raise ConfigError(f"demo.dpo_loss={self.dpo_loss!r} must be one of {', '.join(DPO_LOSSES)}")

    @classmethod
    def quick(cls, overrides=()) -> DemoConfig:
        """The CI setting: less data, smaller budgets, the same model shapes (dotted ``overrides``
        applied on top)."""
        return build(cls, apply_overrides(cls, QUICK, overrides), "demo")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path, overrides=()) -> DemoConfig:
        """A demo config file (``configs/demo.toml``): DemoConfig keys at the top level, or under
        ``[demo]``, with dotted ``overrides`` applied (through the one config reader)."""
        return load(cls, path, overrides, section="demo", what="demo config")

    def to_toml(self) -> str:
        """The config as a commented TOML file that ``from_toml`` reads back to an equal config."""
        lines = ["# effilm demo config: every field of effilm.demo.config.DemoConfig", "[demo]"]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            lit = ("true" if v else "false") if isinstance(v, bool) else repr(v)
            lines.append(f"{f.name} = {lit}  # {f.metadata['help']}")
        return "\n".join(lines) + "\n"

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    # ----- model tables ([model] of a run file)
    def model_table(self, kind: str) -> dict:
        common = {"vocab_size": self.vocab_size, "d_model": self.d_model, "n_layers": self.n_layers,
                  "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "max_seq_len": self.seq_len}
        if kind == "dense":
            return {"preset": "tiny-dense", **common, "ffn_dim": self.ffn_mult * self.d_model}
        if kind == "arctic":
            return {"preset": "tiny-arctic", **common, "ffn_dim": self.d_model, "residual_ffn_dim": self.d_model,
                    "moe": {"num_experts": self.num_experts, "top_k": self.ffn_mult - 1,
                            "expert_ffn_dim": self.d_model}}
        raise ConfigError(f"unknown demo model kind {kind!r}")

    def posttrain_run_dict(self, kind: str, out_dir: str, init_from: str, data: str) -> dict:
        """The run config of the SFT (``kind="sft"``, on chat shards) or DPO (``kind="dpo"``, on
        preference shards) stage, starting from the model directory ``init_from``."""
        if kind not in ("sft", "dpo"):
            raise ConfigError(f"unknown post-training stage {kind!r}; choose sft or dpo")
        tokens = self.sft_tokens if kind == "sft" else self.dpo_tokens
        steps = max(1, -(-tokens // self.tokens_per_step))
        d = {
            "out_dir": out_dir,
            "model": {"init_from": init_from},
            "data": {"seq_len": self.seq_len, "seed": self.seed,
                     "sources": [{"name": kind, "path": data, "val_sequences": self.val_sequences}],
                     "stages": [{"name": kind, "tokens": steps * self.tokens_per_step, "mixture": {kind: 1.0}}]},
            "optim": {"lr": self.sft_lr if kind == "sft" else self.dpo_lr,
                      "warmup_steps": min(self.warmup_steps, max(1, steps // 10))},
            "train": {"objective": kind, "global_batch": self.global_batch, "micro_batch": self.global_batch,
                      "seed": self.seed, "device": "cpu", "log_every": max(1, min(self.log_every, steps // 8)),
                      "eval_every": 0, "save_every": 0, "keep_last": 1, "threads": self.threads},
        }
        if kind == "dpo":
            d["dpo"] = {"beta": self.dpo_beta, "loss": self.dpo_loss, "reference": "precomputed"}
        return d

    def contaminated_run_dict(self, out_dir: str, init_from: str, sources: dict[str, str]) -> dict:
        """The run config of ``dense-contaminated``: the model at ``init_from`` (dense-web) trained on for
        ``contaminated_tokens`` on ``sources["web"]`` mixed with the leaked quiz (``sources["quiz_leak"]``, the
        whole of it trained on: no validation split)."""
        steps = max(1, -(-self.contaminated_tokens // self.tokens_per_step))
        leak = next(k for k in sources if k != "web")
        return {
            "out_dir": out_dir,
            "model": {"init_from": init_from},
            "data": {"seq_len": self.seq_len, "seed": self.seed,
                     "sources": [{"name": "web", "path": sources["web"], "val_sequences": self.val_sequences},
                                 {"name": leak, "path": sources[leak], "val_sequences": 0}],
                     "stages": [{"name": "leak", "tokens": steps * self.tokens_per_step,
                                 "mixture": {"web": 1.0 - self.contaminated_leak_share,
                                             leak: self.contaminated_leak_share}}]},
            "optim": {"lr": self.lr, "warmup_steps": min(self.warmup_steps, max(1, steps // 10))},
            "train": {"global_batch": self.global_batch, "micro_batch": self.global_batch, "seed": self.seed,
                      "device": "cpu", "log_every": max(1, min(self.log_every, steps // 8)), "eval_every": 0,
                      "save_every": 0, "keep_last": 1, "threads": self.threads},
        }

    @property
    def train_steps(self) -> int:
        return -(-self.train_tokens // self.tokens_per_step)

    @property
    def upcycle_step(self) -> int:
        """The dense-textbook step arctic-upcycled starts from: ``upcycle_at`` of the run, on a logged step."""
        step = round(self.train_steps * self.upcycle_at) // self.log_every * self.log_every
        return min(max(step, self.log_every), self.train_steps - 1)

    def upcycle_table(self, init_from: str, balance: str, seed: int | None = None) -> dict:
        """The ``[model]`` table of an Arctic hybrid upcycled from the dense model at ``init_from``: the
        demo hybrid's shape (residual MLP and top-k experts of width d_model), its residual MLP and
        experts cut from the dense MLP's ffn_mult slices (``residual = "slice"``), so the active
        parameters stay the dense model's."""
        return {"init_from": init_from,
                "upcycle": {"experts": self.num_experts, "top_k": self.ffn_mult - 1, "pattern": "H",
                            "granularity": self.ffn_mult, "residual": "slice", "seed": self.seed if seed is None else seed},
                "moe": {"balance": balance}}  # fmt: skip

    def run_dict(self, name: str, out_dir: str, tokenizer: str, sources: dict[str, str]) -> dict:
        """The run config (``RunConfig.from_dict`` input) of demo model ``name`` (one of MODEL_NAMES).
        ``arctic-upcycled`` starts from dense-textbook's checkpoint at ``upcycle_step`` (its run
        directory beside ``out_dir``) and trains the rest of the same stages. ``dense-filtered``
        has dense-textbook's two stages with the filtered web corpus (``sources[FILTERED_SOURCE]``)
        in place of the textbook one."""
        if name not in MODEL_NAMES:
            raise ConfigError(f"unknown demo model {name!r}; choose from {MODEL_NAMES}")
        steps = self.train_steps
        total = steps * self.tokens_per_step
        if name == "dense-web":
            stages = [{"name": "web", "tokens": total, "mixture": {"web": 1.0}}]
        else:
            web_steps = max(1, round(steps * self.web_stage_fraction))
            second = FILTERED_SOURCE if name == "dense-filtered" else "textbook"
            stages = [{"name": "web", "tokens": web_steps * self.tokens_per_step, "mixture": {"web": 1.0}},
                      {"name": second, "tokens": (steps - web_steps) * self.tokens_per_step,
                       "mixture": {second: 1.0}}]
        if name == "arctic-upcycled":
            stages = stages_after(stages, self.upcycle_step * self.tokens_per_step)
            dense = Path(out_dir).parent / "dense-textbook" / "checkpoints" / f"step-{self.upcycle_step:08d}"
            model = self.upcycle_table(str(dense), MOE_RUNS[name])
        else:
            model = self.model_table("arctic" if name.startswith("arctic") else "dense")
            if name in MOE_RUNS:
                model["moe"]["balance"] = MOE_RUNS[name]
        train = {"global_batch": self.global_batch, "micro_batch": self.global_batch, "seed": self.seed,
                 "device": "cpu", "log_every": self.log_every, "eval_every": 0, "save_every": 0, "keep_last": 1,
                 "threads": self.threads}  # fmt: skip
        if name == "dense-textbook":  # keep the checkpoint arctic-upcycled starts from
            train.update(save_every=self.upcycle_step, keep_last=steps)
        return {
            "out_dir": out_dir,
            "tokenizer": tokenizer,
            "model": model,
            "data": {"seq_len": self.seq_len, "seed": self.seed,
                     "sources": [{"name": k, "path": v, "val_sequences": self.val_sequences} for k, v in sources.items()],
                     "stages": stages},
            "optim": {"lr": self.lr, "warmup_steps": self.warmup_steps},
            "train": train,
        }


def stages_after(stages: list[dict], skip_tokens: int) -> list[dict]:
    """``stages`` without their first ``skip_tokens`` tokens (a run that continues another's budget)."""
    out = []
    for st in stages:
        take = st["tokens"] - min(skip_tokens, st["tokens"])
        skip_tokens -= st["tokens"] - take
        if take:
            out.append({**st, "tokens": take})
    return out
