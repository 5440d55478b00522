"""The dependency direction of ARCHITECTURE.md holds: every module imports, and each package
imports only the packages below it in the table."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llmquant"

# Package (first component under llmquant) -> the packages it may import; ARCHITECTURE.md's
# table. Imports under ``if TYPE_CHECKING:`` count too: there are none.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "schema": set(),
    "dtypes": {"errors"},
    "cache": set(),
    "cli": {"errors"},
    "hub": set(),
    "quant": {"dtypes"},
    "tensors": {"dtypes", "errors"},
    "values": {"errors"},
    "model": {"cache", "dtypes", "errors", "hub", "tensors"},
    "data": {"cache", "errors", "hub"},
    "runfolder": {"cache", "dtypes", "errors", "quant", "tensors", "values"},
    "export": {"cache", "dtypes", "errors", "quant", "runfolder", "tensors"},
    "formats": {"errors", "export", "model", "quant", "runfolder", "schema", "tensors"},
    "recipe": {"errors", "formats", "model", "schema", "tensors"},
    "calib": {"model", "quant", "recipe", "values"},
    "report": {"cache", "recipe"},
    "evaluate": {
        "cache", "calib", "data", "errors", "formats", "model", "recipe", "report", "schema",
        "tensors", "values",
    },  # fmt: skip
    "pipeline": {
        "cache", "calib", "data", "dtypes", "errors", "evaluate", "formats", "model", "preflight",
        "quant", "recipe", "report", "runfolder", "tensors", "values",
    },  # fmt: skip
    "preflight": {"cache", "errors", "formats", "model", "quant", "recipe"},
    "run": {"cli", "pipeline", "recipe"},
    "eval": {"cache", "cli", "evaluate", "recipe"},
    "__init__": set(),
}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "llmquant":
                names |= {f"llmquant.{alias.name}" for alias in node.names}
            elif node.module.startswith("llmquant."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("llmquant.")}
    return names


def test_every_package_is_in_the_table():
    assert {_component(m) for m in _modules()} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_follow_the_dependency_direction(module):
    source = _component(module)
    wrong = {
        name
        for name in _imports(_modules()[module])
        if _component(name) != source and _component(name) not in ALLOWED[source]
    }
    assert not wrong, f"{module} ({source}) may not import {sorted(wrong)}"


def test_the_table_has_no_cycle():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError(f"cycle: {' -> '.join([*path, node])}")
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for child in ALLOWED[node]:
            visit(child, [*path, node])
        seen[node] = 2

    for node in ALLOWED:
        visit(node, [])


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from llmquant.pipeline import run\nimport llmquant.export.common\n")
    assert _imports(bad) == {"llmquant.pipeline", "llmquant.export.common"}
    assert "pipeline" not in ALLOWED["quant"]
