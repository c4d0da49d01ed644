"""A Starlette app behind maintgate, on SQLite: ``python examples/starlette_app.py``.

Then, from another shell in the same folder::

    curl -i -H 'X-Tenant-ID: demo' http://127.0.0.1:8000/
    maintgate on demo --message "Renaming a field"   (from this directory: the same maintgate.db)
    curl -i -H 'X-Tenant-ID: demo' http://127.0.0.1:8000/                         # JSON 503
    curl -i -H 'X-Tenant-ID: demo' -H 'Accept: text/html' http://127.0.0.1:8000/   # HTML 503
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from maintgate import MaintenanceMiddleware, MaintenanceStore
from maintgate.tenants import from_header

DATABASE_URL = os.environ.get("MAINTGATE_DATABASE_URL", "sqlite:///maintgate.db")


async def home(request: Request) -> JSONResponse:
    return JSONResponse({"tenant": request.headers.get("x-tenant-id"), "contacts": []})


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def create_app(database_url: str = DATABASE_URL) -> MaintenanceMiddleware:
    """The example app wrapped by the gate; creates maintgate's tables if needed."""
    store = MaintenanceStore(database_url)
    store.create_tables()
    app = Starlette(routes=[Route("/", home), Route("/healthz", healthz)])
    return MaintenanceMiddleware(app, store, tenant=from_header("X-Tenant-ID"), exempt_paths=["/healthz"])


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
