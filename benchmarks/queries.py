"""Database load: SELECTs issued by the gate for many requests within one TTL, and under a cold stampede."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from sqlalchemy import event

from maintgate import MaintenanceMiddleware, MaintenanceStore
from maintgate.tenants import from_header


class SelectCounter:
    """Counts SELECT statements on a real engine."""

    def __init__(self, engine) -> None:
        self.count = 0
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement, *args) -> None:
        if statement.lstrip()[:6].upper() == "SELECT":
            with self._lock:
                self.count += 1


async def _noop_app(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _scope(tenant: str) -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-tenant-id", tenant.encode())]}


async def _request(app, tenant: str) -> int:
    status = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(_scope(tenant), receive, send)
    return status[0]


def run(
    store: MaintenanceStore,
    *,
    requests: int = 100_000,
    tenants: int = 1_000,
    stampede: int = 256,
    ttl: float = 1.0,
) -> dict[str, Any]:
    """Queries for ``requests`` sequential requests over ``tenants`` tenants, and for the concurrent
    first requests of a process (a gate of other settings, so that it has a state of its own)."""
    counter = SelectCounter(store.engine)
    app = MaintenanceMiddleware(_noop_app, store, tenant=from_header("X-Tenant-ID"), cache_ttl=ttl)

    async def spread() -> float:
        start = time.perf_counter()
        for i in range(requests):
            await _request(app, f"tenant{i % tenants}")
        return time.perf_counter() - start

    elapsed = asyncio.run(spread())
    spread_queries = counter.count

    app.gate.close()
    counter.count = 0
    # A process's first requests, all at once: they share the one first read.
    cold = MaintenanceMiddleware(
        _noop_app, store, tenant=from_header("X-Tenant-ID"), cache_ttl=ttl, log_interval=ttl + 1e-9
    )

    async def herd():
        return await asyncio.gather(*(_request(cold, "stampede") for _ in range(stampede)))

    statuses = asyncio.run(herd())
    assert all(s == 200 for s in statuses)
    cold.gate.close()
    return {
        "requests": requests,
        "tenants": tenants,
        "ttl": ttl,
        "seconds": elapsed,
        "queries": spread_queries,
        "stampede": stampede,
        "stampede_queries": counter.count,
    }
