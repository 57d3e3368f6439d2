"""Short Python programs whose printed output is obtained by running them in the sandbox."""

from __future__ import annotations

import random

from effilm.synth.domain_math import Problem
from effilm.synth.pyeval import run_program


def _sum_loop(rng):
    n, v = rng.randint(3, 12), rng.choice(["total", "acc", "s"])
    return f"{v} = 0\nfor i in range(1, {n + 1}):\n    {v} += i\nprint({v})", f"adds the numbers 1 to {n}"


def _factorial(rng):
    n = rng.randint(3, 9)
    return f"f = 1\nk = {n}\nwhile k > 1:\n    f *= k\n    k -= 1\nprint(f)", f"computes {n} factorial"


def _evens(rng):
    n = rng.randint(5, 20)
    return (f"count = 0\nfor i in range({n}):\n    if i % 2 == 0:\n        count += 1\nprint(count)",
            f"counts the even numbers below {n}")


def _list_ops(rng):
    xs = [rng.randint(1, 50) for _ in range(rng.randint(3, 6))]
    fn = rng.choice(["max", "min", "sum", "len"])
    return f"xs = {xs}\nprint({fn}(xs))", f"applies {fn} to a list"


def _strings(rng):
    word, k = rng.choice(["ab", "hi", "go", "na", "xo"]), rng.randint(2, 5)
    return f"w = '{word}' * {k}\nprint(w)\nprint(len(w))", f"repeats the string '{word}' {k} times"


def _fib(rng):
    n = rng.randint(4, 12)
    return (f"a = 0\nb = 1\nfor _ in range({n}):\n    t = a + b\n    a = b\n    b = t\nprint(a)",
            f"computes Fibonacci number {n}")


PROGRAMS = [_sum_loop, _factorial, _evens, _list_ops, _strings, _fib]


def program(rng: random.Random) -> Problem:
    source, what = rng.choice(PROGRAMS)(rng)
    output = run_program(source)
    q = rng.choice([f"What does this program print?\n```python\n{source}\n```",
                    f"Trace the following code and give its output.\n```python\n{source}\n```"])
    steps = [f"the program {what}", "running it line by line prints " + " then ".join(output.splitlines())]
    return Problem(q, steps, output.replace("\n", " and "))


GENERATORS = {"python": program}
TOPICS = {"python": "reading short Python programs"}
