"""The procedural backend: determinism, quiz format, verified answers and quiz/corpus disjointness."""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

from effilm.errors import ConfigError
from effilm.synth import domain_facts, procedural
from effilm.synth.pyeval import run_program

N_FACTS = 120


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_deterministic_given_seed_and_independent_of_start():
    a = list(procedural.generate_corpus(40, N_FACTS, seed=3))
    b = list(procedural.generate_corpus(40, N_FACTS, seed=3))
    assert a == b
    tail = list(procedural.generate_corpus(10, N_FACTS, seed=3, start=30))
    assert tail == a[30:]
    c = list(procedural.generate_corpus(40, N_FACTS, seed=4))
    assert [r["text"] for r in a] != [r["text"] for r in c]
    assert list(procedural.generate_web_corpus(20, N_FACTS, 3)) == list(procedural.generate_web_corpus(20, N_FACTS, 3))
    assert procedural.generate_quiz(N_FACTS, 3) == procedural.generate_quiz(N_FACTS, 3)


def test_records_carry_provenance_and_token_counts():
    recs = list(procedural.generate_corpus(30, N_FACTS, seed=0))
    assert len({r["id"] for r in recs}) == 30
    for r in recs:
        p = r["provenance"]
        assert p["backend"] == "procedural" and p["seed"] == 0
        assert {"prompt", "topic", "audience", "style", "kind", "injected_words", "sampling", "model"} <= set(p)
        assert r["n_tokens"]["text"] == len(re.findall(r"\w+|[^\w\s]", r["text"])) > 20
    assert {r["provenance"]["audience"] for r in recs} >= {"children", "college"}
    assert any(r["provenance"]["topic"].startswith("facts/") for r in recs)
    assert any(not r["provenance"]["topic"].startswith("facts/") for r in recs)


def test_quiz_is_mmlu_format_with_plausible_distractors():
    quiz = procedural.generate_quiz(N_FACTS, seed=1)
    facts = procedural.select_facts(N_FACTS, seed=1)
    assert len(quiz) == len(facts) == N_FACTS
    for item, fact in zip(quiz, facts, strict=True):
        assert set(item) == {"question", "subject", "choices", "answer"}
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["choices"][item["answer"]] == fact.answer
        assert fact.subject in item["question"]
        if fact.relation == "number":
            assert all(c.isdigit() for c in item["choices"])
    answers = [q["answer"] for q in quiz]
    assert all(answers.count(k) > N_FACTS // 10 for k in range(4)), "answer letters are unbalanced"


def test_corpus_teaches_every_quiz_fact_many_times():
    facts = procedural.select_facts(60, seed=2)
    counts = {f.id: 0 for f in facts}
    for rec in procedural.generate_corpus(600, 60, seed=2):
        for fid in rec["provenance"].get("facts", []):
            counts[fid] += 1
            assert fid.split(":", 1)[0] in domain_facts.QUIZ
    assert min(counts.values()) >= 5, sorted(counts.values())[:5]
    rec = next(r for r in procedural.generate_corpus(50, 60, seed=2) if r["provenance"].get("facts"))
    fact = next(f for f in facts if f.id == rec["provenance"]["facts"][0])
    assert fact.subject.lower() in rec["text"].lower() and fact.answer in rec["text"]


@pytest.mark.parametrize("n", [8, 13])
def test_no_quiz_item_appears_in_training_text(n):
    """n-gram proof (lowercased, punctuation stripped): no quiz question, nor question + answer."""
    corpus = list(procedural.generate_corpus(1500, N_FACTS, seed=0))
    corpus += list(procedural.generate_web_corpus(1500, N_FACTS, seed=0))
    corpus += list(procedural.generate_chat(1000, N_FACTS, seed=0))
    corpus += [{"text": r["text"] + " " + r["chosen"]} for r in procedural.generate_preferences(1000, N_FACTS, seed=0)]
    grams: set[tuple[str, ...]] = set()
    stream = " " + " ".join(" ".join(_words(r["text"])) for r in corpus) + " "
    for r in corpus:
        grams |= _ngrams(_words(r["text"]), n)
    quiz = procedural.generate_quiz(N_FACTS, seed=0, questions_per_fact=2)
    for item in quiz:
        for text in (item["question"], item["question"] + " " + item["choices"][item["answer"]]):
            words = _words(text)
            if len(words) >= n:
                hits = _ngrams(words, n) & grams
                assert not hits, f"quiz item leaks into corpus: {hits}"
            else:
                assert f" {' '.join(words)} " not in stream, text
    # the check has teeth: a planted quiz question is caught
    planted = _words(quiz[0]["question"] + " " + quiz[0]["choices"][quiz[0]["answer"]])
    assert _ngrams(planted, min(n, len(planted))) & (grams | _ngrams(planted, min(n, len(planted))))


@pytest.mark.parametrize("stream", ["corpus", "chat", "preferences"])
def test_corpus_teaches_question_answer_form_in_other_phrasings(stream):
    gen = {"corpus": procedural.generate_corpus, "chat": procedural.generate_chat,
           "preferences": procedural.generate_preferences}[stream]
    text = "\n".join(r["text"] for r in gen(300, N_FACTS, seed=0))
    if stream != "corpus":
        assert text.count("user: ") > 250
        for templates in domain_facts.CHAT.values():  # the chat phrasings are used, beside the exercises'
            assert sum(max(re.split(r"\{\w\}", t), key=len).strip().lower() in text.lower() for t in templates) >= 3
    else:
        assert text.count("Question: ") > 100 and text.count("\nAnswer: ") > 100
    for templates in domain_facts.QUIZ.values():
        for t in templates:
            frame = max(re.split(r"\{\w\}", t), key=len).strip()
            assert len(frame.split()) >= 4
            assert frame.lower() not in text.lower(), frame


def test_chat_and_preference_records_answer_the_facts():
    from effilm.data.chat import conversation

    facts = {f.id: f for f in domain_facts.select_facts(N_FACTS, 0)}
    cfg = procedural.ProceduralConfig(num_facts=N_FACTS, turns_per_chat=3)
    chats = list(procedural.generate_chat(300, N_FACTS, seed=0, cfg=cfg))
    assert [r["id"] for r in chats[5:9]] == [r["id"] for r in procedural.generate_chat(4, N_FACTS, seed=0, start=5, cfg=cfg)]
    turns = [len(r["messages"]) for r in chats]
    assert {r["messages"][0]["role"] for r in chats} == {"system", "user"} and max(turns) >= 6
    asked = 0
    for r in chats:
        msgs = conversation(r, "chat")  # the SFT reader accepts every record
        assert msgs[-1]["role"] == "assistant" and r["text"].endswith(msgs[-1]["content"])
        pairs = [(q["content"], a["content"]) for q, a in zip(msgs, msgs[1:], strict=False)
                 if q["role"] == "user" and a["role"] == "assistant"]  # fmt: skip
        for fid in r["provenance"]["facts"]:  # each fact taught is asked, and answered right
            f = facts[fid]
            assert any(f.subject.lower() in q.lower() and a == f"{f.answer}." for q, a in pairs), (fid, pairs)
            asked += 1
    assert asked > 300
    prefs = list(procedural.generate_preferences(300, N_FACTS, seed=0))
    confused = 0  # rejected: another question's answer about the same subject, or a distractor of the same kind
    for r in prefs:
        (fid,) = r["provenance"]["facts"]
        assert r["chosen"] == f"{facts[fid].answer}." and r["rejected"] != r["chosen"]
        confused += r["rejected"][:-1] in domain_facts.other_relations(facts[fid])
        assert r["prompt"][0]["role"] == "user" and facts[fid].subject.lower() in r["prompt"][0]["content"].lower()
    assert len({r["prompt"][0]["content"] for r in prefs}) > 150
    assert 60 < confused < 240, confused


def test_computed_answers_are_correct():
    recs = [r for r in procedural.generate_corpus(400, N_FACTS, seed=5)
            if r["provenance"]["topic"] in {"arithmetic", "fractions", "algebra", "units", "python"}]
    assert {r["provenance"]["topic"] for r in recs} == {"arithmetic", "fractions", "algebra", "units", "python"}
    checked = 0
    for r in recs:
        for m in re.finditer(r"What is (\d+) \+ (\d+)\?\nAnswer: (\d+)", r["text"]):
            assert int(m[1]) + int(m[2]) == int(m[3])
            checked += 1
        for m in re.finditer(r"Compute (\d+(?:/\d+)?) ([+*-]) (\d+(?:/\d+)?) and simplify\.\nAnswer: (-?\d+(?:/\d+)?)", r["text"]):
            x, y = Fraction(m[1]), Fraction(m[3])
            assert {"+": x + y, "-": x - y, "*": x * y}[m[2]] == Fraction(m[4])
            checked += 1
        for m in re.finditer(r"```python\n([^`]*)\n```\nAnswer: ([^\n(]+?)(?: \(|\n|$)", r["text"], re.S):
            assert run_program(m[1]).replace("\n", " and ") == m[2].strip()
            checked += 1
    assert checked >= 5


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="procedural.domains"):
        procedural.ProceduralConfig(domains=["astrology"])
    with pytest.raises(ConfigError, match="facts_share"):
        procedural.ProceduralConfig(facts_share=2.0)
