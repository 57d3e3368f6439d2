"""Error types that reach the user as one clear line instead of a traceback."""

from __future__ import annotations


class EffilmError(Exception):
    """A user-facing error: bad input, a bad config or a bad file. The CLI prints it plainly."""


class ConfigError(EffilmError, ValueError):
    """A config field that cannot work. The message names the field."""


class CheckpointError(EffilmError):
    """A checkpoint directory that is missing files or holds mis-shaped tensors."""


def closest(name: str, choices, n: int = 3) -> list[str]:
    """The names in ``choices`` closest to ``name``, for 'did you mean' messages."""
    import difflib

    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.4)
