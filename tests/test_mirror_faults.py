"""The in-memory state under the faults a review found: notifications without a state, lock
order, idle spells, writers and tables of an earlier version, joined windows, early writes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, func, select, text, update

from maintgate import MaintenanceMiddleware, WSGIMaintenanceMiddleware, maintenance_window
from maintgate.tenants import from_header
from tests.conftest import ok_app, ok_wsgi, wsgi_call
from tests.helpers import asgi_request, elsewhere, eventually

postgres = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def gate(store, **options):
    return WSGIMaintenanceMiddleware(ok_wsgi, store, tenant=from_header("X-Tenant-ID"), **options)


@postgres
def test_a_notification_that_carries_no_state_has_the_change_read(store):
    """A long message, or a schedule, is announced without the state: never taken as "off"."""
    app = gate(store, cache_ttl=60)
    other = elsewhere(store)
    assert wsgi_call(app, "acme") == 200
    assert eventually(lambda: app.gate.notifications_live)
    other.activate("acme", message="x" * 9_000)
    assert eventually(lambda: wsgi_call(app, "acme") == 503, 2)
    other.schedule("beta", datetime.now(UTC) - timedelta(seconds=1), datetime.now(UTC) + timedelta(hours=1))
    assert eventually(lambda: wsgi_call(app, "beta") == 503, 2)
    time.sleep(0.3)
    assert wsgi_call(app, "acme") == 503, "the schedule's notification did not switch acme off"
    app.gate.close()


@postgres
def test_schedules_and_switches_on_one_tenant_at_once_never_deadlock(store):
    errors: list[BaseException] = []
    stop = time.monotonic() + 3

    def switcher():
        while time.monotonic() < stop and not errors:
            try:
                store.activate("acme", message="m")
                store.deactivate("acme")
            except Exception as exc:
                errors.append(exc)

    def scheduler():
        while time.monotonic() < stop and not errors:
            try:
                planned = store.schedule("acme", datetime.now(UTC) + timedelta(hours=1))
                store.unschedule(planned.id)
            except Exception as exc:
                errors.append(exc)

    def windows():
        while time.monotonic() < stop and not errors:
            try:
                with maintenance_window(store, "acme") as conn:
                    conn.execute(text("SELECT 1"))
            except Exception as exc:
                if "already open" not in str(exc):
                    errors.append(exc)

    threads = [threading.Thread(target=f) for f in (switcher, scheduler, windows)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [], errors[:2]


@postgres
def test_two_joined_windows_in_one_caller_transaction(store, contacts):
    """A joined window's switch-off must not hold what the next window's switch-on needs."""
    with store.engine.connect() as conn, conn.begin():
        for tenant in ("t1", "t2"):
            with maintenance_window(store, tenant, connection=conn):
                conn.execute(text(f'SELECT count(*) FROM "{contacts}"'))
    assert not store.get("t1").active and not store.get("t2").active


def test_a_write_during_the_first_read_is_not_lost(store):
    slow = threading.Event()

    @event.listens_for(store.engine, "after_cursor_execute")
    def slow_first_read(conn, cursor, statement, *args):
        if "UNION ALL" in statement and not slow.is_set():
            slow.set()  # read, not yet in memory: a slow network, say
            time.sleep(0.3)

    app = gate(store, cache_ttl=60, notifications=False)
    first = threading.Thread(target=wsgi_call, args=(app, "x"))
    first.start()
    assert slow.wait(2)
    store.activate("acme")  # committed while the first read is under way, from this process
    first.join(5)
    assert eventually(lambda: wsgi_call(app, "acme") == 503, 2)
    event.remove(store.engine, "after_cursor_execute", slow_first_read)
    app.gate.close()


def test_ended_schedules_are_let_go(store, clock):
    app = gate(store, clock=clock, now=clock.wall, notifications=False)
    start = clock.wall()
    for n in range(20):
        store.schedule(f"t{n}", start + timedelta(seconds=1), start + timedelta(seconds=2))
    assert wsgi_call(app, "t1") == 200
    assert eventually(lambda: len(app.gate.mirror) == 20, 2)
    clock.advance(1.5)
    assert wsgi_call(app, "t1") == 503
    clock.advance(1.0)
    assert wsgi_call(app, "t1") == 200
    assert len(app.gate.mirror) == 0, "memory holds what is on or to come, not history"
    app.gate.close()


@postgres
def test_a_writer_of_an_earlier_version_is_seen(store):
    """During a rolling upgrade, older processes write without change numbers."""
    app = gate(store, cache_ttl=60)
    assert wsgi_call(app, "legacy") == 200
    assert eventually(lambda: app.gate.notifications_live)
    t = store.tables.state
    with store.engine.begin() as conn:  # what the previous version's activate() wrote
        conn.execute(t.insert().values(tenant="legacy", active=True, mode="full", source="operator"))
        conn.execute(select(func.pg_notify(store.channel, '{"tenant":"legacy"}')))
    assert eventually(lambda: wsgi_call(app, "legacy") == 503, 2)
    app.gate.close()


@postgres
def test_tables_of_an_earlier_version_are_read_in_full_and_said_so(store, caplog):
    """Before `maintgate init` adds change numbers, the gate still sees what is on, and warns."""
    t = store.tables.state
    with store.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {store.tables.version.name}"))
        conn.execute(text(f"ALTER TABLE {t.name} DROP COLUMN version"))
        conn.execute(t.insert().values(tenant="legacy", active=True, mode="full"))
    old = elsewhere(store)
    with caplog.at_level(logging.WARNING, logger="maintgate"):
        app = gate(old, cache_ttl=0.2, notifications=False)
        assert wsgi_call(app, "legacy") == 503
        assert wsgi_call(app, "other") == 200
    assert any("maintgate init" in r.getMessage() for r in caplog.records)
    app.gate.close()
    store.create_tables()  # the upgrade adds them back
    with store.engine.begin() as conn:
        conn.execute(update(t).where(t.c.tenant == "legacy").values(active=False))


def test_after_an_idle_spell_a_request_waits_a_moment_at_most(store, clock):
    """Past max_staleness a request waits for a healthy database's answer, never an outage's."""
    app = gate(store, clock=clock, cache_ttl=0.2, max_staleness=0.5, notifications=False)
    store.activate("acme")
    assert wsgi_call(app, "acme") == 503
    elsewhere(store).deactivate("acme")
    clock.advance(10)  # idle: the state in memory is 10 s old
    assert wsgi_call(app, "acme") == 200, "a healthy database answers within the moment it waits"

    @event.listens_for(store.engine, "before_cursor_execute")
    def stalled(conn, cursor, statement, *args):
        if "UNION ALL" in statement:
            time.sleep(1.0)

    elsewhere(store).activate("acme")
    clock.advance(10)
    started = time.monotonic()
    assert wsgi_call(app, "acme") == 200, "the state in memory (last_known), not a wait"
    assert time.monotonic() - started < 0.1
    for _ in range(5):  # the read is slow: the next requests do not wait at all
        started = time.monotonic()
        assert wsgi_call(app, "acme") == 200
        assert time.monotonic() - started < 0.02
    assert not app.gate.mirror.failing, "a slow read is not a failure"
    event.remove(store.engine, "before_cursor_execute", stalled)
    app.gate.close()


@postgres
def test_an_asgi_gate_listens_again_after_a_lifespan_shutdown(store):
    app = MaintenanceMiddleware(ok_app, store, tenant=from_header("X-Tenant-ID"), cache_ttl=60)
    other = elsewhere(store)

    async def lifespan_cycle():
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive():
            return next(messages)

        async def send(message):
            pass

        async def lifespan_app(scope, receive, send):
            await receive()
            await receive()

        app.app, inner = lifespan_app, app.app
        try:
            await app({"type": "lifespan"}, receive, send)
        finally:
            app.app = inner

    for cycle in range(2):
        assert asyncio.run(asgi_request(app, {"X-Tenant-ID": "acme"})) == 200
        assert eventually(lambda: app.gate.notifications_live), f"cycle {cycle}"
        other.activate("acme")
        assert eventually(lambda: asyncio.run(asgi_request(app, {"X-Tenant-ID": "acme"})) == 503, 2)
        other.deactivate("acme")
        assert eventually(lambda: asyncio.run(asgi_request(app, {"X-Tenant-ID": "acme"})) == 200, 2)
        asyncio.run(lifespan_cycle())
        assert eventually(lambda: not app.gate.notifications_live, 2)


def test_a_long_ttl_keeps_room_for_a_refresh_before_max_staleness(store):
    from maintgate import InvalidArgument

    app = gate(store, cache_ttl=60, notifications=False)
    assert app.gate.max_staleness == 180, "three TTLs: stale-while-revalidate, not a wait, at each expiry"
    with pytest.raises(InvalidArgument, match="twice cache_ttl"):
        gate(store, cache_ttl=60, max_staleness=60)
    app.gate.close()


def test_ending_a_schedule_with_off_shows_at_once_in_this_process_and_by_notification(store):
    """``off`` deletes the schedules that are on: the change is announced without the row's
    state (which says nothing of schedules), so gates read it instead of keeping the schedule."""
    from datetime import timedelta

    from maintgate.core.state import utcnow

    app = gate(store, cache_ttl=60)
    assert wsgi_call(app, "demo") == 200  # the first request starts the listener, on PostgreSQL
    if store.engine.dialect.name == "postgresql":
        assert eventually(lambda: app.gate.notifications_live, 3.0)
    now = utcnow()
    store.schedule("demo", now - timedelta(minutes=1), now + timedelta(hours=1))
    other = elsewhere(store)
    other.schedule("remote", now - timedelta(minutes=1), now + timedelta(hours=1))
    app.gate.refresh()
    assert wsgi_call(app, "demo") == 503 and wsgi_call(app, "remote") == 503
    assert store.deactivate("demo").schedules
    assert wsgi_call(app, "demo") == 200, "this process's own write shows at once"
    if store.engine.dialect.name == "postgresql":
        assert other.deactivate("remote").schedules
        assert eventually(lambda: wsgi_call(app, "remote") == 200, 2.0), "announced to other processes"
    app.gate.close()


def test_after_an_idle_spell_shorter_than_max_staleness_a_change_still_shows(store, clock):
    """Idle for a few TTLs (less than max_staleness): the first request waits a moment for the
    refresh it starts, instead of answering from a state older than twice the TTL."""
    app = gate(store, clock=clock, cache_ttl=1.0, notifications=False)
    assert wsgi_call(app, "acme") == 200
    elsewhere(store).activate("acme")
    clock.advance(5)  # idle: 5 TTLs, well within max_staleness (30 s)
    assert wsgi_call(app, "acme") == 503, "another process's change shows on the first request"
    clock.advance(1.5)  # within two TTLs: answered from memory while the refresh runs
    started = time.monotonic()
    assert wsgi_call(app, "acme") == 503
    assert time.monotonic() - started < 0.02
    app.gate.close()


def test_back_to_back_windows_the_previous_tenant_serves_as_soon_as_its_window_commits(store):
    """A window's switch-off is written in the migration's transaction, unnumbered (PENDING); read
    back, it is as new as the read, so an older numbered notification (its switch-on) must not win."""
    app = gate(store, cache_ttl=0.05)
    tenants = [f"t{i}" for i in range(6)]
    wrong = []
    for tenant in tenants:
        with maintenance_window(store, tenant):
            answers = {other: wsgi_call(app, other) for other in tenants}
            wrong += [
                (tenant, other) for other, code in answers.items() if (code == 503) != (other == tenant)
            ]
    assert wrong == [], "(window open, tenant answered wrongly)"
    app.gate.close()


@postgres
def test_a_switch_on_in_a_callers_transaction_right_after_a_notified_switch_off_is_seen(store):
    """The switch-off's notification is newer than any number left on a row once the caller's
    write (PENDING) replaced it: only the counter tells the next read how new that row is."""
    app = gate(store, cache_ttl=0.1)
    other = elsewhere(store)
    other.activate("acme")
    assert eventually(lambda: wsgi_call(app, "acme") == 503, 3)
    other.deactivate("acme")
    assert eventually(lambda: wsgi_call(app, "acme") == 200, 3), "the switch-off, by notification"
    with other.engine.begin() as conn:
        other.activate("acme", message="again", connection=conn)
    assert eventually(lambda: wsgi_call(app, "acme") == 503, 3), "the switch-on, by the next read"
    other.deactivate("acme")
    with other.engine.begin() as conn:  # and the other way round: a switch-off in a caller's transaction
        other.activate("acme")
        other.deactivate("acme", connection=conn)
    assert eventually(lambda: wsgi_call(app, "acme") == 200, 3)
    app.gate.close()
