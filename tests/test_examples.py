"""Every example runs with its one command on SQLite and serves the gate through a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx
import pytest

from maintgate import MaintenanceStore
from tests.helpers import eventually

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BROWSER = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status(client: httpx.Client, path: str, headers: dict[str, str]) -> int | None:
    """The status of a GET, or None while the server does not answer yet."""
    try:
        return client.get(path, headers=headers).status_code
    except httpx.TransportError:
        return None


@pytest.mark.parametrize(
    ("name", "command", "path"),
    [
        ("starlette", ["examples/starlette_app.py"], "/"),
        ("fastapi", ["examples/fastapi_app.py"], "/contacts"),
        ("flask", ["examples/flask_app.py"], "/contacts"),
        ("django", ["examples/django_project/manage.py", "runserver", "--noreload", "{addr}"], "/contacts"),
    ],
)
def test_example_serves_the_gate(name, command, path, tmp_path):
    db = tmp_path / "example.db"
    port = free_port()
    env = {
        **os.environ,
        "MAINTGATE_DATABASE_URL": f"sqlite:///{db}",
        "EXAMPLE_SQLITE_PATH": str(db),
        "PORT": str(port),
    }
    args = [sys.executable, *(part.format(addr=f"127.0.0.1:{port}") for part in command)]
    server = subprocess.Popen(
        args, cwd=EXAMPLES.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as client:
            demo = {"X-Tenant-ID": "demo"}
            assert eventually(lambda: status(client, path, demo) == 200, 30), name
            assert client.get("/healthz").status_code == 200
            store = MaintenanceStore(f"sqlite:///{db}")
            store.activate("demo", message=f"{name} maintenance", retry_after=60)
            assert eventually(lambda: status(client, path, demo) == 503, 5)
            api = client.get(path, headers=demo)
            assert api.headers["content-type"].startswith("application/problem+json")
            assert api.json()["detail"] == f"{name} maintenance" and api.headers["retry-after"] == "60"
            page = client.get(path, headers={**demo, "Accept": BROWSER})
            assert page.status_code == 503 and f"{name} maintenance" in page.text
            assert client.get("/healthz", headers=demo).status_code == 200
            assert client.get(path, headers={"X-Tenant-ID": "other"}).status_code == 200
            store.engine.dispose()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        output = server.stdout.read()
        server.stdout.close()
    assert "Traceback" not in output, output


def test_django_manage_py_maintgate_command(tmp_path):
    """``manage.py maintgate …`` runs the maintgate CLI's commands on Django's own store."""
    env = {**os.environ, "EXAMPLE_SQLITE_PATH": str(tmp_path / "example.db")}
    manage = [sys.executable, "examples/django_project/manage.py", "maintgate"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*manage, *args], cwd=EXAMPLES.parent, env=env, capture_output=True, text=True, timeout=60
        )

    assert run("on", "demo", "--message", "via manage.py").returncode == 0
    done = run("status", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["tenant"] == "demo" and row["active"] and row["message"] == "via manage.py"
    assert "usage: manage.py maintgate" in run("--help").stdout, "Django's help, with Django's options"
    bad = run("on", "bad id")
    assert bad.returncode == 1 and "invalid tenant id" in bad.stderr and "Traceback" not in bad.stderr
    assert run("off", "demo").returncode == 0
    assert "deactivated" in run("history", "demo").stdout
