"""Unit conversion problems from the bundled ``units.csv`` table, computed exactly."""

from __future__ import annotations

import csv
import functools
import io
import random
from fractions import Fraction
from importlib import resources

from effilm.synth.domain_math import Problem


@functools.cache
def units() -> tuple[dict, ...]:
    text = resources.files("effilm.synth").joinpath("tables", "units.csv").read_text(encoding="utf-8")
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append({**row, "per_base": Fraction(row["per_base"])})
    return tuple(rows)


def _num(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    as_float = float(x)
    if Fraction(repr(as_float)) == x:  # exact decimal, e.g. 0.25
        return repr(as_float)
    return f"{x.numerator}/{x.denominator}"


def conversion(rng: random.Random) -> Problem:
    rows = units()
    quantity = rng.choice(sorted({r["quantity"] for r in rows}))
    src, dst = rng.sample([r for r in rows if r["quantity"] == quantity], 2)
    value = Fraction(rng.randint(1, 500)) if rng.random() < 0.8 else Fraction(rng.randint(1, 40), 4)
    factor = src["per_base"] / dst["per_base"]
    result = value * factor
    q = rng.choice([
        f"Convert {_num(value)} {src['plural']} to {dst['plural']}.",
        f"How many {dst['plural']} are there in {_num(value)} {src['plural']}?",
        f"Express {_num(value)} {src['symbol']} in {dst['symbol']}.",
    ])
    steps = [f"one {src['unit']} is {_num(factor)} {dst['plural']}",
             f"{_num(value)} x {_num(factor)} = {_num(result)}"]
    if result / factor != value:
        raise AssertionError(f"unit check failed for {q}")
    return Problem(q, steps, f"{_num(result)} {dst['plural'] if result != 1 else dst['unit']}")


GENERATORS = {"units": conversion}
TOPICS = {"units": "converting units of measurement"}
