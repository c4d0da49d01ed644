"""PostgreSQL: the window's switch-on and switch-off as server functions that ``create_tables``
makes, and the statements that do the same where the functions are absent (tables made by
Alembic or an older maintgate), stricter isolation defaults, or dropped meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import ResourceClosedError

from maintgate import (
    MaintenanceStore,
    MaintgateError,
    Owner,
    WindowBusy,
    async_maintenance_window,
    maintenance_window,
    rollout,
)
from maintgate.core.state import READ_ONLY
from maintgate.core.store import state_fields, state_from_payload
from tests.helpers import Boom, bulk_tenants, events, state_rows_scanned, without_server_functions
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


def test_drop_tables_drops_its_own_functions_and_no_other_stores(store):
    """Names carry at most 32 characters of the prefix: two stores whose prefixes share them
    must not drop each other's functions."""
    long = "x" * 32
    a = MaintenanceStore(store.engine, table_prefix=f"{long}a_")
    b = MaintenanceStore(store.engine, table_prefix=f"{long}b_")
    a.create_tables()
    b.create_tables()
    try:

        def ours() -> list[str]:
            with store.engine.connect() as conn:
                found = conn.execute(
                    text("SELECT proname FROM pg_proc WHERE starts_with(proname, :p)"), {"p": long}
                )
                return list(found.scalars())

        assert len(ours()) == 6, "three each, named apart by their digests"
        with maintenance_window(b, "t1") as conn:
            a.drop_tables()
            conn.execute(text(f"CREATE TABLE {long[:20]}_lock (id INTEGER)"))  # a new lock: fresh catalog
        assert not b.get("t1").active and len(ours()) == 3
    finally:
        a.drop_tables()
        b.drop_tables()
        with store.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {long[:20]}_lock"))


def test_a_role_that_may_not_execute_the_functions_gets_the_statements(store, fleet):
    """A hardened database revokes EXECUTE from PUBLIC: windows and rollouts of a role that may
    write the tables but not call the functions run as statements, not refused."""
    role = f"mgrole{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))
        for name in functions_of(store):
            conn.execute(text(f"REVOKE EXECUTE ON FUNCTION {name} FROM PUBLIC"))
    f = fleet(4)
    engine = create_engine(store.engine.url.set(username=role))
    try:
        limited = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
        with maintenance_window(limited, "t1") as conn:
            assert limited.effective("t1") is not None
            conn.execute(text("SELECT 1"))
        assert not limited.get("t1").active and events(limited, "t1") == ["window_opened", "window_committed"]
        with store.engine.begin() as conn:
            for tenant in f.tenants:
                conn.execute(text(f"ALTER TABLE contacts_{tenant} OWNER TO {role}"))
                conn.execute(text(f"GRANT ALL ON {f.log} TO {role}"))
        report = rollout(limited, "limited", f.tenants, f.migrate)
        assert sorted(report.done) == f.tenants and report.failed == {}
    finally:
        engine.dispose()
        with store.engine.begin() as conn:
            for tenant in f.tenants:
                conn.execute(text(f"ALTER TABLE contacts_{tenant} OWNER TO postgres"))
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))


def test_the_functions_pass_plpgsqls_strict_checks(store, fleet):
    """``plpgsql.extra_errors = all`` (any session may set it) turns sloppy assignments into errors."""
    options = "-c plpgsql.extra_errors=all -c plpgsql.extra_warnings=all"
    engine = create_engine(store.engine.url, connect_args={"options": options})
    strict = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    f = fleet(3)
    statements = Statements(strict)
    try:
        sent = statements.during(lambda: open_and_close(strict, "t1"))
        assert len([s for s in sent if "switch_o" in s]) == 2
        with pytest.raises(Boom), maintenance_window(strict, "t2"):
            raise Boom("no")
        report = rollout(strict, "strict", f.tenants, f.migrate, canary=1, max_failures=2)
        assert sorted(report.done) == f.tenants
        assert events(strict, "t2") == ["window_opened", "window_failed"]
    finally:
        engine.dispose()


def test_a_value_too_long_for_its_column_is_refused_on_both_paths(store, path):
    """Arguments are not cut to their column's length on the way into a function."""
    with pytest.raises(MaintgateError, match=r"nothing changed.*too long"):
        store.open_window("demo", Owner("h" * 300, 1), window_id="w" * 40)
    assert store.get("demo") is None and store.history("demo") == []


@pytest.mark.parametrize(
    "schema", ["Mixed Case", "colon :name", "per%cent", "dollar$maintgate$quote", 'quo"te']
)
def test_schemas_with_odd_names(store, fleet, schema):
    """A quoted schema name may hold what SQL text, bound parameters and dollar quotes use."""
    quoted = store.engine.dialect.identifier_preparer.quote(schema)  # % doubled, as the driver reads it
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {quoted}")
    odd = MaintenanceStore(store.engine, table_prefix="odd_", schema=schema)
    try:
        odd.create_tables()
        with maintenance_window(odd, "t1") as conn:
            assert odd.effective("t1") is not None
            conn.execute(text("SELECT 1"))
        assert not odd.get("t1").active
        report = rollout(odd, "odd", ["t2", "t3"], lambda conn, tenant: None)
        assert sorted(report.done) == ["t2", "t3"]
        in_schema = text(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = :s"
        )
        with odd.engine.connect() as conn:
            assert conn.execute(in_schema, {"s": schema}).scalar() == 3
        odd.drop_tables()
        with odd.engine.connect() as conn:
            assert conn.execute(in_schema, {"s": schema}).scalar() == 0
    finally:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {quoted} CASCADE")


def test_functions_dropped_while_a_window_runs_fail_that_window_only(store, fleet):
    """The switch-off's call is in the migration's transaction: if its function is dropped
    meanwhile, the window fails (not migrated, maintenance on, error recorded) and the next
    windows switch on and off with statements. (Only a hand-written DROP does this: drop_tables
    drops the tables too.)"""
    f = fleet(3)
    first, second = f.tenants[0], f.tenants[1]
    with pytest.raises(Exception, match="does not exist"), maintenance_window(store, first) as conn:
        f.migrate(conn, first)
        without_server_functions(store)
    state = store.get(first)
    assert state.active and state.window_id is None and "does not exist" in state.error
    assert not f.renamed(first) and f.migrated() == {}
    with maintenance_window(store, second) as conn:
        f.migrate(conn, second)
    assert not store.get(second).active and f.migrated() == {second: 1}


def plan_rows(store: MaintenanceStore, name: str) -> dict[str, tuple[str, int, str | None]]:
    """Each tenant of rollout ``name``: (status, attempts, runner)."""
    rt = store.tables.rollout_tenant
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(f"SELECT tenant, status, attempts, runner FROM {rt.name} WHERE name = :n"), {"n": name}
        ).all()
    return {tenant: (status, attempts, runner) for tenant, status, attempts, runner in rows}


def test_a_rollouts_window_claims_the_next_tenant_with_its_switch_off(store, fleet):
    """One window at a time: each switch-off claims the next tenant in the same call, so the
    claim's own call runs for the first tenant and to find that nothing is left, in plan order."""
    f = fleet(30)
    order: list[str] = []
    statements = Statements(store)

    def migrate(conn, tenant: str) -> None:
        order.append(tenant)
        f.migrate(conn, tenant)

    sent = statements.during(lambda: rollout(store, "ahead", f.tenants, migrate, concurrency=1))
    claims = [s for s in sent if "_claim_" in s or "rollout_tenant SET status" in s]
    assert len(claims) <= 3, claims  # the first looks for expired claims, then pending; the last finds none
    assert order == f.tenants and f.migrated() == dict.fromkeys(f.tenants, 1)
    assert {(status, attempts) for status, attempts, _ in plan_rows(store, "ahead").values()} == {("done", 1)}


def test_a_tenant_claimed_ahead_of_a_stop_is_given_back(store, fleet):
    """A stop while a window runs: that window's switch-off has claimed the next tenant, which the
    runner gives back untouched (pending, no attempt counted) rather than run or hold until its
    lease runs out; the rollout resumes with it."""
    f = fleet(8)
    stop = threading.Event()
    first = rollout(
        store, "given-back", f.tenants, f.stopping_after(f.tenants[2], stop), stop=stop, concurrency=1
    )
    assert first.done == tuple(f.tenants[:3]) and first.not_started == tuple(f.tenants[3:])
    rows = plan_rows(store, "given-back")
    assert rows[f.tenants[3]] == ("pending", 0, None), rows
    assert store.get(f.tenants[3]) is None
    second = rollout(store, "given-back", f.tenants, f.migrate, concurrency=1)
    assert second.done == tuple(f.tenants[3:]) and f.migrated() == dict.fromkeys(f.tenants, 1)
    assert all(attempts == 1 for _, attempts, _ in plan_rows(store, "given-back").values())


def test_a_dead_runners_tenant_is_taken_over_while_switch_offs_claim(store, fleet):
    """Claims folded into the switch-offs still look for a crashed runner's expired claims now
    and then: its tenant is taken over within about a second, not when the plan runs out."""
    f = fleet(80)
    rt = store.tables.rollout_tenant.name
    dead = f.tenants[-1]
    order: list[str] = []

    def migrate(conn, tenant: str) -> None:
        order.append(tenant)
        if len(order) == 3:  # a runner claimed the last tenant and died
            with store.engine.begin() as other:
                other.execute(
                    text(
                        f"UPDATE {rt} SET status = 'running', runner = 'dead:1:x', attempts = 1, "
                        "lease_until = now() - interval '1 second' WHERE name = 'dead' AND tenant = :t"
                    ),
                    {"t": dead},
                )
        time.sleep(0.05)
        f.migrate(conn, tenant)

    report = rollout(store, "dead", f.tenants, migrate, concurrency=1, lease=3.0)
    assert report.complete and f.migrated() == dict.fromkeys(f.tenants, 1)
    assert order.index(dead) < 60, f"taken over as tenant {order.index(dead)} of 80"
    assert plan_rows(store, "dead")[dead][:2] == ("done", 2)


def test_runners_on_a_server_defaulting_to_repeatable_read_claim_without_failing(store, fleet, path):
    """Claims of runners sharing a plan each update a row another may have just taken: under a
    snapshot that is a serialization failure, which ended the runner. They claim in READ
    COMMITTED, as the rollout's windows run (which claim with their switch-offs). Three runners
    of four windows: each tenant migrated once, at its first attempt."""
    options = r"-c default_transaction_isolation=repeatable\ read"
    engine = create_engine(store.engine.url, connect_args={"options": options}, pool_size=20)
    strict = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    if path == "statements":
        without_server_functions(strict)
    f = fleet(150)
    try:
        assert at_once([lambda: rollout(strict, "rr", f.tenants, f.migrate, concurrency=4)] * 3) == []
        assert f.migrated() == dict.fromkeys(f.tenants, 1)
        rows = plan_rows(store, "rr").values()
        assert {(status, attempts) for status, attempts, _ in rows} == {("done", 1)}, "nothing ran twice"
        if path == "functions":  # dropped while this store thinks they are there: statements
            without_server_functions(strict)
            g = fleet(5)
            assert rollout(strict, "rr-dropped", g.tenants, g.migrate).complete
            assert g.migrated() == dict.fromkeys(g.tenants, 1)
    finally:
        engine.dispose()


def test_a_switch_on_reads_no_more_rows_with_100000_tenants_before_the_table_is_analyzed(store, path):
    """The switch-on gives the rows left PENDING a change number: found through the version index
    whatever the statistics say. Right after a restore or a bulk import (no statistics yet) it
    read the whole state table twice per window (23 ms each with 100,000 tenants here)."""
    bulk_tenants(store, 100_000)
    before = state_rows_scanned(store)
    for i in range(10):
        with maintenance_window(store, f"t{i}") as conn:
            conn.execute(text("SELECT 1"))
    assert store.get("t9").active is False
    assert state_rows_scanned(store) - before < 100_000, "a window scanned the whole state table"


def test_a_dead_runners_tenant_claimed_ahead_of_a_stop_is_given_back_for_take_over(store, fleet):
    """A switch-off took over a dead runner's expired claim (its window may have opened: the
    tenant may be in maintenance), then the runner was stopped: the tenant goes back as an expired claim,
    which the next run takes over, not as pending (never started), which a run whose list leaves
    it out would drop, in maintenance for good."""
    f = fleet(6)
    rt = store.tables.rollout_tenant.name
    dead = f.tenants[-1]
    stop = threading.Event()
    order: list[str] = []

    def migrate(conn, tenant: str) -> None:
        order.append(tenant)
        if len(order) == 1:  # the claim of a runner that died
            with store.engine.begin() as other:
                other.execute(
                    text(
                        f"UPDATE {rt} SET status = 'running', runner = 'dead:1:x', attempts = 1, "
                        "lease_until = now() - interval '1 second' WHERE name = 'back' AND tenant = :t"
                    ),
                    {"t": dead},
                )
            time.sleep(1.1)  # past the next look for expired claims (lease / 3 = 1 s)
        if len(order) == 2:
            stop.set()
        f.migrate(conn, tenant)

    first = rollout(store, "back", f.tenants, migrate, concurrency=1, lease=3.0, stop=stop)
    assert first.done == tuple(f.tenants[:2])
    status, attempts, runner = plan_rows(store, "back")[dead]
    assert (status, attempts, runner) == ("running", 1, None), "given back as the expired claim it was"
    assert f.tenants[2] in first.not_started
    without = rollout(store, "back", f.tenants[:-1], f.migrate, concurrency=1, lease=3.0)
    assert dead not in without.dropped
    assert plan_rows(store, "back")[dead][0] == "done" and not store.get(dead).active
    assert f.migrated() == dict.fromkeys(f.tenants, 1)


def test_a_rollouts_long_migrations_finish_on_a_server_defaulting_to_repeatable_read(store, fleet, path):
    """The runner renews its claims every lease / 3 while their windows run; under a snapshot the
    window's done mark then failed to serialize with that renewal, so every migration longer
    than that failed, ten times over. A rollout's windows run in READ COMMITTED."""
    options = r"-c default_transaction_isolation=repeatable\ read"
    engine = create_engine(store.engine.url, connect_args={"options": options}, pool_size=10)
    strict = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    f = fleet(2)

    def slow(conn, tenant: str) -> None:
        time.sleep(1.3)  # past the first renewal (lease 3 s: every second)
        f.migrate(conn, tenant)

    try:
        report = rollout(strict, "long", f.tenants, slow, concurrency=2, lease=3.0, max_failures=None)
        assert report.failed == {} and sorted(report.done) == f.tenants
        assert {(status, attempts) for status, attempts, _ in plan_rows(store, "long").values()} == {
            ("done", 1)
        }
        assert f.migrated() == dict.fromkeys(f.tenants, 1)
    finally:
        engine.dispose()


class RoundTrips:
    """The messages a store's connections send that the client then waits on (a simple Query, or
    the Sync ending an extended-protocol exchange), read from libpq's trace of each checkout."""

    def __init__(self, store: MaintenanceStore, path) -> None:
        self.file = open(path, "w+")  # noqa: SIM115
        event.listen(store.engine, "checkout", self._trace)
        event.listen(store.engine, "checkin", self._untrace)

    def _trace(self, dbapi_connection, record, proxy) -> None:
        dbapi_connection.pgconn.trace(self.file.fileno())

    def _untrace(self, dbapi_connection, record) -> None:
        if dbapi_connection is not None and not dbapi_connection.closed:
            dbapi_connection.pgconn.untrace()

    def close(self, store: MaintenanceStore) -> None:
        event.remove(store.engine, "checkout", self._trace)
        event.remove(store.engine, "checkin", self._untrace)
        store.engine.dispose()
        self.file.close()

    def during(self, action) -> list[str]:
        self.file.flush()
        start = self.file.seek(0, 2)
        action()
        self.file.flush()
        self.file.seek(start)
        sent = [line.split("\t") for line in self.file.read().splitlines()]
        return [
            f[4][:60] if f[3] == "Query" else f[3]
            for f in sent
            if len(f) > 3 and f[1] == "F" and f[3] in ("Query", "Sync")
        ]


def test_a_window_takes_one_round_trip_more_than_a_plain_transaction(store, tmp_path):
    """The switch-on's call, its commit, the migration's BEGIN and its lock go as one message;
    the switch-off as one more, before the COMMIT a plain transaction sends too."""
    with maintenance_window(store, "warm"):
        pass
    trips = RoundTrips(store, tmp_path / "trace")

    def plain() -> None:
        with store.engine.begin() as conn:
            conn.execute(text("SELECT 1"))

    def window() -> None:
        with maintenance_window(store, "demo") as conn:
            conn.execute(text("SELECT 1"))

    try:
        bare, windowed = trips.during(plain), trips.during(window)
    finally:
        trips.close(store)
    assert len(windowed) == len(bare) + 1, (bare, windowed)
    assert store.get("demo") is not None and not store.get("demo").active
    assert events(store) == ["window_opened", "window_committed"]


@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_the_migrations_transaction_runs_at_the_engines_level_and_sees_the_switch_on(store, level):
    engine = create_engine(store.engine.url, isolation_level=level)
    strict = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    try:
        with maintenance_window(strict, "demo") as conn:
            assert (
                conn.execute(text("SELECT current_setting('transaction_isolation')")).scalar()
                == level.lower()
            )
            seen = conn.execute(text(f"SELECT active FROM {store.tables.state.name} WHERE tenant = 'demo'"))
            assert seen.scalar() is True
        assert not strict.get("demo").active
    finally:
        engine.dispose()


@pytest.fixture
def probe(store) -> Iterator[str]:
    """A table for a test's rows, on the store's database."""
    table = f"{store.tables.state.name}_probe"
    with store.engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (v TEXT)"))
    yield table
    with store.engine.begin() as conn:
        conn.execute(text(f"DROP TABLE {table}"))


@pytest.fixture
def pooled(store) -> Iterator[MaintenanceStore]:
    """A store on the same tables over an engine of two pooled connections."""
    engine = create_engine(store.engine.url, pool_size=2, max_overflow=0)
    yield MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    engine.dispose()


def assert_pool_runs_transactions(store: MaintenanceStore, table: str) -> None:
    """Every connection of ``store``'s two-connection pool runs transactions: a rolled-back insert is gone."""
    with store.engine.connect() as first, store.engine.connect() as second:
        for conn in (first, second):
            conn.execute(text(f"INSERT INTO {table} VALUES ('must roll back')"))
            conn.rollback()
        assert first.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0


def test_the_pools_connections_stay_transactional_after_windows_of_every_outcome(pooled, probe):
    """The opening leaves the driver in autocommit for the window's transaction: after windows that
    commit, fail, are refused as busy or end their own transaction, every connection of the pool
    still runs transactions."""
    from maintgate import WindowLost

    with maintenance_window(pooled, "ok") as conn:
        conn.execute(text("SELECT 1"))
    with pytest.raises(Boom), maintenance_window(pooled, "boom"):
        raise Boom("inside")
    with maintenance_window(pooled, "held"), pytest.raises(WindowBusy), maintenance_window(pooled, "held"):
        pytest.fail("must not run")
    with pytest.raises(WindowLost), maintenance_window(pooled, "ends") as conn:
        conn.commit()
    assert_pool_runs_transactions(pooled, probe)
    active = [bool(pooled.get(t).active) for t in ("ok", "boom", "held", "ends")]
    assert active == [False, True, False, True]


def test_a_begin_listeners_set_local_scopes_the_migrations_transaction(store):
    """Helper's finding: an engine's "begin" listener that scopes each transaction (schema per
    tenant, SET LOCAL) must run in the migration's transaction, not before the opening, in
    autocommit, where it does nothing."""
    schema = f"tenant_{uuid.uuid4().hex[:8]}"
    engine = create_engine(store.engine.url)

    @event.listens_for(engine, "begin")
    def scoped(conn) -> None:
        conn.exec_driver_sql(f"SET LOCAL search_path TO {schema}, public")
        conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")

    scoping = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    with store.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        with maintenance_window(scoping, "acme") as conn:
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "2s"
            conn.exec_driver_sql("CREATE TABLE invoices (id int)")
        with store.engine.connect() as conn:
            found = conn.execute(
                text("SELECT table_schema FROM information_schema.tables WHERE table_name = 'invoices'")
            )
            assert found.scalars().all() == [schema]
        assert not scoping.get("acme").active
    finally:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        engine.dispose()


def test_a_window_whose_connection_is_closed_in_its_block_leaves_the_pool_transactional(pooled, probe):
    """Helper's finding: closing the yielded connection inside the block (a helper's `with conn:`)
    hands it back to the pool mid-window; it must not stay there in autocommit, where an app's
    rolled-back transaction would have committed."""
    with pytest.raises(ResourceClosedError), maintenance_window(pooled, "acme") as conn, conn:
        conn.execute(text("SELECT 1"))
    assert pooled.get("acme").active and pooled.get("acme").error
    assert_pool_runs_transactions(pooled, probe)


@pytest.mark.parametrize("then", ["SQLAlchemy", "psycopg", "COPY"])
@pytest.mark.parametrize("end", ["commit", "rollback", "raw COMMIT"])
def test_work_after_the_work_ended_the_windows_transaction_is_rolled_back_with_the_window(
    store, probe, end, then
):
    """Helper's finding: after the work commits or rolls back the window's transaction, what it
    runs next is in a new transaction, which the failed window rolls back (not statement by
    statement committed), whether sent through SQLAlchemy or psycopg."""
    from maintgate import WindowLost

    with pytest.raises(WindowLost), maintenance_window(store, "acme") as conn:
        if end == "raw COMMIT":
            conn.exec_driver_sql("COMMIT")
        else:
            getattr(conn, end)()
        driver = conn.connection.driver_connection
        if then == "SQLAlchemy":
            conn.execute(text(f"INSERT INTO {probe} VALUES ('after the end')"))
        elif then == "psycopg":
            driver.execute(f"INSERT INTO {probe} VALUES ('after the end')")
        else:
            with driver.cursor().copy(f"COPY {probe} (v) FROM STDIN") as copy:
                copy.write_row(["after the end"])
    with store.engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {probe}")).scalar() == 0
    assert store.get("acme").active and "WindowLost" in store.get("acme").error


def test_a_window_joined_on_an_owned_windows_connection_runs_in_its_transaction(store):
    """Helper's finding: a joined window inside an owned one, on its connection, was refused as if
    the connection autocommitted; both commit together, as before."""
    with maintenance_window(store, "a") as conn, maintenance_window(store, "b", connection=conn):
        conn.execute(text("SELECT 1"))
    assert not store.get("a").active and not store.get("b").active
    assert events(store, "b") == ["window_opened", "window_committed"]


def test_a_window_whose_connection_is_detached_commits(store, probe):
    """Helper's finding: detaching the window's connection from the pool (to keep a session setting
    out of it) is no reason to fail the window."""
    with maintenance_window(store, "acme") as conn:
        conn.execute(text(f"INSERT INTO {probe} VALUES ('x')"))
        conn.detach()
        conn.execute(text(f"INSERT INTO {probe} VALUES ('y')"))
    with store.engine.connect() as conn:
        assert conn.execute(text(f"SELECT v FROM {probe} ORDER BY v")).scalars().all() == ["x", "y"]
    assert not store.get("acme").active


def test_a_store_made_inside_an_engines_pool_event_breaks_nothing(store):
    """Helper's finding: SQLAlchemy walks a pool's listeners in a list that adding to breaks; a store
    made while the engine is busy (here, inside its own checkin event) must not add to it then,
    and its windows still work (their opening in three round trips)."""
    engine = create_engine(store.engine.url)
    made: list[MaintenanceStore] = []

    @event.listens_for(engine, "checkin")
    def app_listener(dbapi_connection, record) -> None:
        if not made:
            made.append(MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state")))

    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert made and engine.pool.checkedout() == 0
        with maintenance_window(made[0], "acme") as conn:
            conn.execute(text("SELECT 1"))
        assert not made[0].get("acme").active and engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_a_busy_engines_window_closed_in_its_block_leaves_the_pool_at_the_engines_level(store, fleet):
    """Third helper's finding: on an engine busy when the store was made (no pool listener), a
    rollout window whose migration closes its connection must still put back what it changed on
    the driver: the engine's isolation level above all."""
    engine = create_engine(store.engine.url, isolation_level="REPEATABLE READ", pool_size=3, max_overflow=0)
    with engine.connect():  # busy: the store adds no listener to its pool
        busy = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    f = fleet(2)

    def migrate(conn, tenant: str) -> None:
        f.migrate(conn, tenant)
        conn.close()

    try:
        report = rollout(busy, "busy-close", f.tenants, migrate, concurrency=1, max_failures=None)
        assert set(report.failed) == set(f.tenants)
        with engine.connect() as first, engine.connect() as second, engine.connect() as third:
            level = text("SELECT current_setting('transaction_isolation')")
            levels = {c.execute(level).scalar() for c in (first, second, third)}
        assert levels == {"repeatable read"}
    finally:
        engine.dispose()


def test_a_cursor_factory_function_keeps_work_after_the_windows_end_in_a_transaction(store, probe):
    """Third helper's finding: with a cursor factory that is a function (psycopg takes any
    callable), there is no cursor class to begin a transaction again: the window opens in three
    round trips, and work after the work ended its transaction is rolled back with it."""
    import psycopg

    from maintgate import WindowLost

    def factory(conn, *args, **kwargs):
        return psycopg.Cursor(conn, *args, **kwargs)

    engine = create_engine(store.engine.url, connect_args={"cursor_factory": factory})
    made = MaintenanceStore(engine, table_prefix=store.tables.state.name.removesuffix("state"))
    try:
        with pytest.raises(WindowLost), maintenance_window(made, "acme") as conn:
            conn.commit()
            conn.execute(text(f"INSERT INTO {probe} VALUES ('after the end')"))
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT count(*) FROM {probe}")).scalar() == 0
    finally:
        engine.dispose()
