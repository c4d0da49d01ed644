"""Alembic inside a migration window: ``alembic upgrade`` and the switch-off commit together.

The helper hands the window's connection to Alembic through ``config.attributes["connection"]``;
your ``env.py`` must use it when it is there (the "sharing a connection" recipe)::

    def run_migrations_online():
        connection = config.attributes.get("connection")
        if connection is None:
            ...  # your usual engine_from_config() path
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():  # joins the window's transaction; Alembic won't commit it
            context.run_migrations()
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .core.errors import InvalidArgument
from .core.store import MaintenanceStore
from .migration import maintenance_window


def upgrade(
    store: MaintenanceStore,
    tenant: str,
    config: Any,
    revision: str = "head",
    *,
    message: str | None = None,
    retry_after: int | None = None,
    ends_at: datetime | None = None,
    sql: bool = False,
    mode: str = "full",
) -> None:
    """Run ``alembic upgrade revision`` for ``tenant`` inside a migration window, on one connection.

    ``config`` is an ``alembic.config.Config``. Every migration, the version table update and
    the switch-off commit together; any failure rolls all of them back and keeps maintenance on.
    """
    from alembic import command

    if sql:
        raise InvalidArgument(
            "offline (--sql) mode writes a script and touches no database: run it without a window"
        )
    with maintenance_window(
        store,
        tenant,
        message=message or f"Upgrading the database to {revision}",
        retry_after=retry_after,
        ends_at=ends_at,
        mode=mode,
    ) as connection:
        previous = config.attributes.get("connection")
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, revision)
        finally:
            if previous is None:
                config.attributes.pop("connection", None)
            else:
                config.attributes["connection"] = previous
