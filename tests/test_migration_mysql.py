"""MariaDB/MySQL commit DDL implicitly: the window refuses, or runs degraded when told to."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from maintgate import MaintenanceStore, MaintgateError, maintenance_window, rollout
from tests.conftest import MYSQL_URL, require_mysql
from tests.helpers import columns, rename


@pytest.fixture
def mysql_store() -> Iterator[tuple[MaintenanceStore, str]]:
    require_mysql()
    store = MaintenanceStore(MYSQL_URL, table_prefix=f"mg{uuid.uuid4().hex[:8]}_")
    store.create_tables()
    table = f"contacts_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, `primary-email` VARCHAR(200))"))
    yield store, table
    with store.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    store.drop_tables()
    store.engine.dispose()


def test_refused_before_doing_anything(mysql_store):
    store, _ = mysql_store
    with (
        pytest.raises(MaintgateError, match="allow_non_transactional_ddl"),
        maintenance_window(store, "demo"),
    ):
        pytest.fail("the body must not run")
    assert store.get("demo") is None
    assert store.history("demo") == []


def test_degraded_mode_switches_off_only_after_the_work_succeeded(mysql_store):
    store, table = mysql_store
    with maintenance_window(store, "demo", allow_non_transactional_ddl=True) as conn:
        rename(conn, table)
        assert store.effective("demo") is not None
    assert columns(store, table) == {"id", "main-email-contact"}
    assert not store.get("demo").active
    assert [e.event for e in store.history("demo")] == ["window_opened", "window_committed"]


def test_degraded_mode_failure_leaves_a_partial_schema_and_maintenance_on(mysql_store):
    store, table = mysql_store
    with (
        pytest.raises(RuntimeError),
        maintenance_window(store, "demo", allow_non_transactional_ddl=True) as conn,
    ):
        rename(conn, table)
        raise RuntimeError("second step failed")
    assert columns(store, table) == {"id", "main-email-contact"}, "DDL committed implicitly: partial schema"
    state = store.get("demo")
    assert state.active and state.error == "RuntimeError: second step failed"


def test_started_at_is_recorded_and_kept(mysql_store):
    """MySQL evaluates SET left to right: started_at must be computed from the old `active`."""
    store, _ = mysql_store
    first = store.activate("demo", message="one")
    assert first.started_at is not None
    second = store.activate("demo", message="two")
    assert second.started_at == first.started_at


def test_a_joined_degraded_window_leaves_the_commit_to_the_caller(mysql_store):
    store, table = mysql_store
    with store.engine.connect() as conn:
        conn.begin()
        with maintenance_window(store, "demo", connection=conn, allow_non_transactional_ddl=True):
            conn.execute(text(f"INSERT INTO {table} (id) VALUES (41)"))
        assert store.get("demo").active, "the switch-off waits for the caller's commit"
        conn.commit()
    assert not store.get("demo").active and store.get("demo").window_id is None


def test_a_rollout_is_refused_before_anything_changes(mysql_store):
    store, table = mysql_store
    with pytest.raises(MaintgateError, match="needs PostgreSQL or SQLite, not mysql"):
        rollout(store, "fleet", ["demo"], lambda conn, tenant: rename(conn, table))
    assert columns(store, table) == {"id", "primary-email"} and store.get("demo") is None
