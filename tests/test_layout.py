"""The package layout: imports flow only downward, and no two modules import each other directly
or through a chain. Function-local imports count (they hide cycles); ``if TYPE_CHECKING:``
imports do not (they never run).

``python tests/test_layout.py [SRC_DIR]`` prints the import graph's figures: modules, import
edges, cycles and the imports that point upward.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

BASE = {"effilm", "errors", "io", "device", "outputs"}  # the root package (lazy names only) and the leaves
# Which parts each part may import, besides itself and BASE. docs/ARCHITECTURE.md has this table.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "io": set(),
    "device": set(),
    "config": set(),
    "models": {"config"},
    "data": {"config"},
    "formats": {"config", "models", "data"},
    "inference": {"config", "models", "data", "formats"},
    "quant": {"config", "models", "data", "formats", "inference"},
    "eval": {"config", "models", "data", "formats", "inference"},
    "train": {"config", "models", "data", "formats", "eval"},
    "serve": {"config", "data", "formats", "inference"},
    "synth": {"config", "data", "formats", "inference"},
    "reports": {"config"},
    "demo": {"config", "models", "data", "formats", "inference", "quant", "eval", "train", "synth", "reports"},
    "commands": {"config", "models", "data", "formats", "inference", "quant", "eval", "train", "serve", "synth",
                 "reports", "demo"},
    "cli": {"config"},  # finds the command modules by name (importlib), so nothing imports them
    "__main__": {"cli"},
}  # fmt: skip


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for p in sorted((src / "effilm").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the effilm modules it imports (``from P import m`` of a submodule counts as P.m)."""
    mods = modules(src)
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "effilm")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "effilm":
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                deps.update(subs)
                if len(subs) < len(node.names):
                    deps.add(node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "effilm"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from one part into a part it may not import (the table above)."""
    bad = []
    for mod, deps in sorted(graph.items()):
        p = part(mod)
        for d in sorted(deps):
            q = part(d)
            if q == p or q in BASE:
                continue
            if q not in ALLOWED.get(p, set()):
                bad.append(f"{mod} -> {d}")
    return bad


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_imports_only_flow_downward():
    graph = import_graph()
    assert {part(m) for m in graph} - set(ALLOWED) - BASE == set(), "a new part needs a row in ALLOWED"
    assert upward_imports(graph) == []


def test_nothing_imports_the_command_line():
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if part(m) not in ("commands", "cli", "__main__")
                   and any(part(d) in ("commands", "cli") for d in deps))  # fmt: skip
    assert users == []


def test_the_checker_sees_hidden_cycles(tmp_path):
    pkg = tmp_path / "effilm"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from effilm.models.b import g\n")
    (pkg / "models" / "b.py").write_text("import effilm.models.c\n")
    (pkg / "models" / "c.py").write_text("from effilm.models import a\nfrom typing import TYPE_CHECKING\n"
                                         "if TYPE_CHECKING:\n    from effilm.train import loop\n")  # fmt: skip
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["effilm.models.a", "effilm.models.b", "effilm.models.c"]]
    (pkg / "models" / "c.py").write_text("from effilm.train.loop import x\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("")
    assert upward_imports(import_graph(tmp_path)) == ["effilm.models.c -> effilm.train.loop"]


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    g = import_graph(src)
    cyc = cycles(g)
    print(f"modules {len(g)}, import edges {sum(map(len, g.values()))}, cycles {len(cyc)}, "
          f"modules in cycles {sum(map(len, cyc))}, upward imports {len(upward_imports(g))}")
    for c in cyc:
        print("  cycle:", " <-> ".join(c))
    for u in upward_imports(g):
        print("  upward:", u)
