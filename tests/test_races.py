"""Races: threads hammering while the state flips, a thousand cold requests, two windows at once,
and a window under a live gate's load."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import httpx2 as httpx
import pytest
from sqlalchemy import inspect, text

from maintgate import MaintenanceMiddleware, WindowBusy, WSGIMaintenanceMiddleware, maintenance_window
from maintgate.tenants import from_header
from tests.conftest import QueryCounter
from tests.conftest import wsgi_call as call
from tests.servers import uvicorn_server
from tests.test_flood import ok_wsgi


def test_wsgi_threads_hammer_while_the_state_flips(store):
    app = WSGIMaintenanceMiddleware(ok_wsgi, store, tenant=from_header("X-Tenant-ID"), cache_ttl=0.2)
    queries = QueryCounter(store.engine, only_lookups=True)
    stop = threading.Event()
    errors: list[BaseException] = []
    started = time.monotonic()

    def hammer(n: int) -> None:
        try:
            while not stop.is_set():
                for tenant in ("a", "b", "c"):
                    assert call(app, tenant) in (200, 503)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for flip in range(10):
        (store.activate if flip % 2 == 0 else store.deactivate)("a")
        time.sleep(0.1)
    store.activate("b")
    stop.set()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - started
    assert errors == []
    time.sleep(0.25)  # one TTL: everyone converges
    assert [call(app, t) for t in ("a", "b", "c")] == [200, 503, 200]
    flips = 11 if app.gate.notifications else 0  # each notification may cost one reload
    bound = 3 * (elapsed / 0.2 + 2) + flips + 3
    assert queries.count <= bound, f"{queries.count} queries, single-flight bound {bound:.0f}"
    app.gate.close()


def test_a_thousand_concurrent_requests_on_a_cold_cache(store):
    store.activate("hot")
    # Without the listener, whose connecting reads what changed once more (tested in test_notify).
    # A TTL longer than the test: under load the requests can outlast 1 s, and a refresh then is due.
    app = MaintenanceMiddleware(
        ok_app_asgi, store, tenant=from_header("X-Tenant-ID"), notifications=False, cache_ttl=60
    )
    queries = QueryCounter(store.engine)

    async def one(tenant: str) -> int:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-tenant-id", tenant.encode())]}
        await app(scope, receive, send)
        return sent[0]["status"]

    async def main():
        return await asyncio.gather(*(one(("hot", "cold", "warm", "mild")[i % 4]) for i in range(1000)))

    statuses = asyncio.run(main())
    assert statuses.count(503) == 250 and statuses.count(200) == 750
    assert queries.count == 1, "one query for every tenant, for 1,000 concurrent requests at start"
    app.gate.close()


async def ok_app_asgi(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_two_windows_race_exactly_one_wins(store):
    barrier = threading.Barrier(2)
    outcomes: dict[int, str] = {}

    def window(i: int) -> None:
        barrier.wait()
        try:
            with maintenance_window(store, "demo", message=f"window {i}"):
                time.sleep(0.5)
            outcomes[i] = "won"
        except WindowBusy:
            outcomes[i] = "busy"

    threads = [threading.Thread(target=window, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes.values()) == ["busy", "won"]
    history = store.history("demo")
    assert [e.event for e in history] == ["window_opened", "window_committed"], "the loser changed nothing"
    winner = next(i for i, o in outcomes.items() if o == "won")
    assert history[0].message == f"window {winner}"
    assert not store.get("demo").active


def test_a_window_under_load_never_shows_a_half_migrated_schema(store):
    table = f"contacts_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, a VARCHAR(10), b VARCHAR(10))"))

    async def columns_app(scope, receive, send):
        if scope["type"] != "http":
            return
        cols = await asyncio.to_thread(
            lambda: sorted(c["name"] for c in inspect(store.engine).get_columns(table))
        )
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": ",".join(cols).encode()})

    app = MaintenanceMiddleware(columns_app, store, tenant=from_header("X-Tenant-ID"), cache_ttl=0.1)
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def load(base: str) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop.is_set():
                response = client.get("/", headers={"X-Tenant-ID": "demo"})
                seen.append((response.status_code, response.text if response.status_code == 200 else ""))

    with uvicorn_server(app) as base:
        threads = [threading.Thread(target=load, args=(base,)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        with maintenance_window(store, "demo") as conn:
            time.sleep(0.3)  # gates see maintenance within their TTL
            conn.execute(text(f"ALTER TABLE {table} RENAME COLUMN a TO a2"))
            time.sleep(0.3)
            conn.execute(text(f"ALTER TABLE {table} RENAME COLUMN b TO b2"))
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
    app.gate.close()
    bodies = {body for status, body in seen if status == 200}
    assert "a2,b,id" not in bodies and "a,b2,id" not in bodies, "a half-migrated schema was served"
    assert bodies <= {"a,b,id", "a2,b2,id"}
    assert "a2,b2,id" in bodies and any(status == 503 for status, _ in seen)
    with store.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {table}"))


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_processes_race_for_one_window(store):
    """Across processes only the advisory lock decides: exactly one window opens."""
    import subprocess
    import sys

    url = store.engine.url.render_as_string(hide_password=False)
    prefix = store.tables.state.name.removesuffix("state")
    code = (
        "import sys, time\n"
        "from maintgate import MaintenanceStore, maintenance_window, WindowBusy\n"
        "store = MaintenanceStore(sys.argv[1], table_prefix=sys.argv[2])\n"
        "time.sleep(max(0, float(sys.argv[3]) - time.time()))\n"
        "try:\n"
        "    with maintenance_window(store, 'demo'):\n"
        "        time.sleep(1)\n"
        "    print('won')\n"
        "except WindowBusy:\n"
        "    print('busy')\n"
    )
    start_at = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, prefix, start_at], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert results == ["busy", "won"]
    assert [e.event for e in store.history("demo")] == ["window_opened", "window_committed"]
