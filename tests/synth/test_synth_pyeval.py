"""The restricted interpreter used by the python domain."""

from __future__ import annotations

import pytest

from effilm.synth.pyeval import SandboxError, SandboxLimits, run_program


def test_runs_whitelisted_programs():
    src = "t = 0\nfor i in range(1, 5):\n    if i % 2 == 1:\n        t += i * i\nprint(t)\nprint(max([3, 9, 2]), 'x' * 3)"
    assert run_program(src) == "10\n9 xxx"
    assert run_program("a = 0\nb = 1\nk = 0\nwhile k < 10:\n    t = a + b\n    a = b\n    b = t\n    k += 1\nprint(a)") == "55"


@pytest.mark.parametrize("src,msg", [
    ("import os", "Import"),
    ("open('x')", "'open' is not allowed"),
    ("().__class__", "not allowed"),
    ("x = 1\nx.real", "Attribute"),
    ("def f():\n    pass", "FunctionDef"),
    ("eval('1')", "'eval' is not allowed"),
    ("print(y)", "not defined"),
    ("print(9 ** 9 ** 9)", "too large"),
    ("x = 'a' * 10000000", "longer than"),
    ("lambda: 1", "Lambda"),
])
def test_rejects_anything_outside_the_whitelist(src, msg):
    with pytest.raises(SandboxError, match=msg):
        run_program(src)


def test_step_and_time_limits_stop_infinite_loops():
    with pytest.raises(SandboxError, match="step limit"):
        run_program("while True:\n    pass")
    with pytest.raises(SandboxError, match="time limit"):
        run_program("while True:\n    pass", SandboxLimits(max_steps=10**9, max_seconds=0.05))
