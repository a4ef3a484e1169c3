"""The import contract: the data flow features -> train -> export -> artifact -> engine -> ranking has no
arrow running back. Walks every module's imports with `ast` (lazy imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "training", "export", "benchmarks")
# What each package may import from this project (besides itself). engine: nothing else, ever.
ALLOWED = {"engine": set(), "training": {"engine"}, "export": {"engine", "training"},
           "benchmarks": {"engine", "training", "export"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names imported by a module (relative imports resolved); `top_level_only`: the
    statements run at import time (not inside functions, not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    nodes = []
    if top_level_only:
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                stack.extend(node.orelse)
                continue
            nodes.append(node)
            stack.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from engine import files`
    return names


def project_modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_upstream(package):
    """engine/ imports neither training, export nor benchmarks (not even lazily); training not export..."""
    broken = []
    for name, path in project_modules(package).items():
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top in PACKAGES and top != package and top not in ALLOWED[package]:
                broken.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not broken, "layering violated:\n" + "\n".join(broken)


def import_cycles(modules: dict[str, Path]) -> list[str]:
    """Cycles in the graph of import-time imports among `modules` (name -> file), as "a -> b -> a"."""
    graph = {name: {m for m in imports_of(path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_import_cycles_among_project_modules():
    """No cycle among the imports that run at import time (lazy imports inside functions excluded)."""
    modules = {n: p for package in PACKAGES for n, p in project_modules(package).items()}
    cycles = import_cycles(modules)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_sees_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from b import x\n")
    (tmp_path / "b.py").write_text("import a\ndef f():\n    import c\n")
    (tmp_path / "c.py").write_text("import b\n")  # b imports c lazily only: not a cycle at import time
    global ROOT
    root, ROOT = ROOT, tmp_path
    try:
        assert import_cycles({"a": tmp_path / "a.py", "b": tmp_path / "b.py", "c": tmp_path / "c.py"}) == ["a -> b -> a"]
    finally:
        ROOT = root
