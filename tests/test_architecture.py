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
