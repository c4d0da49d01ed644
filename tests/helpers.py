"""Helpers the tests share: the seed incident's rename, columns, end-state checks, waiting."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import inspect, text

from maintgate import MaintenanceStore


class Boom(Exception):
    pass


def columns(store: MaintenanceStore, table: str) -> set[str]:
    return {c["name"] for c in inspect(store.engine).get_columns(table)}


def rename(conn, table: str) -> None:
    """The seed incident's rename, quoted for the connection's dialect (MariaDB/MySQL: backticks)."""
    old, new = map(conn.dialect.identifier_preparer.quote, ("primary-email", "main-email-contact"))
    conn.execute(text(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}"))


def events(store: MaintenanceStore, tenant: str = "demo") -> list[str]:
    return [e.event for e in store.history(tenant)]


def assert_migrated_and_off(store: MaintenanceStore, table: str, tenant: str = "demo") -> None:
    assert columns(store, table) == {"id", "main-email-contact"}
    state = store.get(tenant)
    assert state is not None and not state.active and state.window_id is None and state.error is None
    assert store.effective(tenant) is None


def assert_not_migrated_on_and_error(
    store: MaintenanceStore, table: str, error_fragment: str, tenant: str = "demo"
) -> None:
    assert columns(store, table) == {"id", "primary-email"}
    state = store.get(tenant)
    assert state is not None and state.active and state.window_id is None
    assert error_fragment.lower() in (state.error or "").lower(), state.error
    assert events(store, tenant)[-1] == "window_failed"


def without_server_functions(store: MaintenanceStore) -> None:
    """PostgreSQL: tables as Alembic or an older maintgate made them, without the server functions
    ``create_tables`` adds: windows then switch on and off with statements."""
    with store.engine.begin() as conn:
        names = conn.execute(
            text("SELECT oid::regprocedure::text FROM pg_proc WHERE starts_with(proname, :prefix)"),
            {"prefix": store.tables.state.name.removesuffix("state")},
        ).scalars()
        for name in list(names):
            conn.execute(text(f"DROP FUNCTION {name}"))


def eventually(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll ``predicate`` until it is truthy or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def elsewhere(store: MaintenanceStore) -> MaintenanceStore:
    """Another process's view of ``store``'s tables: its writes reach this process's gates only by
    notification or by their TTL, never directly."""
    state = store.tables.state
    return MaintenanceStore(store.engine, table_prefix=state.name.removesuffix("state"), schema=state.schema)


async def asgi_request(app: Any, headers: dict[str, str]) -> int:
    """One GET / through an ASGI app, in the running loop; its status."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"]


def bulk_tenants(store: MaintenanceStore, count: int) -> None:
    """PostgreSQL: ``count`` serving tenants in the state table at once, as a restore or a bulk
    import leaves it: no statistics until autovacuum analyzes it."""
    with store.engine.begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO {store.tables.state.name} (tenant, active, version, updated_at) "
                "SELECT 'bulk' || g, false, g, now() FROM generate_series(1, :n) g"
            ),
            {"n": count},
        )


def state_rows_scanned(store: MaintenanceStore) -> int:
    """PostgreSQL: rows of the state table read by sequential scans so far (every backend's,
    flushed by ending the store's connections)."""
    store.engine.dispose()
    with store.engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        scanned: int = conn.execute(
            text("SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables WHERE relname = :t"),
            {"t": store.tables.state.name},
        ).scalar_one()
    return scanned
