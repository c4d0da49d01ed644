"""PostgreSQL LISTEN/NOTIFY: sent on commit only, heard by thread and asyncio listeners, reconnecting."""

from __future__ import annotations

import json
import time

import httpx2 as httpx
import psycopg
import pytest
from sqlalchemy import text

from maintgate import (
    ALL_TENANTS,
    MaintenanceMiddleware,
    WSGIMaintenanceMiddleware,
    maintenance_window,
    notify,
)
from maintgate.tenants import from_header
from tests import apps
from tests.conftest import POSTGRES_URL, QueryCounter, ok_app, wsgi_call
from tests.helpers import asgi_request, elsewhere, eventually
from tests.servers import uvicorn_server

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


class Inbox:
    """A raw psycopg connection listening on the store's channel."""

    def __init__(self, store):
        url = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.conn = psycopg.connect(url, autocommit=True)
        self.conn.execute(f'LISTEN "{store.channel}"')

    def drain(self, wait: float = 0.3) -> list[str]:
        return [json.loads(n.payload)["tenant"] for n in self.conn.notifies(timeout=wait)]

    def close(self):
        self.conn.close()


def test_every_committed_change_notifies_and_a_rollback_does_not(store):
    inbox = Inbox(store)
    try:
        store.activate("demo")
        store.deactivate("demo")
        store.activate(ALL_TENANTS)
        assert inbox.drain() == ["demo", "demo", "*"]
        with store.engine.connect() as conn:
            tx = conn.begin()
            store.activate("rolled", connection=conn)
            tx.rollback()
        assert inbox.drain() == []
        with maintenance_window(store, "demo"):
            assert inbox.drain() == ["demo"], "the switch-on commits on its own"
        assert inbox.drain() == ["demo"], "the switch-off is announced with the migration's commit"
        with pytest.raises(RuntimeError), maintenance_window(store, "demo"):
            raise RuntimeError("fail")
        assert inbox.drain() == ["demo", "demo"], (
            "switch-on and failure record; the rolled-back off is never sent"
        )
        sched = store.schedule("demo", store.get("demo").updated_at)
        store.unschedule(sched.id)
        assert inbox.drain() == ["demo", "demo"]
    finally:
        inbox.close()


def test_thread_listener_applies_changes_at_once_and_survives_a_lost_connection(store):
    app = WSGIMaintenanceMiddleware(apps.flask_app(), store, tenant=from_header("X-Tenant-ID"), cache_ttl=60)
    other = elsewhere(store)  # another process: only the notification tells this one
    assert app.gate.notifications
    assert wsgi_call(app, "demo") == 200  # the first request starts the listener
    assert eventually(lambda: app.gate.notifications_live, 3.0)
    assert app.gate.refresh()  # the read the listener's connecting asks for is over
    refreshes = QueryCounter(store.engine, only_lookups=True)
    started = time.monotonic()
    other.activate("demo", message="heard")
    assert eventually(lambda: wsgi_call(app, "demo") == 503, 1.0), "a 60 s TTL, yet the change shows at once"
    print(f"propagation {1000 * (time.monotonic() - started):.1f} ms")
    other.activate(ALL_TENANTS)
    assert eventually(lambda: wsgi_call(app, "other") == 503, 1.0)
    other.deactivate(ALL_TENANTS)
    other.deactivate("demo")
    assert eventually(lambda: wsgi_call(app, "other") == 200 and wsgi_call(app, "demo") == 200, 1.0)
    assert refreshes.count == 0, "the notifications carried the states: no query"

    with store.engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = :name AND query LIKE :listen"
            ),
            {"name": notify.APPLICATION_NAME, "listen": f'LISTEN "{store.channel}"%'},
        ).all()
    assert killed, "the listener's backend was found"
    assert eventually(lambda: not app.gate.notifications_live, 2.0)
    assert eventually(lambda: app.gate.notifications_live, 5.0), "it reconnected"
    other.activate("demo", message="after the reconnect")
    assert eventually(lambda: wsgi_call(app, "demo") == 503, 1.0)
    app.gate.close()


def test_the_listener_connecting_keeps_what_the_gate_holds(store):
    """The first burst is answered by one read; the listener's arrival reads only what changed."""
    store.activate("demo")
    refreshes = QueryCounter(store.engine, only_lookups=True)
    app = WSGIMaintenanceMiddleware(apps.flask_app(), store, tenant=from_header("X-Tenant-ID"), cache_ttl=60)
    waited = []
    for _ in range(200):
        started = time.monotonic()
        assert wsgi_call(app, "demo") == 503 and wsgi_call(app, "x") == 200
        waited.append(time.monotonic() - started)
        if app.gate.notifications_live:
            break
        time.sleep(0.01)
    assert eventually(lambda: app.gate.notifications_live, 3.0)
    for _ in range(50):
        started = time.monotonic()
        assert wsgi_call(app, "demo") == 503 and wsgi_call(app, "x") == 200
        waited.append(time.monotonic() - started)
    assert refreshes.count <= 2, "the first read, and one read of what changed when the listener connected"
    assert max(waited[1:]) < 0.05, "nobody waited after the first request"
    app.gate.close()


def test_one_listener_serves_asgi_gates_on_any_event_loop_and_lifespan_shutdown_stops_it(store):
    import asyncio

    app = MaintenanceMiddleware(apps.starlette_app(), store, tenant=from_header("X-Tenant-ID"), cache_ttl=60)
    other = elsewhere(store)
    demo = {"X-Tenant-ID": "demo"}
    for round_ in range(2):  # two event loops one after the other, without lifespan (a test client, say)
        assert asyncio.run(asgi_request(app, demo)) == 200
        assert eventually(lambda: app.gate.notifications_live, 3.0), f"listening in loop {round_}"
        other.activate("demo", message="heard")
        assert eventually(lambda: asyncio.run(asgi_request(app, demo)) == 503, 1.0)
        other.deactivate("demo")
        assert eventually(lambda: asyncio.run(asgi_request(app, demo)) == 200, 1.0)
    with uvicorn_server(app) as base, httpx.Client(base_url=base) as client:
        assert client.get("/", headers=demo).status_code == 200
        assert any(k[1] == store.channel for k in notify._threads)
        other.activate("demo", message="heard")
        assert eventually(lambda: client.get("/", headers=demo).status_code == 503, 1.0)
    assert eventually(lambda: not any(k[1] == store.channel for k in notify._threads), 2.0), (
        "lifespan shutdown released the listener, which stopped: no other gate used it"
    )
    assert not app.gate.notifications_live


def test_notifications_are_off_elsewhere_and_can_be_switched_off(store, tmp_path):
    from maintgate import MaintenanceStore

    sqlite = MaintenanceStore(f"sqlite:///{tmp_path / 'x.db'}")
    assert not MaintenanceMiddleware(ok_app, sqlite).gate.notifications
    assert not MaintenanceMiddleware(ok_app, store, notifications=False).gate.notifications
    assert POSTGRES_URL.startswith("postgresql")
