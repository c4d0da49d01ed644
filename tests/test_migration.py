"""The migration window on a real SQLite file and a real PostgreSQL server: order, atomicity, faults."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import uuid

import pytest
from sqlalchemy import create_engine, event, text

from maintgate import (
    MaintenanceStore,
    MaintgateError,
    WindowBusy,
    async_maintenance_window,
    maintenance_window,
)
from maintgate.core.store import make_sqlite_transactional
from tests.helpers import (
    Boom,
    assert_migrated_and_off,
    assert_not_migrated_on_and_error,
    columns,
    events,
    eventually,
    rename,
)


def test_success_commits_the_migration_and_the_switch_off_together(store, contacts):
    with maintenance_window(store, "demo", message="Renaming primary-email", retry_after=300) as conn:
        seen = store.effective("demo")
        assert seen is not None and seen.active and seen.message == "Renaming primary-email"
        assert seen.owner is not None and store.window_alive(store.get("demo")) is True
        assert seen.owner.pid == os.getpid() and seen.owner.host == socket.gethostname()
        assert store.get("demo").window_id is not None, "the switch-on names its window"
        rename(conn, contacts)
        conn.execute(text(f"UPDATE {contacts} SET \"main-email-contact\" = 'b@example.com'"))
    assert_migrated_and_off(store, contacts)
    assert events(store) == ["window_opened", "window_committed"]
    assert store.history("demo")[0].owner is not None


def test_failure_rolls_back_ddl_first_migrations_and_records_the_error(store, contacts):
    error = Boom("the second step failed")
    with pytest.raises(Boom) as info, maintenance_window(store, "demo", message="Renaming") as conn:
        rename(conn, contacts)  # DDL before any DML: the pysqlite trap
        raise error
    assert info.value is error, "the original exception propagates unchanged"
    assert_not_migrated_on_and_error(store, contacts, "Boom: the second step failed")
    assert store.get("demo").message == "Renaming"


def test_a_successful_retry_after_a_failed_window_switches_maintenance_off(store, contacts):
    with pytest.raises(Boom), maintenance_window(store, "demo"):
        raise Boom("first try")
    with maintenance_window(store, "demo") as conn:
        rename(conn, contacts)
    state = store.get("demo")
    assert not state.active and state.error is None and state.owner is None
    assert columns(store, contacts) == {"id", "main-email-contact"}


def test_failure_on_a_users_plain_sqlite_engine_rolls_back_too(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'plain.db'}")  # no recipe: default pysqlite
    store = MaintenanceStore(engine)
    store.create_tables()
    with engine.begin() as conn:
        conn.execute(text('CREATE TABLE contacts (id INTEGER PRIMARY KEY, "primary-email" TEXT)'))
    with pytest.raises(Boom), maintenance_window(store, "demo") as conn:
        rename(conn, "contacts")
        raise Boom
    assert_not_migrated_on_and_error(store, "contacts", "Boom")
    engine.dispose()


def reject_updates(store: MaintenanceStore, name: str, sqlite_when: str, pg_when: str, message: str) -> None:
    """A real database trigger that makes some updates of the state table fail with ``message``."""
    table = store.tables.state.name
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    f"CREATE TRIGGER {table}_{name} BEFORE UPDATE ON {table} "
                    f"WHEN {sqlite_when} BEGIN SELECT RAISE(ABORT, '{message}'); END"
                )
            )
        else:
            conn.execute(
                text(
                    f"CREATE FUNCTION {table}_{name}() RETURNS trigger AS $$ BEGIN "
                    f"IF {pg_when} THEN RAISE EXCEPTION '{message}'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    f"CREATE TRIGGER {table}_{name} BEFORE UPDATE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {table}_{name}()"
                )
            )


def reject_switch_off(store: MaintenanceStore) -> None:
    """A trigger that refuses to switch maintenance off: the deactivation itself fails."""
    reject_updates(
        store,
        "no_off",
        "OLD.active = 1 AND NEW.active = 0",
        "OLD.active AND NOT NEW.active",
        "switch-off rejected",
    )


def test_failure_in_the_switch_off_rolls_back_the_migration(store, contacts):
    reject_switch_off(store)
    with pytest.raises(Exception, match="switch-off rejected"), maintenance_window(store, "demo") as conn:
        rename(conn, contacts)
    assert_not_migrated_on_and_error(store, contacts, "switch-off rejected")


def test_failure_at_commit_rolls_back_everything(database_url, tmp_path):
    """A deferred constraint fails only at COMMIT, after the switch-off already ran."""
    engine = create_engine(database_url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", lambda dbapi, rec: dbapi.execute("PRAGMA foreign_keys = ON"))
        make_sqlite_transactional(engine)
    store = MaintenanceStore(engine, table_prefix=f"mg{uuid.uuid4().hex[:8]}_")
    store.create_tables()
    parent, child = f"parent_{uuid.uuid4().hex[:6]}", f"child_{uuid.uuid4().hex[:6]}"
    with engine.begin() as conn:
        conn.execute(text(f'CREATE TABLE {parent} (id INTEGER PRIMARY KEY, "primary-email" VARCHAR(200))'))
        conn.execute(
            text(
                f"CREATE TABLE {child} (id INTEGER PRIMARY KEY, parent_id INTEGER "
                f"REFERENCES {parent}(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        )
    try:
        with pytest.raises(Exception, match=r"(?i)foreign key"), maintenance_window(store, "demo") as conn:
            rename(conn, parent)
            conn.execute(text(f"INSERT INTO {child} (id, parent_id) VALUES (1, 999)"))
        assert_not_migrated_on_and_error(store, parent, "foreign key")
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {child}"))
            conn.execute(text(f"DROP TABLE {parent}"))
        store.drop_tables()
        engine.dispose()


def test_when_recording_the_failure_fails_the_original_error_still_propagates(store, contacts, caplog):
    reject_updates(store, "no_err", "NEW.error IS NOT NULL", "NEW.error IS NOT NULL", "cannot record")
    error = Boom("original")
    with (
        caplog.at_level(logging.ERROR, logger="maintgate"),
        pytest.raises(Boom) as info,
        maintenance_window(store, "demo") as conn,
    ):
        rename(conn, contacts)
        raise error
    assert info.value is error
    assert columns(store, contacts) == {"id", "primary-email"}
    assert store.get("demo").active, "maintenance stays on"
    assert any("could not record" in r.getMessage() and "original" in r.getMessage() for r in caplog.records)


def test_joined_connection_is_never_committed_by_the_library(store, contacts):
    with store.engine.connect() as conn:
        tx = conn.begin()
        with maintenance_window(store, "demo", connection=conn) as joined:
            assert joined is conn
            rename(conn, contacts)
        assert store.get("demo").active, "the switch-off waits for the caller's commit"
        assert columns(store, contacts) == {"id", "primary-email"} or store.engine.dialect.name == "sqlite"
        tx.commit()
    assert_migrated_and_off(store, contacts)


def test_joined_connection_failure_records_and_propagates(store, contacts):
    with (
        pytest.raises(Boom),
        store.engine.begin() as conn,
        maintenance_window(store, "demo", connection=conn),
    ):
        rename(conn, contacts)
        raise Boom("joined")
    assert_not_migrated_on_and_error(store, contacts, "Boom: joined")


def test_a_caller_rolling_back_after_a_joined_window_is_visible(store, caplog):
    with caplog.at_level(logging.WARNING, logger="maintgate"), store.engine.connect() as conn:
        tx = conn.begin()
        with maintenance_window(store, "demo", connection=conn):
            pass
        if store.engine.dialect.name == "postgresql":
            assert store.window_alive(store.get("demo")) is True, "the caller's transaction holds the lock"
            with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
                pass
        tx.rollback()
    state = store.get("demo")
    assert state.active and state.owner is not None
    if store.engine.dialect.name == "postgresql":  # once the lease that covered its opening is over
        assert eventually(lambda: store.window_alive(store.get("demo")) is False, 6)
    assert any(getattr(r, "maintgate_event", "") == "window_rolled_back_by_caller" for r in caplog.records)


def test_joined_connection_must_be_in_a_transaction(store):
    with (
        store.engine.connect() as conn,
        pytest.raises(MaintgateError, match="inside a transaction"),
        maintenance_window(store, "demo", connection=conn),
    ):
        pass
    assert store.get("demo") is None


def test_autocommit_connections_are_refused_before_anything_changes(store):
    with store.engine.connect() as conn:
        auto = conn.execution_options(isolation_level="AUTOCOMMIT")
        auto.begin()
        with (
            pytest.raises(MaintgateError, match="AUTOCOMMIT"),
            maintenance_window(store, "demo", connection=auto),
        ):
            pass
    assert store.get("demo") is None


def test_a_second_window_for_the_tenant_is_refused_and_changes_nothing(store, contacts):
    with maintenance_window(store, "demo", message="first") as conn:
        before = store.get("demo")
        with (
            pytest.raises(WindowBusy, match="already open"),
            maintenance_window(store, "demo", message="second"),
        ):
            pass
        assert store.get("demo") == before
        rename(conn, contacts)
    assert_migrated_and_off(store, contacts)
    with maintenance_window(store, "other"), maintenance_window(store, "third"):
        pass


def test_an_operators_maintenance_stays_on_after_the_window(store, contacts):
    store.activate("demo", message="operator")
    with maintenance_window(store, "demo", message="window") as conn:
        rename(conn, contacts)
    state = store.get("demo")
    assert state.active and state.owner is None
    assert columns(store, contacts) == {"id", "main-email-contact"}


def test_an_operators_maintenance_is_left_as_the_operator_set_it(store):
    store.activate("demo", message="operator's", retry_after=900, mode="read_only")
    with maintenance_window(store, "demo", message="window's", retry_after=30):
        during = store.get("demo")
        assert during.message == "operator's" and during.mode == "full", "the window needs full, no more"
    state = store.get("demo")
    assert state.active and state.message == "operator's" and state.retry_after == 900 and state.read_only


def test_an_operators_maintenance_survives_a_failed_window_and_its_retry(store):
    store.activate("demo", message="operator")
    with pytest.raises(Boom), maintenance_window(store, "demo"):
        raise Boom("first try")
    assert store.get("demo").active
    with maintenance_window(store, "demo"):
        pass
    state = store.get("demo")
    assert state.active and state.source == "operator", "the operator switched it on; it stays on"


def test_history_is_append_only_and_complete(store, contacts):
    store.activate("demo", message="by hand")
    store.deactivate("demo")
    with pytest.raises(Boom), maintenance_window(store, "demo", message="try 1"):
        raise Boom("no")
    with maintenance_window(store, "demo", message="try 2") as conn:
        rename(conn, contacts)
    history = store.history("demo")
    assert [e.event for e in history] == [
        "activated",
        "deactivated",
        "window_opened",
        "window_failed",
        "window_opened",
        "window_committed",
    ]
    assert history[3].error == "Boom: no" and history[2].message == "try 1"
    assert all(a.at <= b.at for a, b in itertools.pairwise(history))
    assert [e.event for e in store.history("demo", limit=2)] == ["window_opened", "window_committed"]


def test_async_window_success_and_failure(store, contacts):
    async def main():
        async with async_maintenance_window(store, "demo", message="async") as conn:
            assert store.effective("demo").message == "async"
            await conn.execute(text(f'ALTER TABLE {contacts} RENAME COLUMN "primary-email" TO "tmp-email"'))
        assert columns(store, contacts) == {"id", "tmp-email"}
        assert not store.get("demo").active
        with pytest.raises(Boom):
            async with async_maintenance_window(store, "demo") as conn:
                await conn.execute(
                    text(f'ALTER TABLE {contacts} RENAME COLUMN "tmp-email" TO "main-email-contact"')
                )
                raise Boom("async failure")

    asyncio.run(main())
    assert columns(store, contacts) == {"id", "tmp-email"}
    state = store.get("demo")
    assert state.active and state.error == "Boom: async failure"


def test_autocommit_engines_are_refused_before_anything_changes(database_url, store):
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    auto_store = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    try:
        with pytest.raises(MaintgateError, match="AUTOCOMMIT"), maintenance_window(auto_store, "demo"):
            pytest.fail("the body must not run")
    finally:
        engine.dispose()
    assert store.get("demo") is None


def test_sqlite_connection_lost_mid_work(tmp_path):
    """SQLite's counterpart of pg_terminate_backend: the driver connection closes under the migration."""
    store = MaintenanceStore(f"sqlite:///{tmp_path / 'lost.db'}")
    store.create_tables()
    with store.engine.begin() as conn:
        conn.execute(text('CREATE TABLE contacts (id INTEGER PRIMARY KEY, "primary-email" TEXT)'))
    with pytest.raises(Exception, match="closed"), maintenance_window(store, "demo") as conn:
        rename(conn, "contacts")
        conn.connection.dbapi_connection.close()
        conn.execute(text("SELECT 1"))
    assert_not_migrated_on_and_error(store, "contacts", "closed")
    store.engine.dispose()


def test_a_live_gate_sees_the_window_and_never_a_half_migrated_schema(store, contacts):
    """Requests during the window get 503; after the commit they get 200 and the new column."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from maintgate import MaintenanceMiddleware
    from maintgate.tenants import from_header

    from .conftest import ManualClock

    def read_columns(request):
        return JSONResponse(sorted(columns(store, contacts)))

    clock = ManualClock()
    app = MaintenanceMiddleware(
        Starlette(routes=[Route("/", read_columns)]),
        store,
        tenant=from_header("X-Tenant-ID"),
        clock=clock,
        notifications=False,
    )
    headers = {"X-Tenant-ID": "demo"}
    with TestClient(app) as client:
        assert client.get("/", headers=headers).json() == ["id", "primary-email"]
        with maintenance_window(store, "demo") as conn:
            clock.advance(1.1)
            assert client.get("/", headers=headers).status_code == 503
            rename(conn, contacts)
            assert client.get("/", headers=headers).status_code == 503
        # This process committed the window: its gates see the switch-off with the new schema at once.
        assert client.get("/", headers=headers).json() == ["id", "main-email-contact"]
    app.gate.close()


def test_bad_arguments_are_maintgate_errors(store):
    from maintgate import InvalidArgument

    with pytest.raises(InvalidArgument, match="retry_after") as info:
        store.activate("demo", retry_after=-1)
    assert isinstance(info.value, MaintgateError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_advisory_lock_is_released_for_other_sessions(store):
    """A pool reset would not release a session lock; the window must, or drop the connection."""
    key = store.window_lock_key("demo")
    other = create_engine(store.engine.url)
    try:
        for fails in (False, True):
            with pytest.raises(Boom) if fails else _nothing(), maintenance_window(store, "demo"):
                with other.connect() as conn:
                    assert conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar() is False
                if fails:
                    raise Boom
            with other.connect() as conn:
                assert conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar() is True
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        other.dispose()


def _nothing():
    import contextlib

    return contextlib.nullcontext()
