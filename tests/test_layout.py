"""The package's shape: no import circles (lazy and type-checking imports included), the direction of
imports between the three packages (docs/design.md, Layout), and what `import emulate` costs."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("graphs", "emulate", "cluster")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for f in sorted((ROOT / package).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


def imports(f: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The project modules `f` imports anywhere in it: top level, inside functions, under TYPE_CHECKING."""
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(f, name, known) for name, f in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    found = cycles(import_graph())
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_run_one_way_between_the_packages():
    """graphs imports neither emulate nor cluster; emulate never imports cluster (the Ray executor is
    found through the registry by name)."""
    graph = import_graph()
    wrong = [(a, b) for a, targets in graph.items() for b in targets
             if (a.startswith("graphs") and not b.startswith("graphs"))
             or (a.startswith("emulate") and b.startswith("cluster"))]
    assert wrong == []


def test_graphs_draws_only_in_its_pictures_package():
    """graphs outside graphs.pictures imports no drawing library and no torch, not even lazily."""
    heavy = ("torch", "ray", "matplotlib", "pygraphviz", "transformers")
    wrong = []
    for name, f in modules().items():
        if not name.startswith("graphs") or name.startswith("graphs.pictures"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [(name, n) for n in names if n.split(".")[0] in heavy]
    assert wrong == []


def test_import_emulate_loads_nothing_heavy():
    code = ("import sys, emulate, graphs; import emulate.cli; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'matplotlib', 'networkx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['networkx']"  # graphs' own data structure; the rest come when they are used


def test_version_needs_no_torch():
    code = ("import sys; from emulate.cli import main; code = main(['--version']); "
            "print(code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 False"


def test_the_package_says_it_is_typed():
    assert (ROOT / "emulate" / "py.typed").is_file()
