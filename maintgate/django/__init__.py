"""Django integration: the migration window on Django's own connection, inside ``transaction.atomic()``.

``maintenance_window(tenant)`` makes ORM and ``schema_editor`` work atomic with the
switch-off, for management commands, Celery tasks and data migrations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import URL, create_engine
from sqlalchemy.pool import StaticPool

from ..core.errors import MaintgateError
from ..core.state import FULL
from ..core.store import MaintenanceStore
from ..migration import _Window

_stores: dict[tuple[str, str, str, str | None], MaintenanceStore] = {}

_URL_SCHEMES = {
    "django.db.backends.sqlite3": "sqlite",
    "django.db.backends.postgresql": "postgresql+psycopg",
    "django.db.backends.mysql": "mysql+pymysql",
}


def database_url(using: str = "default") -> URL:
    """The SQLAlchemy URL of Django's database ``using``, built from ``settings.DATABASES``."""
    from django.conf import settings

    db = settings.DATABASES[using]
    scheme = _URL_SCHEMES.get(db["ENGINE"])
    if scheme is None:
        raise MaintgateError(f"maintgate does not know Django's database engine {db['ENGINE']!r}")
    if scheme == "sqlite":
        return URL.create("sqlite", database=str(db["NAME"]))
    return URL.create(
        scheme,
        username=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=int(db["PORT"]) if db.get("PORT") else None,
        database=db.get("NAME") or None,
    )


def get_store(using: str = "default") -> MaintenanceStore:
    """The store for Django's database ``using``, built from the settings as they are now.

    ``settings.MAINTGATE`` may give ``DATABASE_URL``, ``TABLE_PREFIX`` and ``SCHEMA``. Stores
    are kept per configuration, so each keeps its connection pool.
    """
    from . import conf

    url = conf.get("DATABASE_URL") or database_url(using).render_as_string(hide_password=False)
    key = (using, url, conf.get("TABLE_PREFIX", "maintgate_"), conf.get("SCHEMA"))
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = MaintenanceStore(url, table_prefix=key[2], schema=key[3])
    return store


class _Lent:
    """Django's driver connection, lent to SQLAlchemy: usable, but never committed, rolled back or closed."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def _sqlalchemy_connection(django_connection: Any, store: MaintenanceStore) -> Iterator[Any]:
    """A SQLAlchemy Connection over Django's driver connection, inside Django's transaction."""
    django_connection.ensure_connection()
    raw = django_connection.connection
    options: dict[str, Any] = {"poolclass": StaticPool, "pool_reset_on_return": None}
    if store.engine.dialect.name == "postgresql":
        options["use_native_hstore"] = False  # its setup wants the bare psycopg connection
    engine = create_engine(store.engine.url, creator=lambda: _Lent(raw), **options)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


@contextmanager
def maintenance_window(
    tenant: str,
    *,
    using: str = "default",
    message: str | None = None,
    retry_after: int | None = None,
    ends_at: datetime | None = None,
    store: MaintenanceStore | None = None,
    mode: str = FULL,
) -> Iterator[Any]:
    """A migration window on Django's connection ``using``; yields that connection.

    Maintenance goes on in a committed transaction of its own; the block and the switch-off
    run in one ``transaction.atomic()``, so ORM and ``schema_editor`` work commits with the
    switch-off or not at all. On failure the error is recorded and the exception propagates.
    Open it outside any atomic block: it needs the transaction to itself.
    """
    from django.db import connections, transaction

    store = store if store is not None else get_store(using)
    connection = connections[using]
    if connection.in_atomic_block:
        raise MaintgateError(
            "open the maintenance window outside transaction.atomic(): it owns the transaction"
        )
    window = _Window(store, tenant, message, retry_after, ends_at, False, store.engine.dialect.name, mode)
    # Like Django's migrate on SQLite: foreign keys cannot be switched off inside a transaction,
    # and schema_editor needs them off, so switch them off around it and check before commit.
    sqlite = connection.vendor == "sqlite"
    window.lock()
    try:
        window.open()
        if sqlite:
            connection.disable_constraint_checking()
        try:
            with transaction.atomic(using=using):
                yield connection
                if transaction.get_rollback(using=using):
                    # Something inside marked the transaction for rollback: Django would roll
                    # back silently at the end, taking the switch-off with it.
                    raise MaintgateError(
                        "the window's transaction was marked for rollback; nothing was migrated"
                    )
                if sqlite:
                    connection.check_constraints()
                with _sqlalchemy_connection(connection, store) as conn:
                    window.succeed(conn)
            window.committed()
        except BaseException as exc:
            window.fail(exc)
            raise
        finally:
            if sqlite:
                connection.enable_constraint_checking()
    finally:
        window.unlock()


__all__ = ["database_url", "get_store", "maintenance_window"]
