"""Model commands: presets, params, convert, demo."""

from __future__ import annotations


def register(sub) -> None:  # filled in by the foundation work
    return None
