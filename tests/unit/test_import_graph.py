"""The import graph of ckpt_ir: no cycle, and the core never imports the layers above it.

Read from the source with ``ast`` (nothing is imported), so the test sees every module,
including ones no other test happens to import. ``converters/`` ships as ``ckpt_ir.converters``
(pyproject's package-dir), and is read under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"ckpt_ir": REPO / "ckpt_ir", "ckpt_ir.converters": REPO / "converters"}

CORE = ("ckpt_ir.ir", "ckpt_ir.transforms", "ckpt_ir.planner", "ckpt_ir.executor",
        "ckpt_ir.layout", "ckpt_ir.tables", "ckpt_ir.options", "ckpt_ir.capabilities",
        "ckpt_ir.readahead")
"""The format-free core: IR, transforms, tables, planner, executor, layouts, typed options and
the capability protocols the executor asks for."""

UPWARD = ("ckpt_ir.api", "ckpt_ir.adapter_api", "ckpt_ir.orchestration", "ckpt_ir.cli",
          "ckpt_ir.commands", "ckpt_ir.converters", "ckpt_ir.manager", "ckpt_ir.formats",
          "ckpt_ir.detect", "ckpt_ir.distributed", "ckpt_ir.verify")
"""What sits above the core: the public API and its orchestration, the CLI, the format
modules, detection, the manager."""


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((prefix, *parts))] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(module: str, level: int, here: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def _targets(node: ast.Import | ast.ImportFrom, here: str) -> list[str]:
    """The ckpt_ir modules an import statement loads (a ``from m import name`` loads
    ``m.name`` when that is a module, else ``m``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _resolve(node.module or "", node.level, here, MODULES[here].name == "__init__.py")
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    return [n for n in names if n in MODULES]


def _imports(module: str, *, top_level_only: bool) -> set[str]:
    """Modules ``module`` imports: at import time (module body, outside ``TYPE_CHECKING``),
    or anywhere (inside functions too)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.update(_targets(node, module))
            elif isinstance(node, ast.If):
                if not _is_type_checking(node):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, (ast.Try, ast.With)):
                visit(node.body)
                for handler in getattr(node, "handlers", ()):
                    visit(handler.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))

    if top_level_only:
        visit(tree.body)
    else:
        out.update(t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for t in _targets(node, module))
    out.discard(module)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_covers_the_packages():
    # A broken root or glob would make the other tests pass vacuously.
    assert {"ckpt_ir.api", "ckpt_ir.adapter_api", "ckpt_ir.orchestration", "ckpt_ir.planner",
            "ckpt_ir.tables", "ckpt_ir.converters.base", "ckpt_ir.converters.storage.dcp_files",
            "ckpt_ir.commands.convert"} <= MODULES.keys()
    assert "ckpt_ir.orchestration" in _imports("ckpt_ir.api", top_level_only=True)


def test_no_import_cycle():
    graph = {m: _imports(m, top_level_only=True) for m in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or ())


def test_the_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_api_and_adapter_api_do_not_import_each_other_anywhere():
    # Not even lazily inside a function: both sit on ckpt_ir.orchestration.
    assert "ckpt_ir.api" not in _imports("ckpt_ir.adapter_api", top_level_only=False)
    assert "ckpt_ir.api" not in _imports("ckpt_ir.orchestration", top_level_only=False)
    assert "ckpt_ir.adapter_api" not in _imports("ckpt_ir.orchestration", top_level_only=False)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _within(m, CORE)))
def test_core_never_imports_upward(module):
    # Lazy imports inside functions count too: the core must work without the layers above.
    upward = sorted(m for m in _imports(module, top_level_only=False) if _within(m, UPWARD))
    assert upward == [], f"{module} imports {upward}"
