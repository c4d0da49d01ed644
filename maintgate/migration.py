"""The migration window: maintenance on, migrate, and off again in the migration's own transaction.

The steps are written once, in :func:`_steps`; every form of the window (sync or async, on a
connection of its own or the caller's, Django's, Alembic's) drives that one sequence:

1. Refuse what cannot be atomic (AUTOCOMMIT, a caller's REPEATABLE READ snapshot, a pool too
   small), before anything changes.
2. Switch maintenance on in a committed transaction of its own, writing a new window id and a
   lease (renewed while the window runs, except on PostgreSQL). A second window fails here
   (:class:`WindowBusy`), having changed nothing.
3. Begin the migration's transaction and, on PostgreSQL, take the tenant's lock as a
   *transaction* lock on it, so the lock lives and dies with the migration (and works behind
   PgBouncer); a window taken over meanwhile fails (:class:`WindowLost`). Hand the connection
   to the work.
4. Check that the transaction is still the one the window began, and switch maintenance off in
   it with a write fenced on the window id that must change exactly one row; then commit.
5. On any failure roll back, then record the error in a new transaction (fenced too);
   maintenance stays on and the original exception propagates unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.pool import AssertionPool, QueuePool, SingletonThreadPool, StaticPool

from .core.errors import MaintgateError, WindowBusy, WindowLost, WindowRefused
from .core.plan import Done
from .core.state import FULL, Owner, Window, check_tenant
from .core.store import (
    DEFAULT_LEASE,
    ENDED_BY_WORK,
    PUBLISH_WAIT,
    MaintenanceStore,
    _collecting,
    _read_committed,
    announce,
    can_lend,
    end_autocommit,
    in_autocommit_idle,
    make_sqlite_transactional,
    unprepared,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger("maintgate")

TRANSACTIONAL_DDL = frozenset({"postgresql", "sqlite", "mssql"})
ERROR_MAX_LENGTH = 2000
CONNECTIONS_NEEDED = 2
"""Connections of the store's engine a window holds at once: the migration's and one for bookkeeping."""

__all__ = ["WindowBusy", "WindowLost", "async_maintenance_window", "maintenance_window"]


def _describe(exc: BaseException) -> str:
    """``Type: message`` for the record, without SQLAlchemy's docs link or bound parameters (data)."""
    lines = [
        line
        for line in str(exc).splitlines()
        if not line.startswith(("(Background on this error", "[parameters:"))
    ]
    return f"{type(exc).__name__}: {chr(10).join(lines)}"[:ERROR_MAX_LENGTH]


def _pool_capacity(engine: Engine) -> float:
    pool = engine.pool
    if isinstance(pool, StaticPool | SingletonThreadPool | AssertionPool):
        return 1
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow
        return float("inf") if overflow < 0 else pool.size() + overflow
    return float("inf")


def check_pool(engine: Engine, needed: int = CONNECTIONS_NEEDED) -> None:
    """Refuse up front when the engine's pool cannot lend a window the connections it needs at once."""
    capacity = _pool_capacity(engine)
    if capacity < needed:
        raise MaintgateError(
            f"a migration window needs {needed} connections of the store's engine at once (the "
            f"migration's and one for its own bookkeeping), but its pool ({type(engine.pool).__name__}) "
            f"lends at most {int(capacity)}: raise pool_size or max_overflow"
        )


# What a driver does for each step of the sequence.
CHECK = "check"  # fn(connection): refusals before anything changes (Django's window has none to make)
TX = "tx"  # fn(connection) on the migration's connection, in its transaction
BOOK = "book"  # fn(*args), a blocking call on the store's engine (a worker thread under asyncio)
WORK = "work"  # hand the connection to the caller's block
COMMIT = "commit"  # commit the migration's transaction (a window that owns it)
ABORT = "abort"  # roll the migration's transaction back; never raises

Step = tuple[Any, ...]


class _Window:
    """The state of one window; :func:`_steps` calls its methods in order, drivers run them."""

    def __init__(
        self,
        store: MaintenanceStore,
        tenant: str,
        *,
        message: str | None,
        retry_after: int | None,
        ends_at: datetime | None,
        mode: str,
        owned: bool,
        dialect_name: str,
        allow_non_transactional_ddl: bool = False,
        lease: float = DEFAULT_LEASE,
        connections_needed: int = CONNECTIONS_NEEDED,
    ) -> None:
        check_tenant(tenant)
        if dialect_name not in TRANSACTIONAL_DDL and not allow_non_transactional_ddl:
            raise MaintgateError(
                f"{dialect_name} commits DDL implicitly, so a migration window cannot be atomic there; "
                "pass allow_non_transactional_ddl=True to accept a possibly partial schema on failure "
                "(maintenance is switched off only after all the work succeeded)"
            )
        check_pool(store.engine, connections_needed)
        store._prepare_windows()
        self.store = store
        self.tenant = tenant
        self.message = message
        self.retry_after = retry_after
        self.ends_at = ends_at
        self.mode = mode
        self.owned = owned
        self.lease = lease
        self.atomic = dialect_name in TRANSACTIONAL_DDL
        self.postgres = store.engine.dialect.name == "postgresql"
        self.owner = Owner(socket.gethostname(), os.getpid())
        self.window: Window | None = None
        self.before_close: Callable[[], None] | None = None
        self._token: str | None = None
        self._ended_by_caller: str | None = None
        self._watched: Connection | None = None
        self._renewer: _Renewer | None = None
        self._unprepared: AbstractContextManager[None] | None = None
        self._closing: list[Any] = []
        self.lent: Connection | None = None
        """The migration's connection, idle until its transaction begins: the switch-on commits on it."""
        self.done: Done | None = None
        """A rollout's done mark, written with the switch-off."""
        self._held: Any = None
        self._saved: list[Any] = []
        """What the switch-on changed on ``lent``'s driver when it began the migration's transaction
        in autocommit (:func:`end_autocommit` puts it back); empty otherwise."""

    @property
    def opened(self) -> bool:
        return self.window is not None

    # -- steps on the migration's connection -----------------------------------------------------

    def prepare(self, conn: Connection) -> None:
        """Refuse what cannot be atomic, before anything changes; sends nothing that starts a transaction."""
        autocommit = MaintgateError("the migration window needs a transaction, not an AUTOCOMMIT connection")
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            raise autocommit
        dbapi = conn.connection.dbapi_connection
        name = conn.dialect.name
        if (
            name == "postgresql"
            and getattr(conn.connection.driver_connection, "autocommit", False)
            and in_autocommit_idle(conn)  # not an owned window's transaction, begun in autocommit
        ):
            raise autocommit
        if (
            name == "sqlite"
            and not _sqlite_in_transaction(dbapi)
            and getattr(dbapi, "isolation_level", "") is None
        ):
            raise autocommit
        if name == "postgresql" and not self.owned:  # the caller's transaction is open anyway
            level = str(conn.get_isolation_level()).upper()
            if level in ("REPEATABLE READ", "SERIALIZABLE"):
                raise MaintgateError(
                    f"the caller's transaction is {level}: its snapshot cannot see the switch-on "
                    "that the window commits in a transaction of its own, so it could not switch "
                    "maintenance off. Open the window without connection= (it then owns its "
                    "transaction, at your engine's isolation level), or join it in READ COMMITTED"
                )

    def begin(self, conn: Connection) -> None:
        """After the switch-on, the migration's transaction begins; PostgreSQL: it takes the tenant's lock.

        Only now: a snapshot (REPEATABLE READ) then sees the switch-on, and an owned window never
        needs two server connections at once (a pooler's small pool cannot deadlock it).
        """
        if conn.dialect.name == "sqlite" and not _sqlite_in_transaction(conn.connection.dbapi_connection):
            # Without this BEGIN, pysqlite would autocommit DDL that comes before any DML.
            conn.exec_driver_sql("BEGIN")
        if self.postgres:  # the switch-off is fenced on the transaction's id instead
            self._unprepared = unprepared(conn)
            self._unprepared.__enter__()
            self._lock(conn)
        else:
            self._watch(conn)

    def close(self, conn: Connection) -> None:
        """Switch off in the migration's transaction, once sure it is still the window's own."""
        assert self.window is not None
        if self.before_close is not None:
            self.before_close()
        self._check_transaction(conn)
        if self.owned:  # shown to this process's gates once the window commits it
            with _collecting(conn, self._closing):
                self.store.close_window(self.window, conn, transaction=self._token, done=self.done)
        else:
            self.store.close_window(self.window, conn, transaction=self._token)
            self._announce_on_commit(conn)

    def _lock(self, conn: Connection) -> None:
        assert self.window is not None
        # The transaction's id too: the switch-off checks that the work did not end it.
        backend_pid, self._token = self.store._hold(self.window, conn, self._held)
        self._held = None
        self.owner = Owner(self.owner.host, self.owner.pid, backend_pid)

    def _watch(self, conn: Connection) -> None:
        """Notice the work ending the window's transaction through SQLAlchemy (commit or rollback)."""

        def ended(_conn: Connection) -> None:
            self._ended_by_caller = self._ended_by_caller or "committed or rolled back"

        self._watched = conn
        self._ended = ended
        event.listen(conn, "commit", ended)
        event.listen(conn, "rollback", ended)

    def _unwatch(self) -> None:
        conn, self._watched = self._watched, None
        if conn is not None:
            for name in ("commit", "rollback"):
                if event.contains(conn, name, self._ended):
                    event.remove(conn, name, self._ended)

    def _check_transaction(self, conn: Connection) -> None:
        """Refuse to switch off if the work ended the window's transaction (PostgreSQL: the
        switch-off itself checks the transaction's id as well)."""
        why = self._ended_by_caller
        if (
            why is None
            and conn.dialect.name == "sqlite"
            and not _sqlite_in_transaction(conn.connection.dbapi_connection)
        ):
            why = "ended (COMMIT or ROLLBACK sent)"
        if why is None and self._saved and in_autocommit_idle(conn):
            why = "ended (COMMIT or ROLLBACK sent)"
        if why is not None:
            raise WindowLost(ENDED_BY_WORK.format(why=why))

    # -- bookkeeping steps, each in a transaction of its own --------------------------------------

    def open(self) -> None:
        """Switch maintenance on; start renewing the lease where no lock covers the window.

        A failure at the switch-on's COMMIT leaves it unknown whether it landed (a lost reply):
        the window then counts as open, so that its failure is recorded, fenced on its id.
        """
        window_id = uuid.uuid4().hex
        try:
            self.window, opened = self.store._open_window(
                self.tenant,
                self.owner,
                message=self.message,
                retry_after=self.retry_after,
                ends_at=self.ends_at,
                mode=self.mode,
                lease=self.lease,
                window_id=window_id,
                connection=self.lent,
                begin=self.lent is not None,
            )
            if opened is not None:
                self._held, self._saved = opened
        except MaintgateError:
            raise  # refused before its transaction committed: nothing changed
        except BaseException:
            self.window = Window(window_id, self.tenant, self.owner, self.mode, self.message)
            raise
        if not self.postgres:  # on PostgreSQL the lock holds the window once the gap is over
            self._renewer = _Renewer(self.store, self.window, self.lease)
            self._renewer.start()

    def close_alone(self) -> None:
        """Degraded mode (DDL that commits itself): the switch-off after the work, on its own."""
        assert self.window is not None
        self.store.close_window(self.window)

    def fail(self, exc: BaseException) -> None:
        """Record the error in a new transaction; if even that fails, log it and carry on."""
        assert self.window is not None
        error = _describe(exc)
        try:
            held = self.store.record_window_failure(self.window, error)
        except Exception as record_exc:
            logger.error(
                "maintgate: could not record the failure of tenant %r's window (%s); "
                "maintenance stays on. Original error: %s",
                self.tenant,
                _describe(record_exc),
                error,
                extra={"maintgate_event": "record_failure_failed", "tenant": self.tenant},
            )
            return
        announce(
            "window_failed",
            self.tenant,
            owner=self.owner,
            window=self.window.id,
            error=error,
            held=None if held else False,
            level=logging.WARNING,
        )

    def withdraw(self, exc: BaseException) -> None:
        """The work refused to start: end the window as if it never opened, and say why."""
        assert self.window is not None
        self.store.close_window(self.window, logged_as="window_withdrawn")
        announce("window_withdrawn", self.tenant, window=self.window.id, why=str(exc), level=logging.WARNING)

    def committed(self) -> None:
        """Log that the migration and the switch-off are committed."""
        window = self.window
        announce("window_committed", self.tenant, owner=self.owner, window=window.id if window else None)
        self.store._publish(self._closing, wait=PUBLISH_WAIT)

    def finish(self) -> None:
        """Whatever the outcome: stop renewing, stop watching the connection."""
        if self._renewer is not None:
            self._renewer.stop()
        if self._unprepared is not None:
            self._unprepared.__exit__(None, None, None)
        if self._saved and self.lent is not None:
            end_autocommit(self.lent, self._saved)
        self._unwatch()

    def _announce_on_commit(self, conn: Connection) -> None:
        """Joined windows: the caller commits; log it then, or warn if it rolls back instead."""

        def rolled_back(_conn: Connection) -> None:
            event.remove(conn, "commit", committed)
            logger.warning(
                "maintgate: the caller rolled back the transaction of tenant %r's window after it "
                "closed; maintenance stays on and status shows the owner gone",
                self.tenant,
                extra={"maintgate_event": "window_rolled_back_by_caller", "tenant": self.tenant},
            )

        def committed(_conn: Connection) -> None:
            event.remove(conn, "rollback", rolled_back)
            self.committed()

        self._unwatch()
        event.listen(conn, "rollback", rolled_back, once=True)
        event.listen(conn, "commit", committed, once=True)


def _steps(w: _Window) -> Generator[Step, Any, None]:
    """The window's one sequence of steps; a driver carries out each step it yields."""
    try:
        yield (CHECK, w.prepare)
        try:
            yield (BOOK, w.open)
            yield (TX, w.begin)
            yield (WORK,)
            if w.atomic or not w.owned:  # a caller's transaction is the caller's to commit
                yield (TX, w.close)
                if w.owned:
                    yield (COMMIT,)
            else:
                yield (COMMIT,)
                yield (BOOK, w.close_alone)
        except BaseException as exc:
            if w.opened:  # a refusal before the switch-on changed nothing and records nothing
                with contextlib.suppress(BaseException):  # a cancellation meanwhile: record all the same
                    yield (ABORT,)
                yield (BOOK, w.withdraw if isinstance(exc, WindowRefused) else w.fail, exc)
            raise
    finally:
        w.finish()
    if w.owned:
        w.committed()


def drive(
    steps: Generator[Step, Any, None],
    conn: Connection,
    *,
    commit: Callable[[], object],
    abort: Callable[[], object],
    handed: Any,
    begin: Callable[[], object] | None = None,
    checks: bool = True,
) -> Iterator[Any]:
    """Carry out the steps synchronously; yields ``handed`` to the caller's block at the work step.

    ``begin`` starts the migration's transaction just before its first step in it, after the
    switch-on (Django's atomic block is entered only then); ``checks=False`` skips the refusals a driver
    makes impossible itself.
    """
    result: Any = None
    step = next(steps)
    while True:
        try:
            kind = step[0]
            if kind == WORK:
                yield handed
                result = None
            elif kind == CHECK:
                result = step[1](conn) if checks else None
            elif kind == TX:
                if begin is not None:
                    starting, begin = begin, None
                    starting()
                result = step[1](conn)
            elif kind == BOOK:
                result = step[1](*step[2:])
            elif kind == COMMIT:
                result = commit()
            else:
                result = abort()
        except BaseException as exc:
            try:
                step = steps.throw(exc)
            except StopIteration:
                return
            continue
        try:
            step = steps.send(result)
        except StopIteration:
            return


class _Renewer:
    """Renews a window's lease every third of its length, on a daemon thread, until stopped."""

    def __init__(self, store: MaintenanceStore, window: Window, lease: float) -> None:
        self._store = store
        self._window = window
        self._lease = lease
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"maintgate-lease-{window.tenant}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self._lease / 3):
            try:
                if not self._store.renew_window(self._window, self._lease):
                    logger.warning(
                        "maintgate: tenant %r's window %s no longer holds the tenant (released or "
                        "taken over); it will fail instead of switching maintenance off",
                        self._window.tenant,
                        self._window.id,
                        extra={"maintgate_event": "window_lost", "tenant": self._window.tenant},
                    )
                    return
            except Exception as exc:  # a busy SQLite file, a passing outage: try again next time
                if not warned:
                    warned = True
                    logger.warning(
                        "maintgate: could not renew the lease of tenant %r's window (%s); retrying",
                        self._window.tenant,
                        _describe(exc),
                        extra={"maintgate_event": "lease_renewal_failed", "tenant": self._window.tenant},
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


def _never_commit() -> None:
    raise AssertionError("a joined window never commits the caller's transaction")


def _rollback_caller(conn: Connection) -> None:
    """Roll the caller's transaction back (never commit it): the error record must not wait on its locks."""
    try:
        conn.rollback()
    except Exception:
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
    lease: float = DEFAULT_LEASE,
) -> Iterator[Connection]:
    """Open a migration window for ``tenant`` and yield the connection to migrate on.

    Success: the migration and the switch-off commit together. Failure: everything rolls
    back, maintenance stays on, the error is recorded, and the exception propagates.
    With ``connection=``, the switch-off runs in the caller's transaction and the caller
    commits: the library never commits a connection it was given. On failure it rolls that
    transaction back before recording the error. ``lease`` is how long a window that stopped
    renewing (its process died) keeps the tenant on SQLite and MySQL.
    """
    if connection is not None and not connection.in_transaction():
        raise MaintgateError("pass a connection inside a transaction (conn.begin()); the caller commits it")
    dialect = (connection or store.engine).dialect.name
    same_pool = connection is None or connection.engine is store.engine
    window = _Window(
        store,
        tenant,
        message=message,
        retry_after=retry_after,
        ends_at=ends_at,
        mode=mode,
        owned=connection is None,
        dialect_name=dialect,
        allow_non_transactional_ddl=allow_non_transactional_ddl,
        lease=lease,
        connections_needed=CONNECTIONS_NEEDED if same_pool else 1,
    )
    if connection is not None:
        yield from drive(
            _steps(window),
            connection,
            commit=_never_commit,
            abort=lambda: _rollback_caller(connection),
            handed=connection,
        )
        return
    yield from _owned(store, window)


def _begin_unless_begun(conn: Connection) -> None:
    """The migration's transaction, unless the switch-on's message began it (SQLAlchemy's autobegin)."""
    if not conn.in_transaction():
        conn.begin()


def _owned(store: MaintenanceStore, window: _Window, read_committed: bool = False) -> Iterator[Connection]:
    """A window that owns its transaction, on a connection of the store's engine; at the engine's
    isolation level, or ``read_committed`` (set on the driver for this window alone: SQLAlchemy's
    option would leave the pool's connections at the level it saw when it first connected)."""
    with store.engine.connect() as conn, ExitStack() as stack:
        if read_committed:
            stack.enter_context(_read_committed(conn))
        begin = None
        if can_lend(conn):  # the switch-on commits on it first: one checkout, not two
            window.lent, begin = conn, functools.partial(_begin_unless_begun, conn)
        else:
            conn.begin()
        yield from drive(
            _steps(window), conn, commit=conn.commit, abort=lambda: _discard(conn), handed=conn, begin=begin
        )


@contextmanager
def rollout_window(
    store: MaintenanceStore,
    tenant: str,
    done: Done,
    *,
    message: str | None,
    retry_after: int | None,
    lease: float,
) -> Iterator[Connection]:
    """:func:`maintenance_window` for a rollout's tenant: ``done`` (its done mark) is written with
    the switch-off, in the same round trip where the server function does both.

    On PostgreSQL its transaction is READ COMMITTED whatever the engine's level: the runner renews
    the tenant's claim while the migration runs, and under a snapshot the done mark would then
    fail to serialize with that renewal, for every migration longer than a third of the lease."""
    window = _Window(
        store,
        tenant,
        message=message,
        retry_after=retry_after,
        ends_at=None,
        mode=FULL,
        owned=True,
        dialect_name=store.engine.dialect.name,
        lease=lease,
    )
    window.done = done
    yield from _owned(store, window, read_committed=store.engine.dialect.name == "postgresql")


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
    lease: float = DEFAULT_LEASE,
) -> AsyncIterator[AsyncConnection]:
    """:func:`maintenance_window` for SQLAlchemy's asyncio engines; yields an ``AsyncConnection``.

    The window's bookkeeping (switch-on, error record) runs in worker threads on the store's
    engine; the migration and the switch-off run on the async connection. Without
    ``engine=`` or ``connection=``, an async engine is made from the store's URL.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    if connection is not None and not connection.in_transaction():
        raise MaintgateError("pass a connection inside a transaction (conn.begin()); the caller commits it")
    owned_engine = None
    if connection is None and engine is None:
        engine = owned_engine = create_async_engine(_async_url(store.engine))
        if engine.dialect.name == "sqlite":
            make_sqlite_transactional(engine.sync_engine)
    dialect = (connection or engine).dialect.name  # type: ignore[union-attr]
    window = _Window(
        store,
        tenant,
        message=message,
        retry_after=retry_after,
        ends_at=ends_at,
        mode=mode,
        owned=connection is None,
        dialect_name=dialect,
        allow_non_transactional_ddl=allow_non_transactional_ddl,
        lease=lease,
        connections_needed=1,  # the migration's connection comes from the async engine
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            if connection is None:
                assert engine is not None
                conn = engine.connect()
                try:  # connecting runs to its end: aiosqlite's thread must not outlive a cancelled start
                    await _uncancelled(conn.start())
                finally:
                    if conn.sync_connection is not None:
                        stack.push_async_callback(conn.close)
                await conn.begin()
            else:
                conn = connection
            # An async generator cannot delegate with ``yield from``: hand the block's outcome on by hand.
            driver = _drive_async(_steps(window), conn, owned=connection is None)
            handed = await driver.__anext__()
            try:
                yield handed
            except BaseException as exc:
                await driver.athrow(exc)  # runs the failure steps, then raises ``exc`` again
                raise
            with contextlib.suppress(StopAsyncIteration):
                await driver.__anext__()
    finally:
        if owned_engine is not None:
            await owned_engine.dispose()


async def _drive_async(
    steps: Generator[Step, Any, None], conn: AsyncConnection, *, owned: bool
) -> AsyncGenerator[AsyncConnection, None]:
    """Carry out the steps on an async connection; bookkeeping runs in threads, to its end."""
    result: Any = None
    step = next(steps)
    while True:
        try:
            kind = step[0]
            if kind == WORK:
                yield conn
                result = None
            elif kind in (TX, CHECK):
                result = await conn.run_sync(step[1])
            elif kind == BOOK:
                result = await _to_the_end(step[1], *step[2:])
            elif kind == COMMIT:
                await conn.commit()
                result = None
            else:  # a rollback a cancellation must not cut short: the error record follows it
                result = await _uncancelled(conn.run_sync(_discard if owned else _rollback_caller))
        except BaseException as exc:
            try:
                step = steps.throw(exc)
            except StopIteration:
                return
            continue
        try:
            step = steps.send(result)
        except StopIteration:
            return


async def _to_the_end(func: Any, *args: Any) -> Any:
    """Run a blocking step in a worker thread to its end even if the task is cancelled meanwhile.

    A switch-on committed by a thread must be known to the window, or it could not be
    undone; the cancellation is re-raised once the step is over.
    """
    return await _uncancelled(asyncio.to_thread(func, *args))


async def _uncancelled(awaitable: Any) -> Any:
    """Await ``awaitable`` to its end; a cancellation meanwhile is raised once it is over."""
    task = asyncio.ensure_future(awaitable)
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
