"""Tenant floods: a million hostile ids, and thousands of valid unknown ones, against real databases."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import event

from maintgate import ALL_TENANTS, InvalidArgument, WSGIMaintenanceMiddleware
from maintgate.tenants import from_header
from tests.conftest import QueryCounter, ok_wsgi, wsgi_call


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_a_million_hostile_tenant_ids_cost_no_queries_and_no_memory(store, capsys):
    app = WSGIMaintenanceMiddleware(ok_wsgi, store, tenant=from_header("X-Tenant-ID"))
    queries = QueryCounter(store.engine)
    wsgi_call(app, "warm-up")
    before_rss, before_queries = rss_mib(), queries.count
    started = time.monotonic()
    pad = "x" * 130
    for i in range(1_000_000):
        # Too long, or outside the charset: never a tenant, never a query, never a cache entry.
        tenant = f"{pad}{i}" if i % 2 else f"../{i}<script>"
        if wsgi_call(app, tenant) != 200:
            raise AssertionError(tenant)
    grown = rss_mib() - before_rss
    elapsed = time.monotonic() - started
    spent = queries.count - before_queries
    with capsys.disabled():
        print(f"\nflood: 1,000,000 hostile ids in {elapsed:.1f}s: {spent} queries, RSS +{grown:.1f} MiB")
    assert spent <= elapsed / app.gate.mirror.ttl + 2, "one refresh per TTL at most"
    assert len(app.gate.mirror) == 0, "memory holds what is in maintenance, nothing requests name"
    assert grown < 20
    store.activate(ALL_TENANTS)
    assert wsgi_call(app, "../evil") == 503, "an invalid id still sees the global switch"
    app.gate.close()


def test_thousands_of_valid_unknown_tenants_stay_within_the_bounds(store, capsys):
    app = WSGIMaintenanceMiddleware(ok_wsgi, store, tenant=from_header("X-Tenant-ID"))
    queries = QueryCounter(store.engine)
    running = {"now": 0, "max": 0}
    lock = threading.Lock()

    def started(*args):
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])

    def finished(*args):
        with lock:
            running["now"] -= 1

    event.listen(store.engine, "before_cursor_execute", started)
    event.listen(store.engine, "after_cursor_execute", finished)
    before_rss = rss_mib()
    errors = []
    began = time.monotonic()

    def flood(offset: int) -> None:
        try:
            for i in range(offset, 5_000, 8):
                wsgi_call(app, f"t{i}")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    grown = rss_mib() - before_rss
    elapsed = time.monotonic() - began
    with capsys.disabled():
        print(
            f"\nflood: 5,000 valid unknown ids from 8 threads in {elapsed:.1f}s: {queries.count} queries, "
            f"at most {running['max']} statements at once, {len(app.gate.mirror)} held, RSS +{grown:.1f} MiB"
        )
    assert errors == []
    assert queries.count <= elapsed / app.gate.mirror.ttl + 2, "no query per tenant: one per TTL at most"
    assert len(app.gate.mirror) == 0
    assert running["max"] <= 2, "one refresh (a statement or two) at a time"
    assert grown < 50
    app.gate.close()


def test_tenant_ids_can_be_restricted_further(store):
    app = WSGIMaintenanceMiddleware(
        ok_wsgi,
        store,
        tenant=from_header("X-Tenant-ID"),
        tenant_pattern=r"t-\d{1,6}",
        tenant_max_length=8,
        notifications=False,
    )
    store.activate("t-42")
    store.activate("demo")
    queries = QueryCounter(store.engine)
    assert wsgi_call(app, "t-42") == 503
    assert wsgi_call(app, "demo") == 200, "not a tenant by this gate's rule: only the global switch applies"
    assert wsgi_call(app, "t-1234567") == 200
    assert queries.count <= 1, "every tenant's state in one read (perhaps already done)"
    for bad in ({"tenant_pattern": "("}, {"tenant_max_length": 0}, {"max_staleness": 0}):
        with pytest.raises(InvalidArgument):
            WSGIMaintenanceMiddleware(ok_wsgi, store, **bad)
    app.gate.close()
