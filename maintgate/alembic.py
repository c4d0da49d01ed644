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

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, event

from .core.errors import WindowRefused
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
    mode: str = "full",
) -> None:
    """Run ``alembic upgrade revision`` for ``tenant`` inside a migration window, on one connection.

    ``config`` is an ``alembic.config.Config``. Every migration, the version table update and
    the switch-off commit together; any failure rolls all of them back and keeps maintenance on.
    An ``env.py`` that connects on its own (the stock one) is refused before it runs anything,
    and the window is withdrawn: it would migrate outside the window's transaction.
    """
    from alembic import command

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
            with _only_on(connection):
                command.upgrade(config, revision)
        finally:
            # The stock env.py's fileConfig() disables every logger it does not name, ours too.
            logging.getLogger("maintgate").disabled = False
            if previous is None:
                config.attributes.pop("connection", None)
            else:
                config.attributes["connection"] = previous


@contextmanager
def _only_on(window_connection: Connection) -> Iterator[None]:
    """Refuse any connection this thread opens on another engine while Alembic runs."""
    thread = threading.get_ident()

    def connected(conn: Connection) -> None:
        if threading.get_ident() == thread and conn is not window_connection:
            raise WindowRefused(
                "env.py opened a connection of its own, so the migrations would run outside the "
                "window's transaction and the switch-off could not commit with them. In env.py's "
                "run_migrations_online(), use config.attributes.get('connection') when it is set: "
                "context.configure(connection=that_connection, ...) (Alembic's 'sharing a "
                "connection' recipe; see maintgate.alembic)"
            )

    event.listen(Engine, "engine_connect", connected)
    try:
        yield
    finally:
        event.remove(Engine, "engine_connect", connected)
