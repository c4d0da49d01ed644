"""ASGI apps the server benchmarks run under uvicorn, configured by environment variables.

``MAINTGATE_BENCH_APP=bare|gated``, ``MAINTGATE_BENCH_URL`` (database), ``MAINTGATE_BENCH_PREFIX``
(table prefix), ``MAINTGATE_BENCH_NOTIFY=1|0``, ``MAINTGATE_BENCH_TTL`` (seconds).
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from maintgate import MaintenanceMiddleware, MaintenanceStore
from maintgate.tenants import from_header


async def hello(request):
    return PlainTextResponse("Hello, world!")


def build():
    app = Starlette(routes=[Route("/", hello)])
    if os.environ.get("MAINTGATE_BENCH_APP", "gated") == "bare":
        return app
    store = MaintenanceStore(
        os.environ["MAINTGATE_BENCH_URL"], table_prefix=os.environ.get("MAINTGATE_BENCH_PREFIX", "maintgate_")
    )
    return MaintenanceMiddleware(
        app,
        store,
        tenant=from_header("X-Tenant-ID"),
        cache_ttl=float(os.environ.get("MAINTGATE_BENCH_TTL", "1.0")),
        notifications=os.environ.get("MAINTGATE_BENCH_NOTIFY", "1") == "1",
    )


app = build()
