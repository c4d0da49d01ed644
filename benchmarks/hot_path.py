"""Hot path, in process: bare app vs pass-through middleware vs maintgate (maintenance off, cache hit).

Variants run interleaved, round after round, so that drift on a noisy machine hits
all of them alike; each figure is the median over rounds of the per-request time.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from maintgate import MaintenanceMiddleware, MaintenanceStore, WSGIMaintenanceMiddleware
from maintgate.tenants import from_header

HEADERS = [
    (b"host", b"demo.example.com"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"x-tenant-id", b"demo"),
]


class PassThrough:
    """The cheapest possible pure-ASGI middleware: the floor any middleware pays."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)


class HeaderGateFloor:
    """The least a header-keyed gate can do in pure Python: scan, decode, one dict read, one clock read.

    No structure, no fallbacks, no configurability: it shows how much of maintgate's cost
    is inherent to the job.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.entries = {"demo": (float("inf"), None)}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            entry = None
            for name, value in scope["headers"]:
                if name == b"x-tenant-id":
                    entry = self.entries.get(value.decode("latin-1"))
                    break
            if entry is not None and entry[0] > time.monotonic() and entry[1] is None:
                await self.app(scope, receive, send)
                return
        raise RuntimeError("the floor only knows the hot path")


class WSGIPassThrough:
    """The cheapest possible WSGI middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": HEADERS,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def time_asgi(apps: dict[str, Any], n: int, rounds: int, accept: bytes | None = None) -> dict[str, float]:
    """Median seconds per request of each ASGI app, measured interleaved."""
    scope = _scope()
    if accept is not None:
        scope["headers"] = [(k, accept if k == b"accept" else v) for k, v in scope["headers"]]

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    async def batch(app) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return (time.perf_counter() - start) / n

    async def main() -> dict[str, float]:
        samples: dict[str, list[float]] = {name: [] for name in apps}
        for app in apps.values():
            await batch(app)  # warm caches and code paths
        for _ in range(rounds):
            for name, app in apps.items():
                samples[name].append(await batch(app))
        return {name: statistics.median(values) for name, values in samples.items()}

    return asyncio.run(main())


def time_wsgi(
    apps: dict[str, Any], n: int, rounds: int, accept: str | None = None, stat: Any = statistics.median
) -> dict[str, float]:
    """Seconds per request of each WSGI app (median over rounds by default), measured interleaved."""
    import io

    base = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "demo.example.com",
        "HTTP_USER_AGENT": "bench/1.0",
        "HTTP_ACCEPT": "application/json",
        "HTTP_X_TENANT_ID": "demo",
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    if accept is not None:
        base["HTTP_ACCEPT"] = accept

    def start_response(status, headers, exc_info=None):
        return None

    def batch(app: Callable) -> float:
        start = time.perf_counter()
        for _ in range(n):
            environ = dict(base)
            environ["wsgi.input"] = io.BytesIO()
            body = app(environ, start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return (time.perf_counter() - start) / n

    samples: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():
        batch(app)
    for _ in range(rounds):
        for name, app in apps.items():
            samples[name].append(batch(app))
    return {name: stat(values) for name, values in samples.items()}


def starlette_hello() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse("Hello, world!")

    return Starlette(routes=[Route("/", hello)])


def flask_hello() -> Any:
    from flask import Flask

    app = Flask("bench")

    @app.route("/")
    def hello():
        return "Hello, world!"

    return app.wsgi_app


def fastapi_hello(peer: bool = False) -> Any:
    """FastAPI hello-world; with ``peer``, behind fastapi-maintenance (its default env-var backend)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    if peer:
        from fastapi_maintenance import MaintenanceModeMiddleware

        app.add_middleware(MaintenanceModeMiddleware)
    return app


def run(store: MaintenanceStore, quick: bool = False) -> list[dict[str, Any]]:
    """Rows of timings: bare, pass-through, floor, maintgate and, where one exists, the peer."""
    tenant = from_header("X-Tenant-ID")
    rows = []
    scale = 0.1 if quick else 1.0

    async def bare(scope, receive, send):
        return None

    def asgi_row(name: str, app: Any, n: int, rounds: int, peer: Any = None) -> None:
        gated = MaintenanceMiddleware(app, store, tenant=tenant, cache_ttl=3600)
        variants = {"bare": app, "pass": PassThrough(app), "floor": HeaderGateFloor(app), "maintgate": gated}
        if peer is not None:
            variants["peer"] = peer
        times = time_asgi(variants, max(1, int(n * scale)), rounds)
        rows.append({"target": name, **times})
        gated.gate.close()

    asgi_row("bare ASGI callable", bare, 100_000, 15)
    asgi_row("Starlette hello-world", starlette_hello(), 10_000, 15)
    asgi_row("FastAPI hello-world", fastapi_hello(), 5_000, 15, peer=fastapi_hello(peer=True))
    rows[-1]["peer_name"] = "fastapi-maintenance"
    flask = flask_hello()
    gated = WSGIMaintenanceMiddleware(flask, store, tenant=tenant, cache_ttl=3600)
    times = time_wsgi(
        {"bare": flask, "pass": WSGIPassThrough(flask), "maintgate": gated}, max(1, int(5_000 * scale)), 15
    )
    rows.append({"target": "Flask hello-world", **times})
    return rows


def run_blocked(store: MaintenanceStore, quick: bool = False) -> dict[str, float]:
    """Seconds per 503 on FastAPI: maintgate's JSON and HTML, and fastapi-maintenance's."""
    import os

    from maintgate import ALL_TENANTS

    scale = 0.1 if quick else 1.0
    store.activate(ALL_TENANTS, message="Benchmarking the 503 path")
    json_gate = MaintenanceMiddleware(
        fastapi_hello(), store, tenant=from_header("X-Tenant-ID"), cache_ttl=3600
    )
    html_gate = MaintenanceMiddleware(
        fastapi_hello(), store, tenant=from_header("X-Tenant-ID"), cache_ttl=3600
    )
    previous = os.environ.get("FASTAPI_MAINTENANCE_MODE")
    os.environ["FASTAPI_MAINTENANCE_MODE"] = "1"
    try:
        peer = fastapi_hello(peer=True)
        n = max(1, int(3_000 * scale))
        json_times = time_asgi({"maintgate_json": json_gate, "peer": peer}, n, 9)
        html_times = time_asgi({"maintgate_html": html_gate}, n, 9, accept=b"text/html,*/*;q=0.8")
    finally:
        if previous is None:
            os.environ.pop("FASTAPI_MAINTENANCE_MODE", None)
        else:
            os.environ["FASTAPI_MAINTENANCE_MODE"] = previous
        store.deactivate(ALL_TENANTS)
        json_gate.gate.close()
        html_gate.gate.close()
    return {**json_times, **html_times}
