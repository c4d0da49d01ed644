"""The window in real deployments: fencing, lost sessions, leases, callers that end the transaction,
snapshot isolation, schema per tenant, operator races, small pools (issue 9).

Each test reproduces a way the window was seen to end in neither allowed state:
"migrated and off", or "not migrated, on, and the error recorded".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from maintgate import (
    MaintenanceStore,
    MaintgateError,
    Owner,
    Renderer,
    WindowBusy,
    WindowLost,
    async_maintenance_window,
    maintenance_window,
)
from maintgate.tenants import from_header
from tests.conftest import MYSQL_URL, ManualClock, require_mysql
from tests.helpers import (
    Boom,
    assert_migrated_and_off,
    assert_not_migrated_on_and_error,
    columns,
    events,
    eventually,
    rename,
    without_server_functions,
)

postgres_only = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


class ByHand:
    """A window entered by hand, so a test can interleave it with others; always left at the end."""

    def __init__(self, cm) -> None:
        self.cm = cm
        self.done = False

    def __enter__(self):
        return self, self.cm.__enter__()

    def exit(self) -> bool:
        """Leave the window as a clean ``with`` exit would; whether it committed."""
        self.done = True
        try:
            self.cm.__exit__(None, None, None)
        except Exception:
            return False
        return True

    def __exit__(self, *exc) -> None:
        if not self.done:
            self.done = True
            with contextlib.suppress(BaseException):
                self.cm.__exit__(*exc) if exc[0] else self.cm.__exit__(Boom, Boom("test ended"), None)


# 1. Fencing ------------------------------------------------------------------------------------


def test_a_released_window_taken_over_by_another_fails_instead_of_switching_off(store, contacts):
    with ByHand(maintenance_window(store, "demo", message="first")) as (first, conn):
        # An operator releases it (on SQLite before the migration writes: one writer at a time).
        released = store.release_window("demo")
        assert released is not None and released.window_id is not None
        if store.engine.dialect.name == "postgresql":
            # The first window's transaction still holds the lock: nobody else can start migrating.
            with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
                pass
            rename(conn, contacts)
            assert not first.exit()
        else:
            with maintenance_window(store, "demo", message="second"):
                rename(conn, contacts)
                assert not first.exit(), "the first window's switch-off is fenced on its own id"
                assert store.get("demo").active, "the second window's maintenance stays on"
    state = store.get("demo")
    # PostgreSQL: the first window failed and keeps maintenance on; SQLite: the second one ended it.
    assert state.active == (store.engine.dialect.name == "postgresql") and state.window_id is None
    assert columns(store, contacts) == {"id", "primary-email"}, "the first window's work rolled back"
    assert "window_failed" in events(store)


def test_the_switch_off_must_change_exactly_the_windows_row(store, contacts):
    with pytest.raises(WindowLost, match="no longer held"), maintenance_window(store, "demo") as conn:
        with store.engine.begin() as other:  # someone deletes maintgate's row behind the window's back
            other.execute(store.tables.state.delete().where(store.tables.state.c.tenant == "demo"))
        rename(conn, contacts)
    assert columns(store, contacts) == {"id", "primary-email"}
    assert events(store)[-1] == "window_failed"


# 2. Exclusion that cannot be lost silently (PostgreSQL) -----------------------------------------


def _backend_gone(store: MaintenanceStore, pid: int) -> bool:
    with store.engine.connect() as conn:
        return (
            conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar()
            == 0
        )


def _lock_holder(store: MaintenanceStore) -> int:
    """The backend that holds the tenant's advisory lock: the session the exclusion lives in."""
    key = store.window_lock_key("demo")
    with store.engine.connect() as conn:
        return conn.execute(
            text(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = :hi AND objid = :lo AND objsubid = 1"
            ),
            {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
        ).scalar_one()


@postgres_only
def test_killing_the_session_that_holds_the_exclusion_never_lets_two_windows_migrate(store, contacts):
    with ByHand(maintenance_window(store, "demo")) as (first, conn):
        rename(conn, contacts)
        holder = _lock_holder(store)
        with store.engine.connect() as killer:
            assert killer.execute(text("SELECT pg_terminate_backend(:p)"), {"p": holder}).scalar()
        assert eventually(lambda: _backend_gone(store, holder), 5)
        second_opened = first_committed = False
        try:
            with maintenance_window(store, "demo"):
                second_opened = True
                first_committed = first.exit()  # the first window ends while the second is migrating
        except WindowBusy:
            first_committed = first.exit()
    assert not (second_opened and first_committed), "two windows migrated the tenant at once"
    assert columns(store, contacts) == {"id", "primary-email"}


@postgres_only
def test_an_idle_session_timeout_during_a_long_migration_does_not_end_the_exclusion(store, contacts):
    reaped = MaintenanceStore(
        store.engine.url.render_as_string(hide_password=False),
        table_prefix=store.tables.state.name.removesuffix("state"),
        engine_options={"connect_args": {"options": "-c idle_session_timeout=300"}},
    )
    try:
        with maintenance_window(reaped, "demo") as conn:
            rename(conn, contacts)
            time.sleep(1.0)  # any session idle outside a transaction is gone by now
            with pytest.raises(WindowBusy), maintenance_window(reaped, "demo"):
                pytest.fail("a second window opened while the first was migrating")
        assert_migrated_and_off(store, contacts)
    finally:
        reaped.engine.dispose()


@postgres_only
def test_a_refused_lock_leaves_no_setting_on_the_pooled_connection(store):
    with maintenance_window(store, "demo"):
        for _ in range(3):
            with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
                pass
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW client_connection_check_interval")).scalar() == "0"


# 3. Leases ------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def any_store(request, tmp_path):
    """A store on a SQLite file, PostgreSQL or MariaDB, with its own tables."""
    from tests.conftest import POSTGRES_URL, require_postgres

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lease.db'}"
    elif request.param == "postgresql":
        require_postgres()
        url = POSTGRES_URL
    else:
        require_mysql()
        url = MYSQL_URL
    store = MaintenanceStore(url, table_prefix=f"mg{uuid.uuid4().hex[:10]}_")
    store.create_tables()
    yield store
    store.drop_tables()
    store.engine.dispose()


def _window(store: MaintenanceStore, **options):
    return maintenance_window(store, "demo", allow_non_transactional_ddl=True, **options)


@pytest.mark.parametrize(
    "owner",
    [Owner("another-host", 4242), Owner(socket.gethostname(), os.getpid())],
    ids=["crashed-on-another-host", "pid-reused-by-this-process"],
)
def test_a_dead_windows_lease_expires_and_the_next_window_takes_over(any_store, owner):
    any_store.open_window("demo", owner, message="crashed", lease=0.6)  # and never renewed: it died
    with pytest.raises(WindowBusy, match=r"lease runs until .*maintgate release demo"), _window(any_store):
        pass
    assert any_store.window_alive(any_store.get("demo")) is True
    assert eventually(lambda: any_store.window_alive(any_store.get("demo")) is False, 5)
    with _window(any_store, message="takes over"):
        assert any_store.get("demo").owner.pid == os.getpid()
    state = any_store.get("demo")
    assert not state.active and state.window_id is None


def test_a_running_window_renews_its_lease(any_store):
    with _window(any_store, lease=0.6):
        time.sleep(1.5)  # more than two leases
        with pytest.raises(WindowBusy), _window(any_store):
            pass
        assert any_store.window_alive(any_store.get("demo")) is True
    assert not any_store.get("demo").active


def test_release_clears_a_dead_owner_and_status_says_who_holds_the_window(any_store, capsys):
    from maintgate.cli import main

    url = any_store.engine.url.render_as_string(hide_password=False)
    base = ["--database-url", url, "--table-prefix", any_store.tables.state.name.removesuffix("state")]
    window = any_store.open_window("demo", Owner("another-host", 4242), lease=600)
    assert main([*base, "status", "demo"]) == 0
    out = capsys.readouterr().out
    assert f"window {window.id}" in out and "another-host pid 4242" in out
    assert "lease until" in out and "new windows are refused until then" in out
    assert main([*base, "status", "demo", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)[0]
    assert data["window"]["id"] == window.id and data["window"]["lease_until"] is not None
    assert main([*base, "release", "demo"]) == 0
    assert f"released window {window.id}" in capsys.readouterr().out
    assert any_store.get("demo").active, "maintenance stays on: the operator ends it with off"
    with _window(any_store):
        pass
    assert main([*base, "release", "demo"]) == 1
    assert "no window holds" in capsys.readouterr().err


# 4. The work must not end the window's transaction ---------------------------------------------


@pytest.mark.parametrize("end", ["commit", "rollback", "raw COMMIT", "raw ROLLBACK"])
def test_work_that_ends_the_windows_transaction_fails_the_window(store, contacts, end):
    with (
        pytest.raises(WindowLost, match="Never commit or roll back"),
        maintenance_window(store, "demo") as conn,
    ):
        rename(conn, contacts)
        if end.startswith("raw"):
            conn.exec_driver_sql(end.split()[1])
        else:
            getattr(conn, end)()
        conn.execute(text(f"INSERT INTO {contacts} (id) VALUES (7)"))
    state = store.get("demo")
    assert state.active and state.window_id is None and "WindowLost" in state.error
    assert events(store)[-1] == "window_failed"


def test_async_work_that_commits_the_windows_transaction_fails_the_window(store, contacts):
    async def main():
        async with async_maintenance_window(store, "demo") as conn:
            await conn.execute(text(f'ALTER TABLE {contacts} RENAME COLUMN "primary-email" TO "x"'))
            await conn.commit()

    with pytest.raises(WindowLost):
        asyncio.run(main())
    state = store.get("demo")
    assert state.active and "WindowLost" in state.error


# 5. Snapshot isolation -----------------------------------------------------------------------------


@postgres_only
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_joined_windows_under_snapshot_isolation_are_refused_before_anything_changes(store, contacts, level):
    with store.engine.connect() as conn:
        conn = conn.execution_options(isolation_level=level)
        conn.begin()
        conn.execute(text("SELECT 1"))  # the caller's snapshot is taken
        with pytest.raises(MaintgateError, match=level), maintenance_window(store, "demo", connection=conn):
            rename(conn, contacts)
        conn.rollback()
    assert store.get("demo") is None or not store.get("demo").active
    assert columns(store, contacts) == {"id", "primary-email"}


@postgres_only
@pytest.mark.parametrize("level", ["REPEATABLE READ", "SERIALIZABLE"])
def test_owned_windows_on_a_snapshot_isolation_engine_end_in_an_allowed_state(store, contacts, level):
    engine = create_engine(store.engine.url, isolation_level=level)
    snap = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    try:
        with pytest.raises(Boom), maintenance_window(snap, "demo") as conn:
            rename(conn, contacts)
            raise Boom("first try")
        assert_not_migrated_on_and_error(store, contacts, "first try")
        with maintenance_window(snap, "demo") as conn:
            assert conn.execute(
                text(f"SELECT active FROM {store.tables.state.name} WHERE tenant = 'demo'")
            ).scalar()
            rename(conn, contacts)
        assert_migrated_and_off(store, contacts)
    finally:
        engine.dispose()


# 6. Schema per tenant ------------------------------------------------------------------------------


@postgres_only
@pytest.mark.parametrize("setting", ["SET LOCAL", "SET"])
@pytest.mark.parametrize("decoy", [False, True], ids=["no-tables-there", "decoy-tables-there"])
def test_a_migration_that_moves_search_path_still_switches_off_in_maintgates_schema(store, setting, decoy):
    from maintgate.core.schema import build_tables

    schema = f"tenant_{uuid.uuid4().hex[:8]}"
    prefix = store.tables.state.name.removesuffix("state")
    decoys = build_tables(prefix, schema)
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
        conn.execute(text(f'CREATE TABLE {schema}.contacts (id INTEGER PRIMARY KEY, "primary-email" TEXT)'))
        if decoy:
            decoys.metadata.create_all(conn)
            conn.execute(decoys.state.insert().values(tenant="demo", active=True, window_id="decoy"))
    try:
        with maintenance_window(store, "demo") as conn:
            conn.execute(text(f"{setting} search_path TO {schema}"))
            rename(conn, "contacts")
        state = store.get("demo")
        assert not state.active and state.window_id is None
        with store.engine.connect() as conn:
            cols = conn.execute(
                text(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = :s AND table_name = 'contacts'"
                ),
                {"s": schema},
            ).scalars()
            assert set(cols) == {"id", "main-email-contact"}
            if decoy:
                assert conn.execute(decoys.state.select()).one().window_id == "decoy", (
                    "the decoy is untouched"
                )
    finally:
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        store.engine.dispose()  # a plain SET stays on the pooled connection


# 8. The gate during a migration that blocks its read ----------------------------------------------


def _ok_wsgi(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_sqlite_gate_never_serves_the_pre_window_off_during_a_large_write(tmp_path):
    from maintgate import WSGIMaintenanceMiddleware
    from tests.conftest import wsgi_call

    store = MaintenanceStore(f"sqlite:///{tmp_path / 'big.db'}")
    store.create_tables()
    with store.engine.begin() as conn:
        conn.execute(text("CREATE TABLE big (id INTEGER PRIMARY KEY, pad TEXT)"))
        conn.execute(
            text(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000) "
                "INSERT INTO big SELECT i, printf('%.500c', 'x') FROM n"
            )
        )
    clock = ManualClock()
    app = WSGIMaintenanceMiddleware(
        _ok_wsgi, store, tenant=from_header("X-Tenant-ID"), clock=clock, load_timeout=1.0
    )
    try:
        assert wsgi_call(app, "demo") == 200
        with maintenance_window(store, "demo") as conn:
            conn.exec_driver_sql(
                "PRAGMA cache_size = 20"
            )  # the write spills: a rollback journal locks readers out
            conn.execute(text("UPDATE big SET pad = pad || 'y'"))
            clock.advance(2)
            assert wsgi_call(app, "demo") == 503
        clock.advance(2)
        assert wsgi_call(app, "demo") == 200
    finally:
        app.gate.close()
        store.engine.dispose()


@postgres_only
def test_a_window_that_locks_maintgates_own_table_still_gets_503s(store):
    from maintgate import WSGIMaintenanceMiddleware
    from tests.conftest import wsgi_call

    app = WSGIMaintenanceMiddleware(
        _ok_wsgi, store, tenant=from_header("X-Tenant-ID"), cache_ttl=0.3, load_timeout=1.0
    )
    try:
        assert wsgi_call(app, "demo") == 200
        assert eventually(lambda: app.gate.notifications_live, 5)
        with maintenance_window(store, "demo") as conn:
            conn.execute(text(f"ALTER TABLE {store.tables.state.name} ADD COLUMN extra INTEGER"))
            time.sleep(0.5)  # the switch-on's notification is in; the cached "off" has expired
            assert [wsgi_call(app, "demo") for _ in range(3)] == [503, 503, 503]
    finally:
        app.gate.close()


# 9. Operator races ------------------------------------------------------------------------------


def _waiting_on_a_lock(store: MaintenanceStore, pid: int) -> bool:
    with store.engine.connect() as conn:
        kind = conn.execute(
            text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
        ).scalar()
    return kind == "Lock"


@postgres_only
def test_an_operators_switch_on_that_commits_while_the_window_closes_is_kept(store):
    ready, go = threading.Event(), threading.Event()
    result: dict = {}

    def window():
        try:
            with maintenance_window(store, "demo", message="window") as conn:
                result["pid"] = conn.execute(text("SELECT pg_backend_pid()")).scalar()
                ready.set()
                go.wait(10)
            result["ok"] = True
        except Exception as exc:  # pragma: no cover - reported below
            result["error"] = exc

    thread = threading.Thread(target=window)
    thread.start()
    assert ready.wait(10)
    with store.engine.connect() as operator:
        tx = operator.begin()
        store.activate("demo", message="operator: keep it on", connection=operator)  # holds the row
        go.set()
        assert eventually(lambda: _waiting_on_a_lock(store, result["pid"]), 5), (
            "the switch-off waits on the row"
        )
        tx.commit()
    thread.join(10)
    assert result.get("ok"), result
    state = store.get("demo")
    assert state.active and state.message == "operator: keep it on" and state.window_id is None


def test_an_operators_new_message_during_a_window_is_kept(store):
    store.activate("demo", message="first", retry_after=60)
    with maintenance_window(store, "demo", message="window"):
        store.activate("demo", message="second", retry_after=120)
    state = store.get("demo")
    assert state.active and state.message == "second" and state.retry_after == 120


def test_an_operator_switching_on_during_a_window_is_respected(store):
    with maintenance_window(store, "demo", message="window"):
        store.activate("demo", message="keep it on")
        assert store.get("demo").owner is not None, "the window still owns it"
        with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
            pass
    state = store.get("demo")
    assert state.active and state.message == "keep it on" and state.owner is None


def test_an_operator_switching_off_during_a_window_keeps_the_window_exclusive(store):
    with maintenance_window(store, "demo"):
        store.deactivate("demo")
        with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
            pass
    assert not store.get("demo").active and store.get("demo").owner is None


# 10. One sequence, one store API ----------------------------------------------------------------


def test_an_async_joined_window_logs_its_commit(store, contacts, caplog):
    from sqlalchemy.ext.asyncio import create_async_engine

    from maintgate.migration import _async_url

    async def main():
        engine = create_async_engine(_async_url(store.engine))
        try:
            async with engine.connect() as conn:
                await conn.begin()
                async with async_maintenance_window(store, "demo", connection=conn) as joined:
                    await joined.execute(
                        text(f'ALTER TABLE {contacts} RENAME COLUMN "primary-email" TO "main-email-contact"')
                    )
                await conn.commit()
        finally:
            await engine.dispose()

    with caplog.at_level(logging.INFO, logger="maintgate"):
        asyncio.run(main())
    assert_migrated_and_off(store, contacts)
    assert [r.maintgate_event for r in caplog.records if hasattr(r, "maintgate_event")][
        -1
    ] == "window_committed"


def test_the_stores_window_api_is_fenced_on_the_window_id(store):
    me = Owner("here", 1)
    window = store.open_window("demo", me, message="mine", lease=60)
    with pytest.raises(WindowBusy):
        store.open_window("demo", me, lease=60)
    assert store.renew_window(window, 60)
    assert store.release_window("demo").window_id == window.id
    other = store.open_window("demo", me, lease=60)
    with pytest.raises(WindowLost), store.engine.begin() as conn:
        store.close_window(window, conn)
    assert not store.record_window_failure(window, "late error"), "only the history hears of it"
    assert store.get("demo").window_id == other.id and store.get("demo").error is None
    with store.engine.begin() as conn:
        store.close_window(other, conn)
    assert not store.get("demo").active
    assert [e.window_id for e in store.history("demo") if e.event == "window_failed"] == [window.id]


# 14. Connections and errors ------------------------------------------------------------------------


def test_a_pool_too_small_for_a_window_is_refused_up_front(database_url, store):
    small = create_engine(database_url, pool_size=1, max_overflow=0, pool_timeout=1)
    tiny = MaintenanceStore(small, table_prefix=store.tables.state.name.removesuffix("state"))
    try:
        with pytest.raises(MaintgateError, match="needs 2 connections"), maintenance_window(tiny, "demo"):
            pytest.fail("the body must not run")
    finally:
        small.dispose()
    assert store.get("demo") is None


@postgres_only
def test_expose_error_shows_clients_only_the_first_line_of_a_database_error(store, contacts):
    from maintgate.core.negotiation import PROBLEM_JSON

    with store.engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {contacts} (id, \"primary-email\") VALUES (1, 'ada@example.com')"))
    with pytest.raises(Exception, match="duplicate key"), maintenance_window(store, "demo") as conn:
        conn.execute(text(f"INSERT INTO {contacts} (id, \"primary-email\") VALUES (1, 'ada@example.com')"))
    state = store.get("demo")
    assert "ada@example.com" in state.error, "the operator's record keeps the detail"
    body = Renderer(expose_error=True).render(PROBLEM_JSON, state, "demo", 60).decode()
    assert "duplicate key" in body and "ada@example.com" not in body and "DETAIL" not in body


def test_a_recorded_database_error_leaves_out_the_statements_parameters(store):
    with (
        pytest.raises(Exception, match=r"UNIQUE|unique|duplicate"),
        maintenance_window(store, "demo") as conn,
    ):
        table = store.tables.history.name
        conn.execute(
            text(f"INSERT INTO {table} (id, tenant, event, at) VALUES (:i, 'x', 'e', :at)"),
            [{"i": 10**6, "at": "2026-01-01 00:00:00"}, {"i": 10**6, "at": "2026-01-01 00:00:00"}],
        )
    assert "[parameters:" not in store.get("demo").error


# Found by review: each reproduced first, then fixed ---------------------------------------------


def test_a_cancellation_while_the_async_window_rolls_back_still_records_the_error(store):
    async def window():
        task = asyncio.current_task()
        async with async_maintenance_window(store, "demo", lease=3) as conn:
            await conn.execute(text("SELECT 1"))
            asyncio.get_running_loop().call_soon(task.cancel)  # lands while the window rolls back
            raise Boom("migration failed")

    async def main():
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.ensure_future(window()), 10)

    asyncio.run(main())
    state = store.get("demo")
    assert state.active and "migration failed" in state.error and state.window_id is None
    assert events(store)[-1] == "window_failed"


def _lock_is_free(store: MaintenanceStore, tenant: str = "demo") -> bool:
    """Whether another session can take the tenant's advisory lock (always, off PostgreSQL)."""
    if store.engine.dialect.name != "postgresql":
        return True
    other = create_engine(store.engine.url)
    try:
        with other.connect() as conn:
            key = store.window_lock_key(tenant)
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            return bool(got)
    finally:
        other.dispose()


def test_async_window_cancelled_in_the_block_records_and_releases(store, contacts):
    async def main():
        entered = asyncio.Event()

        async def migrate():
            async with async_maintenance_window(store, "demo") as conn:
                await conn.execute(text(f'ALTER TABLE {contacts} RENAME COLUMN "primary-email" TO "x"'))
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(migrate())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    state = store.get("demo")
    assert state.active and "CancelledError" in state.error and state.owner is None
    assert columns(store, contacts) == {"id", "primary-email"}
    assert _lock_is_free(store)


@pytest.mark.parametrize("delay", [0, 0.001, 0.005, 0.02, 0.05, 0.1])
def test_async_window_cancelled_while_opening_leaves_no_lock_and_no_silent_state(store, delay):
    async def main():
        async def migrate():
            async with async_maintenance_window(store, "demo"):
                await asyncio.sleep(30)

        task = asyncio.create_task(migrate())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _lock_is_free(store)
    state = store.get("demo")
    if state is not None:  # it opened: then the cancellation is on record
        assert state.active and state.owner is None and "CancelledError" in (state.error or "")


@postgres_only
def test_a_joined_window_after_the_caller_wrote_the_tenants_row_is_refused_not_hung(store):
    with store.engine.connect() as conn:
        conn.begin()
        store.activate("demo", message="caller's", connection=conn)  # the caller holds the row
        started = time.monotonic()
        with (
            pytest.raises(MaintgateError, match="open the window first"),
            maintenance_window(store, "demo", connection=conn),
        ):
            pytest.fail("the body must not run")
        assert time.monotonic() - started < 10
        conn.rollback()
    assert store.get("demo") is None or not store.get("demo").active


@postgres_only
def test_a_search_path_left_on_a_pooled_connection_does_not_misdirect_the_store(store):
    schema = f"tenant_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    # Last in, first out: the next checkout gets the connection the migration left its search_path on.
    lifo = MaintenanceStore(
        store.engine.url.render_as_string(hide_password=False),
        table_prefix=store.tables.state.name.removesuffix("state"),
        engine_options={"pool_use_lifo": True},
    )
    try:
        with maintenance_window(lifo, "demo") as conn:
            conn.execute(text(f"SET search_path TO {schema}"))  # session-level: it outlives the window
        assert lifo.lookup("demo").state is None
        with pytest.raises(Boom), maintenance_window(lifo, "demo"):
            raise Boom("recorded all the same")
        assert "recorded all the same" in store.get("demo").error
    finally:
        lifo.engine.dispose()
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))


@postgres_only
@pytest.mark.parametrize("reply", ["commit", "call"])
def test_a_lost_reply_to_the_switch_ons_commit_still_ends_in_an_allowed_state(store, reply):
    """The switch-on commits but its reply is lost (its COMMIT's, or, where it is one server
    function call in autocommit, the call's): the window must not leave an orphan switch-on."""
    import socket

    if reply == "commit":
        without_server_functions(store)

    class CutAfterCommit:
        def __init__(self) -> None:
            self.armed, self.cut = True, False
            self.server = socket.create_server(("127.0.0.1", 0))
            self.port = self.server.getsockname()[1]
            threading.Thread(target=self.accept, daemon=True).start()

        def accept(self) -> None:
            while True:
                try:
                    client, _ = self.server.accept()
                except OSError:
                    return
                upstream = socket.create_connection(("127.0.0.1", 5432))
                lost = threading.Event()
                threading.Thread(target=self.pipe, args=(client, upstream, True, lost), daemon=True).start()
                threading.Thread(target=self.pipe, args=(upstream, client, False, lost), daemon=True).start()

        def pipe(self, src, dst, outbound: bool, lost: threading.Event) -> None:
            with contextlib.suppress(OSError), src, dst:
                while data := src.recv(65536):
                    if lost.is_set():
                        continue
                    if reply == "commit":
                        cutting = data.startswith(b"Q") and b"COMMIT\x00" in data
                    else:
                        cutting = b"switch_on_" in data and b"(CAST(" in data
                    cutting = cutting and outbound and self.armed
                    if cutting:
                        lost.set()
                    dst.sendall(data)
                    if cutting:
                        self.armed, self.cut = False, True
                        time.sleep(0.5)  # the server commits and answers; the answer never arrives
                        for s in (src, dst):
                            with contextlib.suppress(OSError):
                                s.shutdown(socket.SHUT_RDWR)
                                s.close()
                        return

    proxy = CutAfterCommit()
    prefix = store.tables.state.name.removesuffix("state")
    cut = MaintenanceStore(f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/test", table_prefix=prefix)
    try:
        with pytest.raises(Exception), maintenance_window(cut, "demo"):  # noqa: B017
            pytest.fail("the work must not run: the window does not know it opened")
        assert proxy.cut
        state = store.get("demo")
        # Either the switch-on never landed, or it did and the failure is on record: never an orphan.
        assert state is None or not state.active or (state.error and state.window_id is None)
        if reply == "call":  # an autocommit call is committed before it is answered
            assert state is not None and state.active and state.error and state.window_id is None
    finally:
        cut.engine.dispose()
        proxy.server.close()


@postgres_only
def test_windows_exclude_each_other_however_the_stores_schema_is_spelled(store):
    """A store given schema="public" and one given no schema (the CLI's default) use the same
    tables, so they must use the same lock: neither may take over, or clear, the other's window."""
    state = store.tables.state
    prefix = state.name.removesuffix("state")
    named = MaintenanceStore(store.engine, table_prefix=prefix, schema="public")
    plain = MaintenanceStore(store.engine, table_prefix=prefix)
    assert named.window_lock_key("demo") == plain.window_lock_key("demo")
    assert named.channel == plain.channel == store.channel, "and one notification channel"
    opened, done = threading.Event(), threading.Event()

    def run() -> None:
        with maintenance_window(named, "demo", lease=0.05):
            opened.set()
            done.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert opened.wait(10)
        time.sleep(0.2)  # the opening's lease is over: only the transaction lock says it runs
        assert plain.window_alive(plain.get("demo")) is True
        with pytest.raises(WindowBusy):
            plain.open_window("demo", Owner("another-host", 1))
        ended = plain.deactivate("demo")
        assert ended.released is None, "a running window is never cleared"
    finally:
        done.set()
        thread.join()
