"""A FastAPI app behind maintgate, on SQLite: ``python examples/fastapi_app.py``.

The API docs (``/docs``, ``/openapi.json``) and the health check stay reachable during maintenance.
Try: ``curl -i -H 'X-Tenant-ID: demo' http://127.0.0.1:8000/contacts`` and ``maintgate on demo``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Header

from maintgate import MaintenanceMiddleware, MaintenanceStore
from maintgate.tenants import from_header

DATABASE_URL = os.environ.get("MAINTGATE_DATABASE_URL", "sqlite:///maintgate.db")

store = MaintenanceStore(DATABASE_URL)
store.create_tables()

app = FastAPI(title="maintgate example")
app.add_middleware(
    MaintenanceMiddleware,
    store=store,
    tenant=from_header("X-Tenant-ID"),
    exempt_paths=["/healthz", "/docs", "/docs/*", "/openapi.json"],
)


@app.get("/contacts")
async def contacts(x_tenant_id: str | None = Header(default=None)) -> dict[str, object]:
    return {"tenant": x_tenant_id, "contacts": [{"name": "Ada", "email": "ada@example.com"}]}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
