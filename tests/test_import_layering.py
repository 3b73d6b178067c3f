"""The layering of the controller's modules, read from their imports (no module is run).

The engine (controller/policies) is pure: it imports nothing of the daemon. Among the
controller's modules no import circle exists, counting every import, function-level ones
and those under `if TYPE_CHECKING:` included (a circle for the type checker is a circle for
the reader too: admin_requests and server used to import each other that way).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "lrpilot.controller"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "controller").with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join([PACKAGE, *parts])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, typing_too: bool = True) -> set[str]:
    """The modules `path` imports (absolute names); with `typing_too` False, not those in
    TYPE_CHECKING blocks."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if not typing_too and isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    paths = sorted((ROOT / "controller").rglob("*.py"))
    modules = {_module_name(p): p for p in paths}
    return {name: {m for m in _imports(path) if m in modules and m != name}
            for name, path in modules.items()}  # fmt: skip


def test_the_engine_imports_nothing_of_the_daemon() -> None:
    engine = f"{PACKAGE}.policies"
    for module, deps in _graph().items():
        if module == engine or module.startswith(engine + "."):
            daemon = sorted(d for d in deps if not d.startswith(engine))
            assert daemon == [], f"{module} imports daemon modules {daemon}"


def test_no_import_circle_among_the_controllers_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circle = [*path[path.index(dep) :], dep]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_reading_of_imports_sees_a_known_edge() -> None:
    """The graph is not empty by mistake: the daemon's loop imports the job table."""
    graph = _graph()
    assert f"{PACKAGE}.jobs" in graph[f"{PACKAGE}.server"]
    assert f"{PACKAGE}.policies.base" in graph[f"{PACKAGE}.policies.plateau"]
