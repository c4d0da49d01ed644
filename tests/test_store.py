"""The store against a real SQLite file and a real PostgreSQL server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect, text

from maintgate import (
    ALL_TENANTS,
    InvalidArgument,
    InvalidTenant,
    MaintenanceStore,
    MaintgateError,
    maintenance_window,
    metadata,
)
from tests.conftest import POSTGRES_URL, require_postgres


def test_metadata_is_exported_with_default_table_names():
    assert "maintgate_state" in metadata.tables
    assert {c.name for c in metadata.tables["maintgate_state"].columns} >= {
        "tenant",
        "active",
        "message",
        "error",
        "retry_after",
        "ends_at",
        "started_at",
        "updated_at",
    }


def test_create_tables_is_idempotent_and_uses_prefix(store: MaintenanceStore):
    store.create_tables()
    names = inspect(store.engine).get_table_names()
    assert store.tables.state.name in names
    assert store.tables.state.name.endswith("_state")


def test_tenant_not_in_maintenance(store: MaintenanceStore):
    assert store.get("demo") is None
    assert store.effective("demo") is None
    store.activate("demo")
    store.deactivate("demo")
    state = store.get("demo")
    assert state is not None and not state.active
    assert store.effective("demo") is None
    store.deactivate("never-seen")
    assert store.history("never-seen") == [], "switching off a tenant never seen records nothing"


def test_activate_records_the_full_state(store: MaintenanceStore):
    ends = datetime.now(UTC) + timedelta(minutes=10)
    before = datetime.now(UTC)
    state = store.activate("demo", message="Renaming a field", retry_after=600, ends_at=ends)
    assert state.tenant == "demo" and state.active
    assert state.message == "Renaming a field"
    assert state.retry_after == 600
    assert state.error is None
    assert abs((state.ends_at - ends).total_seconds()) < 0.001
    assert state.started_at.tzinfo is not None and state.started_at >= before - timedelta(seconds=1)
    assert state.updated_at >= state.started_at
    assert store.get("demo") == state


def test_reactivation_keeps_started_at_and_updates_message(store: MaintenanceStore):
    first = store.activate("demo", message="one")
    second = store.activate("demo", message="two")
    assert second.started_at == first.started_at
    assert second.message == "two"
    store.deactivate("demo")
    third = store.activate("demo", message="three")
    assert third.started_at > first.started_at


def test_global_switch_covers_every_tenant_and_no_tenant(store: MaintenanceStore):
    store.activate(ALL_TENANTS, message="Database upgrade")
    for tenant in ("demo", "other", None):
        state = store.effective(tenant)
        assert state is not None and state.is_global and state.message == "Database upgrade"
    store.activate("demo", message="own window")
    assert store.effective("demo").message == "own window"
    store.deactivate(ALL_TENANTS)
    assert store.effective("other") is None
    assert store.effective("demo").message == "own window"


def test_all_lists_global_first(store: MaintenanceStore):
    store.activate("zeta")
    store.activate("alpha")
    store.activate(ALL_TENANTS)
    assert [s.tenant for s in store.all()] == [ALL_TENANTS, "alpha", "zeta"]


@pytest.mark.parametrize("bad", ["", "x" * 129, "a b", "<script>", "ünï", "-lead", None, 42])
def test_invalid_tenant_ids_are_refused(store: MaintenanceStore, bad):
    with pytest.raises(InvalidTenant) as info:
        store.activate(bad)
    assert isinstance(info.value, MaintgateError) and isinstance(info.value, ValueError)
    assert len(str(info.value)) < 300


def test_bad_arguments_name_the_value(store: MaintenanceStore):
    with pytest.raises(ValueError, match="retry_after"):
        store.activate("demo", retry_after=-5)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.activate("demo", ends_at=datetime(2030, 1, 1))
    with pytest.raises(TypeError, match="URL or Engine"):
        MaintenanceStore(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="table_prefix"):
        MaintenanceStore("sqlite://", table_prefix="bad-prefix;")
    with pytest.raises(InvalidArgument, match="limit"):
        store.history("demo", limit=-1)


def test_writes_join_the_callers_transaction(store: MaintenanceStore):
    with store.engine.connect() as conn:
        tx = conn.begin()
        store.activate("demo", message="inside", connection=conn)
        assert store.get("demo", connection=conn).active
        tx.rollback()
    assert store.get("demo") is None


def test_store_accepts_an_engine(database_url: str):
    from sqlalchemy import create_engine

    engine = create_engine(database_url)
    store = MaintenanceStore(engine, table_prefix=f"mg{uuid.uuid4().hex[:8]}_")
    try:
        store.create_tables()
        store.activate("demo")
        assert store.effective("demo").active
    finally:
        store.drop_tables()
        engine.dispose()


def test_schema_option_on_postgresql():
    require_postgres()
    schema = f"mgschema_{uuid.uuid4().hex[:8]}"
    store = MaintenanceStore(POSTGRES_URL, schema=schema)
    with store.engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        store.create_tables()
        store.activate("demo", message="in a schema")
        assert store.get("demo").message == "in a schema"
        assert "maintgate_state" in inspect(store.engine).get_table_names(schema=schema)
    finally:
        with store.engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        store.engine.dispose()


def test_changes_read_what_changed_since_a_number(store):
    from datetime import UTC, datetime, timedelta

    first = store.changes(None)
    assert first.full and first.states == {} and first.schedules == {}
    store.activate("a", message="on")
    store.schedule("b", datetime.now(UTC) + timedelta(hours=1))
    store.activate("c")
    store.deactivate("c")
    everything = store.changes(None)
    assert set(everything.states) == {"a"}, "a full read holds only what is on"
    assert [s.tenant for s in everything.schedules["b"]] == ["b"]
    assert everything.version == first.version + 4
    since = store.changes(first.version)
    assert not since.full
    assert since.states["a"].message == "on" and since.states["c"] is None, "an off is a change too"
    assert since.schedules["b"] and since.version == everything.version
    assert store.changes(everything.version).states == {}, "nothing changed: nothing read"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # SQLite serializes writers
def test_a_change_that_commits_late_is_never_skipped(store):
    """A write in a caller's transaction takes no number (it would hold the counter for as long
    as the caller likes): it is read on every refresh until a numbered change renumbers it."""
    start = store.changes(None)
    conn = store.engine.connect()
    tx = conn.begin()
    try:
        store.activate("late", connection=conn)  # not committed yet
        store.activate("early")  # does not wait for the caller's transaction
        meanwhile = store.changes(start.version)
        assert set(meanwhile.states) == {"early"}
        tx.commit()
    finally:
        if tx.is_active:
            tx.rollback()
        conn.close()
    after = store.changes(meanwhile.version)
    assert set(after.states) == {"late"}, "committed after the reader moved past 'early': still read"
    assert store.changes(after.version).states.keys() == {"late"}, "read again until numbered"
    store.activate("other")
    numbered = store.changes(after.version)
    assert numbered.states.keys() == {"late", "other"}, "the next numbered change renumbers it"
    assert store.changes(numbered.version).states == {}


@pytest.mark.parametrize(
    "options",
    [{"table_prefix": 5}, {"schema": 5}, {"engine_options": 5}, {"listen_url": 5}, {"listen_url": "::"}],
)
def test_bad_store_arguments_raise_invalid_argument_naming_them(options, tmp_path):
    from maintgate import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        MaintenanceStore(f"sqlite:///{tmp_path / 'x.db'}", **options)
    assert info.value.option == next(iter(options)), info.value


@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_writers_of_different_tenants_succeed_on_an_engine_under_snapshot_isolation(level):
    """Every write takes the change counter: on the app's own engine at a snapshot level, the
    store's short writes run READ COMMITTED, or writers of other tenants fail to serialize."""
    import threading

    from sqlalchemy import create_engine

    require_postgres()
    prefix = f"mg{uuid.uuid4().hex[:8]}_"
    maker = MaintenanceStore(POSTGRES_URL, table_prefix=prefix)
    maker.create_tables()
    maker.engine.dispose()
    engine = create_engine(POSTGRES_URL, isolation_level=level, pool_size=8)
    store = MaintenanceStore(engine, table_prefix=prefix)
    errors: list[str] = []

    levels: set[str] = set()

    def writer(i: int) -> None:
        for k in range(20):
            try:
                (store.activate if k % 2 == 0 else store.deactivate)(f"t{i}")
                # A window's switch-on commits on the migration's own connection, READ COMMITTED;
                # the migration's transaction then runs at the engine's level. (SERIALIZABLE
                # migrations of different tenants conflict on the state table's index pages.)
                if level == "REPEATABLE READ":
                    with maintenance_window(store, f"w{i}") as conn:
                        levels.add(conn.execute(text("SHOW transaction_isolation")).scalar())
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [], errors[:3]
        assert [len(store.history(f"t{i}")) for i in range(6)] == [20] * 6
        if level == "REPEATABLE READ":
            assert [len(store.history(f"w{i}")) for i in range(6)] == [40] * 6
            assert levels == {"repeatable read"}
    finally:
        store.drop_tables()
        engine.dispose()


def test_a_store_on_an_autocommit_engine_still_writes_in_transactions():
    """Windows are refused on an AUTOCOMMIT engine, but operator writes are not: each must still
    be one transaction (all of it, or nothing), and creating the tables must work."""
    from sqlalchemy import create_engine

    require_postgres()
    engine = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    store = MaintenanceStore(engine, table_prefix=f"mg{uuid.uuid4().hex[:8]}_")
    try:
        store.create_tables()
        store.activate("demo", message="on")
        assert store.get("demo").active
        with engine.connect() as conn:  # the write's last statement (history, number) now fails
            conn.execute(text(f"ALTER TABLE {store.tables.history.name} ADD CHECK (tenant <> 'late')"))
        with pytest.raises(Exception, match="check"):
            store.activate("late", message="half")
        assert store.get("late") is None, "the switch-on committed without its history and number"
    finally:
        store.drop_tables()
        engine.dispose()
