"""A Flask app behind maintgate, served by waitress, on SQLite: ``python examples/flask_app.py``.

Try: ``curl -i -H 'X-Tenant-ID: demo' http://127.0.0.1:8000/contacts`` and ``maintgate on demo``.
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request

from maintgate import MaintenanceStore, WSGIMaintenanceMiddleware
from maintgate.tenants import from_header

DATABASE_URL = os.environ.get("MAINTGATE_DATABASE_URL", "sqlite:///maintgate.db")

store = MaintenanceStore(DATABASE_URL)
store.create_tables()

app = Flask(__name__)
app.wsgi_app = WSGIMaintenanceMiddleware(  # type: ignore[method-assign]
    app.wsgi_app, store, tenant=from_header("X-Tenant-ID"), exempt_paths=["/healthz"]
)


@app.get("/contacts")
def contacts():
    return jsonify(tenant=request.headers.get("X-Tenant-ID"), contacts=[{"name": "Ada"}])


@app.get("/healthz")
def healthz():
    return "ok"


if __name__ == "__main__":
    from waitress import serve

    serve(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
