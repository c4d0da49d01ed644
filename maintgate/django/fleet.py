"""``manage.py maintgate rollout run NAME --call migrate``: Django's ``migrate`` in each tenant's schema.

For schema-per-tenant projects on PostgreSQL: each tenant's window sets ``search_path`` to the
schema named after the tenant (alone, so each schema keeps its own ``django_migrations``), runs
``migrate`` there, and marks the tenant done; all of it commits with the switch-off, or none.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection

from ..cli import BuiltinMigration
from ..core.errors import MaintgateError
from ..core.store import MaintenanceStore


@contextmanager
def django_window(
    store: MaintenanceStore, tenant: str, *, message: str | None, retry_after: int | None, lease: float
) -> Iterator[tuple[Any, Connection]]:
    """A rollout's window on Django's connection: yields it, and SQLAlchemy's view of its transaction."""
    from django.db import connections

    from . import _sqlalchemy_connection, conf, maintenance_window

    try:
        with (
            maintenance_window(
                tenant, store=store, message=message, retry_after=retry_after, lease=lease
            ) as connection,
            _sqlalchemy_connection(connection, store) as conn,
        ):
            yield connection, conn
    finally:
        connections[conf.database_alias()].close()  # the worker thread's own: nothing outlives it


def migrate_schema(connection: Any, tenant: str) -> None:
    """Run Django's ``migrate`` (every app, to its latest migration) in the schema named ``tenant``."""
    from django.core.management import call_command

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [tenant])
        if cursor.fetchone() is None:
            raise MaintgateError(f"tenant {tenant!r} has no schema {tenant!r}: nothing to migrate")
        cursor.execute(f"SET LOCAL search_path TO {connection.ops.quote_name(tenant)}")
    call_command(
        "migrate",
        database=connection.alias,
        interactive=False,
        verbosity=0,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
    )


def _postgresql_only() -> None:
    from django.db import connections

    from . import conf

    alias = conf.database_alias()
    vendor = connections[alias].vendor
    if vendor != "postgresql":
        raise MaintgateError(
            f"--call migrate runs each tenant's migrations in its own PostgreSQL schema, and "
            f"DATABASES[{alias!r}] is {vendor}: pass --call module:function with your own migration"
        )


MIGRATE = BuiltinMigration(
    migrate=migrate_schema,
    opener=django_window,
    help="Django's migrate in the PostgreSQL schema named after each tenant",
    concurrency=1,  # migrate is not documented to be thread-safe: more runner processes instead
    check=_postgresql_only,
)
"""The built-in ``migrate`` of ``manage.py maintgate rollout run``."""
