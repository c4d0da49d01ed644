"""A fleet of tenants for rollout tests and benchmarks, and a runner process (``python -m tests.fleet``)."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from maintgate import MaintenanceStore


class Fleet:
    """Per-tenant tables (``contacts_<tenant>``) with the incident's column, and a log of migrations
    written in each migration's own transaction: it says how many times each tenant was migrated."""

    def __init__(self, store: MaintenanceStore, count: int, tag: str | None = None) -> None:
        self.store = store
        self.tag = tag or uuid.uuid4().hex[:6]
        self.tenants = [f"t{self.tag}{i:04d}" for i in range(count)]
        self.log = f"migrated_{self.tag}"
        if tag is not None:
            return  # the tables exist: another process made them
        with store.engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {self.log} (tenant VARCHAR(64) NOT NULL)"))
            for tenant in self.tenants:
                conn.execute(text(f'CREATE TABLE contacts_{tenant} (id INTEGER, "primary-email" TEXT)'))

    @classmethod
    def existing(cls, store: MaintenanceStore, tag: str, count: int) -> Fleet:
        """The fleet another process created."""
        return cls(store, count, tag)

    def migrate(self, conn, tenant: str, fail: set[str] = frozenset()) -> None:
        conn.execute(
            text(f'ALTER TABLE contacts_{tenant} RENAME COLUMN "primary-email" TO "main-email-contact"')
        )
        conn.execute(text(f"INSERT INTO {self.log} (tenant) VALUES (:t)"), {"t": tenant})
        if tenant in fail:
            raise RuntimeError(f"{tenant}: NOT NULL constraint failed")

    def stopping_after(self, last: str, stop: threading.Event) -> Callable[[Any, str], None]:
        """The migration, which sets ``stop`` (as Ctrl-C or ``maintgate rollout stop`` would) once
        tenant ``last`` is migrated."""

        def migrate(conn, tenant: str) -> None:
            self.migrate(conn, tenant)
            if tenant == last:
                stop.set()

        return migrate

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


def main(argv: list[str]) -> int:
    """A runner in a process of its own: ``URL PREFIX NAME TAG COUNT [PAUSE] [CONCURRENCY] [LEASE]
    [stall|skew=SECONDS]``; ``stall``: the process stops itself (SIGSTOP) between its first claim
    and that tenant's window, as a paused VM would, after printing ``claimed TENANT``; ``skew``:
    its clock runs that many seconds ahead."""
    import os
    import signal

    from maintgate.fleet import rollout, sqlalchemy_window

    url, prefix, name, tag, count = argv[:5]
    pause = float(argv[5]) if len(argv) > 5 else 0.0
    concurrency = int(argv[6]) if len(argv) > 6 else 2
    lease = float(argv[7]) if len(argv) > 7 else 30.0
    store = MaintenanceStore(url, table_prefix=prefix)
    fleet = Fleet.existing(store, tag, int(count))

    def migrate(conn, tenant):
        fleet.migrate(conn, tenant)
        time.sleep(pause)

    stalled: list[str] = []
    extra = argv[8] if len(argv) > 8 else ""
    if extra.startswith("skew="):  # this host's clock runs ahead of the others'
        from datetime import timedelta

        import maintgate.fleet

        ahead = timedelta(seconds=float(extra.split("=")[1]))
        real = maintgate.fleet.utcnow
        maintgate.fleet.utcnow = lambda: real() + ahead  # type: ignore[assignment]

    def opener(store, tenant, **options):
        if extra == "stall" and not stalled:
            stalled.append(tenant)
            print(f"claimed {tenant}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return sqlalchemy_window(store, tenant, **options)

    report = rollout(
        store,
        name,
        fleet.tenants,
        migrate,
        concurrency=concurrency,
        lease=lease,
        max_failures=None,
        opener=opener,
    )
    print(f"done {len(report.done)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def migrate(conn, tenant: str) -> None:
    """``maintgate rollout run --call tests.fleet:migrate``: the fleet's migration, found from the
    tenant's name; tenants listed in $FLEET_FAIL fail, and $FLEET_PAUSE slows each window."""
    import os

    tag = tenant[1:7]
    Fleet.existing(None, tag, 0).migrate(conn, tenant, set(os.environ.get("FLEET_FAIL", "").split()))  # type: ignore[arg-type]
    time.sleep(float(os.environ.get("FLEET_PAUSE", "0")))
