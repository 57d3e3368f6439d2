"""``--task gsm8k:FILE``: prompts, greedy generation with stop sequences, and lm-eval's strict-match
and flexible-extract scoring. The peer check runs the real lm-evaluation-harness (``eval-check``
extra) with ``generate_until`` on the same tiny HF model, items and few-shot examples."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from eval_fixtures import hf_tokenizer, tiny_llama  # noqa: E402

from effilm.errors import EffilmError  # noqa: E402
from effilm.eval.gsm8k import FILTERS, INVALID, exact_match, extract, prompt  # noqa: E402
from effilm.eval.tasks import TaskConfig, load_task  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
OUTPUTS = ["She sold 48/2 = 24 clips.\n#### 72", "#### 1,234.", "The answer is $5.00.", "no number here",
           "x = -3 and then 12", "#### -7\n#### 9", "It costs $1,000,000 in total", "7", "3.5 or 4.",
           " #### 18 ", "####18", "#### ,", "values 1, 2, 3"]
REFERENCES = ["Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "Total is #### 1234", "#### 5",
              "#### 12", "#### 1000000", "#### 4", "#### 18", "#### -7", "#### 3"]


def problems(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        out.append({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
                    "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"})
    return out


def test_extraction_and_matching_by_hand():
    assert extract("so #### 72 and #### 5", *FILTERS["strict-match"]) == "72"
    assert extract("costs $1,000 then 12.", *FILTERS["flexible-extract"]) == "12."
    assert extract("nothing", *FILTERS["flexible-extract"]) == INVALID
    assert exact_match("12.", "He has 5 + 7 = 12 apples.\n#### 12") and exact_match("$1,000", "#### 1000")
    assert not exact_match(INVALID, "#### 12") and not exact_match("12", "#### 13")
    assert prompt(load_item("Q1?", "A #### 1"), [load_item("Q0?", "B #### 0")]) == \
        "Question: Q0?\nAnswer: B #### 0\n\nQuestion: Q1?\nAnswer:"


def load_item(q, a):
    from effilm.eval.gsm8k import MathItem

    return MathItem(q, a, "math", "x:1")


def test_scoring_equals_lm_evals_own_filters_and_metric():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    for name, (rx, group) in FILTERS.items():
        theirs = RegexFilter(regex_pattern=rx.pattern, group_select=group).apply([[o] for o in OUTPUTS], None)
        assert [extract(o, rx, group) for o in OUTPUTS] == [t[0] for t in theirs], name
        for pred in [t[0] for t in theirs]:
            for ref in REFERENCES:
                em = exact_match_hf_evaluate([pred], [ref], regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"],
                                             ignore_case=True, ignore_punctuation=False)["exact_match"]
                assert exact_match(pred, ref) == bool(em), (pred, ref)


def test_bad_records_and_too_many_shots(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [problems(1, 0)[0], {"question": "q?", "answer": "no marker"},
                                                   {"answer": "#### 3"}, {"question": "q", "answer": "#### "}]) + "\n")
    task = load_task(f"gsm8k:{f}")
    assert len(task.math) == 1 and [s["source"] for s in task.skipped] == [f"{f}:2", f"{f}:3", f"{f}:4"]
    with pytest.raises(EffilmError, match=r"g\.jsonl:2: needs 'answer': the solution ending in '#### <number>'"):
        load_task(f"gsm8k:{f}", TaskConfig(strict=True))
    from effilm.eval.gsm8k import score_gsm8k

    with pytest.raises(EffilmError, match="shots=5 but the few-shot source has 0 examples"):
        score_gsm8k(None, None, task.math, [], shots=5, batch_size=1, max_gen_toks=8)


def math_tokenizer():
    """A BPE over the problems' own text (numbers, '####', 'apples'): a random model then writes numbers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in problems(300, 9)]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k")
    tok = math_tokenizer()
    model_dir = root / "model"
    tiny_llama(tok.get_vocab_size()).save_pretrained(model_dir)
    hf_tokenizer(tok).save_pretrained(model_dir)
    for name, n, seed in (("test", 5, 1), ("dev", 3, 2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems(n, seed)))
    return root, model_dir


def test_cli_reports_both_scores_and_batching_does_not_change_answers(setup, tmp_path):
    root, model_dir = setup
    runs = {}
    for bs in (1, 4):
        out = tmp_path / f"r{bs}.json"
        p = subprocess.run([sys.executable, "-m", "effilm", "eval", str(model_dir), "--task",
                            f"gsm8k:{root / 'test.jsonl'},dev={root / 'dev.jsonl'},name=g", "--shots", "2",
                            "--max-gen-toks", "24", "--batch-size", str(bs), "--output", str(out)],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stderr
        assert "strict-match" in p.stdout and "flexible-extract" in p.stdout
        runs[bs] = json.loads(out.read_text())["tasks"][0]
    assert [r["output"] for r in runs[1]["items"]] == [r["output"] for r in runs[4]["items"]]
    t = runs[4]
    assert set(t["overall"]) == {"strict-match", "flexible-extract"} and t["overall"]["strict-match"]["n"] == 5
    assert all(r["target"].isdigit() and set(r["extracted"]) == {"strict-match", "flexible-extract"} for r in t["items"])


def test_generation_and_scores_equal_lm_eval_harness(setup, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from effilm.data.tokenizer import load_tokenizer
    from effilm.eval.gsm8k import score_gsm8k
    from effilm.formats.load import load

    root, model_dir = setup
    torch.set_num_threads(1)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "g.yaml").write_text(f"""task: effilm_gsm8k_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'test.jsonl'}
    dev: {root / 'dev.jsonl'}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "</s>", "<|im_end|>"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 24
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
""")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32",
                                  tasks=["effilm_gsm8k_check"], num_fewshot=2, batch_size=1, device="cpu",
                                  log_samples=True, task_manager=TaskManager(include_path=str(tasks),
                                                                             include_defaults=False))
    task = load_task(f"gsm8k:{root / 'test.jsonl'},dev={root / 'dev.jsonl'}")
    ours = score_gsm8k(load(model_dir), load_tokenizer(model_dir), task.math, task.math_dev, shots=2, batch_size=1,
                       max_gen_toks=24)
    by_filter = {}
    for s in out["samples"]["effilm_gsm8k_check"]:
        by_filter.setdefault(s["filter"], {})[s["doc_id"]] = s
    assert set(by_filter) == {"strict-match", "flexible-extract"}
    for name, samples in by_filter.items():
        key = "correct" if name == "strict-match" else "correct_norm"
        for i, mine in enumerate(ours):
            s = samples[i]
            args = s["arguments"]
            assert (args[0][0] if isinstance(args, list) else args["gen_args_0"]["arg_0"]) == prompt(task.math[i], task.math_dev[:2])
            assert mine["output"] == s["resps"][0][0], i  # the same generated text
            assert mine["extracted"][name] == s["filtered_resps"][0], (name, i)
            assert float(mine[key]) == s["exact_match"], (name, i)
        acc = sum(r[key] for r in ours) / len(ours)
        assert out["results"]["effilm_gsm8k_check"][f"exact_match,{name}"] == pytest.approx(acc)
    # the outputs are not all empty, and some filter found a number: the comparison has teeth
    assert any(r["output"].strip() for r in ours) and any(r["extracted"]["flexible-extract"] != INVALID for r in ours)
