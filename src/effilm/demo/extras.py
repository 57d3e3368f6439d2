"""The optional packages (pyproject extras) each late demo stage needs. Without them the stage (or
the serve transcript) is skipped and says so, and the rest of the demo runs on the core install."""

from __future__ import annotations

import importlib.util

SHIP_MODULES = ("gguf",)  # the [gguf] extra: the GGUF export
REPORT_MODULES = ("matplotlib",)  # the [plots] extra: the report's plots
SERVE_MODULES = ("starlette", "uvicorn", "httpx", "openai")  # the [serve] extra and the openai client


def missing_modules(names) -> list[str]:
    """The modules among ``names`` that are not importable (checked without importing them)."""
    out = []
    for n in names:
        try:
            found = importlib.util.find_spec(n) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            out.append(n)
    return out
