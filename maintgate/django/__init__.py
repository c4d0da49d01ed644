"""Django integration: the migration window on Django's own connection, inside ``transaction.atomic()``.

``maintenance_window(tenant)`` makes ORM and ``schema_editor`` work atomic with the
switch-off, for management commands, Celery tasks and data migrations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import URL, create_engine
from sqlalchemy.pool import StaticPool

from ..core.errors import MaintgateError
from ..core.state import FULL
from ..core.store import DEFAULT_LEASE, MaintenanceStore
from ..migration import _steps, _Window, drive

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

    conf.check_store()
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


def _same_database(a: URL, b: URL) -> bool:
    """Whether two URLs name one database (whatever the driver or the password)."""
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return os.path.realpath(a.database or "") == os.path.realpath(b.database or "")
    default = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}.get(a.get_backend_name())
    return (a.host or "localhost", a.port or default, a.database) == (
        b.host or "localhost",
        b.port or default,
        b.database,
    )


def window_store(
    using: str | None = None, store: MaintenanceStore | None = None
) -> tuple[str, MaintenanceStore]:
    """The Django alias a window migrates on and the store it switches, refusing any split.

    The switch-off can commit with the migration only when maintgate's tables are in the
    database the migration runs on, the one the gate reads. Anything else is refused here,
    before anything changes, naming the settings involved.
    """
    from . import conf

    alias = conf.database_alias()
    using = alias if using is None else using
    if using != alias:
        raise MaintgateError(
            f"the window would migrate DATABASES[{using!r}] while maintgate's tables, which the gate "
            f"reads, are in MAINTGATE['DATABASE'] = {alias!r}: the switch-off can only commit with the "
            "migration in one database. Migrate that database's tenants with using= set to it, and "
            "keep maintgate's tables there"
        )
    if store is None:
        store = get_store(alias)
    if not _same_database(store.engine.url, database_url(using)):
        where = "MAINTGATE['DATABASE_URL']" if conf.get("DATABASE_URL") else "the store passed in"
        raise MaintgateError(
            f"{where} ({store.engine.url.render_as_string(hide_password=True)}) is not the database of "
            f"DATABASES[{using!r}], where the migration runs: the switch-off can only commit with the "
            "migration in one database. Drop MAINTGATE['DATABASE_URL'], or point it at that database"
        )
    return using, store


@contextmanager
def maintenance_window(
    tenant: str,
    *,
    using: str | None = None,
    message: str | None = None,
    retry_after: int | None = None,
    ends_at: datetime | None = None,
    store: MaintenanceStore | None = None,
    mode: str = FULL,
    lease: float = DEFAULT_LEASE,
) -> Iterator[Any]:
    """A migration window on Django's connection ``using`` (default: maintgate's database); yields it.

    Maintenance goes on in a committed transaction of its own; the block and the switch-off
    run in one ``transaction.atomic()``, so ORM and ``schema_editor`` work commits with the
    switch-off or not at all. On failure the error is recorded and the exception propagates.
    Open it outside any atomic block: it needs the transaction to itself.
    """
    from django.db import connections, transaction

    using, store = window_store(using, store)
    connection = connections[using]
    if connection.in_atomic_block:
        raise MaintgateError(
            "open the maintenance window outside transaction.atomic(): it owns the transaction"
        )
    window = _Window(
        store,
        tenant,
        message=message,
        retry_after=retry_after,
        ends_at=ends_at,
        mode=mode,
        owned=True,
        dialect_name=store.engine.dialect.name,
        lease=lease,
        connections_needed=1,  # the migration runs on Django's connection
    )
    sqlite = connection.vendor == "sqlite"

    def before_close() -> None:
        if transaction.get_rollback(using=using):
            # Something inside marked the transaction for rollback: Django would roll back
            # silently at the end, taking the switch-off with it.
            raise MaintgateError("the window's transaction was marked for rollback; nothing was migrated")
        if sqlite:
            connection.check_constraints()

    window.before_close = before_close
    atomic = transaction.atomic(using=using)
    state = {"open": False}

    def commit() -> None:
        state["open"] = False
        atomic.__exit__(None, None, None)

    def abort() -> None:
        if state["open"]:
            state["open"] = False
            try:
                transaction.set_rollback(True, using=using)
                atomic.__exit__(None, None, None)
            except Exception:
                connection.close()

    # Like Django's migrate on SQLite: foreign keys cannot be switched off inside a transaction,
    # and schema_editor needs them off, so switch them off around it and check before commit.
    if sqlite:
        connection.disable_constraint_checking()

    def begin() -> None:
        atomic.__enter__()
        state["open"] = True

    try:
        # Made before the atomic block, so SQLAlchemy's first queries run outside it: the block,
        # and its snapshot (REPEATABLE READ) or write lock (SQLite IMMEDIATE), start after the switch-on.
        with _sqlalchemy_connection(connection, store) as conn:
            try:
                yield from drive(
                    _steps(window),
                    conn,
                    commit=commit,
                    abort=abort,
                    handed=connection,
                    begin=begin,
                    checks=False,  # the window makes its own atomic block: nothing to refuse
                )
            finally:
                abort()  # a refusal before the work leaves Django's atomic block to close
    finally:
        if sqlite:
            connection.enable_constraint_checking()


__all__ = ["database_url", "get_store", "maintenance_window", "window_store"]
