"""SFT: chat data tokenized with its loss mask, packed with the mask and document boundaries, and a
loss over the assistant tokens normalised by their count in the global batch."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo import SRC
from safetensors.torch import load_file
from train_fixtures import make_data, run_toml

from effilm.cli import main
from effilm.config.data import DataConfig, TokenizeConfig
from effilm.config.reader import build
from effilm.config.run import load_run_config
from effilm.data.chat import conversation, encode_chat
from effilm.data.loader import StagedLoader
from effilm.data.shards import TokenDataset, tokenize_files
from effilm.data.tokenizer import load_tokenizer
from effilm.errors import EffilmError
from effilm.train.loop import train

NAMES = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]


def chat_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(NAMES, 2)
        turns = [{"role": "user", "content": f"Which comes after {a}?"}, {"role": "assistant", "content": f"{b}, then {a}."}]
        if i % 3 == 0:
            turns = [{"role": "system", "content": "Answer in a few words."}, *turns,
                     {"role": "user", "content": f"And before {b}?"}, {"role": "assistant", "content": f"{a}."}]  # fmt: skip
        out.append({"messages": turns} if i % 4 else {"prompt": turns[-2]["content"], "completion": turns[-1]["content"]})
    return out


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sft")
    make_data(root)
    recs = chat_records(240, 0)
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tokenize_files([root / "chat.jsonl"], root / "tok", root / "chat", TokenizeConfig(chat=True, shard_tokens=4000))
    return root, recs


def sft_run(root: Path, out: Path, extra: str = "", micro: int = 4, **kw) -> Path:
    text = run_toml(root, out, extra=extra, **kw).replace(f'path = "{root / "web"}"', f'path = "{root / "chat"}"')
    text = text.replace("mixture = { web = 0.5, syn = 0.5 }", "mixture = { web = 1 }")
    text = text.replace("micro_batch = 4", f"micro_batch = {micro}").replace("[train]", '[train]\nobjective = "sft"')
    path = root / f"{out.name}.toml"
    path.write_text(text)
    return path


def test_chat_shards_hold_the_assistant_masks(chat, tmp_path, capsys):
    root, recs = chat
    ds, tok = TokenDataset(root / "chat"), load_tokenizer(root / "tok")
    assert ds.has_loss_mask and ds.num_documents == len(recs)
    for i in (0, 1, 5, 9):
        ids, mask = encode_chat(tok, conversation(recs[i], "r"))
        assert ds.document(i).tolist() == [*ids, tok.eos_id] and ds.document_mask(i).tolist() == [*mask, 0]
    # a bad record names its file and line; the mask files are checked like the shards
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "no answer"}]}) + "\n")  # fmt: skip
    assert main(["data", "tokenize", "--chat", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer",
                 str(root / "tok"), "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert f"{tmp_path / 'bad.jsonl'}:2: no assistant turn" in capsys.readouterr().err
    import shutil

    shutil.copytree(root / "chat", tmp_path / "copy")
    mask = next((tmp_path / "copy").glob("*.mask.bin"))
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(Exception, match="mask.bin: .* bytes for .* tokens"):
        TokenDataset(tmp_path / "copy")


def test_batches_carry_the_mask_and_document_boundaries(chat):
    root, _ = chat
    cfg = build(DataConfig, {"sources": [{"name": "c", "path": str(root / "chat"), "val_sequences": 2}],
                             "stages": [{"name": "s", "tokens": 2048, "mixture": {"c": 1}}], "seq_len": 64}, "data")
    loader = StagedLoader(cfg, 4, 4)
    assert loader.doc_ids  # on by default for chat data
    tok = load_tokenizer(root / "tok")
    b = next(loader)
    assert b.loss_mask.shape == b.tokens.shape and b.doc_ids is not None
    kept = tok.decode(b.tokens[b.loss_mask.bool()].tolist())
    assert "Which comes after" not in kept and "<|end|>" in kept and "then" in kept
    val = loader.validation_batches()["c"][0]
    assert val.loss_mask is not None and val.loss_mask.shape == val.tokens.shape


def test_sft_loss_is_over_assistant_tokens_of_the_global_batch(chat, tmp_path):
    root, _ = chat
    one = train(load_run_config(sft_run(root, tmp_path / "m8", micro=8), ["train.max_steps=2"]))
    four = train(load_run_config(sft_run(root, tmp_path / "m2", micro=2), ["train.max_steps=2"]))
    a, b = load_file(str(one.final_dir / "model.safetensors")), load_file(str(four.final_dir / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=2e-6) for k in a)  # the same gradient however the batch is split
    assert one.final_loss == pytest.approx(four.final_loss, rel=1e-5)
    # the logged loss is the masked mean: recompute it for the first batch by hand
    from effilm.models.transformer import build_model

    cfg = load_run_config(sft_run(root, tmp_path / "x", micro=8))
    loader = StagedLoader(cfg.data, 8, 8)
    batch = next(loader)
    model = build_model(cfg.model, seed=cfg.train.seed).eval()
    with torch.no_grad():
        logits = model(batch.tokens[:, :-1], doc_ids=batch.doc_ids[:, :-1]).logits
    keep = batch.loss_mask[:, 1:].bool()
    want = torch.nn.functional.cross_entropy(logits[keep], batch.tokens[:, 1:][keep])
    from effilm.train.objectives import StepContext, SupervisedFineTuning
    from effilm.train.parallel import Dist

    obj = SupervisedFineTuning()
    n = obj.global_count([batch], Dist())
    assert n == int(keep.sum()) < keep.numel()
    with torch.no_grad():
        got = obj.micro_loss(model, batch, StepContext(torch.device("cpu"), global_count=n)).loss_sum / n
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(EffilmError, match="objective 'sft' needs loss masks"):
        train(_plain(root, tmp_path))


def _plain(root, tmp_path):
    """An SFT run on plain (unmasked) data: refused with a clear error."""
    text = run_toml(root, tmp_path / "plain").replace("[train]", '[train]\nobjective = "sft"')
    (root / "plain.toml").write_text(text)
    return load_run_config(root / "plain.toml")


def test_sft_resume_after_sigkill_is_bitwise_identical(chat, tmp_path):
    root, _ = chat
    ref = train(load_run_config(sft_run(root, tmp_path / "ref", stage_tokens=1536)))
    run = tmp_path / "killed"
    toml = sft_run(root, run, stage_tokens=1536)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "effilm", "train", str(toml)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    import time

    t0, ck = time.time(), run / "checkpoints" / "step-00000003"
    while not ck.is_dir():
        assert proc.poll() is None and time.time() - t0 < 120, "the run finished before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run([sys.executable, "-m", "effilm", "train", str(toml), "--resume"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    a, b = load_file(str(ref.final_dir / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_loss_equals_trl(tmp_path):
    """TRL's SFTTrainer with assistant_only_loss on the same conversations: the same tokens, the same
    assistant mask, and the same loss from the same weights."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from chat_fixtures import CONVERSATIONS, GENERATION, make_tokenizer, tiny_llama_for
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    import effilm
    from effilm.data.loader import Batch
    from effilm.train.objectives import StepContext, SupervisedFineTuning
    from effilm.train.parallel import Dist

    d = make_tokenizer(tmp_path / "tok", GENERATION)
    hf_tok, hf = tiny_llama_for(d)
    hf.save_pretrained(tmp_path / "hf")
    args = SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, per_device_train_batch_size=len(CONVERSATIONS),
                     report_to=[], max_length=None, use_cpu=True, bf16=False, seed=0)  # fmt: skip
    trainer = SFTTrainer(model=hf, args=args, train_dataset=Dataset.from_list([{"messages": c} for c in CONVERSATIONS]),
                         processing_class=hf_tok)  # fmt: skip
    ours_tok = load_tokenizer(d)
    for row, conv in zip(trainer.train_dataset, CONVERSATIONS, strict=True):
        ids, mask = encode_chat(ours_tok, conversation({"messages": conv}, "t"))
        assert row["input_ids"] == ids and [int(label != -100) for label in row["labels"]] == mask
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"]
    with torch.no_grad():
        theirs = float(trainer.compute_loss(hf.eval(), batch, num_items_in_batch=(labels[:, 1:] != -100).sum()))
    model = effilm.load(tmp_path / "hf")
    ours_batch = Batch(tokens=batch["input_ids"], doc_ids=None, step=0, micro=0, num_micro=1, stage="s", sources=[],
                       loss_mask=(labels != -100).to(torch.uint8))  # fmt: skip
    obj = SupervisedFineTuning()
    n = obj.global_count([ours_batch], Dist())
    with torch.no_grad():
        ours = float(obj.micro_loss(model, ours_batch, StepContext(torch.device("cpu"), global_count=n)).loss_sum) / n
    assert ours == pytest.approx(theirs, abs=1e-5), (ours, theirs)
