"""The gate behind real servers on 127.0.0.1: uvicorn for ASGI, wsgiref for WSGI, real HTTP."""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import pytest
import websockets

from maintgate import ALL_TENANTS, MaintenanceMiddleware, WSGIMaintenanceMiddleware
from maintgate.tenants import from_header
from tests import apps
from tests.servers import uvicorn_server, wsgi_server

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def websocket_outcome(url: str, tenant: str) -> tuple[str, object]:
    """("open", first message) or ("refused", HTTP status of the handshake)."""

    async def attempt():
        try:
            async with websockets.connect(url, additional_headers={"X-Tenant-ID": tenant}) as ws:
                return "open", await ws.recv()
        except websockets.InvalidStatus as exc:
            return "refused", exc.response.status_code

    return asyncio.run(attempt())


def test_uvicorn_serves_json_html_retry_after_exempt_and_refuses_websockets(store, clock):
    app = MaintenanceMiddleware(
        apps.starlette_app(), store, tenant=from_header("X-Tenant-ID"), exempt_paths=["/healthz"], clock=clock
    )
    with uvicorn_server(app) as base, httpx.Client(base_url=base) as client:
        ws_url = base.replace("http", "ws") + "/ws"
        assert client.get("/", headers={"X-Tenant-ID": "demo"}).json() == {"ok": True, "tenant": "demo"}
        assert websocket_outcome(ws_url, "demo") == ("open", "hello")

        store.activate("demo", message="Renaming a field", retry_after=600)
        clock.advance(1.5)
        api = client.get("/", headers={"X-Tenant-ID": "demo"})
        assert api.status_code == 503
        assert api.headers["content-type"] == "application/problem+json; charset=utf-8"
        assert api.headers["retry-after"] == "600"
        assert api.headers["cache-control"] == "no-store" and api.headers["vary"] == "Accept"
        assert api.json()["detail"] == "Renaming a field" and api.json()["tenant"] == "demo"

        page = client.get("/", headers={"X-Tenant-ID": "demo", "Accept": BROWSER})
        assert page.status_code == 503 and page.headers["content-type"].startswith("text/html")
        assert "Renaming a field" in page.text and page.headers["retry-after"] == "600"

        assert client.get("/healthz", headers={"X-Tenant-ID": "demo"}).text == "ok"
        assert client.get("/", headers={"X-Tenant-ID": "other"}).status_code == 200
        assert websocket_outcome(ws_url, "demo") == ("refused", 503)
        assert websocket_outcome(ws_url, "other") == ("open", "hello")
    app.gate.close()


@pytest.mark.parametrize("kind", ["flask", "django"])
def test_wsgi_server_serves_the_gate(kind, store, clock):
    inner = apps.flask_app() if kind == "flask" else apps.django_app()
    app = WSGIMaintenanceMiddleware(
        inner, store, tenant=from_header("X-Tenant-ID"), exempt_paths=["/healthz"], clock=clock
    )
    with wsgi_server(app) as base, httpx.Client(base_url=base) as client:
        assert client.get("/", headers={"X-Tenant-ID": "demo"}).status_code == 200
        store.activate(ALL_TENANTS, message="Database upgrade", retry_after=120)
        clock.advance(1.5)
        api = client.get("/", headers={"X-Tenant-ID": "demo"})
        assert api.status_code == 503 and api.json()["detail"] == "Database upgrade"
        assert api.headers["retry-after"] == "120"
        page = client.get("/", headers={"Accept": BROWSER})
        assert page.status_code == 503 and "Database upgrade" in page.text
        assert client.get("/healthz").text == "ok"
