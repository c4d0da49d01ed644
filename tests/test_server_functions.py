"""PostgreSQL: the window's switch-on and switch-off as server functions that ``create_tables``
makes, and the statements that do the same where the functions are absent (tables made by
Alembic or an older maintgate), stricter isolation defaults, or dropped meanwhile."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, text

from maintgate import MaintenanceStore, WindowBusy, async_maintenance_window, maintenance_window, rollout
from maintgate.core.state import READ_ONLY
from maintgate.core.store import state_fields, state_from_payload
from tests.helpers import Boom, events, without_server_functions
from tests.test_notify import Inbox

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def functions_of(store: MaintenanceStore) -> list[str]:
    with store.engine.connect() as conn:
        return sorted(
            conn.execute(
                text("SELECT proname FROM pg_proc WHERE starts_with(proname, :prefix)"),
                {"prefix": store.tables.state.name.removesuffix("state")},
            ).scalars()
        )


class Statements:
    """The statements a store's engine sends, transaction control aside."""

    def __init__(self, store: MaintenanceStore) -> None:
        self.sent: list[str] = []
        event.listen(store.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement: str, *args) -> None:
        self.sent.append(statement)

    def during(self, action) -> list[str]:
        self.sent.clear()
        action()
        return list(self.sent)


def open_and_close(store: MaintenanceStore, tenant: str) -> None:
    with maintenance_window(store, tenant):
        pass


@pytest.fixture(params=["functions", "statements"])
def path(request, store) -> str:
    if request.param == "statements":
        without_server_functions(store)
    return request.param


def test_a_window_does_the_same_with_server_functions_or_statements(store, path):
    """Every observable effect of a window, on both paths: states, history, notifications, a busy
    tenant refused with nothing changed, an operator's maintenance kept, a failure on record."""
    inbox = Inbox(store)
    heard = lambda: [state_from_payload(n.payload) for n in inbox.conn.notifies(timeout=0.3)]  # noqa: E731
    fields = lambda state: None if state is None else state_fields(state)  # noqa: E731
    statements = Statements(store)
    try:
        sent = statements.during(lambda: open_and_close(store, "warm"))
        heard()
        # With the functions: one call each for the switch-on and the switch-off.
        calls = [s for s in sent if "switch_o" in s]
        assert len(calls) == (2 if path == "functions" else 0), sent

        ends = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        store.activate("demo", message="operator's", retry_after=900, ends_at=ends, mode=READ_ONLY)
        heard()
        with maintenance_window(store, "demo", message="window's", retry_after=30) as conn:
            [(tenant, state, version)] = heard()
            now = store.get("demo")
            assert tenant == "demo" and fields(state) == fields(now) and isinstance(version, int)
            assert now.active and now.message == "operator's" and now.mode == "full" and now.window_id
            before = store.get("demo")
            with pytest.raises(WindowBusy, match="already open"), maintenance_window(store, "demo"):
                pass
            assert store.get("demo") == before and heard() == [], "refused: nothing changed or sent"
            conn.execute(text("SELECT 1"))
        [(_, state, _)] = heard()
        after = store.get("demo")
        assert fields(state) == fields(after), "the switch-off's notification says what the table says"
        assert after.active and after.source == "operator" and after.message == "operator's"
        assert after.read_only and after.retry_after == 900 and after.window_id is None

        with maintenance_window(store, "fresh", message="m") as conn:
            assert store.effective("fresh").message == "m"
        assert not store.get("fresh").active and store.effective("fresh") is None
        with pytest.raises(Boom), maintenance_window(store, "fresh"):
            raise Boom("no")
        failed = store.get("fresh")
        assert failed.active and failed.error == "Boom: no" and failed.window_id is None
        twice = ["window_opened", "window_committed", "window_opened", "window_failed"]
        assert events(store, "fresh") == twice
        opened = store.history("fresh")[0]
        assert opened.owner is not None and opened.window_id is not None and opened.message == "m"
    finally:
        inbox.close()


def test_an_async_window_does_the_same_on_both_paths(store, path):
    async def main() -> None:
        async with async_maintenance_window(store, "demo", message="async"):
            assert store.effective("demo").message == "async"
        assert not store.get("demo").active
        with pytest.raises(Boom):
            async with async_maintenance_window(store, "demo"):
                raise Boom("async failure")

    asyncio.run(main())
    state = store.get("demo")
    assert state.active and state.error == "Boom: async failure"
    assert events(store) == ["window_opened", "window_committed", "window_opened", "window_failed"]


def test_create_tables_makes_the_functions_again_and_drop_tables_removes_them(store):
    made = functions_of(store)
    assert len(made) == 3 and {m.rsplit("_", 1)[0] for m in made} == {
        store.tables.state.name.removesuffix("state") + kind for kind in ("switch_on", "switch_off", "claim")
    }
    store.create_tables()
    assert functions_of(store) == made, "idempotent"

    without_server_functions(store)  # as tables made by Alembic, or by an older maintgate
    statements = Statements(store)
    store._functions.clear()  # this store forgets what it found, as a new process would
    sent = statements.during(lambda: open_and_close(store, "demo"))
    assert not [s for s in sent if "switch_o" in s], "without them: statements"
    store.create_tables()  # what the upgrade notes ask for
    assert functions_of(store) == made
    sent = statements.during(lambda: open_and_close(store, "demo"))
    assert len([s for s in sent if "switch_o" in s]) == 2, "and this store uses them at once"

    store.drop_tables()
    assert functions_of(store) == []
    store.create_tables()  # for the fixture's own drop


def test_functions_dropped_under_a_running_store_fall_back_to_statements(store):
    open_and_close(store, "demo")  # the store has found its functions
    without_server_functions(store)
    with maintenance_window(store, "demo") as conn:
        assert store.effective("demo") is not None
        conn.execute(text("SELECT 1"))
    assert not store.get("demo").active
    assert events(store) == ["window_opened", "window_committed"] * 2


def at_once(actions: list) -> list[BaseException]:
    """Run ``actions`` on as many threads, started together; the errors they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(actions))

    def run(action) -> None:
        start.wait()
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_stores_creating_the_tables_at_once_all_succeed(store):
    """Several processes deploying at once each run create_tables: the functions are made once."""
    prefix = store.tables.state.name.removesuffix("state")
    for _ in range(5):
        without_server_functions(store)
        stores = [MaintenanceStore(store.engine, table_prefix=prefix) for _ in range(4)]
        assert at_once([s.create_tables for s in stores]) == []
        assert len(functions_of(store)) == 3


def test_a_server_whose_default_isolation_is_stricter_gets_the_statements(store):
    """An autocommit call runs at the session's default isolation; under a snapshot, windows of
    different tenants would fail on the change counter. The function sees it and changes nothing,
    and the switch-on runs as statements in a READ COMMITTED transaction instead. (SERIALIZABLE
    migrations of different tenants can fail to serialize with each other whatever the switch-on
    does: the README says to run them again, as a rollout does.)"""
    options = r"-c default_transaction_isolation=repeatable\ read"
    engine = create_engine(store.engine.url, connect_args={"options": options}, pool_size=10)
    strict = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))

    def windows(worker: int) -> None:
        for i in range(15):
            with maintenance_window(strict, f"t{worker}-{i}") as conn:
                conn.execute(text("SELECT 1"))

    try:
        assert at_once([lambda w=w: windows(w) for w in range(8)]) == []
        states = [strict.get(f"t{w}-{i}") for w in range(8) for i in range(15)]
        assert all(s is not None and not s.active and s.window_id is None for s in states)
        assert all(events(strict, f"t{w}-0") == ["window_opened", "window_committed"] for w in range(8))
    finally:
        engine.dispose()


def test_a_switch_on_that_outlasts_its_lock_timeout_changes_nothing(store):
    """The function's transaction commits by itself: an error in it (here the row lock held past
    the switch-on's lock timeout) is a refusal, with nothing changed."""
    from maintgate import MaintgateError
    from maintgate.core import store as store_module

    store.activate("demo", message="operator")
    before, history = store.get("demo"), store.history("demo")
    with store.engine.connect() as holder:
        holder.execute(text(f"SELECT 1 FROM {store.tables.state.name} WHERE tenant = 'demo' FOR UPDATE"))
        started = datetime.now(UTC)
        with pytest.raises(MaintgateError, match="nothing changed"), maintenance_window(store, "demo"):
            pytest.fail("must not run")
        waited = datetime.now(UTC) - started
        holder.rollback()
    assert waited < timedelta(seconds=store_module.BOOKKEEPING_LOCK_TIMEOUT + 3)
    assert store.get("demo") == before and store.history("demo") == history


def test_a_rollout_does_the_same_on_both_paths(store, path, fleet):
    """The claim (a server function, or its statement) keeps plan order, the canary and the budget."""
    f = fleet(24)
    broken = {f.tenants[4], f.tenants[15]}
    report = rollout(
        store, "both", f.tenants, lambda c, t: f.migrate(c, t, broken), canary=3, max_failures=None
    )
    assert sorted(report.done) == sorted(set(f.tenants) - broken) and set(report.failed) == broken
    assert f.migrated() == dict.fromkeys(report.done, 1)
    assert all(store.get(t).active == (t in broken) for t in f.tenants)

    h = fleet(12)
    canary = rollout(store, "canary", h.tenants, lambda c, t: h.migrate(c, t, {h.tenants[1]}), canary=5)
    assert canary.stopped and "canary failed" in canary.stopped and set(canary.failed) == {h.tenants[1]}
    assert set(h.tenants[5:]) <= set(canary.not_started) and not any(store.get(t) for t in h.tenants[5:])

    g = fleet(12)
    order: list[str] = []

    def budget_migrate(conn, tenant: str) -> None:
        order.append(tenant)
        g.migrate(conn, tenant, set(g.tenants[:2]))

    spent = rollout(store, "budget", g.tenants, budget_migrate, max_failures=2, concurrency=1)
    assert order == g.tenants[:2], "plan order; no claim once the budget is spent"
    assert "failure budget" in spent.stopped and set(spent.failed) == set(g.tenants[:2])


def test_a_rollout_after_its_functions_are_dropped_claims_with_statements(store, fleet):
    f = fleet(10)
    first = rollout(store, "first", f.tenants[:5], f.migrate)
    without_server_functions(store)  # this store still thinks they are there
    second = rollout(store, "second", f.tenants[5:], f.migrate)
    assert len(first.done) == len(second.done) == 5 and f.migrated() == dict.fromkeys(f.tenants, 1)
