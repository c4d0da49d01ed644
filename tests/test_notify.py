"""PostgreSQL LISTEN/NOTIFY: sent on commit only, heard by thread and asyncio listeners, reconnecting."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

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
from maintgate.core.state import READ_ONLY
from maintgate.core.store import PENDING, state_fields, state_from_payload
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


def test_each_notification_carries_exactly_the_state_the_table_holds(store):
    """The payload is built by the writing statement itself: it must say what a read says."""
    inbox = Inbox(store)

    def heard() -> list[tuple[str, object, object]]:
        return [state_from_payload(n.payload) for n in inbox.conn.notifies(timeout=0.3)]

    def fields(state):
        return None if state is None else state_fields(state)

    try:
        ends = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        store.activate("demo", message='<b>é"\n</b>', retry_after=7, ends_at=ends, mode=READ_ONLY)
        [(tenant, state, version)] = heard()
        assert (tenant, fields(state)) == ("demo", fields(store.get("demo")))
        assert isinstance(version, int) and version > 0
        with maintenance_window(store, "demo", message="window"):
            [(_, state, opened)] = heard()
            assert fields(state) == fields(store.get("demo"))
            assert state.mode == "full", "a window needs full over the operator's read-only"
            assert opened > version
        [(_, state, closed)] = heard()
        assert fields(state) == fields(store.get("demo")) and state.active, "the operator's stays on"
        assert closed == PENDING, "written in the migration's transaction: no number taken"
        store.deactivate("demo")
        with maintenance_window(store, "fresh"):
            heard()
        [(_, state, _)] = heard()
        assert fields(state) == fields(store.get("fresh")) and not state.active
        store.activate("long", message="x" * 9_000)
        [(tenant, state, version)] = heard()
        assert (tenant, state) == ("long", None) and version > 0, "too long for NOTIFY: no state"
        store.schedule("demo", datetime.now(UTC) + timedelta(hours=1))
        [(tenant, state, _)] = heard()
        assert (tenant, state) == ("demo", None), "a schedule is not in the row: read it"
    finally:
        inbox.close()


def test_a_writer_in_another_time_zone_announces_the_same_times(store):
    """The payload is built in the writer's session, whose TimeZone may not be UTC."""
    from sqlalchemy import create_engine

    from maintgate import MaintenanceStore

    engine = create_engine(store.engine.url, connect_args={"options": "-c timezone=Asia/Kolkata"})
    writer = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    inbox = Inbox(store)
    try:
        for tenant, ends in (("demo", datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)),
                             ("old", datetime(1850, 1, 1, tzinfo=UTC))):  # fmt: skip
            writer.activate(tenant, message="m", ends_at=ends)
            [(_, state, _)] = [state_from_payload(n.payload) for n in inbox.conn.notifies(timeout=0.3)]
            assert state_fields(state) == state_fields(store.get(tenant))
            assert state.ends_at == ends and state.ends_at.utcoffset() == timedelta(0)
    finally:
        inbox.close()
        engine.dispose()


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
