"""The window and the gate behind a real PgBouncer in transaction pooling mode (2 server connections).

Each test reproduces what was measured through PgBouncer 1.18: prepared statements failing windows,
two windows on one tenant at once, locks outliving a killed window, notifications silently lost.
"""

from __future__ import annotations

import itertools
import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from maintgate import MaintenanceStore, WindowBusy, WSGIMaintenanceMiddleware, maintenance_window
from maintgate.tenants import from_header
from tests.conftest import POSTGRES_URL, wsgi_call
from tests.helpers import elsewhere, eventually

pytest_plugins = ["tests.pgbouncer"]


@pytest.fixture
def bounced(pgbouncer_url):
    """A store whose engine goes through PgBouncer; tables made directly on PostgreSQL."""
    prefix = f"mg{uuid.uuid4().hex[:10]}_"
    direct = MaintenanceStore(POSTGRES_URL, table_prefix=prefix)
    direct.create_tables()
    store = MaintenanceStore(pgbouncer_url, table_prefix=prefix)
    yield store
    store.engine.dispose()
    direct.drop_tables()
    direct.engine.dispose()


class Background:
    """Light traffic through the bouncer from other clients, so that server connections change hands."""

    def __init__(self, url: str, prefix: str) -> None:
        self.store = MaintenanceStore(url, table_prefix=prefix)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                self.store.activate("other", message=f"busy {n}")
                self.store.lookup("someone")
                self.store.deactivate("other")
            except Exception as exc:  # reported by the test
                self.errors.append(exc)
            time.sleep(0.005)

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.store.engine.dispose()


def test_sequential_windows_all_succeed_even_on_the_users_own_engine(bounced, pgbouncer_url):
    """The user's engine has psycopg's default prepared statements: the window must not trip on them."""
    engine = create_engine(pgbouncer_url)  # no prepare_threshold=None: as a user would write it
    store = MaintenanceStore(engine, table_prefix=bounced.tables.state.name.removesuffix("state"))
    table = f"counter_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (n INTEGER NOT NULL)"))
        conn.execute(text(f"INSERT INTO {table} VALUES (0)"))
    try:
        with Background(pgbouncer_url, bounced.tables.state.name.removesuffix("state")) as background:
            for _ in range(40):
                with maintenance_window(store, "demo") as conn:
                    conn.execute(text(f"UPDATE {table} SET n = n + 1"))
        assert not background.errors, background.errors[:3]
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT n FROM {table}")).scalar() == 40
        assert not store.get("demo").active
        assert [e.event for e in store.history("demo", limit=80)].count("window_committed") == 40
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {table}"))
        engine.dispose()


def test_two_windows_on_one_tenant_never_overlap(bounced, pgbouncer_url):
    spans: list[tuple[float, float]] = []
    busy = 0
    lock = threading.Lock()

    def attempt(barrier: threading.Barrier) -> None:
        nonlocal busy
        barrier.wait()
        try:
            with maintenance_window(bounced, "demo"):
                start = time.monotonic()
                time.sleep(0.05)
                end = time.monotonic()
            with lock:
                spans.append((start, end))
        except WindowBusy:
            with lock:
                busy += 1

    with Background(pgbouncer_url, bounced.tables.state.name.removesuffix("state")):
        for _ in range(20):
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=attempt, args=(barrier,)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), "two windows overlapped"
    assert len(spans) + busy == 40 and len(spans) >= 20


HOLDER = textwrap.dedent(
    """
    import sys, time
    from maintgate import MaintenanceStore, maintenance_window
    store = MaintenanceStore(sys.argv[1], table_prefix=sys.argv[2])
    with maintenance_window(store, "demo"):
        print("open", flush=True)
        time.sleep(120)
    """
)


def test_a_killed_window_frees_the_tenant_at_once(bounced, pgbouncer_url):
    prefix = bounced.tables.state.name.removesuffix("state")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, pgbouncer_url, prefix], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "open"
        assert bounced.window_alive(bounced.get("demo")) is True
        with pytest.raises(WindowBusy), maintenance_window(bounced, "demo"):
            pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    assert eventually(lambda: bounced.window_alive(bounced.get("demo")) is False, 10)
    with maintenance_window(bounced, "demo"):
        pass
    assert not bounced.get("demo").active


def _ok(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_the_gate_works_and_says_plainly_that_notifications_need_a_direct_connection(
    bounced, pgbouncer_url, caplog
):
    app = WSGIMaintenanceMiddleware(_ok, bounced, tenant=from_header("X-Tenant-ID"), cache_ttl=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="maintgate"):
            assert wsgi_call(app, "demo") == 200
            elsewhere(bounced).activate("demo")  # another process: only a refresh can tell
            assert eventually(lambda: wsgi_call(app, "demo") == 503, 3), "reads work through the bouncer"
            assert eventually(
                lambda: any(
                    getattr(r, "maintgate_event", "") == "notifications_unavailable" for r in caplog.records
                ),
                5,
            )
        warning = next(
            r for r in caplog.records if getattr(r, "maintgate_event", "") == "notifications_unavailable"
        )
        assert "listen_url" in warning.getMessage() and "PgBouncer" in warning.getMessage()
        assert not app.gate.notifications_live
    finally:
        app.gate.close()


def test_a_direct_listen_url_brings_notifications_back(bounced, pgbouncer_url):
    store = MaintenanceStore(
        pgbouncer_url, table_prefix=bounced.tables.state.name.removesuffix("state"), listen_url=POSTGRES_URL
    )
    app = WSGIMaintenanceMiddleware(_ok, store, tenant=from_header("X-Tenant-ID"), cache_ttl=60)
    try:
        assert wsgi_call(app, "demo") == 200
        assert eventually(lambda: app.gate.notifications_live, 5)
        elsewhere(store).activate("demo")  # another process: only the notification can tell
        assert eventually(lambda: wsgi_call(app, "demo") == 503, 2), "seen at once despite a 60 s TTL"
    finally:
        app.gate.close()
        store.engine.dispose()


def test_writes_under_background_reads_never_meet_a_prepared_statement(bounced, pgbouncer_url):
    """psycopg prepares a statement after five runs; PgBouncer's transaction pooling then hands
    the next transaction another server, where it does not exist. Engines the store builds
    prepare nothing."""
    apps = [
        WSGIMaintenanceMiddleware(_ok, bounced, tenant=from_header("X-Tenant-ID"), cache_ttl=ttl)
        for ttl in (0.02, 0.03, 0.05)
    ]
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic(app):
        while not stop.is_set():
            try:
                wsgi_call(app, "demo")
            except BaseException as exc:  # reported below
                errors.append(exc)

    threads = [threading.Thread(target=traffic, args=(app,)) for app in apps]
    for t in threads:
        t.start()
    try:
        for _ in range(30):
            bounced.activate("demo", message="m")
            bounced.schedule("demo", bounced.get("demo").updated_at)
            bounced.deactivate("demo")
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for app in apps:
            app.gate.close()
    assert errors == []
    assert not any(app.gate.mirror.failing for app in apps), "every refresh went through"


def test_a_rollout_through_the_bouncer_on_the_users_own_engine(bounced, pgbouncer_url):
    """Claims, leases and done marks repeat the same statements: none may be prepared."""
    from maintgate import rollout
    from tests.fleet import Fleet

    engine = create_engine(pgbouncer_url)  # psycopg's default: statements prepared after 5 runs
    store = MaintenanceStore(engine, table_prefix=bounced.tables.state.name.removesuffix("state"))
    fleet = Fleet(store, 30)
    try:
        with Background(pgbouncer_url, bounced.tables.state.name.removesuffix("state")) as background:
            report = rollout(store, "bounced", fleet.tenants, fleet.migrate, concurrency=3, lease=0.6)
        assert not background.errors, background.errors[:3]
        assert report.complete, report
        assert fleet.migrated() == dict.fromkeys(fleet.tenants, 1)
        assert not any(store.get(t).active for t in fleet.tenants)
    finally:
        fleet.drop()
        engine.dispose()
