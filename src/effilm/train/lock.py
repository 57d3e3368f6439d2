"""One run per run directory: an exclusive lock on ``RUN/.lock`` for the whole run.

Rank 0 takes it for every rank of a torchrun job (``flock``, so the kernel releases it when the
process ends, however it ends). The file names its holder (pid, host, start time, command); a
second run on the same directory fails at once with that line. A lock file whose holder is gone
(the lock is free but the file still names a holder: a run that was killed) is taken over with a
warning.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from effilm.errors import EffilmError

LOCK = ".lock"


class RunLocked(EffilmError):
    """Another run holds this run directory."""


def _describe(info: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {when} ({info.get('command', '?')})"


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def _read(self) -> dict:
        try:
            return json.loads(os.pread(self.fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read()
            os.close(self.fd)
            self.fd = None
            raise RunLocked(f"{self.path}: the run directory is in use by another run, {_describe(holder)}; "
                            "wait for it to finish or choose another out_dir") from None  # fmt: skip
        previous = self._read()
        if previous:
            warnings.warn(f"{self.path}: taking over a stale lock left by {_describe(previous)}, which is no "
                          "longer running", stacklevel=2)  # fmt: skip
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}  # fmt: skip
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode(), 0)
        os.fsync(self.fd)
        return self

    def release(self) -> None:
        """Free the lock and clear the holder (the file stays: deleting it would race a waiter)."""
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
