"""``effilm eval --task chat:FILE``: free-form questions through the chat template, greedy answers,
normalised exact match. The outputs are checked against a greedy loop written here, over prompts
rendered by transformers' own ``apply_chat_template``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from engine_fixtures import add_tokenizer, make_tokenizer, tiny  # noqa: E402

import effilm  # noqa: E402
from effilm.errors import EffilmError  # noqa: E402
from effilm.eval.chat import exact_match, normalize_answer  # noqa: E402
from effilm.eval.tasks import TaskConfig, load_task  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Which river is the longest?", "How many legs has a cat?",
             "Name a blue thing.", "What equals seven?", "Where is the garden?"]
NEW = 6
SYSTEM = [{"role": "system", "content": "Answer briefly."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-task")
    tok_dir = make_tokenizer(root)
    model = tiny("tiny-dense", tie_embeddings=False, init_std=0.08)
    model_dir = add_tokenizer(effilm.save(model, root / "model"), tok_dir)
    return {"root": root, "tok_dir": tok_dir, "model": model, "model_dir": model_dir}


def _greedy(model, hf_tok, messages: list[dict], eos: set[int]) -> str:
    """The reference answer: transformers renders the prompt, a plain argmax loop without a cache."""
    ids = list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    out = []
    with torch.no_grad():
        for _ in range(NEW):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in eos:
                break
            ids.append(nxt)
            out.append(nxt)
    return hf_tok.decode(out, skip_special_tokens=True)


def test_normalisation():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert normalize_answer("An apple, a pear.") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words
    assert exact_match("Paris.", ["paris"]) and exact_match("the  PARIS", ["Paris"])
    assert not exact_match("Paris, France", ["Paris"]) and not exact_match("", ["Paris"])
    assert exact_match("Lyon", ["Paris", "lyon"])


def test_chat_task_scores_greedy_answers_by_exact_match(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(setup["tok_dir"]))
    eos = {hf_tok.convert_tokens_to_ids(t) for t in ("<|end|>", "</s>")} - {None, hf_tok.unk_token_id}
    expected = [_greedy(setup["model"], hf_tok, [{"role": "user", "content": q}], eos) for q in QUESTIONS]
    expected[2] = _greedy(setup["model"], hf_tok, SYSTEM + [{"role": "user", "content": QUESTIONS[2]}], eos)
    assert all(normalize_answer(e) for e in expected) and len({normalize_answer(e) for e in expected}) > 1
    # items 0, 2, 4: a reference equal to the model's answer (up to case, punctuation and articles);
    # items 1, 3, 5: references that are not its answer; one record of each accepted form (item 2's
    # prompt has a system message)
    lines = [
        {"question": QUESTIONS[0], "answer": "The " + expected[0].upper() + "!", "subject": "geo", "id": "q0"},
        {"question": QUESTIONS[1], "answer": "definitely not this", "subject": "geo"},
        {"messages": SYSTEM + [{"role": "user", "content": QUESTIONS[2]}],
         "answers": ["nope", expected[2] + "."]},
        {"question": QUESTIONS[3], "choices": ["x y z", "w"], "answer": 1},
        {"question": QUESTIONS[4], "choices": ["w", expected[4], "x"], "answer": 1},
        {"question": QUESTIONS[5], "answers": [expected[5] + " extra words"]},
    ]
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = subprocess.run([sys.executable, "-m", "effilm", "eval", str(setup["model_dir"]), "--task", f"chat:{quiz}",
                          "--max-new-tokens", str(NEW), "--batch-size", "4", "--output", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "exact_match" in out.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    (task,) = report["tasks"]
    items = task["items"]
    assert [it["output"].strip() for it in items] == [e.strip() for e in expected]
    assert [it["correct"] for it in items] == [True, False, True, False, True, False]
    assert items[0]["id"] == "q0" and items[3]["answers"] == ["w"]
    n_right = sum(it["correct"] for it in items)
    assert task["overall"]["exact_match"]["micro"] == pytest.approx(n_right / 6)
    assert task["subjects"]["geo"]["n"] == 2


def test_batching_does_not_change_answers(setup, tmp_path):
    from effilm.data.tokenizer import load_tokenizer
    from effilm.eval.chat import score_chat

    quiz = tmp_path / "q.jsonl"
    quiz.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS))
    items = load_task(f"chat:{quiz}").chat
    tok = load_tokenizer(setup["tok_dir"])
    one = score_chat(setup["model"], tok, items, batch_size=1, max_new_tokens=NEW)
    many = score_chat(setup["model"], tok, items, batch_size=6, max_new_tokens=NEW)
    assert [r["output"] for r in one] == [r["output"] for r in many]


@pytest.mark.parametrize("record, reason", [
    ({"answer": "x"}, "needs 'question'"),
    ({"question": "q?"}, "needs 'answer'"),
    ({"question": "q?", "answers": []}, "'answers' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "a"},
     "last message must be the user's question"),
    ({"messages": [{"role": "robot", "content": "q"}], "answer": "a"}, r"messages\[0\] must have role"),
    ({"question": "q?", "choices": ["a", "b"], "answer": 5}, "not an index"),
    ({"question": "q?", "answer": "..."}, "empty once normalised"),
])
def test_bad_records_name_file_and_line(tmp_path, record, reason):
    quiz = tmp_path / "bad.jsonl"
    quiz.write_text(json.dumps({"question": "fine?", "answer": "yes"}) + "\n" + json.dumps(record) + "\n")
    task = load_task(f"chat:{quiz}")  # skipped and listed by default
    assert len(task.chat) == 1 and task.skipped[0]["source"] == f"{quiz}:2"
    with pytest.raises(EffilmError, match=rf"bad\.jsonl:2: .*{reason}"):
        load_task(f"chat:{quiz}", TaskConfig(strict=True))


def test_chat_task_needs_a_chat_template(tmp_path):
    from effilm.data.tokenizer import load_tokenizer
    from effilm.eval.chat import score_chat

    tok = load_tokenizer(make_tokenizer(tmp_path, chat_template=False))
    quiz = tmp_path / "q.jsonl"
    quiz.write_text(json.dumps({"question": "q?", "answer": "blue"}) + "\n")
    with pytest.raises(EffilmError, match="need a tokenizer with a chat template"):
        score_chat(tiny("tiny-dense"), tok, load_task(f"chat:{quiz}").chat, batch_size=1, max_new_tokens=2)
