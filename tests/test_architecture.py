"""The core knows no framework, and the WSGI adapter loads neither Django nor Starlette."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import maintgate

CORE = Path(maintgate.__file__).parent / "core"
ALLOWED_THIRD_PARTY = {"sqlalchemy", "cachetools"}


def test_core_imports_only_stdlib_sqlalchemy_and_cachetools():
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            for root in roots:
                assert root in sys.stdlib_module_names or root in ALLOWED_THIRD_PARTY, (
                    f"{path.name} imports {root}"
                )


def test_importing_the_wsgi_adapter_loads_no_framework():
    code = (
        "import sys, maintgate, maintgate.wsgi, maintgate.asgi, maintgate.tenants\n"
        "frameworks = ('django', 'starlette', 'flask', 'fastapi')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in frameworks))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_package_ships_type_information():
    assert (Path(maintgate.__file__).parent / "py.typed").exists()


def _imports(package: Path) -> dict[str, set[str]]:
    """Each maintgate module and the maintgate modules it imports, anywhere in it (functions too)."""
    graph: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        here = name.split(".") if is_package else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = found
    return {name: {m for m in found if m in graph and m != name} for name, found in graph.items()}


def test_no_module_imports_one_that_imports_it_back():
    """Package ``__init__`` re-exports aside, modules form no cycle (the CLI and the demo once did)."""
    graph = _imports(Path(maintgate.__file__).parent)
    modules = {name for name in graph if not any(other.startswith(name + ".") for other in graph)}
    cycles = []
    for start in sorted(modules):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node] & modules:
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, cycles


def test_no_test_helper_is_written_twice():
    """A helper lives in tests/helpers.py (or one test file), not copied from file to file."""
    tests = Path(__file__).parent
    seen: dict[str, list[str]] = {}
    for path in sorted(tests.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("test_"):
                seen.setdefault(ast.dump(node), []).append(f"{path.name}::{node.name}")
    twice = [places for places in seen.values() if len(places) > 1]
    assert not twice, twice
