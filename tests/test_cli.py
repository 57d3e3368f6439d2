"""The command line, run as a user would: real subprocesses of ``python -m effilm``."""

import json
import os
import subprocess
import sys

import pytest
import repo
import torch

SRC = str(repo.SRC)


def effilm(*args, check=True, cwd=None):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "effilm", *args], capture_output=True, text=True, env=env, timeout=600, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"effilm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_presets_lists_every_preset():
    out = effilm("presets", "--json").stdout
    names = {r["name"] for r in json.loads(out)}
    assert {"arctic", "phi-3-mini-4k", "phi-3-small-8k", "openelm-3b", "tiny-arctic", "mixtral-8x7b"} <= names


@pytest.mark.parametrize("name, total, active", [("arctic", 478.6e9, 17.32e9), ("phi-3.5-moe", 41.87e9, 6.64e9)])
def test_params_json(name, total, active):
    s = json.loads(effilm("params", name, "--json", "--seq-len", "1024").stdout)
    assert isinstance(s["total_params"], int) and isinstance(s["active_params"], int)
    assert abs(s["total_params"] - total) / total < 1e-3 and abs(s["active_params"] - active) / active < 1e-3
    assert s["seq_len"] == 1024 and s["weight_bytes"]["int4"] * 8 == s["weight_bytes"]["fp32"]
    text = effilm("params", name).stdout
    assert "active per token" in text and "KV cache / token bf16" in text


def test_bad_input_is_one_clear_line():
    p = effilm("params", "phi3-mini", check=False)
    assert p.returncode == 2 and "unknown preset 'phi3-mini'" in p.stderr and "did you mean" in p.stderr
    assert "Traceback" not in p.stderr
    p = effilm("convert", "/nonexistent", "/tmp/x", "--to", "hf", check=False)
    assert p.returncode == 2 and "no such model directory" in p.stderr and "Traceback" not in p.stderr


def test_convert_both_ways(tmp_path):
    import effilm as api
    from effilm.config import ModelConfig
    from effilm.models.transformer import build_model

    model = build_model(ModelConfig.from_name("tiny-moe", vocab_size=150), seed=3)
    api.save(model, tmp_path / "ck")
    effilm("convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    effilm("convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "effilm")
    back = api.load(tmp_path / "back")
    ids = torch.randint(0, 150, (1, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model.eval()(ids).logits)
    s = json.loads(effilm("params", str(tmp_path / "hf"), "--json").stdout)
    assert s["total_params"] == model.cfg.num_params()


def _subcommands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def _config_classes():
    from effilm.config.data import TokenizeConfig, TokenizerTrainConfig
    from effilm.config.model import UpcycleConfig
    from effilm.config.quant import QuantConfig
    from effilm.config.run import RunConfig
    from effilm.data.classifier_train import ClassifierConfig
    from effilm.data.dedup import DedupConfig
    from effilm.data.filters import FilterConfig
    from effilm.demo.config import DemoConfig
    from effilm.eval.decontam import DecontamConfig
    from effilm.eval.scoring import EvalConfig
    from effilm.eval.tasks import TaskConfig
    from effilm.eval.twins import TwinEvalConfig
    from effilm.formats.convert import ConvertConfig
    from effilm.inference.sampling import SamplingParams
    from effilm.reports.plots import PlotConfig
    from effilm.serve.app import ServeConfig
    from effilm.synth.annotate import AnnotateConfig
    from effilm.synth.recipe import Recipe
    from effilm.synth.runner import SynthOptions
    from effilm.synth.twins import TwinConfig

    return {
        ("presets",): [], ("params",): [], ("plan",): [], ("convert",): [ConvertConfig], ("demo",): [DemoConfig],
        ("tokenizer",): [], ("tokenizer", "train"): [TokenizerTrainConfig], ("data",): [],
        ("data", "tokenize"): [TokenizeConfig], ("synth",): [SynthOptions, Recipe], ("dedup",): [DedupConfig],
        ("filter",): [FilterConfig], ("eval",): [EvalConfig, TaskConfig],
        ("decontam",): [DecontamConfig, TaskConfig], ("train",): [RunConfig], ("plot",): [PlotConfig],
        ("generate",): [SamplingParams], ("serve",): [ServeConfig], ("quantize",): [QuantConfig],
        ("annotate",): [AnnotateConfig], ("classifier",): [], ("classifier", "train"): [ClassifierConfig],
        ("upcycle",): [UpcycleConfig], ("twin",): [], ("twin", "make"): [TwinConfig],
        ("twin", "eval"): [TwinEvalConfig, EvalConfig],
    }  # fmt: skip


def _flags(cls, prefix=""):
    """(flag, help) of every field the command line can set, nested tables as --table.field."""
    import dataclasses
    import typing

    from effilm.config.reader import _list_of_scalars, _scalar, _table_type

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        table = _table_type(hints[f.name])
        if table is not None:
            yield from _flags(table, f"{prefix}{f.name}.")
        elif _scalar(hints[f.name]) or _list_of_scalars(hints[f.name]):
            yield "--" + (prefix + f.name).replace("_", "-"), f.metadata.get("help", "")


def test_every_subcommand_has_a_help_that_lists_its_settings(capsys):
    import textwrap

    from effilm.cli import build_parser, main

    parser = build_parser()
    commands = dict(_subcommands(parser))
    classes = _config_classes()
    assert sorted(commands) == sorted(classes), "a new subcommand needs a row in _config_classes"
    top = effilm("-h").stdout
    for path, sub in commands.items():
        with pytest.raises(SystemExit) as exit_:
            main([*path, "-h"])
        assert exit_.value.code == 0, path
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare word by word
        assert text.startswith(f"usage: effilm {' '.join(path)}"), path
        description = " ".join((sub.description or "").split())
        assert description and description[:60] in text, path
        if len(path) == 1:
            assert path[0] in top
        for cls in classes[path]:
            for flag, help_text in _flags(cls):
                if cls.__name__ == "ServeConfig" and flag == "--model":
                    flag = "model"  # positional
                assert flag in text, (path, flag)
                words = " ".join(textwrap.shorten(help_text, 40, placeholder="").split())
                assert words in text, (path, flag, words)
    assert "(default: 0.0003)" in " ".join(effilm("train", "-h").stdout.split())  # the dataclass default, shown


def test_flags_take_dashes_or_underscores_and_typos_get_a_suggestion(tmp_path):
    p = effilm("train", str(tmp_path / "none.toml"), "--optim.lr=3e-4", "--train.log_every=4", check=False)
    assert p.returncode == 2 and "none.toml: run config file not found" in p.stderr
    p = effilm("train", str(tmp_path / "none.toml"), "--optim.lrr=3", check=False)
    assert p.returncode == 2 and "did you mean --optim.lr" in p.stderr and "Traceback" not in p.stderr
    p = effilm("generate", str(tmp_path), "--prompt", "x", "--temperature", "hot", check=False)
    assert p.returncode == 2 and "temperature='hot' should be of type float" in p.stderr


