"""Where commands write, checked before any work: nothing a user has is ever replaced by surprise.

Every command that writes a directory claims it first (:func:`claim_dir`):

* a destination that equals, contains or lies inside one of the command's sources is refused,
  always (``effilm quantize RUN/final --out RUN`` would have replaced the run it reads);
* an existing non-empty directory is refused unless it is an earlier output of the *same*
  command, and even then only with ``--overwrite`` (or, for commands that resume, such as
  ``effilm synth``, when resuming);
* a location that cannot be written (read-only, or a file where a folder is needed) is refused.

Each output directory carries a small marker, ``.effilm-output.json``, naming the command that
wrote it; that is how "an earlier output of the same command" is recognised. Output *files*
(reports) are claimed with :func:`claim_file`: never one of the inputs, never an existing
directory, and in a writable folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from effilm.errors import EffilmError

MARK = ".effilm-output.json"


class OutputError(EffilmError):
    """A destination that a command must not (or cannot) write."""


def _resolved(p) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def earlier_command(directory: Path) -> str | None:
    """The command whose output ``directory`` is (its marker), or None."""
    try:
        return json.loads((Path(directory) / MARK).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def mark(directory: str | os.PathLike, command: str) -> None:
    """Record in ``directory`` that ``command`` wrote it (called inside the temporary directory
    of an atomic write, or into a directory the command fills file by file)."""
    from effilm import __version__

    text = json.dumps({"command": command, "effilm_version": __version__}) + "\n"
    path = Path(directory) / MARK
    tmp = path.with_name(f"{MARK}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _check_writable(target: Path, what: str, shown=None) -> None:
    """Refuse a destination that cannot be written, by trying: a file created (and removed) in the
    nearest folder that exists (permission bits alone say nothing for root or a read-only mount)."""
    import tempfile

    shown = target if shown is None else shown
    probe = target
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {shown}: {probe} is a file, so nothing can be written below it")
    try:
        fd, name = tempfile.mkstemp(prefix=".effilm-write-probe-", dir=probe)
    except OSError as exc:
        raise OutputError(f"{what} {shown}: cannot write in {probe} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(name)


def _check_sources(out: Path, sources: Iterable, what: str, shown) -> None:
    for s in sources:
        if s is None:
            continue
        src = _resolved(s)
        if _inside(src, out):
            relation = "is" if src == out else "contains"
            raise OutputError(f"{what} {shown}: it {relation} the input {s}; writing it would destroy what the "
                              "command reads. Choose another destination")  # fmt: skip
        if _inside(out, src) and src.is_dir():
            raise OutputError(f"{what} {shown}: it lies inside the input {s}; choose a destination outside it")


def claim_dir(out, command: str, sources: Iterable = (), overwrite: bool = False, resumable: bool = False,
              what: str = "output directory") -> Path:
    """Check that ``command`` may write the directory ``out`` (see the module docstring); returns
    it as a Path. ``sources`` are the files and directories the command reads."""
    shown = Path(out)
    path = _resolved(out)
    _check_sources(path, sources, what, shown)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {shown}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        earlier = earlier_command(path)
        if earlier != command:
            kind = f"an earlier `effilm {earlier}` output" if earlier else "not an effilm output"
            raise OutputError(f"{what} {shown}: not empty, and {kind}; refusing to replace what it holds. "
                              f"Choose a new or empty directory (or an earlier `effilm {command}` output)")  # fmt: skip
        if not (overwrite or resumable):
            raise OutputError(f"{what} {shown}: holds an earlier `effilm {command}` output; pass --overwrite to "
                              "replace it")  # fmt: skip
    _check_writable(path, what, shown)
    return shown


def claim_file(path, inputs: Iterable = (), what: str = "output file", replace: bool = True) -> Path:
    """Check that the file ``path`` may be written: not one of ``inputs`` (nor a directory
    holding one), not an existing directory, and in a folder that can be written. With
    ``replace=False`` an existing file is refused too (``--overwrite`` lifts that)."""
    shown = Path(path)
    p = _resolved(path)
    if p.is_file() and not replace:
        raise OutputError(f"{what} {shown}: exists; pass --overwrite to replace it")
    for i in inputs:
        if i is not None and _inside(_resolved(i), p):
            raise OutputError(f"{what} {shown}: it is the input {i}; writing it would destroy it")
    if p.is_dir():
        raise OutputError(f"{what} {shown}: is a directory; give a file path")
    _check_writable(p.parent, what, shown)
    return shown
