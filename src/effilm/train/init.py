"""Starting a run from weights: ``[model] init_from = DIR`` (an effilm checkpoint or an HF directory).

The architecture comes from DIR when the run file is read (:func:`effilm.config.hf.expand_init_from`).
Here the run is completed against DIR before anything is built:

* the tokenizer is DIR's unless the run names one;
* a tokenizer with more tokens than the model (new chat tokens) grows the vocabulary: the
  embedding and an untied LM head get new rows set to the mean of the old ones, so the new tokens
  start as an average token rather than as noise. A smaller model vocabulary than DIR's is an
  error (the config reader refuses it).

With ``[model.upcycle]`` the dense source's weights are upcycled into the MoE architecture first
(:mod:`effilm.models.upcycle`). The weights are copied in at step 0 only; ``--resume`` then
restores the run's own checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from effilm.config.run import RunConfig
from effilm.errors import EffilmError


def resolve_init(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the tokenizer defaulted to ``init_from``'s and the vocabulary grown to fit it."""
    src = cfg.model.init_from
    if not src:
        return cfg
    if cfg.tokenizer is None and (Path(src) / "tokenizer.json").is_file():
        cfg = dataclasses.replace(cfg, tokenizer=src)
    if cfg.tokenizer:
        from effilm.data.tokenizer import load_tokenizer

        n = load_tokenizer(cfg.tokenizer).vocab_size
        if n > cfg.model.vocab_size:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=n))
    return cfg


def load_initial_weights(model, cfg: RunConfig) -> None:
    """Copy ``cfg.model.init_from``'s weights into ``model`` (built with the run's config), growing
    the embedding and LM head rows when the run's vocabulary is larger."""
    import torch

    from effilm.formats.checkpoint import load_state_checked, model_state
    from effilm.formats.load import load

    src = cfg.model.init_from
    try:
        source = load(src)
    except EffilmError as exc:
        raise EffilmError(f"model.init_from={src!r}: cannot load it ({exc})") from None
    state = model_state(source)
    if cfg.model.upcycle is not None:  # dense -> MoE, the same function at step 0 (effilm.models.upcycle)
        from effilm.models.upcycle import upcycle_state

        state = upcycle_state(state, source.cfg, cfg.model, cfg.model.upcycle)
    vocab = cfg.model.vocab_size
    for key in ("embed.weight", "lm_head.weight", "lm_head.bias"):
        t = state.get(key)
        if t is not None and t.shape[0] < vocab:
            extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(vocab - t.shape[0], *t.shape[1:])
            state[key] = torch.cat([t, extra])
    for key, t in model.state_dict().items():  # loss-free balancing from a checkpoint trained without it
        if key.endswith(".router_bias") and key not in state:
            state[key] = torch.zeros_like(t, device="cpu")
    load_state_checked(model, state, f"model.init_from={src}")
