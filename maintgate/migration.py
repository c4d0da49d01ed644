"""The migration window: maintenance on, migrate, and off again in the migration's own transaction.

Order of a window:

1. On PostgreSQL, take a session advisory lock for the tenant on a connection of its own
   (a second window for the tenant fails here, having changed nothing).
2. Switch maintenance on, recording the owner, in a committed transaction of its own.
3. Yield a connection inside one transaction for the migration.
4. On a clean exit, switch maintenance off in that same transaction, then commit: both
   land together or not at all.
5. On any exception, roll back, then record the error in a new transaction that survives
   the rollback; maintenance stays on and the original exception propagates unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event, text

from .core.errors import MaintgateError
from .core.state import FULL, MaintenanceState, Owner, check_tenant
from .core.store import OPERATOR, MaintenanceStore, announce, make_sqlite_transactional

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger("maintgate")

TRANSACTIONAL_DDL = frozenset({"postgresql", "sqlite", "mssql"})
ERROR_MAX_LENGTH = 2000


class WindowBusy(MaintgateError):
    """Another migration window for this tenant is still open."""


def advisory_key(store: MaintenanceStore, tenant: str) -> int:
    """The signed 64-bit PostgreSQL advisory-lock key of ``tenant``'s window in this store."""
    table = store.tables.state
    name = f"maintgate:{table.schema or ''}:{table.name}:{tenant}".encode()
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big", signed=True)


def owner_alive(store: MaintenanceStore, state: MaintenanceState | None) -> bool | None:
    """Whether the process that holds ``state``'s window still lives: None if no window or unknown.

    PostgreSQL: the owner's backend still holds the tenant's advisory lock. Elsewhere: the
    owner runs on this host and its pid exists; another host cannot be told (None).
    """
    if state is None or state.owner is None:
        return None
    owner = state.owner
    if store.engine.dialect.name == "postgresql" and owner.backend_pid is not None:
        key = advisory_key(store, state.tenant)
        with store.engine.connect() as conn:
            held = conn.execute(
                text(
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = :pid"
                    " AND classid = :hi AND objid = :lo AND objsubid = 1"
                ),
                {"pid": owner.backend_pid, "hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
            ).first()
        return held is not None
    if owner.host != socket.gethostname():
        return None
    return _pid_alive(owner.pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(exc: BaseException) -> str:
    """``Type: message`` for the record, without SQLAlchemy's docs link or bound parameters (data)."""
    lines = [
        line
        for line in str(exc).splitlines()
        if not line.startswith(("(Background on this error", "[parameters:"))
    ]
    return f"{type(exc).__name__}: {chr(10).join(lines)}"[:ERROR_MAX_LENGTH]


class _Window:
    """The steps of one window, on synchronous connections; the async window runs them in threads."""

    def __init__(
        self,
        store: MaintenanceStore,
        tenant: str,
        message: str | None,
        retry_after: int | None,
        ends_at: datetime | None,
        allow_non_transactional_ddl: bool,
        dialect_name: str,
        mode: str = FULL,
    ) -> None:
        check_tenant(tenant)
        if dialect_name not in TRANSACTIONAL_DDL and not allow_non_transactional_ddl:
            raise MaintgateError(
                f"{dialect_name} commits DDL implicitly, so a migration window cannot be atomic there; "
                "pass allow_non_transactional_ddl=True to accept a possibly partial schema on failure "
                "(maintenance is switched off only after all the work succeeded)"
            )
        self.store = store
        self.tenant = tenant
        self.message = message
        self.retry_after = retry_after
        self.ends_at = ends_at
        self.mode = mode
        self.atomic = dialect_name in TRANSACTIONAL_DDL
        self.postgres = store.engine.dialect.name == "postgresql"
        self.owner = Owner(socket.gethostname(), os.getpid())
        self.operator_had_it_on = False
        self.previous: MaintenanceState | None = None
        self.opened = False
        self.finished = False
        self._lock_conn: Connection | None = None
        self._check_interval = False

    def lock(self, joined: Connection | None = None) -> None:
        """PostgreSQL: take the tenant's advisory lock, or raise WindowBusy having changed nothing.

        On a connection of our own it is a session lock, held until :meth:`unlock`. In a
        caller's transaction (``joined``) it is a transaction lock on that connection, so that it
        lasts exactly until the caller commits or rolls back.
        """
        if not self.postgres:
            return
        key = advisory_key(self.store, self.tenant)
        if joined is not None:
            got, backend_pid = joined.execute(
                text("SELECT pg_try_advisory_xact_lock(:key), pg_backend_pid()"), {"key": key}
            ).one()
            if not got:
                raise WindowBusy(f"a maintenance window for tenant {self.tenant!r} is already open")
            self.owner = Owner(self.owner.host, self.owner.pid, backend_pid)
            return
        conn = self.store.engine.connect()
        check_interval = (conn.dialect.server_version_info or (0,)) >= (14,)
        try:
            if check_interval:
                conn.exec_driver_sql("SET client_connection_check_interval = '1s'")
            got, backend_pid = conn.execute(
                text("SELECT pg_try_advisory_lock(:key), pg_backend_pid()"), {"key": key}
            ).one()
            conn.commit()
            if not got:
                if check_interval:
                    conn.exec_driver_sql("RESET client_connection_check_interval")
                    conn.commit()
                conn.close()
                raise WindowBusy(f"a maintenance window for tenant {self.tenant!r} is already open")
        except WindowBusy:
            raise
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        self._lock_conn = conn
        self._check_interval = check_interval
        self.owner = Owner(self.owner.host, self.owner.pid, backend_pid)

    def unlock(self) -> None:
        """Release the session lock; if that fails, drop the connection rather than pool it."""
        conn, self._lock_conn = self._lock_conn, None
        if conn is None:
            return
        try:
            conn.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": advisory_key(self.store, self.tenant)}
            )
            if self._check_interval:
                conn.exec_driver_sql("RESET client_connection_check_interval")
            conn.commit()
        except Exception:
            # A pool reset would not release a session lock: never return this connection to the pool.
            conn.invalidate()
        finally:
            conn.close()

    def open(self) -> None:
        """Switch maintenance on, recording the owner, in a committed transaction of its own."""
        store, tenant = self.store, self.tenant
        t = store.tables.state
        with store.engine.begin() as conn:
            store._ensure_row(conn, tenant)
            # A no-op write first: it takes the row's write lock, so two windows cannot both see it free.
            conn.execute(t.update().where(t.c.tenant == tenant).values(tenant=tenant))
            current = store.get(tenant, connection=conn)
            busy = current is not None and current.owner is not None and not self.postgres
            if busy and owner_alive(store, current) is not False:
                raise WindowBusy(
                    f"a maintenance window for tenant {tenant!r} is already open "
                    f"(host {current.owner.host}, pid {current.owner.pid})"  # type: ignore[union-attr]
                )
            self.previous = current
            self.operator_had_it_on = bool(current and current.active and current.source == OPERATOR)
            store._activate(
                tenant,
                self.message,
                self.retry_after,
                self.ends_at,
                self.owner,
                "window_opened",
                conn,
                self.mode,
            )
        self.opened = True
        announce("window_opened", tenant, owner=self.owner, message=self.message, mode=self.mode)

    def prepare(self, conn: Connection) -> None:
        """Refuse AUTOCOMMIT; make sure the driver really is in a transaction (pysqlite defers BEGIN)."""
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            raise MaintgateError("the migration window needs a transaction, not an AUTOCOMMIT connection")
        dbapi = conn.connection.dbapi_connection
        name = conn.dialect.name
        if name == "postgresql" and getattr(conn.connection.driver_connection, "autocommit", False):
            raise MaintgateError("the migration window needs a transaction, not an AUTOCOMMIT connection")
        if name == "sqlite" and not _sqlite_in_transaction(dbapi):
            if getattr(dbapi, "isolation_level", "") is None:
                raise MaintgateError("the migration window needs a transaction, not an AUTOCOMMIT connection")
            # Without this BEGIN, pysqlite would autocommit DDL that comes before any DML.
            conn.exec_driver_sql("BEGIN")
        if name == "postgresql" and (conn.dialect.server_version_info or (0,)) >= (14,):
            conn.exec_driver_sql("SET LOCAL client_connection_check_interval = '1s'")

    def succeed(self, conn: Connection) -> None:
        """Switch maintenance off inside the migration's transaction, unless an operator wants it on.

        An operator's maintenance from before the window is put back as it was; one switched on
        while the window ran stays as the operator set it.
        """
        if self.operator_had_it_on:
            self.store._release(self.tenant, self.owner, self.previous, "window_committed", conn)
        elif self.store._source(self.tenant, conn) == OPERATOR:
            self.store._release(self.tenant, self.owner, None, "window_committed", conn)
        else:
            self.store._deactivate(self.tenant, self.owner, "window_committed", conn)

    def committed(self) -> None:
        """Log that the migration and the switch-off are committed."""
        self.finished = True
        announce("window_committed", self.tenant, owner=self.owner, kept_on=self.operator_had_it_on or None)

    def fail(self, exc: BaseException) -> None:
        """Record the error in a new transaction; if even that fails, log it and carry on."""
        self.finished = True
        try:
            self.store._record_failure(self.tenant, _describe(exc), self.owner, None)
            announce(
                "window_failed", self.tenant, owner=self.owner, error=_describe(exc), level=logging.WARNING
            )
        except Exception as record_exc:
            logger.error(
                "maintgate: could not record the failure of tenant %r's window (%s); "
                "maintenance stays on. Original error: %s",
                self.tenant,
                _describe(record_exc),
                _describe(exc),
                extra={"maintgate_event": "record_failure_failed", "tenant": self.tenant},
            )


def _sqlite_in_transaction(dbapi: Any) -> bool:
    in_tx = getattr(dbapi, "in_transaction", None)
    if in_tx is None:  # SQLAlchemy's aiosqlite adapter: ask the sqlite3 connection underneath
        inner = getattr(getattr(dbapi, "_connection", None), "_conn", None)
        in_tx = getattr(inner, "in_transaction", False)
    return bool(in_tx)


def _discard(conn: Connection) -> None:
    """Roll back and drop the driver connection of a failed window.

    A failed COMMIT can leave the driver's transaction open (SQLite keeps it after a
    deferred-constraint failure) while SQLAlchemy considers it over; closing the driver
    connection is the one way to be sure its locks go before the error is recorded.
    """
    try:
        if conn.in_transaction():
            conn.rollback()
    except Exception:
        pass
    conn.invalidate()


@contextmanager
def maintenance_window(
    store: MaintenanceStore,
    tenant: str,
    *,
    message: str | None = None,
    retry_after: int | None = None,
    ends_at: datetime | None = None,
    connection: Connection | None = None,
    allow_non_transactional_ddl: bool = False,
    mode: str = FULL,
) -> Iterator[Connection]:
    """Open a migration window for ``tenant`` and yield the connection to migrate on.

    Success: the migration and the switch-off commit together. Failure: everything rolls
    back, maintenance stays on, the error is recorded, and the exception propagates.
    With ``connection=``, the switch-off runs in the caller's transaction and the caller
    commits: the library never commits a connection it was given. On failure it rolls that
    transaction back before recording the error.
    """
    dialect = (connection or store.engine).dialect.name
    window = _Window(store, tenant, message, retry_after, ends_at, allow_non_transactional_ddl, dialect, mode)
    if connection is not None and not connection.in_transaction():
        raise MaintgateError("pass a connection inside a transaction (conn.begin()); the caller commits it")
    if connection is not None:
        window.prepare(connection)
        window.lock(joined=connection)
    else:
        window.lock()
    try:
        if connection is not None:
            window.open()
            yield from _joined(window, connection)
        else:
            with store.engine.connect() as conn:
                conn.begin()
                window.prepare(conn)
                window.open()
                yield from _owned(window, conn)
    except BaseException as exc:
        if window.opened and not window.finished:
            window.fail(exc)
        raise
    finally:
        window.unlock()


def _owned(window: _Window, conn: Connection) -> Iterator[Connection]:
    try:
        yield conn
        if window.atomic:
            window.succeed(conn)
            conn.commit()
        else:
            conn.commit()  # degraded mode: the work first, then the switch-off on its own
            _succeed_alone(window)
        window.committed()
    except BaseException as exc:
        _discard(conn)
        window.fail(exc)
        raise


def _joined(window: _Window, conn: Connection) -> Iterator[Connection]:
    try:
        yield conn
        window.succeed(conn)
        _warn_on_caller_rollback(window, conn)
    except BaseException as exc:
        # Roll the caller's transaction back (never commit it): the error record must not wait
        # behind its locks, and SQLite would refuse the record while it holds the file's write lock.
        _rollback_caller(conn)
        window.fail(exc)
        raise


def _warn_on_caller_rollback(window: _Window, conn: Connection) -> None:
    """The caller may still roll back the switch-off: say so in the log if it does."""

    def rolled_back(_conn: Connection) -> None:
        event.remove(conn, "commit", committed)
        logger.warning(
            "maintgate: the caller rolled back the transaction of tenant %r's window after it closed; "
            "maintenance stays on and status shows the owner gone",
            window.tenant,
            extra={"maintgate_event": "window_rolled_back_by_caller", "tenant": window.tenant},
        )

    def committed(_conn: Connection) -> None:
        event.remove(conn, "rollback", rolled_back)
        window.committed()

    event.listen(conn, "rollback", rolled_back, once=True)
    event.listen(conn, "commit", committed, once=True)


def _rollback_caller(conn: Connection) -> None:
    try:
        conn.rollback()
    except Exception:
        conn.invalidate()


def _async_url(engine: Engine) -> Any:
    url = engine.url
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    raise MaintgateError(f"pass engine= (an AsyncEngine) for {url.get_backend_name()}")


@asynccontextmanager
async def async_maintenance_window(
    store: MaintenanceStore,
    tenant: str,
    *,
    engine: AsyncEngine | None = None,
    connection: AsyncConnection | None = None,
    message: str | None = None,
    retry_after: int | None = None,
    ends_at: datetime | None = None,
    allow_non_transactional_ddl: bool = False,
    mode: str = FULL,
) -> AsyncIterator[AsyncConnection]:
    """:func:`maintenance_window` for SQLAlchemy's asyncio engines; yields an ``AsyncConnection``.

    The window's own bookkeeping (lock, switch-on, error record) runs in worker threads on
    the store's engine; the migration and the switch-off run on the async connection.
    Without ``engine=`` or ``connection=``, an async engine is made from the store's URL.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    owned_engine = None
    if connection is None and engine is None:
        engine = owned_engine = create_async_engine(_async_url(store.engine))
        if engine.dialect.name == "sqlite":
            make_sqlite_transactional(engine.sync_engine)
    dialect = (connection or engine).dialect.name  # type: ignore[union-attr]
    window = _Window(store, tenant, message, retry_after, ends_at, allow_non_transactional_ddl, dialect, mode)
    if connection is not None and not connection.in_transaction():
        raise MaintgateError("pass a connection inside a transaction (conn.begin()); the caller commits it")
    try:
        if connection is not None:
            await connection.run_sync(window.prepare)
            await connection.run_sync(window.lock)
            await _to_the_end(window.open)
            try:
                yield connection
                await connection.run_sync(window.succeed)
            except BaseException as exc:
                await connection.run_sync(_rollback_caller)
                await _to_the_end(window.fail, exc)
                raise
        else:
            await _to_the_end(window.lock)
            async with engine.connect() as conn:  # type: ignore[union-attr]
                await conn.begin()
                await conn.run_sync(window.prepare)
                await _to_the_end(window.open)
                try:
                    yield conn
                    if window.atomic:
                        await conn.run_sync(window.succeed)
                        await conn.commit()
                    else:
                        await conn.commit()
                        await _to_the_end(_succeed_alone, window)
                    window.committed()
                except BaseException as exc:
                    await conn.run_sync(_discard)
                    await _to_the_end(window.fail, exc)
                    raise
    except BaseException as exc:
        if window.opened and not window.finished:  # cancelled between the switch-on and the block
            await _to_the_end(window.fail, exc)
        raise
    finally:
        await _to_the_end(window.unlock)
        if owned_engine is not None:
            await owned_engine.dispose()


async def _to_the_end(func: Any, *args: Any) -> Any:
    """Run a blocking step in a worker thread to its end even if the task is cancelled meanwhile.

    A lock taken or a switch-on committed by a thread must be known to the window, or it
    could not be undone; the cancellation is re-raised once the step is over.
    """
    task = asyncio.ensure_future(asyncio.to_thread(func, *args))
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


def _succeed_alone(window: _Window) -> None:
    with window.store.engine.begin() as conn:
        window.succeed(conn)
