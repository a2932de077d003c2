"""The package's layout (docs/architecture.md): no import cycle, dependencies pointing one way, every
module in the module map, and no module or function past the size the docs promise."""

from __future__ import annotations

import ast
import os
import pathlib

from tests.conftest import REPO

PACKAGE = pathlib.Path(REPO) / "pipeline"
LAYERS = ("pipeline.api", "pipeline.cli", "pipeline.commands")  # the only importers of a command


def module_imports() -> dict[str, set[str]]:
    """{module: the pipeline modules it imports at load time} (imports inside functions are lazy)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("pipeline")}
        modules[name] = deps
    return {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}


def test_no_import_cycle_and_commands_are_imported_only_from_the_top():
    graph = module_imports()
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for dep in graph[module]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path[path.index(dep):] + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    upward = [(m, d) for m, deps in graph.items() for d in deps if d.startswith("pipeline.commands")
              and not m.startswith(LAYERS)]
    assert upward == []


def test_every_module_is_in_the_architecture_page_and_small():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name != "__init__.py" or relative == "__init__.py":
            assert f"`{relative}`" in page, f"{relative} is not in docs/architecture.md"
        source = path.read_text()
        assert len(source.splitlines()) <= 420, f"{relative}: {len(source.splitlines())} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 65, f"{relative}: {node.name} has {node.end_lineno - node.lineno + 1} lines"
    assert os.path.isfile(PACKAGE.parent / "docs" / "reference.md")
