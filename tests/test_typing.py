"""Typing that helps (issue 11, point 6): the README's calls pass ``mypy --strict``, a misspelt
option fails it, and the names the docs use are importable from ``maintgate``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import maintgate

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
from fastapi import FastAPI
from starlette.applications import Starlette
from flask import Flask
from maintgate import MaintenanceMiddleware, MaintenanceStore, WSGIMaintenanceMiddleware
from maintgate.tenants import from_header

store = MaintenanceStore("sqlite:///maintgate.db")
app = FastAPI()
app.add_middleware(MaintenanceMiddleware, store=store, tenant=from_header("X-Tenant-ID"), cache_ttl=2.0)
wrapped = MaintenanceMiddleware(Starlette(), store, exempt_paths=["/healthz"], on_store_error="closed")
flask = Flask(__name__)
gated = WSGIMaintenanceMiddleware(flask.wsgi_app, store, max_staleness=60.0)
"""

BAD = """
from starlette.applications import Starlette
from maintgate import MaintenanceMiddleware, MaintenanceStore

MaintenanceMiddleware(Starlette(), MaintenanceStore("sqlite://"), cache_tll=2.0)
MaintenanceMiddleware(Starlette(), MaintenanceStore("sqlite://"), cache_ttl="fast")
"""


def mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "snippet.py"
    path.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_the_readmes_calls_type_check_and_a_misspelt_option_does_not(tmp_path):
    good = mypy(tmp_path, GOOD)
    assert good.returncode == 0, good.stdout
    bad = mypy(tmp_path, BAD)
    assert bad.returncode == 1, bad.stdout
    assert '"cache_tll"' in bad.stdout, bad.stdout
    assert "cache_ttl" in bad.stdout and '"str"' in bad.stdout, bad.stdout


def test_the_names_the_docs_use_are_importable_from_maintgate():
    from maintgate import django as maintgate_django

    for name in ("Schedule", "WindowBusy", "WindowLost", "WindowRefused", "Gate", "Renderer", "ALL_TENANTS"):
        assert name in maintgate.__all__ and hasattr(maintgate, name), name
    assert maintgate_django.__all__, "maintgate.django names its public API"
    for name in maintgate_django.__all__:
        assert hasattr(maintgate_django, name), name


def test_the_adapters_options_are_the_gates_keywords():
    import inspect
    import typing

    from maintgate.core.gate import Gate, GateOptions

    keywords = {
        name
        for name, p in inspect.signature(Gate.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert set(typing.get_type_hints(GateOptions)) == keywords
