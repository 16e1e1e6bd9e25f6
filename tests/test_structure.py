"""The library's shape: every module says its job, and its imports point one way (no circle, even hidden
inside a function)."""

import ast
from pathlib import Path

import alignlib

ROOT = Path(alignlib.__file__).parent


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def imports(name: str, tree: ast.Module) -> set[str]:
    """alignlib modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    package = name if name in ("alignlib", "alignlib.analysis") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("alignlib"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("alignlib"))
    return found


def test_every_module_opens_with_a_docstring_that_says_its_job():
    for name, tree in modules().items():
        doc = ast.get_docstring(tree)
        assert doc and len(doc.split()) >= 5, f"{name} has no opening docstring"


def test_the_import_graph_has_no_circle():
    trees = modules()
    graph = {n: {m for m in imports(n, t) if m in trees and m != n} for n, t in trees.items()}
    packages = {"alignlib", "alignlib.analysis"}  # package __init__ files re-export; they sit above everything
    graph = {n: deps - packages for n, deps in graph.items() if n not in packages}
    state: dict = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import circle: {' -> '.join(path + [node])}"
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])
