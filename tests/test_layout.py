"""The package's layout: no import cycles between its modules, and the product never imports the benches."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in known} or ({node.module} & known)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known
    return found


def _graph() -> dict[str, set[str]]:
    files = [*ROOT.glob("quantize/**/*.py"), *ROOT.glob("bench/*.py")]
    known = {_module(p) for p in files}
    return {_module(p): _imports(p, known) - {_module(p)} for p in files}


def test_no_module_imports_itself_back() -> None:
    graph = _graph()
    # A package's __init__ is imported with each of its modules: it may not import them back.
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_the_package_does_not_import_the_benches() -> None:
    offenders = {m: sorted(d) for m, d in _graph().items() if m.startswith("quantize") and any(x.startswith("bench") for x in d)}
    assert not offenders
