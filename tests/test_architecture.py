"""The package map of docs/architecture.md, held by the imports themselves.

Every import in hpd/ and backends/ is read with `ast`, at module level and inside
functions alike (a lazy import is still a dependency), and so are dynamic imports:
`importlib.import_module` and `__import__` with a constant name, or an f-string whose
constant start names a package (f"hpd.backends.{name}" imports from hpd.backends). Two rules:
- no import circle between modules of hpd/;
- a package imports only the packages below it (LAYERS): the objectives import nothing
  else of hpd, the data imports no models, nothing below training imports training.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# source folder -> installed package (pyproject's package-dir)
TREES = {"hpd": "hpd", "backends": "hpd.backends", "cli": "hpd.cli", "recipes": "hpd.recipes"}

# each package and the packages it may import (besides itself)
LAYERS = {
    "objectives": set(),
    "files": set(),
    "data": {"files"},
    "models": {"objectives", "files", "data"},
    "backends": {"objectives", "files", "data", "models"},
    "engines": {"objectives", "files", "data", "models"},
    "teachers": {"objectives", "files", "data", "models", "backends", "engines"},
    "tasks": {"objectives", "files", "data", "models", "backends"},
    "report": {"objectives", "files", "data", "models", "backends", "engines", "teachers", "tasks"},
    "train": {"objectives", "files", "data", "models", "backends", "engines", "teachers", "tasks", "report",
              "recipes"},
}


def modules(root: Path, trees: dict[str, str]) -> dict[str, Path]:
    found = {}
    for folder, package in trees.items():
        for path in (root / folder).rglob("*.py"):
            parts = [package, *path.relative_to(root / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of `mods` it imports anywhere in its body. `from a.b import c`
    counts as importing a.b.c when that is a module, else a.b; the parent packages that
    Python imports on the way are not counted (every module has them)."""

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        edges = set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Call) and (name := dynamic_import(node)) is not None:
                names = [name]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            edges |= {t for t in map(known, names) if t and t != mod}
        graph[mod] = edges
    return graph


def dynamic_import(call: ast.Call) -> str | None:
    """The module an `importlib.import_module(...)` or `__import__(...)` call names: its
    constant argument, or an f-string's constant start up to its last dot; else None."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        start = str(arg.values[0].value)
        return start.rpartition(".")[0] or None
    return None


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def package_of(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        here = package_of(mod)
        if here is None:
            continue
        for target in sorted(targets):
            there = package_of(target)
            if target == "hpd" or (there is not None and there != here and there not in LAYERS[here]):
                bad.append(f"{mod} imports {target}")
    return bad


def test_no_import_circle_inside_hpd():
    graph = imports(modules(ROOT, TREES))
    inside = {m: {t for t in ts if t.startswith("hpd.") and not t.startswith(("hpd.backends", "hpd.cli"))}
              for m, ts in graph.items() if not m.startswith(("hpd.backends", "hpd.cli"))}
    assert len(inside) > 40  # the whole package was read
    assert circles(inside) == []


def test_packages_import_only_downwards():
    graph = imports(modules(ROOT, TREES))
    assert any(m.startswith("hpd.objectives.") for m in graph) and any(m.startswith("hpd.backends.") for m in graph)
    assert layer_violations(graph) == []


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The rules above on a made-up tree that breaks both: they must not pass vacuously."""
    pkg = tmp_path / "hpd"
    for sub in ("objectives", "train", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "objectives" / "rules.py").write_text("def f():\n    from hpd.train.loop import run\n")
    (pkg / "train" / "loop.py").write_text("from hpd.objectives import rules\nfrom . import plan\n")
    (pkg / "train" / "plan.py").write_text("import hpd.train.loop\n")
    (pkg / "data" / "rows.py").write_text("from hpd.objectives.rules import f\n")
    # dynamic imports: a constant name, and an f-string that picks a module of a package
    (pkg / "objectives" / "chunks.py").write_text(
        "import importlib\n"
        "def wrapper(name):\n    return importlib.import_module(f'hpd.train.{name}')\n")
    (pkg / "data" / "late.py").write_text("def f():\n    return __import__('hpd.objectives.rules')\n")
    graph = imports(modules(tmp_path, {"hpd": "hpd"}))
    assert graph["hpd.train.loop"] == {"hpd.objectives.rules", "hpd.train.plan"}
    assert graph["hpd.objectives.chunks"] == {"hpd.train"}
    assert sorted(map(tuple, circles(graph))) == [("hpd.objectives.rules", "hpd.train.loop", "hpd.train.plan")]
    assert layer_violations(graph) == ["hpd.data.late imports hpd.objectives.rules",
                                       "hpd.data.rows imports hpd.objectives.rules",
                                       "hpd.objectives.chunks imports hpd.train",
                                       "hpd.objectives.rules imports hpd.train.loop"]


LONGEST_FUNCTION = 80  # lines, in hpd/ and backends/: a longer one is split into named steps


def long_functions(root: Path, folders=("hpd", "backends")) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > LONGEST_FUNCTION:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_80_lines(tmp_path):
    assert long_functions(ROOT) == []
    (tmp_path / "hpd").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(LONGEST_FUNCTION))
    (tmp_path / "hpd" / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}")
    assert long_functions(tmp_path) == [f"hpd{__import__('os').sep}long.py:5 long (81 lines)"]
