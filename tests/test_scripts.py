"""The scripts in scripts/ run on a GPU, under Triton's interpreter or for minutes on the CPU, so CI runs none of
them. This catches what breaks them silently between those runs: a syntax error, or a kiln name they import that
was renamed or removed (each costs a device call to find out). Read from the source, not imported: many kiln names
exist only where Triton does (under `if triton is not None:`), and CI has no Triton."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def kiln_imports(tree: ast.AST):
    """(module, name or None) of every `import kiln...` and `from kiln... import name` in a parsed script."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kiln":
            yield from ((node.module, alias.name) for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.split(".")[0] == "kiln")


def module_file(module: str) -> Path | None:
    """kiln.a.b -> kiln/a/b.py or kiln/a/b/__init__.py in this tree (None: no such module)."""
    base = ROOT.joinpath(*module.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def defined_names(source: Path) -> set[str]:
    """Names a module defines at its top level, also inside top-level if / try / with blocks (those that exist
    only with Triton among them): functions, classes, assignments and imports."""
    names, pending = set(), list(ast.parse(source.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending += [*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                        *(n for h in getattr(node, "handlers", []) for n in h.body)]
    return names


def unresolved(tree: ast.AST) -> list[str]:
    """The kiln modules and names a parsed script imports that this tree does not have."""
    missing = []
    for module, name in kiln_imports(tree):
        source = module_file(module)
        if source is None:
            missing.append(module)
        elif name is not None and name not in defined_names(source) and module_file(f"{module}.{name}") is None:
            missing.append(f"{module}.{name}")
    return missing


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_scripts_kiln_imports_resolve(script):
    assert unresolved(ast.parse(script.read_text(), str(script))) == []


def test_the_check_sees_a_renamed_name_and_a_missing_module():
    tree = ast.parse("from kiln.kernels.gemv import FP8_DOT_TILES, no_such_function\nimport kiln.no_such_module\n")
    assert unresolved(tree) == ["kiln.kernels.gemv.no_such_function", "kiln.no_such_module"]
