"""Fleet rollout: one migration across many tenants, each in its own window (issue 12)."""

from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import text

from maintgate import MaintenanceStore
from maintgate.rollout import RolloutBusy, rollout, rollout_status, stop_rollout


class Fleet:
    """Per-tenant tables (``contacts_<tenant>``) with the incident's column, and a log of migrations
    written in each migration's own transaction: it says how many times each tenant was migrated."""

    def __init__(self, store: MaintenanceStore, count: int) -> None:
        self.store = store
        self.tag = uuid.uuid4().hex[:6]
        self.tenants = [f"t{self.tag}{i:04d}" for i in range(count)]
        self.log = f"migrated_{self.tag}"
        with store.engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {self.log} (tenant VARCHAR(64) NOT NULL)"))
            for tenant in self.tenants:
                conn.execute(text(f'CREATE TABLE contacts_{tenant} (id INTEGER, "primary-email" TEXT)'))

    def migrate(self, conn, tenant: str, fail: set[str] = frozenset()) -> None:
        conn.execute(
            text(f'ALTER TABLE contacts_{tenant} RENAME COLUMN "primary-email" TO "main-email-contact"')
        )
        conn.execute(text(f"INSERT INTO {self.log} (tenant) VALUES (:t)"), {"t": tenant})
        if tenant in fail:
            raise RuntimeError(f"{tenant}: NOT NULL constraint failed")

    def migrated(self) -> dict[str, int]:
        with self.store.engine.connect() as conn:
            rows = conn.execute(text(f"SELECT tenant, COUNT(*) FROM {self.log} GROUP BY tenant")).all()
        return {tenant: int(count) for tenant, count in rows}

    def renamed(self, tenant: str) -> bool:
        with self.store.engine.connect() as conn:
            columns = conn.execute(text(f"SELECT * FROM contacts_{tenant} WHERE 1 = 0")).keys()
        return "main-email-contact" in columns

    def drop(self) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {self.log}"))
            for tenant in self.tenants:
                conn.execute(text(f"DROP TABLE IF EXISTS contacts_{tenant}"))


@pytest.fixture
def fleet(store):
    made: list[Fleet] = []

    def build(count: int) -> Fleet:
        made.append(Fleet(store, count))
        return made[-1]

    yield build
    for f in made:
        f.drop()


def test_200_tenants_where_3_fail_end_197_migrated_and_serving_3_in_maintenance(store, fleet):
    f = fleet(200)
    broken = {f.tenants[7], f.tenants[100], f.tenants[199]}
    report = rollout(
        store, "rename-email", f.tenants, lambda c, t: f.migrate(c, t, broken), max_failures=None
    )
    assert sorted(report.done) == sorted(set(f.tenants) - broken)
    assert set(report.failed) == broken and all("NOT NULL" in e for e in report.failed.values())
    assert report.not_started == () and report.stopped is None
    assert f.migrated() == dict.fromkeys(report.done, 1), (
        "each done tenant migrated once; failures rolled back"
    )
    for tenant in f.tenants:
        state = store.get(tenant)
        if tenant in broken:
            assert state.active and "NOT NULL" in state.error and not f.renamed(tenant)
        else:
            assert not state.active and f.renamed(tenant)
    status = rollout_status(store, "rename-email")
    assert (status["done"], status["failed"], status["pending"]) == (197, 3, 0)
    assert {x["tenant"] for x in status["failures"]} == broken

    again = rollout(store, "rename-email", f.tenants, f.migrate, retry_failed=True)
    assert sorted(again.done) == sorted(broken) and len(again.skipped) == 197 and again.complete
    assert f.migrated() == dict.fromkeys(f.tenants, 1)
    assert not any(store.get(t).active for t in f.tenants)


def test_a_canary_failure_stops_the_rollout_and_leaves_the_fleet_untouched(store, fleet):
    f = fleet(30)
    report = rollout(
        store, "canary", f.tenants, lambda c, t: f.migrate(c, t, {f.tenants[2]}), canary=5, concurrency=2
    )
    assert report.stopped and "canary failed" in report.stopped and f.tenants[2] in report.stopped
    assert set(report.done) <= set(f.tenants[:5]) and set(report.failed) == {f.tenants[2]}
    untouched = f.tenants[5:]
    assert set(untouched) <= set(report.not_started)
    assert not any(f.renamed(t) or store.get(t) for t in untouched), "never started: serving, no window"


def test_the_failure_budget_stops_claiming_and_says_why(store, fleet):
    f = fleet(20)
    broken = set(f.tenants[::3])
    report = rollout(
        store, "budget", f.tenants, lambda c, t: f.migrate(c, t, broken), max_failures=2, concurrency=1
    )
    assert len(report.failed) == 2 and report.stopped and "failure budget" in report.stopped
    assert report.not_started and not any(store.get(t) for t in report.not_started)
    first_stop = rollout(store, "budget", f.tenants, f.migrate, max_failures=2)
    assert first_stop.done == () and "failure budget" in first_stop.stopped, "a spent budget stays spent"


def test_a_stopped_rollout_resumes_where_it_stopped(store, fleet):
    f = fleet(40)
    stop = threading.Event()

    def migrate(conn, tenant):
        f.migrate(conn, tenant)
        if tenant == f.tenants[9]:
            stop.set()  # as Ctrl-C or `maintgate rollout stop` would

    first = rollout(store, "resume", f.tenants, migrate, stop=stop, concurrency=1)
    assert first.stopped and len(first.done) == 10 and len(first.not_started) == 30
    second = rollout(store, "resume", f.tenants, f.migrate)
    assert sorted(second.skipped) == sorted(first.done) and len(second.done) == 30 and second.complete
    assert f.migrated() == dict.fromkeys(f.tenants, 1)
    assert stop_rollout(store, "resume") and not stop_rollout(store, "no-such-rollout")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_runs_one_runner_at_a_time_and_says_so(store, fleet):
    f = fleet(3)
    inside, release = threading.Event(), threading.Event()
    done: list[object] = []

    def slow(conn, tenant):
        inside.set()
        release.wait(10)
        f.migrate(conn, tenant)

    first = threading.Thread(target=lambda: done.append(rollout(store, "solo", f.tenants, slow)))
    first.start()
    try:
        assert inside.wait(10)
        with pytest.raises(RolloutBusy, match="one runner"):
            rollout(store, "solo", f.tenants, f.migrate)
    finally:
        release.set()
        first.join(30)
    assert done and done[0].complete
