"""The facts domain: statements, exercises and held-out quiz questions from the bundled tables.

Each relation has three disjoint sets of phrasings:

* ``STATEMENTS``: declarative sentences used in the textbook and web corpora;
* ``EXERCISES``: question phrasings the corpus uses to teach the question-and-answer form;
* ``CHAT``: further, conversational phrasings of the chat data (post-training), beside the exercises';
* ``QUIZ``: question phrasings used *only* by the held-out quiz.

A test checks by n-gram overlap that no quiz item's text appears in the generated corpora.
"""

from __future__ import annotations

import csv
import functools
import io
import random
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Fact:
    relation: str  # capital | continent | symbol | number
    subject: str
    answer: str
    subject_kind: str  # country | element

    @property
    def id(self) -> str:
        return f"{self.relation}:{self.subject}"


def _read_table(name: str) -> list[dict[str, str]]:
    text = resources.files("effilm.synth").joinpath("tables", name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@functools.cache
def fact_universe() -> tuple[Fact, ...]:
    """Every fact the bundled tables give, in a fixed order."""
    facts: list[Fact] = []
    for row in _read_table("countries.csv"):
        facts.append(Fact("capital", row["country"], row["capital"], "country"))
        facts.append(Fact("continent", row["country"], row["continent"], "country"))
    for row in _read_table("elements.csv"):
        facts.append(Fact("symbol", row["name"], row["symbol"], "element"))
        facts.append(Fact("number", row["name"], row["number"], "element"))
    return tuple(facts)


def select_facts(num_facts: int, seed: int) -> list[Fact]:
    """A deterministic subset of ``num_facts`` facts (all of them when it asks for more)."""
    facts = list(fact_universe())
    random.Random(f"facts:{seed}").shuffle(facts)
    return facts[: max(1, min(num_facts, len(facts)))]


SUBJECTS = {"capital": "geography", "continent": "geography", "symbol": "chemistry", "number": "chemistry"}
TOPICS = {
    "capital": "capital cities of the world",
    "continent": "countries and their continents",
    "symbol": "chemical symbols of the elements",
    "number": "atomic numbers of the elements",
}

STATEMENTS: dict[str, list[str]] = {
    "capital": [
        "The capital of {s} is {a}.",
        "{a} is the capital of {s}.",
        "The capital city of {s} is {a}.",
        "{a} is the capital city of {s}.",
        "In {s}, the capital is {a}.",
        "{S}'s capital is the city of {a}.",
        "The government of {s} meets in its capital, {a}.",
        "When people talk about the capital of {s}, they mean {a}.",
    ],
    "continent": [
        "{S} is a country in {a}.",
        "{S} is in {a}.",
        "{S} lies on the continent of {a}.",
        "The country of {s} is part of {a}.",
        "On a map, {s} is found in {a}.",
        "{A} includes the country of {s}.",
    ],
    "symbol": [
        "The chemical symbol for {s} is {a}.",
        "{S} has the symbol {a}.",
        "{a} is the symbol for {s}.",
        "Chemists write {s} as {a}.",
        "The element {s} is written {a} in formulas.",
        "In the periodic table, {s} appears as {a}.",
    ],
    "number": [
        "The atomic number of {s} is {a}.",
        "{S} has atomic number {a}.",
        "An atom of {s} has {a} protons.",
        "Every {s} atom has {a} protons in its nucleus.",
        "{S} is element number {a} in the periodic table.",
        "Element {a} is {s}.",
    ],
}

EXERCISES: dict[str, list[str]] = {
    "capital": ["What is the capital of {s}?", "Name the capital of {s}.", "{S} has what capital city?"],
    "continent": ["On what continent is {s}?", "Name the continent of {s}.", "{S} is in what continent?"],
    "symbol": ["What is the symbol for {s}?", "Give the chemical symbol for {s}.", "How is {s} written?"],
    "number": ["What is the atomic number of {s}?", "Give the atomic number of {s}.",
               "How many protons does {s} have?"],
}

# How users ask in the chat data (with EXERCISES): conversational, varied, never a quiz phrasing
CHAT: dict[str, list[str]] = {
    "capital": ["Tell me the capital of {s}.", "Do you know the capital of {s}?", "What city is {s}'s capital?",
                "I'm writing about {s}. What is its capital?", "Quick one: capital of {s}?",
                "Where is the seat of government of {s}?"],
    "continent": ["Tell me which continent {s} is on.", "What continent is {s} part of?",
                  "I'm looking at a map. Where is {s}, continent-wise?", "Quick one: continent of {s}?",
                  "Do you know what continent {s} belongs to?", "{S}: which continent?"],
    "symbol": ["Tell me the chemical symbol of {s}.", "What do chemists write for {s}?",
               "What's the element symbol for {s}?", "Quick one: symbol of {s}?",
               "I'm balancing an equation. How do I write {s}?", "Do you know the periodic-table symbol of {s}?"],
    "number": ["Tell me the atomic number of {s}.", "How many protons are in an atom of {s}?",
               "What's the atomic number for {s}?", "Quick one: atomic number of {s}?",
               "Where does {s} sit in the periodic table, by number?", "Do you know {s}'s atomic number?"],
}

QUIZ: dict[str, list[str]] = {
    "capital": ["Which of these cities is the capital of {s}?",
                "Choose the city that serves as the capital of {s}."],
    "continent": ["Which of these continents is home to {s}?",
                  "{S} is located on which of the following continents?"],
    "symbol": ["Which of these is the chemical symbol of the element {s}?",
               "Select the correct chemical symbol of {s} from the options."],
    "number": ["Which of these numbers equals the atomic number of {s}?",
               "Select the correct atomic number of {s} from the options."],
}

# Sentence frames for the web-like corpus: loose, chatty, with the fact buried mid-sentence.
WEB_STATEMENTS: dict[str, list[str]] = {
    "capital": ["spent a week in {a} ({s}'s capital btw) and the food was amazing",
                "fun fact: {a} is the capital of {s}, not what most ppl guess",
                "our tour of {s} started in {a}, the capital, then we took the train"],
    "continent": ["{s} is in {a} for anyone confused lol",
                  "planning a trip across {a}, {s} is on the list",
                  "ppl forget {s} is in {a} but it is"],
    "symbol": ["{s} = {a} on the periodic table, had to memorise that for a test",
               "the symbol {a} stands for {s}, my chem teacher drilled this",
               "{a} ({s}) showed up in the homework again"],
    "number": ["{s} is number {a} on the table if i remember right, yes it is {a}",
               "{s} has {a} protons, looked it up",
               "wait {s} is element {a}? yep, {a}"],
}


def _fill(template: str, f: Fact) -> str:
    s, a = f.subject, f.answer
    return template.format(s=s, a=a, S=s[:1].upper() + s[1:], A=a[:1].upper() + a[1:])


def statement(rng: random.Random, f: Fact) -> str:
    return _fill(rng.choice(STATEMENTS[f.relation]), f)


def exercise_question(rng: random.Random, f: Fact) -> str:
    return _fill(rng.choice(EXERCISES[f.relation]), f)


def chat_question(rng: random.Random, f: Fact) -> str:
    """A user's question in the chat data: an exercise or a conversational phrasing."""
    return _fill(rng.choice(EXERCISES[f.relation] + CHAT[f.relation]), f)


def web_statement(rng: random.Random, f: Fact) -> str:
    return _fill(rng.choice(WEB_STATEMENTS[f.relation]), f)


def quiz_question(template_index: int, f: Fact) -> str:
    templates = QUIZ[f.relation]
    return _fill(templates[template_index % len(templates)], f)


def other_relations(f: Fact) -> list[str]:
    """The answers to the other questions about ``f``'s subject (its atomic number when asked
    for its symbol, its capital when asked for its continent): the wrong answer of a model that
    knows the subject but confuses the question."""
    return sorted({g.answer for g in fact_universe() if g.subject == f.subject and g.relation != f.relation
                   and g.answer != f.answer})


def distractors(rng: random.Random, f: Fact, k: int = 3) -> list[str]:
    """``k`` plausible wrong answers: same continent, same first letter, nearby numbers."""
    same = [g for g in fact_universe() if g.relation == f.relation and g.answer != f.answer]
    pool = sorted({g.answer for g in same})
    if f.relation == "capital":
        cont = {g.subject: g.answer for g in fact_universe() if g.relation == "continent"}
        near = sorted({g.answer for g in same if cont[g.subject] == cont[f.subject]})
    elif f.relation == "symbol":
        near = sorted({g.answer for g in same if g.answer[0] == f.answer[0] or g.subject[0] == f.subject[0]})
    elif f.relation == "number":
        n = int(f.answer)
        near = [str(x) for x in (n - 2, n - 1, n + 1, n + 2, n + 10) if x > 0]
    else:
        near = pool
    near = [x for x in near if x != f.answer]
    rng.shuffle(near)
    picked = near[:k]
    rest = [x for x in pool if x not in picked]
    rng.shuffle(rest)
    return picked + rest[: k - len(picked)]
