"""Faults a migration cannot catch: the migrating process killed, its connection killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from sqlalchemy import text

from maintgate import maintenance_window
from tests.helpers import columns, eventually

MIGRATOR = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import text
    from maintgate import MaintenanceStore, maintenance_window
    url, prefix, table = sys.argv[1:4]
    store = MaintenanceStore(url, table_prefix=prefix)
    # A short lease: on SQLite a dead window holds the tenant until its lease expires.
    with maintenance_window(store, "demo", message="Renaming", lease=1.0) as conn:
        conn.execute(text(f'ALTER TABLE {table} RENAME COLUMN "primary-email" TO "main-email-contact"'))
        print("renamed", flush=True)
        time.sleep(120)
    """
)


def test_sigkill_mid_work_leaves_maintenance_on_and_the_owner_gone(store, contacts):
    url = store.engine.url.render_as_string(hide_password=False)
    prefix = store.tables.state.name.removesuffix("state")
    child = subprocess.Popen(
        [sys.executable, "-c", MIGRATOR, url, prefix, contacts], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "renamed"
        state = store.get("demo")
        assert state.active and state.owner.pid == child.pid
        assert store.window_alive(state) is True, "still migrating"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    state = store.get("demo")
    assert state.active and state.owner.pid == child.pid, "a crash leaves maintenance on"
    assert eventually(lambda: store.window_alive(state) is False, 5), "the status says the owner is gone"
    assert eventually(lambda: columns(store, contacts) == {"id", "primary-email"}), "not migrated"
    with maintenance_window(store, "demo") as conn:  # the crashed window does not block the next one
        conn.execute(text(f'ALTER TABLE {contacts} RENAME COLUMN "primary-email" TO "main-email-contact"'))
    assert not store.get("demo").active and store.get("demo").owner is None
    assert columns(store, contacts) == {"id", "main-email-contact"}


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_connection_killed_mid_work(store, contacts):
    """PostgreSQL only: a SQLite connection lives in the process and cannot be killed from outside."""
    with (
        pytest.raises(Exception, match=r"(?i)terminat|closed|connection"),
        maintenance_window(store, "demo") as conn,
    ):
        conn.execute(text(f'ALTER TABLE {contacts} RENAME COLUMN "primary-email" TO "main-email-contact"'))
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
        with store.engine.connect() as killer:
            assert killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        conn.execute(text("SELECT 1"))
    assert columns(store, contacts) == {"id", "primary-email"}
    state = store.get("demo")
    assert state.active and state.error and state.owner is None
    assert [e.event for e in store.history("demo")] == ["window_opened", "window_failed"]


BUSY_MIGRATOR = textwrap.dedent(
    """
    import sys
    from sqlalchemy import text
    from maintgate import MaintenanceStore, maintenance_window
    url, prefix, table = sys.argv[1:4]
    store = MaintenanceStore(url, table_prefix=prefix)
    with maintenance_window(store, "demo") as conn:
        conn.execute(text(f'ALTER TABLE {table} RENAME COLUMN "primary-email" TO "main-email-contact"'))
        print(conn.execute(text("SELECT pg_backend_pid()")).scalar(), flush=True)
        conn.execute(text("SELECT pg_sleep(60)"))
    """
)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_killed_migrator_busy_in_a_statement_frees_its_locks_within_seconds(store, contacts):
    """client_connection_check_interval: the server notices the dead client mid-statement."""
    url = store.engine.url.render_as_string(hide_password=False)
    prefix = store.tables.state.name.removesuffix("state")
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY_MIGRATOR, url, prefix, contacts], stdout=subprocess.PIPE, text=True
    )
    try:
        backend = int(child.stdout.readline())
        time.sleep(0.3)  # let pg_sleep start
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        child.stdout.close()
    killed = time.monotonic()

    def backend_gone():
        with store.engine.connect() as conn:
            return not conn.execute(
                text("SELECT 1 FROM pg_stat_activity WHERE pid = :p"), {"p": backend}
            ).first()

    assert eventually(backend_gone, 10)
    elapsed = time.monotonic() - killed
    print(f"busy backend gone {elapsed:.2f}s after SIGKILL")
    assert elapsed < 3, f"the busy backend took {elapsed:.1f}s to notice its client died"
    assert columns(store, contacts) == {"id", "primary-email"}
    # Its lock went with its transaction; the lease that covered its opening ends soon after.
    assert eventually(lambda: store.window_alive(store.get("demo")) is False, 6)
