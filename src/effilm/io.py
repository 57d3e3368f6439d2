"""Small I/O helpers shared by every writer: atomic files and directories, hashing, JSONL."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry to disk (a no-op where the platform cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, mark: str | None = None) -> Iterator[Path]:
    """Build a directory under a temporary name, then rename it into place.

    An existing directory at ``path`` is replaced only after the new one is complete (commands
    check first that they may replace it: :mod:`effilm.outputs`). ``mark`` names the command
    writing it, recorded inside (``.effilm-output.json``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        if mark:
            from effilm.outputs import mark as write_mark

            write_mark(tmp, mark)
        mode = 0o666 & ~_umask()
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
                # every file with the user's usual permissions (safetensors writes its files 0600)
                os.chmod(child, mode)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_text(path: str | os.PathLike):
    """Open a text file for reading, transparently decompressing ``.gz`` (prefer :func:`read_lines`
    and :func:`read_text`, which turn every reading problem into one clear error)."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


BOM = b"\xef\xbb\xbf"


@contextlib.contextmanager
def _reading(path: str | os.PathLike, lineno: list):
    """Turn the ways a text file can fail to read into one EffilmError naming the file (and line)."""
    from effilm.errors import EffilmError

    where = lambda: f"{path}:{lineno[0]}" if lineno[0] else str(path)  # noqa: E731
    try:
        yield
    except IsADirectoryError:
        raise EffilmError(f"{path}: is a directory, not a file") from None
    except FileNotFoundError:
        raise EffilmError(f"{path}: no such file") from None
    except PermissionError:
        raise EffilmError(f"{path}: permission denied") from None
    except UnicodeDecodeError as exc:
        raise EffilmError(f"{where()}: not valid UTF-8 (byte {exc.object[exc.start:exc.start + 1]!r} at column "
                          f"{exc.start + 1})") from None  # fmt: skip
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise EffilmError(f"{path}: truncated or corrupt gzip data ({exc})") from None
    except OSError as exc:
        raise EffilmError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` of a UTF-8 text file, ``.gz`` decompressed, a leading BOM dropped,
    line endings kept. Non-UTF-8 bytes, truncated gzip data, a directory or a missing file are one
    ``EffilmError`` naming the file (and the line)."""
    lineno = [0]
    with _reading(path, lineno):
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "rb") as fh:
            for raw in fh:
                lineno[0] += 1
                if lineno[0] == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                yield lineno[0], raw.decode("utf-8")


def read_text(path: str | os.PathLike) -> str:
    """The whole of a UTF-8 text file (``.gz`` decompressed, a BOM dropped), with the errors of
    :func:`read_lines`."""
    return "".join(line for _, line in read_lines(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` from a JSONL file (optionally gzipped; a BOM is dropped).

    A malformed line raises an error naming the file and the line, as do the reading problems of
    :func:`read_lines`.
    """
    from effilm.errors import EffilmError

    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EffilmError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise EffilmError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec
