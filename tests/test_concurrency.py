"""The gate under concurrent load: WSGI threads and asyncio tasks, on real databases."""

from __future__ import annotations

import asyncio
import threading

from maintgate import MaintenanceMiddleware, WSGIMaintenanceMiddleware
from maintgate.tenants import from_header
from tests import apps
from tests.conftest import QueryCounter, wsgi_call
from tests.helpers import asgi_request


def test_wsgi_threads_share_one_query_for_every_tenant_and_see_toggles(store, clock):
    store.activate("t0")
    app = WSGIMaintenanceMiddleware(
        apps.flask_app(), store, tenant=from_header("X-Tenant-ID"), clock=clock, notifications=False
    )
    queries = QueryCounter(store.engine)
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)
    results: dict[str, set[int]] = {f"t{i}": set() for i in range(8)}

    def hammer(n: int) -> None:
        try:
            barrier.wait()
            for i in range(200):
                tenant = f"t{(n + i) % 8}"
                results[tenant].add(wsgi_call(app, tenant))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert queries.count == 1, "one query for every tenant, however many threads start at once"
    assert results["t0"] == {503} and results["t1"] == {200}

    store.deactivate("t0")
    store.activate("t1")
    clock.advance(1.1)
    assert wsgi_call(app, "t0") == 200 and wsgi_call(app, "t1") == 503
    app.gate.close()


def test_asgi_cold_start_one_query_for_many_concurrent_requests(store):
    store.activate("hot")
    app = MaintenanceMiddleware(  # a TTL longer than the test: no refresh is due while it runs
        apps.starlette_app(), store, tenant=from_header("X-Tenant-ID"), notifications=False, cache_ttl=60
    )
    queries = QueryCounter(store.engine)

    async def one(tenant: str) -> int:
        return await asgi_request(app, {"X-Tenant-ID": tenant})

    async def main():
        return await asyncio.gather(*(one("hot") for _ in range(256)), *(one("cold") for _ in range(256)))

    statuses = asyncio.run(main())
    assert statuses == [503] * 256 + [200] * 256
    assert queries.count == 1, "the process's first state, read once for every tenant"
    app.gate.close()
