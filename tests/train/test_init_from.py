"""``[model] init_from = DIR``: the architecture and weights of an effilm checkpoint or an HF directory
start the run; contradicting fields are errors; a grown tokenizer grows the vocabulary."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from train_fixtures import make_data, write_run

from effilm.config.reader import build
from effilm.config.run import RunConfig, load_run_config
from effilm.errors import ConfigError
from effilm.models.transformer import build_model
from effilm.train.init import load_initial_weights, resolve_init
from effilm.train.objectives import LanguageModeling, StepContext
from effilm.train.parallel import Dist

DATA = {"sources": [{"name": "web", "path": "web"}], "stages": [{"name": "s", "tokens": 1024, "mixture": {"web": 1}}],
        "seq_len": 32}  # fmt: skip


def _run(model_table: dict, **top) -> RunConfig:
    return resolve_init(build(RunConfig, {"model": model_table, "data": DATA, **top}).with_absolute_paths())


@pytest.mark.parametrize("kind", ["llama", "phi3", "mixtral"])
def test_step_zero_loss_equals_transformers(tmp_path, kind):
    pytest.importorskip("transformers")
    from hf_models import build_hf

    hf = build_hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    cfg = _run({"init_from": str(tmp_path / "hf")})
    assert cfg.model.hf_architecture is not None and cfg.model.vocab_size == 97 and cfg.model.n_layers == 2
    model = build_model(cfg.model, seed=123)  # random weights, replaced by init_from's
    load_initial_weights(model, cfg)
    tokens = torch.randint(0, 97, (3, 33), generator=torch.Generator().manual_seed(1))
    batch = SimpleNamespace(tokens=tokens, doc_ids=None)
    objective = LanguageModeling()
    count = objective.global_count([batch], Dist())
    with torch.no_grad():
        ours = float(objective.micro_loss(model.eval(), batch, StepContext(torch.device("cpu"), global_count=count)).loss_sum) / count
        theirs = float(hf(input_ids=tokens, labels=tokens).loss)
    assert ours == pytest.approx(theirs, abs=1e-5), (ours, theirs)


def test_the_architecture_comes_from_the_directory(tmp_path):
    import effilm
    from effilm.config import ModelConfig

    src = effilm.save(build_model(ModelConfig.from_name("tiny-moe", vocab_size=300, n_layers=2)), tmp_path / "ck")
    cfg = _run({"init_from": str(src), "moe": {"aux_loss_coef": 0.05, "impl": "reference"}, "n_layers": 2,
                "name": "continued"})  # fmt: skip
    assert cfg.model.layer_pattern == "M" and cfg.model.moe.aux_loss_coef == 0.05 and cfg.model.name == "continued"
    assert cfg.model.init_from == str(src.resolve())
    for table, match in (({"d_model": 64}, r"model\.d_model=64 contradicts init_from .*whose d_model is 192"),
                         ({"moe": {"num_experts": 4}}, r"model\.moe\.num_experts=4 contradicts"),
                         ({"vocab_size": 200}, r"model\.vocab_size=200 is smaller than init_from"),
                         ({"preset": "tiny-dense"}, "give one")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            _run({"init_from": str(src), **table})
    for bad, match in ((tmp_path / "nope", "does not exist"), (tmp_path / "ck" / "config.json", "is not a directory")):
        with pytest.raises(ConfigError, match=f"model.init_from=.*{match}"):
            _run({"init_from": str(bad)})
    # the same through a run file and a dotted override (the override wins)
    (tmp_path / "run.toml").write_text('[model]\ninit_from = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"run\.toml: model\.init_from='ck-elsewhere': does not exist"):
        load_run_config(tmp_path / "run.toml", ["model.init_from=ck-elsewhere"])


def test_a_grown_tokenizer_grows_the_vocabulary_with_mean_rows(tmp_path):
    import effilm
    from effilm.config import ModelConfig
    from effilm.config.data import TokenizerTrainConfig
    from effilm.data.tokenizer import load_tokenizer, train_tokenizer

    (tmp_path / "t.txt").write_text("alpha beta gamma delta " * 400)
    small = train_tokenizer([tmp_path / "t.txt"], tmp_path / "small", TokenizerTrainConfig(vocab_size=280, chat_tokens=False))
    big = train_tokenizer([tmp_path / "t.txt"], tmp_path / "big", TokenizerTrainConfig(vocab_size=280, chat_tokens=True))
    n_small, n_big = load_tokenizer(small).vocab_size, load_tokenizer(big).vocab_size
    assert n_big > n_small
    for tied in (True, False):
        src = build_model(ModelConfig.from_name("tiny-dense", vocab_size=n_small, n_layers=1, tie_embeddings=tied))
        ck = effilm.save(src, tmp_path / f"ck-{tied}", tokenizer_dir=small)
        assert _run({"init_from": str(ck)}).tokenizer == str(ck.resolve())  # the checkpoint's own tokenizer
        cfg = _run({"init_from": str(ck)}, tokenizer=str(big))
        assert cfg.model.vocab_size == n_big
        model = build_model(cfg.model, seed=5)
        load_initial_weights(model, cfg)
        for name in ("embed.weight",) + (() if tied else ("lm_head.weight",)):
            old, new = dict(src.named_parameters())[name], dict(model.named_parameters())[name]
            assert torch.equal(new[:n_small], old)
            assert torch.allclose(new[n_small:], old.mean(0, keepdim=True).expand(n_big - n_small, -1))


def test_continue_training_a_checkpoint_and_resume(tmp_path):
    from effilm.cli import main

    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    assert main(["train", str(write_run(data, tmp_path / "first")), "--no-progress"]) == 0
    run = write_run(data, tmp_path / "second", name="second.toml")
    text = run.read_text().replace('preset = "tiny-dense"', f'init_from = "{tmp_path / "first" / "final"}"')
    run.write_text("\n".join(line for line in text.splitlines() if "=" not in line or line.split("=")[0].strip() not in
                             ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")))  # fmt: skip
    # with a vanishing learning rate the continued run ends where it started: at the first run's weights
    assert main(["train", str(run), "--no-progress", "--optim.lr=1e-12", "--train.max-steps=2"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "first" / "final" / "model.safetensors")), load_file(str(tmp_path / "second" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    saved = json.loads((tmp_path / "second" / "config.json").read_text())
    assert saved["model"]["init_from"] == str((tmp_path / "first" / "final").resolve())
    assert main(["train", str(run), "--resume", "--no-progress"]) == 0  # its own checkpoint, not init_from


def test_an_init_from_that_cannot_be_read_is_one_line_naming_it(tmp_path):
    import shutil
    import subprocess
    import sys

    from effilm.cli import main

    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    assert main(["train", str(write_run(data, tmp_path / "first")), "--no-progress"]) == 0
    final = tmp_path / "first" / "final"
    cases = {"badjson": ("config.json", "{not json", r"config\.json: not a valid model config"),
             "noweights": ("model.safetensors", None, r"model\.safetensors: missing"),
             "corrupt": ("model.safetensors", b"\0" * 64, r"model\.safetensors: checksum mismatch")}
    for name, (file, content, match) in cases.items():
        shutil.copytree(final, tmp_path / name)
        if content is None:
            (tmp_path / name / file).unlink()
        elif isinstance(content, bytes):
            (tmp_path / name / file).write_bytes(content)
        else:
            (tmp_path / name / file).write_text(content)
        run = write_run(data, tmp_path / f"run-{name}", name=f"{name}.toml")
        text = run.read_text().replace('preset = "tiny-dense"', f'init_from = "{tmp_path / name}"')
        run.write_text("\n".join(line for line in text.splitlines() if "=" not in line or line.split("=")[0].strip()
                                 not in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")))
        p = subprocess.run([sys.executable, "-m", "effilm", "train", str(run), "--no-progress", "--train.max-steps=1"],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and re.search(match, lines[0]) and name in lines[0], (name, p.stderr)


def test_init_from_a_training_checkpoint_reads_its_weights_not_its_optimizer_state(tmp_path):
    """A mid-run checkpoint (RUN/checkpoints/step-N) also holds optimizer.safetensors: init_from
    and effilm.load take the model's weights from it."""
    from safetensors.torch import load_file

    from effilm.formats.load import load
    from effilm.train.loop import train

    (tmp_path / "data").mkdir()
    data = make_data(tmp_path / "data")
    train(load_run_config(write_run(data, tmp_path / "a", name="a.toml"), ["train.max_steps=3", "train.eval_every=0"]))
    ckpt = tmp_path / "a" / "checkpoints" / "step-00000003"
    assert (ckpt / "optimizer.safetensors").is_file()
    weights = load_file(str(ckpt / "model.safetensors"))
    model = load(ckpt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    cfg = _run({"init_from": str(ckpt)}, tokenizer=str(data / "tok"))
    fresh = build_model(cfg.model, seed=9)
    load_initial_weights(fresh, cfg)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
