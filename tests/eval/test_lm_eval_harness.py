"""The real lm-evaluation-harness (optional extra ``eval-check``) against effilm's letter scoring.

lm-eval runs its own ``hf`` model on a local tiny Llama directory, with an MMLU-style task defined
by local YAML and JSON files (one task per subject, as MMLU is; ``first_n`` few-shot from dev),
fully offline. effilm loads the same directory through ``effilm.formats.load.load`` and scores the
same items with its own scorer; per-item letter log-likelihoods must agree to 1e-4 and accuracy
exactly.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model imports it
torch = pytest.importorskip("torch")

from eval_fixtures import SUBJECTS, hf_tokenizer, make_mmlu_dir, tiny_llama, train_tokenizer  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
    dev: {dev}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {subject_text}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(task_dir, tests, devs):
    task_dir.mkdir()
    names = {}
    for s in SUBJECTS:
        files = {}
        for split, items in (("test", [t for t in tests if t["subject"] == s]), ("dev", devs[s])):
            files[split] = task_dir / f"{s}_{split}.json"
            files[split].write_text("".join(json.dumps(i) + "\n" for i in items))
        names[s] = f"effilm_check_{s}"
        (task_dir / f"{s}.yaml").write_text(TASK_YAML.format(name=names[s], subject_text=s.replace("_", " "), **files))
    return names


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 2])
def test_lm_eval_harness_agrees_with_effilm(tmp_path, monkeypatch, shots):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from effilm.data.tokenizer import load_tokenizer
    from effilm.eval.scoring import EvalConfig, score_task
    from effilm.eval.tasks import load_task
    from effilm.formats.load import load

    torch.set_num_threads(1)
    tests, devs = make_mmlu_dir(tmp_path / "mmlu", n_test=6)
    tok = train_tokenizer()
    model_dir = tmp_path / "model"
    tiny_llama(tok.get_vocab_size()).save_pretrained(model_dir)
    hf_tokenizer(tok).save_pretrained(model_dir)
    names = write_tasks(tmp_path / "tasks", tests, devs)

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=list(names.values()),
        num_fewshot=shots, batch_size=1, device="cpu", log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))

    ours = score_task(load(model_dir), load_tokenizer(model_dir), load_task(f"mmlu:{tmp_path / 'mmlu'}"),
                      EvalConfig(shots=shots, scoring="letter", batch_size=4))
    by_id = {r["id"]: r for r in ours}
    compared = 0
    for subject, name in names.items():
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == 6
        for s in samples:
            mine = by_id[f"{subject}/{s['doc_id']}"]
            theirs = [float(r[0]) for r in s["filtered_resps"]]
            assert mine["loglikelihoods"] == pytest.approx(theirs, abs=1e-4, rel=0)
            assert float(mine["correct"]) == s["acc"]
            compared += 1
        acc = sum(by_id[f"{subject}/{i}"]["correct"] for i in range(6)) / 6
        assert out["results"][name]["acc,none"] == acc
    assert compared == len(ours) == 12
    # the letters are really told apart, so agreement means something
    assert max(max(r["loglikelihoods"]) - min(r["loglikelihoods"]) for r in ours) > 0.1
    assert os.environ["HF_HUB_OFFLINE"] == "1"
