"""Computed domains: arithmetic, fractions and simple linear algebra.

Each generator returns a ``Problem`` whose answer is computed (``fractions.Fraction`` for exact
arithmetic) and re-checked before it is written: a problem that fails its own check raises.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

from effilm.synth.voice import syn


@dataclass
class Problem:
    question: str
    steps: list[str]
    answer: str


def _frac(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def arithmetic(rng: random.Random) -> Problem:
    op = rng.choice(["+", "-", "*", "//"])
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    if op == "+":
        r, word = a + b, rng.choice(["sum", "total"])
        q = rng.choice([f"Add {a} and {b}.", f"What is {a} + {b}?", f"Find the {word} of {a} and {b}."])
        steps = [f"{a} + {b} = {r}"]
    elif op == "-":
        a, b = max(a, b), min(a, b)
        r = a - b
        q = rng.choice([f"Subtract {b} from {a}.", f"What is {a} - {b}?", f"How much is {a} minus {b}?"])
        steps = [f"{a} - {b} = {r}"]
    elif op == "*":
        a = rng.randint(2, 99)
        r = a * b
        q = rng.choice([f"Multiply {a} by {b}.", f"What is {a} x {b}?", f"Find the product of {a} and {b}."])
        tens, ones = divmod(b, 10)
        steps = [f"{a} x {tens * 10} = {a * tens * 10}", f"{a} x {ones} = {a * ones}",
                 f"{a * tens * 10} + {a * ones} = {r}"] if tens and ones else [f"{a} x {b} = {r}"]
    else:
        r = rng.randint(2, 99)
        a = r * b
        q = rng.choice([f"Divide {a} by {b}.", f"What is {a} / {b}?", f"How many times does {b} go into {a}?"])
        steps = [f"{b} x {r} = {a}", f"so {a} / {b} = {r}"]
    check = {"+": a + b, "-": a - b, "*": a * b, "//": a // b}[op]
    if check != r:
        raise AssertionError(f"arithmetic check failed for {q}")
    return Problem(q, steps, str(r))


def fractions(rng: random.Random) -> Problem:
    x = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    y = Fraction(rng.randint(1, 9), rng.randint(2, 12))
    op = rng.choice(["+", "*", "-"])
    if op == "-" and y > x:
        x, y = y, x
    r = {"+": x + y, "*": x * y, "-": x - y}[op]
    word = {"+": "Add", "*": "Multiply", "-": "Subtract"}[op]
    q = rng.choice([f"{word} the fractions {_frac(x)} and {_frac(y)}.",
                    f"Compute {_frac(x)} {op} {_frac(y)} and simplify."])
    if op == "*":
        steps = [f"multiply the tops and the bottoms: ({x.numerator} x {y.numerator}) / "
                 f"({x.denominator} x {y.denominator})", f"simplify to {_frac(r)}"]
    else:
        d = x.denominator * y.denominator // _gcd(x.denominator, y.denominator)
        nx, ny = x.numerator * d // x.denominator, y.numerator * d // y.denominator
        steps = [f"the common denominator is {d}", f"{_frac(x)} = {nx}/{d} and {_frac(y)} = {ny}/{d}",
                 f"{nx} {op} {ny} = {nx + ny if op == '+' else nx - ny}, giving "
                 f"{nx + ny if op == '+' else nx - ny}/{d}", f"simplify to {_frac(r)}"]
    if Fraction(_frac(r)) != r:
        raise AssertionError(f"fraction check failed for {q}")
    return Problem(q, steps, _frac(r))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def algebra(rng: random.Random) -> Problem:
    var = rng.choice("xyzn")
    x = rng.randint(-12, 15)
    a = rng.choice([k for k in range(-9, 10) if k not in (0, 1)])
    b = rng.randint(-30, 30)
    c = a * x + b
    bs = f"+ {b}" if b >= 0 else f"- {-b}"
    q = rng.choice([f"Solve {a}{var} {bs} = {c}.", f"Find {var} if {a}{var} {bs} = {c}."])
    steps = [f"{'subtract' if b >= 0 else 'add'} {abs(b)} on both sides: {a}{var} = {c - b}",
             f"divide both sides by {a}: {var} = {x}",
             f"check: {a} x {x} {bs} = {a * x + b}, which matches {c}"]
    if Fraction(c - b, a) != x:
        raise AssertionError(f"algebra check failed for {q}")
    return Problem(q, steps, f"{var} = {x}")


def worked(rng: random.Random, p: Problem) -> str:
    """A worked example: the problem, the steps in prose, and the answer."""
    lines = [f"Example: {p.question}"]
    for i, s in enumerate(p.steps, 1):
        lines.append(f"Step {i}: {s[:1].upper() + s[1:]}.")
    lines.append(f"{syn(rng, 'so')} {syn(rng, 'answer_is')} {p.answer}.")
    return "\n".join(lines)


def exercise(rng: random.Random, n: int, p: Problem) -> str:
    steps = "; ".join(p.steps)
    return rng.choice([
        f"Exercise {n}. {p.question}\nSolution: {steps}. Answer: {p.answer}.",
        f"Problem {n}: {p.question}\nAnswer: {p.answer} ({steps}).",
        f"Question: {p.question}\nAnswer: {p.answer}",
    ])


GENERATORS = {"arithmetic": arithmetic, "fractions": fractions, "algebra": algebra}
TOPICS = {"arithmetic": "mental arithmetic", "fractions": "working with fractions",
          "algebra": "solving linear equations"}
