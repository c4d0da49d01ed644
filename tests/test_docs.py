"""The README's examples do what the README says when copied (issue 11, point 8)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.django_setup import setup

setup()

from django.test import override_settings  # noqa: E402

from maintgate.core.gate import ExemptPaths  # noqa: E402
from maintgate.django import conf  # noqa: E402

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_django_examples_exempt_paths_let_the_whole_admin_through():
    line = re.search(r'"EXEMPT_PATHS": (\[.*\]),', README)
    assert line is not None, "the README's Django example sets EXEMPT_PATHS"
    with override_settings(MAINTGATE={"EXEMPT_PATHS": ast.literal_eval(line.group(1))}):
        exempt = ExemptPaths(conf.gate_options()["exempt_paths"])
    for path in ("/admin/", "/admin/login/", "/admin/auth/user/1/change/", "/healthz", "/static/app.css"):
        assert path in exempt, path
    for path in ("/api/contacts", "/administrator", "/"):
        assert path not in exempt, path


def test_the_readme_says_regexes_match_the_whole_path():
    assert "whole path" in README and "fullmatch" in README


def test_the_examples_try_line_reaches_their_database():
    """``maintgate on demo``, as the examples say to try, uses the database the example serves."""
    from maintgate.cli import DEFAULT_URL

    examples = Path(__file__).resolve().parent.parent / "examples"
    for name in ("starlette_app.py", "fastapi_app.py", "flask_app.py"):
        source = (examples / name).read_text()
        assert "maintgate on demo" in source, name
        default = re.search(r'os\.environ\.get\("MAINTGATE_DATABASE_URL", "([^"]+)"\)', source)
        assert default is not None and default.group(1) == DEFAULT_URL, name


def test_the_cors_order_the_readme_gives_lets_browsers_read_the_503(tmp_path):
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from starlette.testclient import TestClient

    from maintgate import MaintenanceMiddleware, MaintenanceStore
    from maintgate.tenants import from_header

    assert README.index("app.add_middleware(MaintenanceMiddleware, store=store") < README.index(
        "app.add_middleware(CORSMiddleware"
    ), "the README adds the gate first, CORS last (outermost)"
    store = MaintenanceStore(f"sqlite:///{tmp_path / 'cors.db'}")
    store.create_tables()
    store.activate("demo")
    app = FastAPI()
    app.add_middleware(MaintenanceMiddleware, store=store, tenant=from_header("X-Tenant-ID"))
    app.add_middleware(CORSMiddleware, allow_origins=["https://app.example.com"], allow_headers=["*"])
    with TestClient(app) as client:
        response = client.get("/", headers={"X-Tenant-ID": "demo", "Origin": "https://app.example.com"})
    assert response.status_code == 503
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"
    store.engine.dispose()
