"""DPO: preference pairs tokenized through the chat template with their answers masked in, the
reference log-probabilities computed once and stored, the sigmoid / IPO / hinge losses checked
against TRL's DPOTrainer, and a run that logs its rewards and resumes bitwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from repo import SRC
from safetensors.torch import load_file
from train_fixtures import MODELS, make_data

from effilm.cli import main
from effilm.config.data import TokenizeConfig
from effilm.config.run import load_run_config
from effilm.data.preferences import encode_preference
from effilm.data.shards import TokenDataset, tokenize_files
from effilm.data.tokenizer import load_tokenizer
from effilm.errors import EffilmError
from effilm.train.loop import train


def preference_records(n: int) -> list[dict]:
    from effilm.synth import procedural

    recs = list(procedural.generate_preferences(n, num_facts=40, seed=0))
    for i, r in enumerate(recs[::5]):  # the other shapes a user may write
        r["prompt"] = r["prompt"][0]["content"] if i % 2 else [{"role": "system", "content": "Be brief."}, *r["prompt"]]
        r["chosen"] = [{"role": "assistant", "content": r["chosen"]}]
    return recs


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dpo")
    make_data(root)
    recs = preference_records(160)
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tokenize_files([root / "prefs.jsonl"], root / "tok", root / "pairs", TokenizeConfig(preferences=True,
                                                                                        shard_tokens=3000))  # fmt: skip
    return root, recs


def dpo_toml(root: Path, out: Path, extra: str = "", steps_tokens: int = 1536, micro: int = 4,
             model: str = "dense") -> Path:
    text = f"""out_dir = "{out}"
tokenizer = "{root / 'tok'}"
[model]
{MODELS[model]}
[data]
seq_len = 96
seed = 5
[[data.sources]]
name = "prefs"
path = "{root / 'pairs'}"
val_sequences = 8
[[data.stages]]
name = "dpo"
tokens = {steps_tokens}
mixture = {{ prefs = 1 }}
[optim]
lr = 3e-3
warmup_steps = 1
[train]
objective = "dpo"
global_batch = 8
micro_batch = {micro}
log_every = 1
eval_every = 2
save_every = 1
keep_last = 2
threads = 1
progress = false
{extra}
"""
    path = root / f"{out.name}.toml"
    path.write_text(text)
    return path


def test_preference_shards_hold_both_sides_with_answer_masks(prefs, tmp_path, capsys):
    root, recs = prefs
    ds, tok = TokenDataset(root / "pairs"), load_tokenizer(root / "tok")
    assert ds.preferences and ds.has_loss_mask and ds.num_documents == 2 * len(recs)
    for i in (0, 1, 5, 10):
        c, cm, r, rm = encode_preference(tok, recs[i], "r")
        assert ds.document(2 * i).tolist() == c and ds.document_mask(2 * i).tolist() == cm
        assert ds.document(2 * i + 1).tolist() == r and ds.document_mask(2 * i + 1).tolist() == rm
        # the prompt is shared and unmasked; the answers (and the template's end of turn) are masked in
        n = cm.index(1)
        assert c[:n] == r[:n] and rm.index(1) == n and all(cm[n:]) and all(rm[n:])
        answer = recs[i]["chosen"] if isinstance(recs[i]["chosen"], str) else recs[i]["chosen"][0]["content"]
        assert tok.decode(c[n:]).startswith(answer) and "<|end|>" in tok.decode(c[n:])
    bad = [({"prompt": "q", "chosen": "A.", "rejected": "A."}, "'chosen' and 'rejected' are the same answer"),
           ({"prompt": "q", "chosen": "A."}, "missing rejected"),
           ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "B."},
            "chosen\\[0\\] has role 'user'; an answer holds assistant turns only"),
           ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "A.", "rejected": "B."},
            "prompt\\[0\\] has role 'robot'")]  # fmt: skip
    for n, (rec, match) in enumerate(bad):
        f = tmp_path / f"bad{n}.jsonl"
        f.write_text(json.dumps(recs[0]) + "\n" + json.dumps(rec) + "\n")
        code = main(["data", "tokenize", "--preferences", "--input", str(f), "--tokenizer", str(root / "tok"),
                     "--out", str(tmp_path / f"o{n}")])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2 and f"{f}:2: " in err, err
        import re

        assert re.search(match, err), err
        assert not (tmp_path / f"o{n}").exists()


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_rewards_and_accuracy_equal_trl(tmp_path, loss):
    """TRL's DPOTrainer on the same model, reference and pairs: the same tokens, and the same loss,
    rewards, margins and preference accuracy."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    import copy

    from chat_fixtures import PHI3, make_tokenizer, tiny_llama_for
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import effilm
    from effilm.data.loader import Batch, pair_rows
    from effilm.train.objectives import DirectPreference, ReferenceLogps, StepContext
    from effilm.train.parallel import Dist

    d = make_tokenizer(tmp_path / "tok", PHI3)
    hf_tok, ref = tiny_llama_for(d)
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # the policy has moved away from the reference
        g = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path / "ref")
    policy.save_pretrained(tmp_path / "policy")
    recs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for q, c, r in [("What is the capital of France?", "Paris.", "Lyon, the river city."),
                            ("Name a river.", "The Seine runs fast.", "A stone."),
                            ("What runs over seven hills?", "The river.", "The capital of the stone hills."),
                            ("Is the stone small?", "Yes.", "No.")]]  # fmt: skip
    recs[1]["prompt"] = [{"role": "system", "content": "Answer briefly."}, *recs[1]["prompt"]]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(recs), report_to=[],
                     use_cpu=True, bf16=False, beta=0.1, loss_type=[loss], max_length=None, seed=0)  # fmt: skip
    trainer = DPOTrainer(model=policy.eval(), ref_model=ref.eval(), args=args, processing_class=hf_tok,
                         train_dataset=Dataset.from_list(recs))  # fmt: skip
    ours_tok = load_tokenizer(d)
    for row, rec in zip(trainer.train_dataset, recs, strict=True):
        c, _, r, _ = encode_preference(ours_tok, rec)
        assert c == row["prompt_ids"] + row["chosen_ids"] and r == row["prompt_ids"] + row["rejected_ids"]
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, batch))
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tokenize_files([tmp_path / "p.jsonl"], d, tmp_path / "pairs", TokenizeConfig(preferences=True))
    ds = TokenDataset(tmp_path / "pairs")
    objective = DirectPreference(beta=0.1, loss=loss)
    objective.reference = ReferenceLogps.compute(effilm.load(tmp_path / "ref"), {"p": ds}, 3, torch.device("cpu"),
                                                 None, Dist())  # fmt: skip
    tokens, mask = pair_rows([ds] * len(recs), list(range(len(recs))), ds.eos_id)
    ours_batch = Batch(tokens=torch.from_numpy(tokens), doc_ids=None, step=0, micro=0, num_micro=1, stage="dpo",
                       sources=["p"] * len(recs), loss_mask=torch.from_numpy(mask),
                       pairs=torch.arange(len(recs)))  # fmt: skip
    n = objective.global_count([ours_batch], Dist())
    assert n == len(recs)
    with torch.no_grad():
        out = objective.micro_loss(effilm.load(tmp_path / "policy"), ours_batch, StepContext(torch.device("cpu"),
                                                                                              global_count=n))  # fmt: skip
    assert float(out.loss_sum) / n == pytest.approx(theirs, abs=1e-5)
    for ours, key in (("rewards_chosen", "rewards/chosen"), ("rewards_rejected", "rewards/rejected"),
                      ("rewards_margin", "rewards/margins"), ("rewards_accuracy", "rewards/accuracies")):  # fmt: skip
        assert float(out.extras[ours]) / n == pytest.approx(metrics[key], abs=1e-5), key
    assert 0 < metrics["rewards/accuracies"] < 1 or metrics["rewards/margins"] != 0  # the check has teeth


STEPS = 16  # half of the pairs reject the answer to another question about the same subject: harder


def test_dpo_run_logs_rewards_and_learns_the_preference(prefs, tmp_path):
    root, _ = prefs
    res = train(load_run_config(dpo_toml(root, tmp_path / "run", steps_tokens=STEPS * 8 * 96)))
    run = tmp_path / "run"
    assert (run / "reference_logps.safetensors").is_file() and res.final_dir is not None
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert len(train_recs) == STEPS
    first, late = train_recs[0], train_recs[-5:]
    # step 1 starts at the reference: every reward is 0 and the sigmoid loss is log 2
    assert first["rewards_chosen"] == pytest.approx(0, abs=1e-5) and first["loss"] == pytest.approx(0.693147, abs=1e-4)
    # batches of 8 pairs are noisy: the last five steps' mean margin and accuracy, and held-out pairs below
    assert sum(r["rewards_margin"] for r in late) / 5 > 0 and sum(r["rewards_accuracy"] for r in late) / 5 > 0.6
    assert {"rewards_rejected", "rewards_margin", "rewards_accuracy"} <= set(late[0])
    val = [r["val_loss"]["prefs"] for r in recs if r["kind"] == "val"]
    assert len(val) == STEPS // 2 and val[-1] < val[0] < 0.6932  # held-out pairs: the preference generalises
    # a frozen in-memory reference gives the same run, step for step
    mem = train(load_run_config(dpo_toml(root, tmp_path / "mem", extra='[dpo]\nreference = "model"\n',
                                         steps_tokens=STEPS * 8 * 96)))  # fmt: skip
    assert not (tmp_path / "mem" / "reference_logps.safetensors").exists()
    assert mem.final_loss == pytest.approx(res.final_loss, rel=1e-5)
    # the plot shows the rewards
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "rewards.png").is_file()


def test_dpo_needs_pairs_and_pairs_need_dpo(prefs, tmp_path):
    root, _ = prefs
    text = dpo_toml(root, tmp_path / "x").read_text()
    (root / "lm.toml").write_text(text.replace('objective = "dpo"', 'objective = "lm"'))
    with pytest.raises(EffilmError, match="hold preference pairs, which only objective 'dpo' trains on"):
        train(load_run_config(root / "lm.toml"))
    (root / "plain.toml").write_text(text.replace(str(root / "pairs"), str(root / "web")))
    with pytest.raises(EffilmError, match="objective 'dpo' needs preference pairs"):
        train(load_run_config(root / "plain.toml"))
    (root / "short.toml").write_text(text.replace("seq_len = 96", "seq_len = 16"))
    with pytest.raises(EffilmError, match=r"preference pairs have a side longer than data.seq_len \+ 1 = 17"):
        train(load_run_config(root / "short.toml"))
    (root / "beta.toml").write_text(text + "[dpo]\nbeta = 0\nloss = 'sigmoid'\n")
    with pytest.raises(EffilmError, match=r"beta\.toml: dpo\.beta=0\.0 must be a positive number"):
        load_run_config(root / "beta.toml")


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_resume_after_sigkill_is_bitwise_identical(prefs, tmp_path, loss):
    root, _ = prefs
    extra = f'[dpo]\nloss = "{loss}"\n'
    ref = train(load_run_config(dpo_toml(root, tmp_path / "ref", extra=extra)))
    run = tmp_path / "killed"
    toml = dpo_toml(root, run, extra=extra)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "effilm", "train", str(toml)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    t0, ck = time.time(), run / "checkpoints" / "step-00000001"
    while not ck.is_dir():
        assert proc.poll() is None and time.time() - t0 < 120, "the run finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if loss == "ipo":  # the stored reference is gone: it is rebuilt from the starting model, bit for bit
        (run / "reference_logps.safetensors").unlink()
    out = subprocess.run([sys.executable, "-m", "effilm", "train", str(toml), "--resume"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    a, b = load_file(str(ref.final_dir / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dpo_on_an_moe_model_logs_and_plots_the_auxiliary_loss(prefs, tmp_path):
    from effilm.cli import main

    root, _ = prefs
    train(load_run_config(dpo_toml(root, tmp_path / "moe", model="arctic", steps_tokens=4 * 8 * 96)))
    recs = [json.loads(x) for x in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["kind"] == "train"]
    assert len(steps) == 4 and all(r["aux_loss"] > 0 and r["rewards_accuracy"] is not None for r in steps)
    assert all(len(r["expert_load"]) == len(r["moe_layers"]) > 0 for r in steps)
    assert main(["plot", str(tmp_path / "moe")]) == 0
    plots = {p.name for p in (tmp_path / "moe" / "plots").iterdir()}
    assert {"loss.png", "rewards.png", "expert_load.png"} <= plots
