"""A tiny, restricted Python interpreter for the procedural ``python`` domain.

Programs are parsed with :mod:`ast` and walked by this interpreter, never handed to ``exec``.
Only a whitelist of node types runs: assignments to plain names, ``for`` over ``range`` or a
list, ``while``, ``if``, arithmetic, comparisons, boolean logic, lists, indexing and a handful
of pure functions (``print``, ``range``, ``len``, ``min``, ``max``, ``sum``, ``abs``, ``str``).
There are no builtins, no imports, no attributes and no function definitions. Every node visit
costs a step; the run stops with :class:`SandboxError` past ``max_steps`` or ``max_seconds``, and
integers are bounded so that ``9 ** 9 ** 9`` cannot eat memory.
"""

from __future__ import annotations

import ast
import operator
import time
from dataclasses import dataclass, field

from effilm.errors import ConfigError, EffilmError


class SandboxError(EffilmError):
    """A program used something outside the whitelist or ran past its limits."""


@dataclass
class SandboxLimits:
    max_steps: int = field(default=20_000, metadata={"help": "node visits before the run is stopped"})
    max_seconds: float = field(default=0.5, metadata={"help": "wall-clock limit for one program"})
    max_int_bits: int = field(default=64, metadata={"help": "largest integer magnitude, in bits"})
    max_seq_len: int = field(default=1_000, metadata={"help": "longest list, range or string"})
    time_check_every: int = field(default=256, metadata={"help": "steps between clock checks"})

    def __post_init__(self):
        for name in ("max_steps", "max_int_bits", "max_seq_len", "time_check_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")
        if self.max_seconds <= 0:
            raise ConfigError(f"SandboxLimits.max_seconds must be positive, got {self.max_seconds}")


_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}


class _Interp:
    def __init__(self, limits: SandboxLimits):
        self.limits = limits
        self.env: dict[str, object] = {}
        self.out: list[str] = []
        self.steps = 0
        self.t0 = time.monotonic()
        self.funcs = {
            "print": self._print, "range": self._range, "len": len, "min": min, "max": max,
            "sum": sum, "abs": abs, "str": str,
        }

    # -- limits --------------------------------------------------------------------------
    def tick(self, node):
        self.steps += 1
        if self.steps > self.limits.max_steps:
            raise SandboxError(f"line {getattr(node, 'lineno', '?')}: step limit {self.limits.max_steps} exceeded")
        if self.steps % self.limits.time_check_every == 0 and (
            time.monotonic() - self.t0 > self.limits.max_seconds
        ):
            raise SandboxError(f"time limit {self.limits.max_seconds}s exceeded")

    def check(self, value, node):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value.bit_length() > self.limits.max_int_bits:
            raise SandboxError(f"line {node.lineno}: integer larger than {self.limits.max_int_bits} bits")
        if isinstance(value, (str, list)) and len(value) > self.limits.max_seq_len:
            raise SandboxError(f"line {node.lineno}: sequence longer than {self.limits.max_seq_len}")
        return value

    def _print(self, *args):
        self.out.append(" ".join(str(a) for a in args))

    def _range(self, *args):
        r = range(*args)
        if len(r) > self.limits.max_seq_len:
            raise SandboxError(f"range longer than {self.limits.max_seq_len}")
        return r

    # -- statements ----------------------------------------------------------------------
    def run_block(self, body):
        for stmt in body:
            self.stmt(stmt)

    def stmt(self, node):
        self.tick(node)
        if isinstance(node, ast.Expr):
            self.expr(node.value)
        elif isinstance(node, ast.Assign):
            value = self.expr(node.value)
            for target in node.targets:
                self.assign(target, value)
        elif isinstance(node, ast.AugAssign):
            if not isinstance(node.target, ast.Name) or type(node.op) not in _BINOPS:
                raise SandboxError(f"line {node.lineno}: unsupported augmented assignment")
            cur = self.load(node.target)
            self.assign(node.target, self.binop(node.op, cur, self.expr(node.value), node))
        elif isinstance(node, ast.For):
            if node.orelse:
                raise SandboxError(f"line {node.lineno}: for-else is not supported")
            for item in self.expr(node.iter):
                self.assign(node.target, item)
                self.run_block(node.body)
        elif isinstance(node, ast.While):
            if node.orelse:
                raise SandboxError(f"line {node.lineno}: while-else is not supported")
            while self.expr(node.test):
                self.tick(node)
                self.run_block(node.body)
        elif isinstance(node, ast.If):
            self.run_block(node.body if self.expr(node.test) else node.orelse)
        elif isinstance(node, ast.Pass):
            pass
        else:
            raise SandboxError(f"line {node.lineno}: statement {type(node).__name__} is not allowed")

    def assign(self, target, value):
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            seq = self.load(target.value)
            if not isinstance(seq, list):
                raise SandboxError(f"line {target.lineno}: only list items can be assigned")
            seq[self.expr(target.slice)] = value
        else:
            raise SandboxError(f"line {target.lineno}: can only assign to names and list items")

    def load(self, node: ast.Name):
        if node.id in self.env:
            return self.env[node.id]
        raise SandboxError(f"line {node.lineno}: name {node.id!r} is not defined")

    # -- expressions ---------------------------------------------------------------------
    def binop(self, op, a, b, node):
        if isinstance(op, ast.Pow) and isinstance(b, int) and b > self.limits.max_int_bits:
            raise SandboxError(f"line {node.lineno}: exponent {b} too large")
        if isinstance(op, ast.Mult) and isinstance(b, int) and isinstance(a, (str, list)):
            if len(a) * b > self.limits.max_seq_len:
                raise SandboxError(f"line {node.lineno}: sequence longer than {self.limits.max_seq_len}")
        try:
            return self.check(_BINOPS[type(op)](a, b), node)
        except (TypeError, ZeroDivisionError, IndexError) as exc:
            raise SandboxError(f"line {node.lineno}: {exc}") from None

    def expr(self, node):
        self.tick(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, str, bool)):
            return node.value
        if isinstance(node, ast.Name):
            return self.load(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self.binop(node.op, self.expr(node.left), self.expr(node.right), node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            v = self.expr(node.operand)
            return -v if isinstance(node.op, ast.USub) else not v
        if isinstance(node, ast.BoolOp):
            vals = node.values
            if isinstance(node.op, ast.And):
                result = True
                for v in vals:
                    result = self.expr(v)
                    if not result:
                        return result
                return result
            result = False
            for v in vals:
                result = self.expr(v)
                if result:
                    return result
            return result
        if isinstance(node, ast.Compare):
            left = self.expr(node.left)
            for op, comp in zip(node.ops, node.comparators, strict=True):
                if type(op) not in _CMPOPS:
                    raise SandboxError(f"line {node.lineno}: comparison {type(op).__name__} not allowed")
                right = self.expr(comp)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.List):
            return self.check([self.expr(e) for e in node.elts], node)
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
            try:
                return self.expr(node.value)[self.expr(node.slice)]
            except (IndexError, TypeError) as exc:
                raise SandboxError(f"line {node.lineno}: {exc}") from None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            fn = self.funcs.get(node.func.id)
            if fn is None:
                raise SandboxError(f"line {node.lineno}: function {node.func.id!r} is not allowed")
            args = [self.expr(a) for a in node.args]
            try:
                return self.check(fn(*args), node)
            except (TypeError, ValueError) as exc:
                raise SandboxError(f"line {node.lineno}: {exc}") from None
        raise SandboxError(f"line {getattr(node, 'lineno', '?')}: expression {type(node).__name__} is not allowed")


def run_program(source: str, limits: SandboxLimits | None = None) -> str:
    """Run ``source`` in the sandbox and return what it printed (lines joined by newlines)."""
    try:
        tree = ast.parse(source, mode="exec")
    except SyntaxError as exc:
        raise SandboxError(f"line {exc.lineno}: syntax error: {exc.msg}") from None
    interp = _Interp(limits or SandboxLimits())
    interp.run_block(tree.body)
    return "\n".join(interp.out)
