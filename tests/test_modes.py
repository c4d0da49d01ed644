"""Read-only mode and scheduled windows, through the gate, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import event

from maintgate import ALL_TENANTS, MaintenanceMiddleware, maintenance_window
from maintgate.core.errors import InvalidArgument
from maintgate.tenants import from_header
from tests.conftest import ManualClock, QueryCounter, asgi_call, ok_app

DEMO = {"X-Tenant-ID": "demo"}


@pytest.fixture
def gate(store, clock: ManualClock):
    app = MaintenanceMiddleware(ok_app, store, tenant=from_header("X-Tenant-ID"), clock=clock, now=clock.wall)
    yield app
    app.gate.close()


def test_read_only_lets_reads_through_and_blocks_writes(store, gate):
    store.activate("demo", mode="read_only", message="Copying data")
    for method in ("GET", "HEAD", "OPTIONS"):
        assert asgi_call(gate, headers=DEMO, method=method)[0] == 200
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        status, headers, body = asgi_call(gate, headers=DEMO, method=method)
        assert status == 503 and headers["retry-after"]
        problem = json.loads(body)
        assert problem["read_only"] is True and "Copying data" in problem["detail"]
        assert "cannot be saved" in problem["detail"]
    page = asgi_call(gate, headers={**DEMO, "Accept": "text/html"}, method="POST")[2].decode()
    assert "cannot be saved" in page


def test_the_strictest_state_wins(store, gate, clock):
    store.activate("demo", mode="read_only")
    store.activate(ALL_TENANTS, message="everyone down")
    status, _, body = asgi_call(gate, headers=DEMO)
    assert status == 503 and json.loads(body)["detail"] == "everyone down"
    store.deactivate(ALL_TENANTS)
    clock.advance(1.1)
    assert asgi_call(gate, headers=DEMO)[0] == 200
    assert asgi_call(gate, headers=DEMO, method="POST")[0] == 503


def test_read_only_window(store, gate, clock):
    with maintenance_window(store, "demo", mode="read_only"):
        assert asgi_call(gate, headers=DEMO)[0] == 200
        assert asgi_call(gate, headers=DEMO, method="POST")[0] == 503
    clock.advance(1.1)
    assert asgi_call(gate, headers=DEMO, method="POST")[0] == 200


def test_bad_mode_is_refused(store):
    with pytest.raises(InvalidArgument, match="mode"):
        store.activate("demo", mode="readonly")


def test_a_schedule_turns_maintenance_on_and_off_by_itself_without_writes(store, clock):
    gate = MaintenanceMiddleware(
        ok_app,
        store,
        tenant=from_header("X-Tenant-ID"),
        clock=clock,
        now=clock.wall,
        cache_ttl=30,
        notifications=False,  # the schedule alone must switch it, on time
    )
    start = clock.wall() + timedelta(seconds=5)
    store.schedule("demo", start, start + timedelta(seconds=60), message="Planned upgrade")
    writes = []
    event.listen(
        store.engine,
        "before_cursor_execute",
        lambda c, cur, statement, *a: (
            statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE") and writes.append(statement)
        ),
    )
    queries = QueryCounter(store.engine)
    assert asgi_call(gate, headers=DEMO)[0] == 200
    clock.advance(4.9)
    assert asgi_call(gate, headers=DEMO)[0] == 200
    clock.advance(0.2)  # past starts_at, long before the 30 s TTL
    status, headers, body = asgi_call(gate, headers=DEMO)
    assert status == 503 and json.loads(body)["detail"] == "Planned upgrade"
    assert 59 <= int(headers["retry-after"]) <= 60, "Retry-After counts down to ends_at"
    clock.advance(30)
    assert 29 <= int(asgi_call(gate, headers=DEMO)[1]["retry-after"]) <= 30
    clock.advance(30)
    assert asgi_call(gate, headers=DEMO)[0] == 200
    assert writes == [], "the gate switched on and off by itself"
    assert queries.count <= 4
    gate.gate.close()


def test_schedules_are_listed_cancelled_and_ended_by_off(store):
    now = store.lookup("demo").state  # nothing yet
    assert now is None
    from maintgate.core.state import utcnow

    t0 = utcnow()
    current = store.schedule("demo", t0 - timedelta(minutes=1), t0 + timedelta(hours=1), message="now")
    later = store.schedule("demo", t0 + timedelta(days=1), t0 + timedelta(days=1, hours=1), mode="read_only")
    other = store.schedule("other", t0 + timedelta(hours=2), None)
    assert [s.id for s in store.schedules()] == [current.id, other.id, later.id]
    assert [s.id for s in store.schedules("demo")] == [current.id, later.id]
    assert store.effective("demo").message == "now" and store.effective("demo").schedule_id == current.id
    assert store.lookup("demo").changes_at == current.ends_at
    store.deactivate("demo")  # an operator's off ends the window that is on now, not later ones
    assert [s.id for s in store.schedules("demo")] == [later.id]
    assert store.effective("demo") is None
    assert store.unschedule(later.id) is True and store.unschedule(later.id) is False
    assert store.schedules("demo") == []
    assert [e.event for e in store.history("demo")] == [
        "scheduled",
        "scheduled",
        "deactivated",
        "unscheduled",
    ]
    with pytest.raises(InvalidArgument, match="after starts_at"):
        store.schedule("demo", t0, t0 - timedelta(seconds=1))
