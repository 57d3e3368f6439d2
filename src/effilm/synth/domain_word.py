"""Arithmetic word problems with exact answers, in GSM8K's format.

Each template draws a name, an object and numbers, computes the answer with integers, re-checks it
and writes the worked solution the way GSM8K ships it: sentences with ``<<a*b=c>>`` calculator
annotations, ending in ``#### <answer>``. The templates span one to three steps; the number
ranges are part of a template, so a problem and its twin (the same template with new names and
numbers, :mod:`effilm.synth.twins`) are equally hard.
"""

from __future__ import annotations

import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Keiko", "Luca", "Maya",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yara", "Zane"]
THINGS = ["apples", "stickers", "marbles", "pencils", "cookies", "stamps", "shells", "cards", "beads", "books"]
GOODS = [("notebook", "notebooks"), ("ticket", "tickets"), ("sandwich", "sandwiches"), ("plant", "plants"),
         ("poster", "posters"), ("mug", "mugs")]


@dataclass(frozen=True)
class WordProblem:
    template: int
    question: str
    answer: str  # the worked solution ending in "#### <number>"

    @property
    def value(self) -> int:
        return int(self.answer.rsplit("####", 1)[1])

    def record(self, uid: str) -> dict:
        return {"id": uid, "question": self.question, "answer": self.answer, "subject": f"word_problems/t{self.template}"}


def _buy_more(rng: random.Random) -> tuple[str, str, int]:
    n, t, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(5, 60), rng.randint(3, 40)
    return (f"{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
            f"{n} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {t}.", a + b)


def _give_away(rng: random.Random) -> tuple[str, str, int]:
    n, m, t = *rng.sample(NAMES, 2), rng.choice(THINGS)
    a = rng.randint(20, 90)
    b = rng.randint(2, a - 5)
    return (f"{n} had {a} {t} and gave {b} of them to {m}. How many {t} does {n} have left?",
            f"{n} has {a} - {b} = <<{a}-{b}={a - b}>>{a - b} {t} left.", a - b)


def _packs(rng: random.Random) -> tuple[str, str, int]:
    n, t, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 12), rng.randint(3, 15)
    return (f"{n} buys {a} packs of {t} with {b} {t} in each pack. How many {t} does {n} buy?",
            f"{n} buys {a} * {b} = <<{a}*{b}={a * b}>>{a * b} {t}.", a * b)


def _share(rng: random.Random) -> tuple[str, str, int]:
    n, t, k, each = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 9), rng.randint(3, 14)
    total = k * each
    return (f"{n} shares {total} {t} equally among {k} friends. How many {t} does each friend get?",
            f"Each friend gets {total} / {k} = <<{total}/{k}={each}>>{each} {t}.", each)


def _wages(rng: random.Random) -> tuple[str, str, int]:
    n, rate, hours, days = rng.choice(NAMES), rng.randint(8, 25), rng.randint(2, 8), rng.randint(2, 6)
    per_day = rate * hours
    return (f"{n} earns ${rate} an hour and works {hours} hours a day for {days} days. How many dollars does "
            f"{n} earn in total?",
            f"In one day {n} earns {rate} * {hours} = <<{rate}*{hours}={per_day}>>{per_day} dollars.\n"
            f"In {days} days {n} earns {per_day} * {days} = <<{per_day}*{days}={per_day * days}>>{per_day * days} "
            "dollars.", per_day * days)


def _change(rng: random.Random) -> tuple[str, str, int]:
    n, (one, many) = rng.choice(NAMES), rng.choice(GOODS)
    price, k = rng.randint(2, 15), rng.randint(2, 6)
    cost = price * k
    paid = (cost // 10 + 1 + rng.randint(0, 3)) * 10
    return (f"A {one} costs ${price}. {n} buys {k} {many} and pays with ${paid}. How many dollars of change does "
            f"{n} get?",
            f"The {many} cost {price} * {k} = <<{price}*{k}={cost}>>{cost} dollars.\n"
            f"The change is {paid} - {cost} = <<{paid}-{cost}={paid - cost}>>{paid - cost} dollars.", paid - cost)


def _twice(rng: random.Random) -> tuple[str, str, int]:
    n, a, f = rng.choice(NAMES), rng.randint(4, 40), rng.choice([2, 3])
    word = {2: "twice", 3: "three times"}[f]
    more = a * f
    return (f"{n} reads {a} pages on Monday and {word} as many pages on Tuesday. How many pages does {n} read "
            "on the two days?",
            f"On Tuesday {n} reads {a} * {f} = <<{a}*{f}={more}>>{more} pages.\n"
            f"In total {n} reads {a} + {more} = <<{a}+{more}={a + more}>>{a + more} pages.", a + more)


def _rows(rng: random.Random) -> tuple[str, str, int]:
    n, rows, per, extra = rng.choice(NAMES), rng.randint(3, 9), rng.randint(4, 12), rng.randint(2, 15)
    planted = rows * per
    return (f"{n} plants {rows} rows of tulips with {per} tulips in each row, then {extra} more tulips by the "
            f"gate. How many tulips does {n} plant?",
            f"The rows hold {rows} * {per} = <<{rows}*{per}={planted}>>{planted} tulips.\n"
            f"With the ones by the gate that is {planted} + {extra} = <<{planted}+{extra}={planted + extra}>>"
            f"{planted + extra} tulips.", planted + extra)


TEMPLATES: list[Callable[[random.Random], tuple[str, str, int]]] = [
    _buy_more, _give_away, _packs, _share, _wages, _change, _twice, _rows]


def word_problem(rng: random.Random, template: int) -> WordProblem:
    """A problem from ``TEMPLATES[template]`` with ``rng``'s names and numbers; its answer is
    re-checked against the numbers in the worked solution's last annotation."""
    question, steps, value = TEMPLATES[template](rng)
    a, op, b, result = re.fullmatch(r"(\d+)([-+*/])(\d+)=(\d+)", steps.rsplit("<<", 1)[1].split(">>", 1)[0]).groups()
    computed = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}[op](int(a), int(b))
    if int(result) != value or computed != value:
        raise AssertionError(f"word problem check failed: {question}")
    return WordProblem(template, question, f"{steps}\n#### {value}")


def generate_word_problems(n: int, seed: int) -> list[WordProblem]:
    """``n`` problems, the templates taken in turn (problem i uses template i mod the count)."""
    rng = random.Random(f"word:{seed}")
    return [word_problem(rng, i % len(TEMPLATES)) for i in range(n)]
