"""Read and write maintenance state in the app's own database, through SQLAlchemy Core."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Integer,
    Row,
    String,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    inspect,
    literal,
    make_url,
    null,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import pgsql, plan
from .errors import InvalidArgument, MaintgateError, WindowBusy, WindowLost
from .mirror import mirrors_of
from .schema import DEFAULT_PREFIX, Tables, build_tables
from .state import (
    ALL_TENANTS,
    FULL,
    MODES,
    OPERATOR,
    WINDOW,
    Changes,
    Ended,
    HistoryEntry,
    Lookup,
    MaintenanceState,
    Owner,
    Schedule,
    Window,
    check_tenant,
    strictness,
    utcnow,
)

logger = logging.getLogger("maintgate")

DEFAULT_LEASE = 30.0
"""Seconds a window's lease lasts; off PostgreSQL a running window renews it every third of that."""
OPENING_GRACE = 5.0
"""PostgreSQL: longest a window's lease lasts; after opening, its transaction's lock holds the tenant."""
PUBLISH_WAIT = 2.0
"""Seconds a committed window waits for this process's gates to read its switch-off."""
LOCK_WAIT = 2.0
"""Seconds a migration's transaction retries the tenant's lock, which a switch-on holds for an instant."""


def _KEEP_OPERATOR(t: Any) -> Any:
    """``source`` for a window's write: still the operator's if the operator had it on."""
    return case((and_(t.c.active == true(), t.c.source == OPERATOR), OPERATOR), else_=WINDOW)


_UPSERT_INSERTS: dict[str, Any] = {"postgresql": pg_insert, "sqlite": sqlite_insert}


def make_sqlite_transactional(engine: Engine) -> None:
    """Make pysqlite emit BEGIN for every transaction, so DDL rolls back like DML.

    With its default settings the driver sends no BEGIN before DDL, which then
    autocommits (SQLAlchemy's pysqlite docs, "Serializable isolation / Savepoints /
    Transactional DDL").
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE for a transaction that reads before it writes: taking the write lock later
        # could fail at once ("database is locked"), whatever the busy timeout.
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _state(m: Mapping[Any, Any], *, active: bool, **extra: Any) -> MaintenanceState:
    """A state from a row of the state table (or the lookup's union of it with schedules)."""
    return MaintenanceState(
        tenant=m["tenant"],
        active=active,
        message=m["message"],
        error=m["error"],
        retry_after=m["retry_after"],
        ends_at=_aware(m["ends_at"]),
        started_at=_aware(m["started_at"]),
        updated_at=_aware(m["updated_at"]),
        owner=_owner(m),
        # Full while an open window needs full, over an operator's read-only.
        mode=FULL if m["window_id"] is not None and m["window_mode"] == FULL else m["mode"] or FULL,
        **extra,
    )


def state_fields(state: MaintenanceState) -> dict[str, Any]:
    """A state's own fields as JSON values (times in ISO 8601): what notifications and the CLI show."""
    return {
        "active": state.active,
        "mode": state.mode,
        "message": state.message,
        "error": state.error,
        "retry_after": state.retry_after,
        "ends_at": iso(state.ends_at),
        "started_at": iso(state.started_at),
        "updated_at": iso(state.updated_at),
        "source": state.source,
    }


def state_from_payload(payload: str) -> tuple[str, MaintenanceState | None, int | None]:
    """``(tenant, state, version)`` from a NOTIFY payload; state and version are None if absent."""
    try:
        data = json.loads(payload)
    except ValueError:
        return payload, None, None
    if not isinstance(data, dict) or not isinstance(data.get("tenant"), str):
        return payload, None, None
    tenant = data["tenant"]
    # A change number; PENDING when the write could not take one (a caller's transaction);
    # None when the sender predates change numbers.
    version = data.get("version")
    if "version" in data and version is None:
        version = PENDING
    version = version if isinstance(version, int) and not isinstance(version, bool) else None
    s = data.get("state")
    if not isinstance(s, dict):
        return tenant, None, version
    state = MaintenanceState(
        tenant=tenant,
        active=bool(s.get("active")),
        mode=s.get("mode") or FULL,
        message=s.get("message"),
        error=s.get("error"),
        retry_after=s.get("retry_after"),
        ends_at=_from_iso(s.get("ends_at")),
        started_at=_from_iso(s.get("started_at")),
        updated_at=_from_iso(s.get("updated_at")),
        source=s.get("source"),
    )
    return tenant, state, version


def iso(value: datetime | None) -> str | None:
    """``value`` in ISO 8601, or None."""
    return None if value is None else value.isoformat()


def _from_iso(value: Any) -> datetime | None:
    """A time from a payload, in UTC as the store reads them (the writer's session may have
    rendered it in another time zone)."""
    return _aware(datetime.fromisoformat(value)) if isinstance(value, str) else None


def _refusal(tenant: str, exc: sa_exc.DBAPIError) -> MaintgateError:
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return MaintgateError(
        f"could not switch maintenance on for tenant {tenant!r}; nothing changed: {first}. If the "
        "tenant's row is locked by your own transaction (a joined window opened after writing "
        "maintgate's row), open the window first"
    )


@contextmanager
def _refusing(tenant: str) -> Iterator[None]:
    """A database error inside the switch-on's transaction (before its commit): nothing changed."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise _refusal(tenant, exc) from exc


def _autocommitting(conn: Connection) -> AbstractContextManager[None]:
    """psycopg: each statement on idle ``conn`` commits by itself meanwhile."""
    return _driver_set(conn, "autocommit", True)


def _busy_message(tenant: str, holder: MaintenanceState | None, now: datetime) -> str:
    """Why a new window for ``tenant`` is refused: who holds it, and until when."""
    text_ = f"a maintenance window for tenant {tenant!r} is already open"
    if holder is None or holder.window_id is None:
        return text_
    owner = holder.owner
    who = f" by {owner.host} pid {owner.pid}" if owner else ""
    if holder.lease_until is None or holder.lease_until < now:
        until = "; its migration transaction holds the tenant's lock"
    else:
        until = f"; its lease runs until {holder.lease_until.isoformat()}"
    return (
        f"{text_} (window {holder.window_id}{who}{until}). If that process is gone, "
        f"the next window takes over once the lease expires, or run `maintgate release {tenant}`"
    )


def _state_rows(t: Any, numbered: bool = False) -> Any:
    """State rows in the shape the gate's reads share with schedules (``kind`` tells them apart)."""
    return select(
        literal("state").label("kind"),
        cast(null(), Integer).label("id"),
        t.c.tenant,
        t.c.active,
        t.c.mode,
        t.c.window_id,
        t.c.window_mode,
        t.c.message,
        t.c.error,
        t.c.retry_after,
        t.c.ends_at,
        t.c.started_at,
        t.c.updated_at,
        t.c.owner_host,
        t.c.owner_pid,
        t.c.owner_backend_pid,
        t.c.source,
        t.c.version if numbered else cast(null(), BigInteger).label("version"),
    )


def _schedule_rows(sc: Any) -> Any:
    """Schedules in the shape of :func:`_state_rows`: on from ``starts_at``, by ``created_at``."""
    return select(
        literal("schedule").label("kind"),
        sc.c.id,
        sc.c.tenant,
        true().label("active"),
        sc.c.mode,
        cast(null(), String).label("window_id"),
        cast(null(), String).label("window_mode"),
        sc.c.message,
        cast(null(), String).label("error"),
        sc.c.retry_after,
        sc.c.ends_at,
        sc.c.starts_at.label("started_at"),
        sc.c.created_at.label("updated_at"),
        cast(null(), String).label("owner_host"),
        cast(null(), Integer).label("owner_pid"),
        cast(null(), Integer).label("owner_backend_pid"),
        cast(null(), String).label("source"),
        cast(null(), BigInteger).label("version"),
    )


_PENDING = "maintgate_changes"
PENDING = pgsql.PENDING
"""Change number of a row written in a caller's transaction, until a numbered change renumbers it."""
VERSION_MAX = 2**63 - 1
"""The largest change number (BIGINT): the upper bound of a gate's read of what changed."""
_Change = tuple[str, MaintenanceState | None, int | None]


_OWN = "maintgate_own"


@contextmanager
def _collecting(conn: Connection, pending: list[_Change], own: bool = False) -> Iterator[None]:
    """Have the store's writes on ``conn`` list their changes in ``pending`` meanwhile.

    ``own``: a connection of the store's engine, whose rows the store can read back (a
    caller's, Django's say, may convert column types its own way).
    """
    conn.info[_PENDING] = pending
    conn.info[_OWN] = own
    try:
        yield
    finally:
        conn.info.pop(_PENDING, None)
        conn.info.pop(_OWN, None)


def _owner(m: Mapping[Any, Any]) -> Owner | None:
    if m["owner_host"] is None:
        return None
    return Owner(m["owner_host"], m["owner_pid"], m["owner_backend_pid"])


def _owner_values(owner: Owner | None) -> dict[str, Any]:
    if owner is None:
        return {"owner_host": None, "owner_pid": None, "owner_backend_pid": None}
    return {"owner_host": owner.host, "owner_pid": owner.pid, "owner_backend_pid": owner.backend_pid}


def _record(
    tenant: str,
    event: str,
    at: datetime,
    *,
    message: str | None = None,
    error: str | None = None,
    owner: Owner | None = None,
    window_id: str | None = None,
) -> dict[str, Any]:
    """A history row as the parameters of :func:`pgsql.history_values`."""
    return {
        "h_tenant": tenant,
        "h_event": event,
        "h_at": at,
        "h_message": message,
        "h_error": error,
        "h_window_id": window_id,
        **{f"h_{k}": v for k, v in _owner_values(owner).items()},
    }


def _history_insert(tables: Tables) -> Any:
    return tables.history.insert().values(pgsql.history_values(tables))


def _touch(tables: Tables) -> Any:
    """Lock tenant ``:p_tenant``'s row (an update that changes nothing)."""
    t = tables.state
    return (
        update(t)
        .where(t.c.tenant == bindparam("p_tenant", type_=t.c.tenant.type))
        .values(version=t.c.version)
    )


def _xid_function(conn: Connection) -> str:
    return pgsql.xid_function(conn.dialect.server_version_info)


ENDED_BY_WORK = (
    "the work {why} the window's transaction itself, so the migration is no longer one transaction "
    "with the switch-off; maintenance stays on. Never commit or roll back the connection the window yields"
)


def announce(event: str, tenant: str, *, level: int = logging.INFO, **details: Any) -> None:
    """Log a state change under the ``maintgate`` logger, with the details as structured ``extra``."""
    if not logger.isEnabledFor(level):
        return
    shown = ", ".join(f"{k}={v!r}" for k, v in details.items() if v is not None)
    logger.log(
        level,
        "maintgate: %s tenant %r%s",
        event,
        tenant,
        f" ({shown})" if shown else "",
        extra={
            "maintgate_event": event,
            "tenant": tenant,
            **{f"maintgate_{k}": v for k, v in details.items()},
        },
    )


RESET_SEARCH_PATH = (
    "SELECT set_config('search_path', reset_val, true) FROM pg_settings WHERE name = 'search_path'"
)
BOOKKEEPING_LOCK_TIMEOUT = 5.0
"""Seconds a window's own write waits for the tenant's row before it gives up."""
LOCK_TIMEOUT_SETTING = func.set_config("lock_timeout", f"{int(BOOKKEEPING_LOCK_TIMEOUT * 1000)}ms", True)
"""PostgreSQL: that wait, for the rest of the transaction (as ``SET LOCAL``), as an expression."""
LOOKUP_TIMEOUT = 2.0
"""Seconds a connection attempt or a pool checkout may take on engines the store builds; on
PostgreSQL, also the statement timeout of :meth:`MaintenanceStore.lookup` and ``changes`` on any engine."""


_SAVED = "maintgate_saved"
"""In a pooled connection's ``info``: the driver attributes maintgate changed and has not put back
yet (:class:`Saved`), in the order changed."""


@dataclass(eq=False)
class Saved:
    """A driver attribute maintgate changed, and its value before (:func:`set_on_driver`)."""

    driver: Any
    name: str
    before: Any
    pending: list[Saved]
    """The pooled connection's list of changes not put back yet, this one among them."""

    def restore(self) -> None:
        setattr(self.driver, self.name, self.before)
        if self in self.pending:
            self.pending.remove(self)


def set_on_driver(conn: Connection, name: str, value: Any) -> Saved | None:
    """Set the attribute ``name`` of ``conn``'s driver connection, remembered so that it is put
    back (:func:`put_back`, or :func:`_checked_in` if the connection returns to the pool first);
    None where the driver has no such attribute."""
    driver = conn.connection.driver_connection
    if driver is None or not hasattr(driver, name):
        return None
    pending = conn.connection.info.setdefault(_SAVED, [])
    saved = Saved(driver, name, getattr(driver, name), pending)
    setattr(driver, name, value)
    pending.append(saved)
    return saved


def put_back(conn: Connection, saved: Saved | None) -> None:
    """Undo :func:`set_on_driver`. If the connection went back to the pool meanwhile (closed in a
    window's block), :func:`_checked_in` put it back then, where the store watches the pool;
    where it does not (an engine busy when the store was made), it is put back now, as before."""
    if saved is None or conn.invalidated:
        return
    if not conn.closed:
        saved.restore()
    elif not event.contains(conn.engine, "checkin", _checked_in):
        with contextlib.suppress(Exception):  # best effort: another checkout may hold it now
            saved.restore()


def put_back_all(conn: Connection, saved: list[Saved | None]) -> None:
    """:func:`put_back` each of ``saved``, last changed first."""
    for each in reversed(saved):
        put_back(conn, each)


@contextmanager
def _driver_set(conn: Connection, name: str, value: Any) -> Iterator[None]:
    """The driver connection's attribute ``name`` set to ``value`` meanwhile, where it has one."""
    saved = set_on_driver(conn, name, value)
    try:
        yield
    finally:
        put_back(conn, saved)


def _checked_in(dbapi_connection: Any, record: Any) -> None:
    """A connection back in the pool with driver attributes maintgate changed (a window's, closed
    in its block): all put back, last changed first; dropped if they cannot be (a transaction open)."""
    changed = record.info.pop(_SAVED, None)
    if not changed or dbapi_connection is None:
        return
    try:
        for saved in reversed(list(changed)):  # each restore leaves the list
            saved.restore()
    except Exception:
        record.invalidate()


def unprepared(conn: Connection) -> AbstractContextManager[None]:
    """psycopg: no server-side prepared statements on ``conn`` meanwhile (they break behind PgBouncer)."""
    return _driver_set(conn, "prepare_threshold", None)


def can_lend(conn: Connection) -> bool:
    """Whether ``conn`` (idle) can run a window's bookkeeping transaction before the migration's
    own: psycopg, whose isolation level is set per connection and put back without a round trip."""
    driver = conn.connection.driver_connection
    return (
        conn.dialect.name == "postgresql" and hasattr(driver, "isolation_level") and hasattr(driver, "pgconn")
    )


def _begin_command(driver: Any) -> str:
    """The BEGIN psycopg sends for the transactions of ``driver``: with its isolation level, read
    only and deferrable settings."""
    parts = ["BEGIN"]
    if driver.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + driver.isolation_level.name.replace("_", " "))
    if driver.read_only is not None:
        parts.append("READ ONLY" if driver.read_only else "READ WRITE")
    if driver.deferrable is not None:
        parts.append("DEFERRABLE" if driver.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def end_autocommit(conn: Connection, saved: list[Saved | None]) -> None:
    """After a window begun by :meth:`MaintenanceStore._switch_on_and_begin` ended: its driver out
    of autocommit and its cursor classes as they were (``saved``), or, if its transaction is
    somehow still open, the connection dropped (never back to the pool in autocommit)."""
    if conn.invalidated:
        return
    if not conn.closed:
        driver: Any = conn.connection.driver_connection
        if driver is not None and _status(driver) != "IDLE":
            conn.invalidate()
            return
    put_back_all(conn, saved)


CURSOR_FACTORIES = ("cursor_factory", "server_cursor_factory")
HOOKED = ("execute", "executemany", "copy", "stream")
"""The methods of a psycopg cursor that send statements."""


def cursor_class_with(base: type, before: Callable[[Any], None]) -> type:
    """psycopg's cursor class ``base`` whose methods that send statements call ``before(cursor)``
    first: set as a driver connection's ``cursor_factory`` (and ``server_cursor_factory``), a hook
    on that connection's statements alone (a listener on each window's connection costs more than
    the window's own statements, one on the engine taxes every statement of the application's)."""
    methods: dict[str, Any] = {}
    for name in HOOKED:
        if hasattr(base, name):
            methods[name] = _hooked(getattr(base, name), before)
    return type(f"Maintgate{base.__name__}", (base,), methods)


def _hooked(method: Callable[..., Any], before: Callable[[Any], None]) -> Callable[..., Any]:
    def hooked(cursor: Any, *args: Any, **kwargs: Any) -> Any:
        before(cursor)
        return method(cursor, *args, **kwargs)

    return hooked


def hook_cursors(
    conn: Connection, classes: dict[type, type], before: Callable[[Any], None]
) -> list[Saved | None]:
    """Set on ``conn``'s driver both its cursor classes, hooked with ``before`` (built once per base
    class, kept in ``classes``); returns what :func:`put_back` takes, one entry per class."""
    driver: Any = conn.connection.driver_connection
    saved: list[Saved | None] = []
    for factory in CURSOR_FACTORIES:
        base = getattr(driver, factory, None)
        if isinstance(base, type):
            hooked = classes.get(base)
            if hooked is None:
                hooked = classes[base] = cursor_class_with(base, before)
            saved.append(set_on_driver(conn, factory, hooked))
    return saved


def _begin_again(cursor: Any) -> None:
    """Before a statement of a window begun in autocommit: if the work ended the window's
    transaction, psycopg begins a new one, as it would have, rather than autocommit the rest."""
    driver = cursor.connection
    if driver.autocommit and _status(driver) == "IDLE":
        driver.autocommit = False


_BEGINNING_AGAIN: dict[type, type] = {}


def _status(driver: Any) -> str:
    """psycopg: the server's transaction status as libpq last saw it (IDLE, INTRANS, INERROR...)."""
    return str(driver.info.transaction_status.name)


def _watch_pool(engine: Engine, built: bool) -> bool:
    """Whether :func:`_checked_in` listens to ``engine``'s pool, added now if the engine is idle: one
    the store built, or one with no connection checked out. SQLAlchemy runs a pool's listeners by
    walking a list that adding to fails under a thread walking it (an application's listener that
    waits on I/O while a store is made)."""
    if event.contains(engine, "checkin", _checked_in):
        return True
    checked_out = getattr(engine.pool, "checkedout", None)
    if built or (checked_out is not None and checked_out() == 0):
        event.listen(engine, "checkin", _checked_in)
        return True
    return False


def in_autocommit_idle(conn: Connection) -> bool:
    """Whether ``conn``'s driver (psycopg, in autocommit) has no transaction open on the server."""
    driver: Any = conn.connection.driver_connection
    return driver is not None and _status(driver) == "IDLE"


@contextmanager
def _read_committed(conn: Connection) -> Iterator[None]:
    """PostgreSQL: the transactions begun on ``conn`` meanwhile are READ COMMITTED, whatever the
    engine's level; the store's short writes all take the counter, and under REPEATABLE READ or
    SERIALIZABLE writers of different tenants would fail on it (serialization)."""
    if not can_lend(conn):
        conn.execution_options(isolation_level="READ COMMITTED")  # a connection of the store's own
        yield
        return
    dbapi: Any = conn.dialect.dbapi  # psycopg
    # A transaction even on an AUTOCOMMIT engine: each of the store's writes is all or nothing.
    with (
        _driver_set(conn, "autocommit", False),
        _driver_set(conn, "isolation_level", dbapi.IsolationLevel.READ_COMMITTED),
    ):
        yield


def _wal(dbapi_connection: Any, _record: Any) -> None:
    """Write-ahead logging: a gate's read never waits for a migration's write, nor sees it uncommitted."""
    dbapi_connection.execute("PRAGMA journal_mode=WAL")


def _quoted(conn: Connection, table: Any) -> str:
    """``table``'s quoted name for :func:`text`, which reads ``:name`` as a bound parameter and
    doubles a ``%`` itself where the driver needs it."""
    prep = conn.dialect.identifier_preparer
    name = prep.format_table(table)
    if prep._double_percents:
        name = name.replace("%%", "%")
    return name.replace(":", "\\:")


def _bounded_options(url: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Engine options with bounded waits, unless the caller set them: an outage must not hang requests."""
    merged = dict(options)
    backend = make_url(url).get_backend_name()
    driver = make_url(url).get_driver_name()
    connect_args = dict(merged.get("connect_args", {}))
    if backend == "sqlite":
        # Shorter than a gate's load timeout; with WAL (set on connect) readers never wait anyway.
        if driver == "pysqlite":
            connect_args.setdefault("timeout", LOOKUP_TIMEOUT)
        merged["connect_args"] = connect_args
        return merged
    merged.setdefault("pool_timeout", LOOKUP_TIMEOUT)
    merged.setdefault("pool_pre_ping", True)
    if driver == "psycopg":
        # Prepared statements break behind PgBouncer in transaction pooling (before 1.21).
        connect_args.setdefault("prepare_threshold", None)
    if driver in ("psycopg", "psycopg2", "pymysql", "mysqldb"):
        connect_args.setdefault("connect_timeout", int(LOOKUP_TIMEOUT))
    elif driver == "pg8000":
        connect_args.setdefault("timeout", LOOKUP_TIMEOUT)
    merged["connect_args"] = connect_args
    return merged


def _schedule(m: Mapping[Any, Any]) -> Schedule:
    return Schedule(
        id=m["id"],
        tenant=m["tenant"],
        starts_at=_aware(m["starts_at"]),  # type: ignore[arg-type]
        ends_at=_aware(m["ends_at"]),
        message=m["message"],
        mode=m["mode"],
        retry_after=m["retry_after"],
        created_at=_aware(m["created_at"]),
    )


FUNCTIONS: dict[str, Callable[[Tables, Any], pgsql.ServerFunction]] = {
    "switch_on": lambda tables, dialect: pgsql.switch_on_function(tables, dialect, LOCK_TIMEOUT_SETTING),
    "switch_off": pgsql.switch_off_function,
    "claim": pgsql.claim_function,
}
"""The server functions :meth:`MaintenanceStore.create_tables` makes on PostgreSQL, by kind."""
UNCALLABLE = frozenset({"42883", "42501"})
"""A server function dropped (undefined_function) or not this role's to call (insufficient_privilege)."""
FUNCTION_RECHECK = 60.0
"""Seconds before a store looks again for a server function it did not find."""
_NOT_READ_COMMITTED = "maintgate_not_read_committed"
"""In a connection's ``info``: its session's default isolation is stricter than READ COMMITTED."""
_SCHEMA_OF = (
    "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.oid = to_regclass(quote_ident(:name))"
)


def _functions_marker(tables: Tables) -> str:
    """The comment on the server functions of ``tables``."""
    return f"maintgate: the server functions of {tables.state.schema}.{tables.state.name}"


def _functions_found(conn: Connection, schema: str | None, names: list[str]) -> set[str]:
    """Which of the functions ``names`` exist in ``schema`` and may be called by this session's role."""
    found = conn.execute(
        text(
            "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = :schema AND p.proname = ANY(:names)"
            " AND has_function_privilege(p.oid, 'EXECUTE')"
        ),
        {"schema": schema, "names": names},
    ).scalars()
    return set(found)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")


def _check_retry_after(retry_after: int | None) -> None:
    if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
        raise InvalidArgument(f"retry_after must be a non-negative int of seconds, got {retry_after!r}")


def _to_db(value: datetime | None) -> datetime | None:
    """UTC for every backend: SQLite drops the offset, so convert before it does."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise InvalidArgument(f"datetimes must be timezone-aware, got {value!r}")
    return value.astimezone(UTC)


class MaintenanceStore:
    """Maintenance state of every tenant, kept in tables maintgate owns in the app's database."""

    def __init__(
        self,
        database: str | Engine,
        *,
        table_prefix: str = DEFAULT_PREFIX,
        schema: str | None = None,
        engine_options: Mapping[str, Any] | None = None,
        listen_url: str | None = None,
    ) -> None:
        if engine_options is not None and not isinstance(engine_options, Mapping):
            raise InvalidArgument(
                f"engine_options must be a mapping, got {engine_options!r}", "engine_options"
            )
        if schema is not None and not isinstance(schema, str):
            raise InvalidArgument(f"schema must be a string or None, got {schema!r}", "schema")
        self.tables: Tables = build_tables(table_prefix, schema)
        try:
            self.listen_url = None if listen_url is None else make_url(listen_url)
            """Where gates LISTEN: a direct connection when the engine goes through PgBouncer."""
        except Exception:
            raise InvalidArgument(
                f"listen_url must be a database URL, got {listen_url!r}", "listen_url"
            ) from None
        if isinstance(database, Engine):
            if engine_options:
                raise InvalidArgument("engine_options only apply when the store builds the engine")
            self.engine = database
        elif isinstance(database, str):
            self.engine = create_engine(database, **_bounded_options(database, engine_options or {}))
            if self.engine.dialect.name == "sqlite":
                make_sqlite_transactional(self.engine)
                event.listen(self.engine, "connect", _wal)
        else:
            raise TypeError(f"database must be a SQLAlchemy URL or Engine, got {database!r}")
        self._pool_watched = self.engine.dialect.name == "postgresql" and _watch_pool(
            self.engine, built=not isinstance(database, Engine)
        )
        self._state = self.tables.state
        self.lookup_timeout = LOOKUP_TIMEOUT
        self._qualified: Tables | None = None
        self._built_for: tuple[Any, dict[str, pgsql.ServerFunction]] | None = None
        self._channel: tuple[str, str] | None = None
        self._scope: str | None = None
        self._has_numbers = False
        self._warned_numbers = False
        self._built: dict[tuple[Any, ...], Any] = {}
        self._functions: dict[str, tuple[pgsql.ServerFunction | None, float]] = {}

    @property
    def channel(self) -> str:
        """The PostgreSQL NOTIFY channel on which this store announces every committed change:
        the same for every store on the same tables, however its schema is given."""
        scope = self._lock_scope()
        if self._channel is None or self._channel[0] != scope:
            name = f"{scope}.{self._state.name}".encode()
            self._channel = (scope, "maintgate_" + hashlib.blake2b(name, digest_size=8).hexdigest())
        return self._channel[1]

    def __repr__(self) -> str:
        return f"MaintenanceStore({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def _begin(self, connection: Connection | None) -> Iterator[Connection]:
        """A connection in a transaction: the caller's (never committed here) or a new one."""
        if connection is not None:
            yield connection
            return
        with self._bookkeeping(lock_timeout=False) as conn:
            yield conn

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection of the store's engine on which no statement is prepared (PgBouncer)."""
        with self.engine.connect() as conn, unprepared(conn):
            yield conn

    def create_tables(self, connection: Connection | None = None) -> None:
        """Create maintgate's tables where missing, and add the columns newer versions need; idempotent."""
        with self._begin(connection) as conn:
            self.tables.metadata.create_all(conn, checkfirst=True)
            inspector = inspect(conn)
            for table in self.tables.metadata.sorted_tables:
                have = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
                for column in table.columns:
                    if column.name not in have:
                        kind = column.type.compile(dialect=conn.dialect)
                        conn.execute(
                            text(f"ALTER TABLE {_quoted(conn, table)} ADD COLUMN {column.name} {kind}")
                        )
                for index in table.indexes:
                    index.create(conn, checkfirst=True)
            self._ensure_version_row(conn, self.tables)
            if conn.dialect.name == "postgresql":
                self._create_functions(conn)
        self._has_numbers = True
        self._scope = None  # the bare name may find them now
        if connection is None:
            self._t()  # where they are, found once now rather than by the first lookup

    def drop_tables(self, connection: Connection | None = None) -> None:
        """Drop maintgate's tables (tests and uninstall)."""
        with self._begin(connection) as conn:
            if conn.dialect.name == "postgresql":
                # All at once, in the order gates read them: dropping one by one while a gate
                # reads the next would deadlock.
                tables = self.tables
                inspector = inspect(conn)
                ordered = [tables.version, tables.state, tables.schedule, tables.history]
                there = [t for t in ordered if inspector.has_table(t.name, schema=t.schema)]
                if there:
                    names = ", ".join(_quoted(conn, t) for t in there)
                    conn.execute(text(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE"))
                    self._drop_functions(conn)
            self.tables.metadata.drop_all(conn, checkfirst=True)
        self._functions.clear()

    def get(self, tenant: str, *, connection: Connection | None = None) -> MaintenanceState | None:
        """The recorded state of ``tenant`` (or the global switch), or None if it has none."""
        check_tenant(tenant)
        with self._begin(connection) as conn:
            t = self._t().state
            row = conn.execute(select(t).where(t.c.tenant == tenant)).first()
        return None if row is None else self._from_row(row)

    def effective(self, tenant: str | None, now: datetime | None = None) -> MaintenanceState | None:
        """The active state that applies to ``tenant`` (its own or the global switch, manual or scheduled)."""
        return self.lookup(tenant, now).state

    def lookup(self, tenant: str | None, now: datetime | None = None) -> Lookup:
        """What applies to ``tenant`` at ``now``, and when a schedule will change that by itself.

        The tenant's rows and the global switch's, manual and scheduled, come back in one
        query (:meth:`effective` reads this way; gates hold everything, see :meth:`changes`).
        Of several active states the strictest wins (full over read-only), then the tenant's
        own over the global one.
        """
        now = now or utcnow()
        wanted = [ALL_TENANTS] if tenant is None or tenant == ALL_TENANTS else [tenant, ALL_TENANTS]
        t, sc = self._t().state, self._t().schedule
        manual = _state_rows(t).where(t.c.tenant.in_(wanted), t.c.active)
        planned = _schedule_rows(sc).where(
            sc.c.tenant.in_(wanted), or_(sc.c.ends_at.is_(None), sc.c.ends_at > _to_db(now))
        )
        with self._connect() as conn:
            if conn.dialect.name == "postgresql":
                # A gate must not hang on a stuck server: bound this read, not the app's work.
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(self.lookup_timeout * 1000)}")
            rows = conn.execute(union_all(manual, planned)).all()
        active: list[MaintenanceState] = []
        changes_at: datetime | None = None
        for row in rows:
            m = row._mapping
            state = _state(m, active=True, schedule_id=m["id"])
            if m["kind"] == "schedule":
                starts_at = state.started_at
                if starts_at is not None and starts_at > now:
                    changes_at = starts_at if changes_at is None else min(changes_at, starts_at)
                    continue
                if state.ends_at is not None:
                    changes_at = state.ends_at if changes_at is None else min(changes_at, state.ends_at)
            active.append(state)
        if not active:
            return Lookup(None, changes_at)
        active.sort(key=strictness)
        return Lookup(active[0], changes_at)

    def changes(self, since: int | None, now: datetime | None = None) -> Changes:
        """What the gates hold in memory: every change after change number ``since``, in one query.

        With ``since`` None, everything in force or planned: active rows and schedules not over.
        Otherwise the rows of the tenants that changed after ``since`` (inactive ones too) and
        their schedules not over. Either way one statement, so a process's refresh costs one
        round trip however many tenants there are, and nothing when nothing changed.
        """
        now = now or utcnow()
        tables = self._t()
        t, sc, v = tables.state, tables.schedule, tables.version
        numbered = self._numbered(tables)
        if not numbered:
            since = None  # tables from before change numbers: read everything, every time
        rows = _state_rows(t, numbered)
        planned = _schedule_rows(sc).where(or_(sc.c.ends_at.is_(None), sc.c.ends_at > _to_db(now)))
        if not numbered:
            query = union_all(rows.where(t.c.active), planned)
        else:
            # The counter, in the same snapshot: a row left PENDING is newer than every numbered
            # change this read can see, including one known by notification whose number no row
            # carries any more (the PENDING write replaced it).
            counter = select(
                literal("version").label("kind"),
                *[cast(null(), c.type).label(c.name) for c in rows.selected_columns][1:-1],
                v.c.version,
            ).where(v.c.id == 1)
            if since is None:
                query = union_all(counter, rows.where(t.c.active), planned)
            else:
                # Bounded on both sides, and PENDING by equality: both read as selective by the
                # planner even without statistics (a table just restored), so the version index
                # answers instead of a scan of every tenant's row.
                news = or_(t.c.version.between(since + 1, VERSION_MAX), t.c.version == PENDING)
                changed = select(t.c.tenant).where(news).scalar_subquery()
                query = union_all(counter, rows.where(news), planned.where(sc.c.tenant.in_(changed)))
        with self._connect() as conn:
            if conn.dialect.name == "postgresql":
                # A gate must not hang on a stuck server: bound this read, not the app's work.
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(self.lookup_timeout * 1000)}")
            result = conn.execute(query).all()
        version = since or 0
        states: dict[str, MaintenanceState | None] = {}
        schedules: dict[str, list[Schedule]] = {}
        versions: dict[str, int] = {}
        unnumbered: list[str] = []
        for row in result:
            m = row._mapping
            kind = m["kind"]
            if kind == "version":
                version = max(version, m["version"] or 0)
            elif kind == "state":
                tenant = m["tenant"]
                if (m["version"] or 0) < 0:
                    unnumbered.append(tenant)
                versions[tenant] = max(0, m["version"] or 0)
                version = max(version, versions[tenant])
                states[tenant] = (
                    _state(m, active=True, source=m["source"], window_id=m["window_id"])
                    if m["active"]
                    else None
                )
                schedules.setdefault(tenant, [])
            else:
                schedules.setdefault(m["tenant"], []).append(
                    Schedule(
                        id=m["id"],
                        tenant=m["tenant"],
                        starts_at=_aware(m["started_at"]),  # type: ignore[arg-type]
                        ends_at=_aware(m["ends_at"]),
                        message=m["message"],
                        mode=m["mode"],
                        retry_after=m["retry_after"],
                        created_at=_aware(m["updated_at"]),
                    )
                )
        for tenant in unnumbered:
            # PENDING: committed after every numbered change of its tenant that the read can see,
            # so as new as the counter it read (a notification numbered above it is newer still).
            versions[tenant] = version
        return Changes(since is None, version, states, schedules, versions)

    def _numbered(self, tables: Tables) -> bool:
        """Whether the tables have change numbers (``create_tables`` adds them to older tables)."""
        if self._has_numbers:
            return True
        with self._connect() as conn:
            inspector = inspect(conn)
            t, v = tables.state, tables.version
            numbered = inspector.has_table(v.name, schema=v.schema) and "version" in {
                c["name"] for c in inspector.get_columns(t.name, schema=t.schema)
            }
        if numbered:
            self._has_numbers = True
        elif not self._warned_numbers:
            self._warned_numbers = True
            logger.warning(
                "maintgate: the tables %s were created by an earlier version and have no change "
                "numbers: gates read everything in force on every refresh, and writes fail. Run "
                "`maintgate init` (or store.create_tables()) to add them",
                t.name,
                extra={"maintgate_event": "tables_outdated"},
            )
        return numbered

    def schedule(
        self,
        tenant: str,
        starts_at: datetime,
        ends_at: datetime | None = None,
        *,
        message: str | None = None,
        mode: str = FULL,
        retry_after: int | None = None,
        connection: Connection | None = None,
    ) -> Schedule:
        """Plan maintenance for ``tenant`` from ``starts_at`` to ``ends_at`` (open-ended if None).

        Gates switch it on and off by themselves at those times, with no write to the database.
        """
        check_tenant(tenant)
        _check_mode(mode)
        _check_retry_after(retry_after)
        start, end = _to_db(starts_at), _to_db(ends_at)
        if start is None:
            raise InvalidArgument("schedule needs starts_at")
        if end is not None and end <= start:
            raise InvalidArgument(
                f"ends_at ({end.isoformat()}) must come after starts_at ({start.isoformat()})"
            )
        now = utcnow()
        sc = self._t().schedule
        values = {
            "tenant": tenant,
            "starts_at": start,
            "ends_at": end,
            "message": message,
            "mode": mode,
            "retry_after": retry_after,
            "created_at": now,
        }
        with self._begin(connection) as conn:
            new_id = conn.execute(sc.insert().values(values)).inserted_primary_key[0]  # type: ignore[index]
            until = end.isoformat() if end else "until switched off"
            self._log(
                conn,
                tenant,
                "scheduled",
                now,
                message=f"{start.isoformat()} to {until}" + (f": {message}" if message else ""),
            )
        return Schedule(id=new_id, **{**values, "starts_at": start, "ends_at": end})  # type: ignore[arg-type]

    def schedules(self, tenant: str | None = None) -> list[Schedule]:
        """Planned windows that are on now or still to come, soonest first (of one tenant, or all)."""
        sc = self._t().schedule
        query = select(sc).where(or_(sc.c.ends_at.is_(None), sc.c.ends_at > _to_db(utcnow())))
        if tenant is not None:
            query = query.where(sc.c.tenant == check_tenant(tenant))
        with self._connect() as conn:
            rows = conn.execute(query.order_by(sc.c.starts_at, sc.c.id)).all()
        return [_schedule(r._mapping) for r in rows]

    def unschedule(self, schedule_id: int, *, connection: Connection | None = None) -> bool:
        """Cancel a planned window; False if there was none with that id."""
        sc = self._t().schedule
        with self._begin(connection) as conn:
            row = conn.execute(select(sc).where(sc.c.id == schedule_id)).first()
            if row is None:
                return False
            conn.execute(delete(sc).where(sc.c.id == schedule_id))
            self._log(conn, row.tenant, "unscheduled", utcnow(), message=f"schedule {schedule_id}")
        announce("unscheduled", row.tenant, schedule_id=schedule_id)
        return True

    def all(self) -> list[MaintenanceState]:
        """Every recorded state, the global switch first."""
        t = self._t().state
        with self._connect() as conn:
            rows = conn.execute(select(t).order_by(t.c.tenant)).all()
        states = [self._from_row(r) for r in rows]
        states.sort(key=lambda s: (not s.is_global, s.tenant))
        return states

    def activate(
        self,
        tenant: str,
        *,
        message: str | None = None,
        retry_after: int | None = None,
        ends_at: datetime | None = None,
        mode: str = FULL,
        connection: Connection | None = None,
    ) -> MaintenanceState:
        """Switch maintenance on for ``tenant`` (or ``ALL_TENANTS``) and return the new state.

        ``mode="read_only"`` lets reads through and blocks writes. ``ends_at`` is an estimate
        that sets Retry-After; to have maintenance end by itself, use :meth:`schedule`.
        Re-activating an active tenant updates its message but keeps its ``started_at``.
        """
        state = self._activate(tenant, message, retry_after, ends_at, connection, mode)
        announce("activated", tenant, message=message, mode=mode, retry_after=retry_after)
        return state

    def deactivate(self, tenant: str, *, connection: Connection | None = None) -> Ended:
        """Switch maintenance off for ``tenant``: its own switch and its planned windows that are on.

        A window whose owner is gone (see :meth:`window_alive`) is cleared too; a running window
        keeps the tenant, and its own switch-off is fenced on its id. Returns what was ended
        (falsy if nothing was).
        """
        check_tenant(tenant)
        with self._begin(connection) as conn:
            ended = self._deactivate(tenant, conn)
        if connection is None and ended.schedules:  # committed: no read needed to show it here
            for mirror in mirrors_of(self):
                mirror.ended(tenant, [s.id for s in ended.schedules], ended.state)
        if ended.switch or ended.schedules:
            announce("deactivated", tenant, schedules=[s.id for s in ended.schedules])
        if ended.released is not None:
            released = ended.released
            announce("window_released", tenant, window=released.window_id, owner=released.owner)
        return ended

    def history(self, tenant: str, *, limit: int = 100) -> list[HistoryEntry]:
        """The latest ``limit`` events of ``tenant`` (switches, windows, failures), oldest first."""
        check_tenant(tenant)
        if not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be a positive int, got {limit!r}")
        h = self._t().history
        with self._connect() as conn:
            rows = conn.execute(
                select(h).where(h.c.tenant == tenant).order_by(h.c.id.desc()).limit(limit)
            ).all()
        return [
            HistoryEntry(
                id=m["id"],
                tenant=m["tenant"],
                event=m["event"],
                at=_aware(m["at"]),  # type: ignore[arg-type]
                message=m["message"],
                error=m["error"],
                owner=_owner(m),
                window_id=m["window_id"],
            )
            for m in (r._mapping for r in reversed(rows))
        ]

    def _activate(
        self,
        tenant: str,
        message: str | None,
        retry_after: int | None,
        ends_at: datetime | None,
        connection: Connection | None,
        mode: str = FULL,
    ) -> MaintenanceState:
        """An operator's switch-on; a window that holds the tenant keeps holding it."""
        check_tenant(tenant)
        _check_retry_after(retry_after)
        _check_mode(mode)
        now = utcnow()
        t = self._t().state
        values: list[tuple[Any, Any]] = [
            # First: MySQL evaluates SET left to right, and this must see the old `active`.
            (t.c.started_at, case((t.c.active == true(), t.c.started_at), else_=now)),
            (t.c.source, OPERATOR),
            (t.c.active, True),
            (t.c.message, message),
            (t.c.error, None),
            (t.c.retry_after, retry_after),
            (t.c.ends_at, _to_db(ends_at)),
            (t.c.updated_at, now),
            (t.c.mode, mode),
        ]
        with self._begin(connection) as conn:
            self._ensure_row(conn, tenant)
            conn.execute(update(t).where(t.c.tenant == tenant).ordered_values(*values))
            self._log(conn, tenant, "activated", now, message=message)
            row = conn.execute(select(t).where(t.c.tenant == tenant)).one()
        return self._from_row(row)

    def _deactivate(self, tenant: str, conn: Connection) -> Ended:
        """An operator's switch-off on ``conn`` (see :meth:`deactivate`)."""
        t, sc = self._t().state, self._t().schedule
        now = utcnow()
        values = {"active": False, "error": None, "ends_at": None, "updated_at": now, "source": None}
        switch = conn.execute(update(t).where(t.c.tenant == tenant, t.c.active).values(**values)).rowcount
        on_now = and_(
            sc.c.tenant == tenant,
            sc.c.starts_at <= _to_db(now),
            or_(sc.c.ends_at.is_(None), sc.c.ends_at > _to_db(now)),
        )
        schedules = tuple(
            _schedule(r._mapping) for r in conn.execute(select(sc).where(on_now).order_by(sc.c.id))
        )
        if schedules:
            conn.execute(delete(sc).where(sc.c.id.in_([s.id for s in schedules])))
        row = conn.execute(select(t).where(t.c.tenant == tenant)).first()
        state = None if row is None else self._from_row(row)
        released = None
        if state is not None and state.window_id is not None and not self.window_alive(state):
            cleared = conn.execute(
                update(t)
                .where(t.c.tenant == tenant, t.c.window_id == state.window_id)
                .values(**{c.key: v for c, v in self._window_cleared(t)})
            ).rowcount
            if cleared == 1:
                released = state
                self._log(conn, tenant, "window_released", now, owner=state.owner, window_id=state.window_id)
                state = self._from_row(conn.execute(select(t).where(t.c.tenant == tenant)).one())
        if switch or schedules:
            ended = [*(["its own switch"] if switch else []), *(f"schedule #{s.id}" for s in schedules)]
            message = "ended " + ", ".join(ended)
            self._log(conn, tenant, "deactivated", now, message=message, schedules=bool(schedules))
        return Ended(tenant, bool(switch), schedules, released, state)

    # -- migration windows ---------------------------------------------------------------------------
    #
    # Whose maintenance it is lives here and nowhere else: a window that opens on a tenant the
    # operator already switched on leaves the operator's message, mode and source alone, and its
    # switch-off leaves the operator's maintenance on, as the row says at that moment.

    def window_lock_key(self, tenant: str) -> int:
        """The signed 64-bit PostgreSQL advisory-lock key of ``tenant``'s window in these tables.

        The same for every store on the same tables, however its schema is given: a store
        naming ``schema="public"`` and one naming none (the CLI's default) exclude each other.
        """
        name = f"maintgate:{self._lock_scope()}:{self._state.name}:{tenant}".encode()
        return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "big", signed=True)

    def _lock_scope(self) -> str:
        """The schema part of lock keys: "" for the schema the tables' bare name finds (what a store
        naming no schema has always used), else the schema's name."""
        scope = self._scope
        if scope is not None:
            return scope
        named = self._state.schema
        if named is None or self.engine.dialect.name != "postgresql":
            scope = named or ""
        else:
            scope = "" if self._unqualified_schema() == named else named
        self._scope = scope
        return scope

    def open_window(
        self,
        tenant: str,
        owner: Owner,
        *,
        message: str | None = None,
        retry_after: int | None = None,
        ends_at: datetime | None = None,
        mode: str = FULL,
        lease: float = DEFAULT_LEASE,
        window_id: str | None = None,
        connection: Connection | None = None,
    ) -> Window:
        """Switch maintenance on for a new migration window, in a committed transaction of its own.

        Raises :class:`WindowBusy`, having changed nothing, while another window holds the tenant:
        one whose lease has not expired, or, on PostgreSQL, whose migration transaction holds the
        tenant's lock. On PostgreSQL the lock is the window's proof of life once its transaction
        takes it, so the lease only covers the opening (at most ``OPENING_GRACE`` seconds) and
        needs no renewal; elsewhere the window renews it while it runs. A database error before
        the commit is a refusal too (:class:`MaintgateError`); one at the commit leaves it unknown
        whether the window opened: record its failure with ``window_id``, which is fenced.
        ``connection``: an idle connection of the store's engine (:func:`can_lend`) to commit
        the switch-on on, the migration's own before its transaction begins, which saves a checkout.
        """
        return self._open_window(
            tenant,
            owner,
            message=message,
            retry_after=retry_after,
            ends_at=ends_at,
            mode=mode,
            lease=lease,
            window_id=window_id,
            connection=connection,
        )[0]

    def _open_window(
        self,
        tenant: str,
        owner: Owner,
        *,
        message: str | None,
        retry_after: int | None,
        ends_at: datetime | None,
        mode: str,
        lease: float,
        window_id: str | None,
        connection: Connection | None,
        begin: bool = False,
    ) -> tuple[Window, Any]:
        """:meth:`open_window`; with ``begin`` (``connection`` an owned window's, on psycopg), the
        migration's transaction may begin in the same round trip (:meth:`_switch_on_and_begin`):
        the second item is then the row of its first statement, for :meth:`_hold`, and what
        :func:`end_autocommit` puts back; else None."""
        check_tenant(tenant)
        _check_retry_after(retry_after)
        _check_mode(mode)
        if not isinstance(lease, int | float) or not lease > 0:
            raise InvalidArgument(f"lease must be a positive number of seconds, got {lease!r}")
        postgres = self.engine.dialect.name == "postgresql"
        window_id = window_id or uuid.uuid4().hex
        tables = self._t()
        self._prepare_windows()  # built before the lease's clock starts
        now = utcnow()
        lease_until = now + timedelta(seconds=min(lease, OPENING_GRACE) if postgres else lease)
        new = {
            "tenant": tenant,
            "now": now,
            "message": message,
            "retry_after": retry_after,
            "ends_at": _to_db(ends_at),
            "mode": mode,
            "window_id": window_id,
            "lease_until": lease_until,
            "owner_host": owner.host,
            "owner_pid": owner.pid,
        }
        record = _record(tenant, "window_opened", now, message=message, owner=owner, window_id=window_id)
        held = None
        if postgres and begin and connection is not None:
            held = self._switch_on_and_begin(new, record, connection)
        if held is None and (not postgres or not self._switched_on_in_one(new, record, connection)):
            # On PostgreSQL the switch-on's statement sets its lock timeout itself.
            with self._bookkeeping(not postgres, connection) as conn, _refusing(tenant):
                if postgres:
                    # The tenant's lock, then its row inserted or switched on, in one statement.
                    params = {f"p_{k}": v for k, v in new.items()} | {"p_key": self.window_lock_key(tenant)}
                    statement = self._sql(tables, pgsql.switch_on, LOCK_TIMEOUT_SETTING)
                    switched = conn.execute(statement, params).first() is not None
                else:
                    switched = self._switch_on(conn, tables, new)
                if not switched:
                    raise WindowBusy(_busy_message(tenant, self.get(tenant, connection=conn), now))
                self._changed(conn, tenant, tables, record, carry_state=True, locked=True)
        announce("window_opened", tenant, owner=owner, message=message, mode=mode, window=window_id)
        return Window(window_id, tenant, owner, mode, message, lease_until, tables.state.schema), held

    def _switched_on_in_one(
        self,
        new: dict[str, Any],
        record: dict[str, Any],
        connection: Connection | None,
    ) -> bool:
        """PostgreSQL: the switch-on and its announcement as one call of their server function,
        which commits by itself. False, nothing changed, where it cannot run (a session whose
        default isolation is stricter than READ COMMITTED, the function dropped meanwhile, a
        connection that cannot be lent, tables created without it): the caller switches on
        with statements instead.

        A lost reply raises the driver's error unchanged: the call may have committed, so the
        window counts as open (its failure is then recorded, fenced on its id).
        """
        if connection is not None and not can_lend(connection):
            return False
        tenant = new["tenant"]
        params = self._switch_on_params(new, record)
        with ExitStack() as stack:
            if connection is None:
                conn = stack.enter_context(self._connect()).execution_options(isolation_level="AUTOCOMMIT")
            else:
                conn = connection
                stack.enter_context(unprepared(conn))
                stack.enter_context(_autocommitting(conn))
            stack.enter_context(conn.begin())  # SQLAlchemy's; the driver sends no BEGIN
            try:
                function = self._function("switch_on", conn)
            except sa_exc.DBAPIError as exc:  # before the call: nothing changed
                raise _refusal(tenant, exc) from exc
            if function is None or conn.info.get(_NOT_READ_COMMITTED, False):
                return False
            try:
                sent = conn.execute(function.call, params).scalar()
            except sa_exc.DBAPIError as exc:
                if exc.connection_invalidated:
                    raise
                if getattr(exc.orig, "sqlstate", None) in UNCALLABLE:  # nothing changed
                    self._forget_functions()
                    return False
                raise _refusal(tenant, exc) from exc
            if sent == pgsql.NOT_READ_COMMITTED:
                conn.info[_NOT_READ_COMMITTED] = True
                return False
            if sent is None:
                raise WindowBusy(_busy_message(tenant, self.get(tenant, connection=conn), new["now"]))
        _, state, version = state_from_payload(sent)
        self._publish([(tenant, state, version if state is not None else None)])
        return True

    def _switch_on_params(self, new: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """The switch-on function's arguments."""
        params = {f"p_{k}": v for k, v in new.items()} | record
        return params | {"p_key": self.window_lock_key(new["tenant"]), "p_channel": self.channel}

    def _switch_on_and_begin(self, new: dict[str, Any], record: dict[str, Any], conn: Connection) -> Any:
        """The switch-on function's call and its commit, the BEGIN of the migration's transaction and
        that transaction's first statement (:func:`pgsql.hold`) as one message (:class:`pgsql.Opening`)
        on ``conn``, an owned window's idle connection (psycopg): one round trip where there were three.

        Returns the first statement's row and what :func:`end_autocommit` puts back: ``conn`` is
        then in the migration's transaction with its driver in autocommit, so that psycopg sends no
        BEGIN of its own (it still commits or rolls back what the server has open), and its cursor
        classes begin a transaction again if the work ends the window's (:func:`_begin_again`).
        Returns None where this cannot run, nothing sent and ``conn`` as it was: the window then
        switches on and begins as usual. :class:`WindowBusy` and refusals change nothing; a
        failure after the switch-on's COMMIT, or a lost reply, raises the driver's error: the
        window counts as open.
        """
        tenant = new["tenant"]
        if not can_lend(conn) or conn.in_transaction() or conn.info.get(_NOT_READ_COMMITTED, False):
            return None
        if conn.dispatch.begin:  # a listener's statements (SET LOCAL) belong in the migration's transaction
            return None
        if not self._pool_watched:  # closed in its block, the connection would go back in autocommit
            return None
        driver: Any = conn.connection.driver_connection
        dbapi: Any = conn.dialect.dbapi
        if driver.autocommit or not hasattr(dbapi, "ClientCursor"):
            return None
        if not all(isinstance(getattr(driver, f, None), type) for f in CURSOR_FACTORIES):
            return None  # a factory function: no cursor class to hook (begin again)
        function = self._functions.get("switch_on", (None, 0.0))[0]
        if function is None:  # looked for, on this idle connection
            with _autocommitting(conn), conn.begin():
                try:
                    function = self._function("switch_on", conn)
                except sa_exc.DBAPIError as exc:
                    raise _refusal(tenant, exc) from exc
        if function is None:
            return None
        opening = self._sql(self._t(), pgsql.opening, function.call, conn.dialect)
        if opening is None:
            return None
        params = opening.switch_on.values | opening.hold.values | self._switch_on_params(new, record)
        message = opening.message(_begin_command(driver))
        autocommit = set_on_driver(conn, "autocommit", True)
        try:
            with _driver_set(conn, "cursor_factory", dbapi.ClientCursor):  # binds client-side
                result = conn.exec_driver_sql(message, params)  # SQLAlchemy's events see it
            rows: list[Any] = []
            cursor = result.cursor  # several result sets: the DBAPI cursor's
            while True:
                if cursor.description is not None:
                    rows.append(cursor.fetchone())
                if not cursor.nextset():
                    break
            result.close()
        except sa_exc.DBAPIError as exc:
            self._opening_failed(conn, exc, tenant, autocommit)
            return None
        (sent,), held = rows
        if sent is None or sent == pgsql.NOT_READ_COMMITTED:  # nothing changed: end what began
            conn.rollback()
            put_back(conn, autocommit)
            if sent is None:
                with conn.begin():
                    holder = self.get(tenant, connection=conn)
                raise WindowBusy(_busy_message(tenant, holder, new["now"]))
            conn.info[_NOT_READ_COMMITTED] = True
            return None
        saved = [autocommit, *hook_cursors(conn, _BEGINNING_AGAIN, _begin_again)]
        _, state, version = state_from_payload(sent)
        self._publish([(tenant, state, version if state is not None else None)])
        return held, saved

    def _opening_failed(
        self, conn: Connection, exc: sa_exc.DBAPIError, tenant: str, autocommit: Saved | None
    ) -> None:
        """After :meth:`_switch_on_and_begin`'s message failed: returns if nothing changed and the
        function cannot be called (statements instead); raises a refusal if nothing changed
        otherwise, and ``exc`` where the switch-on may have committed (its reply lost, or a
        failure after its COMMIT)."""
        exc.statement = "maintgate's window opening: the switch-on, the migration's BEGIN and lock"
        if exc.connection_invalidated or conn.invalidated:
            raise exc
        driver: Any = conn.connection.driver_connection
        status = _status(driver)
        if status not in ("IDLE", "INERROR"):
            conn.invalidate(exc)
            raise exc
        conn.rollback()
        put_back(conn, autocommit)
        if status == "INERROR":  # it failed after the switch-on's COMMIT
            raise exc
        if getattr(exc.orig, "sqlstate", None) in UNCALLABLE:  # nothing changed
            self._forget_functions()
            return
        raise _refusal(tenant, exc) from exc

    def _switch_on(self, conn: Connection, tables: Tables, new: dict[str, Any]) -> bool:
        """A window's switch-on where no advisory lock exists: unless another window's lease holds
        the tenant. The operator's message, mode and source stay if the operator had it on."""
        t, now = tables.state, new["now"]
        self._ensure_row(conn, new["tenant"], tables)
        operators = and_(t.c.active == true(), t.c.source == OPERATOR)
        free = or_(t.c.window_id.is_(None), t.c.lease_until.is_(None), t.c.lease_until < _to_db(now))
        kept = [
            (t.c[k], case((operators, t.c[k]), else_=new[k]))
            for k in ("message", "retry_after", "ends_at", "mode")
        ]
        changed = conn.execute(
            update(t)
            .where(t.c.tenant == new["tenant"], free)
            .ordered_values(
                # MySQL evaluates SET left to right: everything that reads `active` or `source` first.
                (t.c.started_at, case((t.c.active == true(), t.c.started_at), else_=now)),
                *kept,
                (t.c.source, case((operators, OPERATOR), else_=WINDOW)),
                (t.c.active, True),
                (t.c.error, None),
                (t.c.updated_at, now),
                (t.c.window_id, new["window_id"]),
                (t.c.lease_until, _to_db(new["lease_until"])),
                (t.c.window_mode, new["mode"]),
                (t.c.owner_host, new["owner_host"]),
                (t.c.owner_pid, new["owner_pid"]),
                (t.c.owner_backend_pid, None),
            )
        ).rowcount
        return changed == 1

    def hold_window(self, window: Window, connection: Connection) -> tuple[int, str]:
        """PostgreSQL: take the tenant's lock in the migration's transaction on ``connection``.

        Checks that the row still names ``window`` (an opening that outlasted its lease may have
        been taken over) and raises :class:`WindowLost` otherwise. A switch-on holds the lock
        for the instant it checks it, so this tries again for up to ``LOCK_WAIT`` seconds.
        Returns the backend pid of the migration's session and its transaction's id, which
        :meth:`close_window` checks. On PostgreSQL 14+ the session also notices a dead client
        within a second while busy in a statement (``client_connection_check_interval``).
        """
        return self._hold(window, connection)

    def _hold(self, window: Window, connection: Connection, first: Any = None) -> tuple[int, str]:
        """:meth:`hold_window`; ``first``: the row of its first attempt, already made
        (:meth:`_switch_on_and_begin`)."""
        tables = self._t()
        attempt = self._sql(tables, pgsql.hold, connection.dialect.server_version_info or (0,))
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            if first is None:
                params = {"p_key": self.window_lock_key(window.tenant), "p_tenant": window.tenant}
                first = connection.execute(attempt, params).one()
            row, first = first, None
            got, backend_pid, holder, transaction = row[:4]
            if holder != window.id:
                raise WindowLost(
                    f"tenant {window.tenant!r} was taken over by window {holder} while window "
                    f"{window.id} was opening; nothing was migrated"
                )
            if got:
                return int(backend_pid), str(transaction)
            if time.monotonic() > deadline:
                raise WindowLost(f"another transaction holds tenant {window.tenant!r}'s window lock")
            time.sleep(0.01)

    def close_window(
        self,
        window: Window,
        connection: Connection | None = None,
        *,
        logged_as: str = "window_committed",
        transaction: str | None = None,
        done: plan.Done | None = None,
    ) -> None:
        """Switch maintenance off for ``window``: fenced, on the migration's ``connection``.

        Changes the window's own row or nothing: if another window or an operator's ``release``
        took the tenant, raises :class:`WindowLost` and the caller's transaction must roll back.
        An operator's maintenance stays on, as the row says at this moment. Without
        ``connection`` it runs in a transaction of its own (DDL that commits itself, a withdrawal).
        ``transaction`` (PostgreSQL): the id :meth:`hold_window` returned; if ``connection`` is no
        longer in that transaction (the work committed it), raises :class:`WindowLost` too.
        ``done``: a rollout's done mark for the tenant, written first, in the same round trip
        where the server function does both (:func:`plan.done`; fenced on the runner's claim).
        """
        if connection is None:
            with self._bookkeeping() as conn:
                self.close_window(window, conn, logged_as=logged_as)
            return
        tables = self._t()
        t = tables.state
        now = utcnow()
        record = _record(window.tenant, logged_as, now, owner=window.owner, window_id=window.id)
        if connection.dialect.name == "postgresql" and not connection.info.get(_OWN, False):
            # In the caller's (the migration's) transaction: fenced switch-off, history, PENDING
            # mark and announcement in one statement.
            params = {
                **record,
                "p_tenant": window.tenant,
                "p_window_id": window.id,
                "p_now": now,
                "p_transaction": transaction,
                "p_channel": self.channel,
            }
            function = self._function("switch_off", connection) if transaction is not None else None
            if function is not None:
                params |= {
                    "p_rollout": done and done.rollout,
                    "p_runner": done and done.runner,
                    "p_search_path": done and done.search_path,
                    "p_status": done and done.claim_next,
                    "p_budget": done and done.budget,
                    "p_lease": done and done.lease,
                }
                try:
                    result = connection.execute(function.call, params).scalar()
                except sa_exc.DBAPIError as exc:
                    if getattr(exc.orig, "sqlstate", None) in UNCALLABLE:  # not the next time
                        self._forget_functions()
                    raise
                closed_tenant, *claimed = result or [None]
                if done is not None:
                    if closed_tenant == pgsql.CLAIM_LOST:
                        raise MaintgateError(done.lost(window.tenant))
                    done.claimed, done.claimed_from = [*claimed, None, None][:2]
                closed = closed_tenant is not None
            else:
                if done is not None:
                    self.mark_done(connection, window.tenant, done, now)
                off = self._sql(tables, pgsql.switch_off, _xid_function(connection) if transaction else None)
                closed = connection.execute(off, params).first() is not None
            if not closed:
                self._not_closed(window, connection, transaction)
            pending = connection.info.get(_PENDING)
            if pending is not None:  # unnumbered (PENDING): gates read the row once it commits
                pending.append((window.tenant, None, None))
            return
        if done is not None:
            self.mark_done(connection, window.tenant, done, now)
        operators = t.c.source == OPERATOR
        changed = connection.execute(
            update(t)
            .where(t.c.tenant == window.tenant, t.c.window_id == window.id)
            .ordered_values(
                (t.c.ends_at, case((operators, t.c.ends_at), else_=None)),
                (t.c.error, None),
                (t.c.active, case((operators, t.c.active), else_=False)),
                (t.c.source, case((operators, OPERATOR), else_=None)),
                (t.c.updated_at, now),
                *self._window_cleared(t),
            )
        ).rowcount
        if changed != 1:
            self._not_closed(window, connection, None, changed)
        self._changed(connection, window.tenant, tables, record, carry_state=True, locked=True)

    def mark_done(self, connection: Connection, tenant: str, done: plan.Done, now: datetime) -> None:
        """Write a rollout's done mark for ``tenant`` in the window's transaction on ``connection``,
        fenced on the runner's claim (:class:`MaintgateError` if another runner holds it), and put
        the session's search_path back as the window found it."""
        tracked = done.search_path is not None
        result = connection.execute(
            self._sql(self._t(), plan.done, tracked),
            {"p_rollout": done.rollout, "p_tenant": tenant, "p_runner": done.runner, "p_now": now},
        )
        if result.rowcount != 1:
            raise MaintgateError(done.lost(tenant))
        if tracked and result.scalar() != done.search_path:
            connection.execute(select(func.set_config("search_path", done.search_path, False)))

    def _not_closed(
        self, window: Window, connection: Connection, transaction: str | None, changed: int = 0
    ) -> NoReturn:
        """Why the switch-off changed nothing: the work ended the window's transaction, or
        the window no longer holds the tenant."""
        if transaction is not None:
            now_in = connection.exec_driver_sql(f"SELECT {_xid_function(connection)}()::text").scalar()
            if now_in != transaction:
                raise WindowLost(ENDED_BY_WORK.format(why="ended (COMMIT or ROLLBACK sent)"))
        raise WindowLost(
            f"tenant {window.tenant!r} is no longer held by window {window.id} "
            f"({changed} rows matched): released by an operator or taken over; "
            "not switching maintenance off"
        )

    def record_window_failure(self, window: Window, error: str) -> bool:
        """Keep maintenance on, say why, and end the window, in a transaction of its own.

        Fenced like the switch-off: if the window no longer holds the tenant, only the history
        records the error, and this returns False.
        """
        t = self._t().state
        with self._bookkeeping() as conn:
            now = utcnow()
            changed = conn.execute(
                update(t)
                .where(t.c.tenant == window.tenant, t.c.window_id == window.id)
                .ordered_values(
                    (t.c.started_at, case((t.c.active == true(), t.c.started_at), else_=now)),
                    (t.c.source, _KEEP_OPERATOR(t)),
                    (t.c.active, True),
                    (t.c.error, error),
                    (t.c.updated_at, now),
                    *self._window_cleared(t),
                )
            ).rowcount
            self._log(
                conn,
                window.tenant,
                "window_failed",
                now,
                error=error,
                owner=window.owner,
                window_id=window.id,
            )
        return changed == 1

    def renew_window(self, window: Window, lease: float) -> bool:
        """Extend the window's lease by ``lease`` seconds from now; False if it no longer holds the tenant."""
        t = self._t().state
        with self._bookkeeping() as conn:
            until = utcnow() + timedelta(seconds=lease)
            changed = conn.execute(
                update(t)
                .where(t.c.tenant == window.tenant, t.c.window_id == window.id)
                .values(lease_until=_to_db(until))
            ).rowcount
        return changed == 1

    def release_window(self, tenant: str) -> MaintenanceState | None:
        """An operator clears the window that holds ``tenant`` (a dead one, say); maintenance stays on.

        If that window still runs, its switch-off then fails, fenced. Returns the released
        window's state, or None if no window held the tenant.
        """
        check_tenant(tenant)
        t = self._t().state
        with self._bookkeeping() as conn:
            held = conn.execute(
                select(t).where(t.c.tenant == tenant, t.c.window_id.is_not(None)).with_for_update()
            ).first()
            if held is None:
                return None
            state = self._from_row(held)
            now = utcnow()
            changed = conn.execute(
                update(t)
                .where(t.c.tenant == tenant, t.c.window_id == state.window_id)
                .values(updated_at=now, **{c.key: v for c, v in self._window_cleared(t)})
            ).rowcount
            if changed != 1:  # that window ended meanwhile: nothing of ours to release
                return None
            self._log(conn, tenant, "window_released", now, owner=state.owner, window_id=state.window_id)
        announce("window_released", tenant, window=state.window_id, owner=state.owner)
        return state

    def window_alive(self, state: MaintenanceState | None) -> bool | None:
        """Whether the window that holds ``state``'s tenant still runs: None when no window holds it.

        PostgreSQL: its migration transaction holds the tenant's lock, or its lease has not
        expired yet (it is opening). Elsewhere: its lease has not expired (the window renews it).
        """
        if state is None or state.window_id is None:
            return None
        if state.lease_until is not None and state.lease_until > utcnow():
            return True
        if self.engine.dialect.name != "postgresql":
            return False
        key = self.window_lock_key(state.tenant)
        with self._connect() as conn:
            held = conn.execute(
                text(
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid = :hi AND objid = :lo AND objsubid = 1"
                ),
                {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF},
            ).first()
        return held is not None

    @staticmethod
    def _window_cleared(t: Any) -> list[tuple[Any, Any]]:
        return [
            (t.c.window_id, None),
            (t.c.lease_until, None),
            (t.c.window_mode, None),
            *((getattr(t.c, k), v) for k, v in _owner_values(None).items()),
        ]

    @contextmanager
    def _bookkeeping(
        self, lock_timeout: bool = True, connection: Connection | None = None
    ) -> Iterator[Connection]:
        """A short transaction of the store's own, READ COMMITTED on PostgreSQL whatever the engine's,
        whose changes this process's gates are shown once it commits. ``lock_timeout``: on
        PostgreSQL, a window's write waits at most :data:`BOOKKEEPING_LOCK_TIMEOUT` for a row;
        ``connection``: run it on this idle connection of the store's engine (see :func:`can_lend`)."""
        with ExitStack() as stack:
            if connection is None:
                conn = stack.enter_context(self._connect())
            else:
                conn = connection
                stack.enter_context(unprepared(conn))
            postgres = conn.dialect.name == "postgresql"
            if postgres:
                stack.enter_context(_read_committed(conn))
            pending: list[_Change] = []
            with conn.begin(), _collecting(conn, pending, own=True):
                if postgres and lock_timeout:
                    # Never wait forever on a row another transaction holds (the caller's own).
                    conn.execute(select(LOCK_TIMEOUT_SETTING))
                yield conn
        self._publish(pending)  # committed

    def _publish(self, changes: list[_Change], wait: float = 0.0) -> None:
        """Show committed changes to this process's gates at once, as a notification would.

        A change whose row was not read back has them read it; ``wait`` bounds how long to
        wait for that read, so that the caller's next request sees the change.
        """
        for mirror in mirrors_of(self):
            unread = False
            for tenant, state, version in changes:
                if version is None:
                    unread = True
                else:
                    mirror.apply(tenant, state, version)
            if unread and wait:
                mirror.sync(wait)
            elif unread:
                mirror.changed()

    def _t(self) -> Tables:
        """maintgate's tables as every statement of the store names them: with their schema.

        On PostgreSQL, a store that names no schema finds where its tables are once, under the
        session's own ``search_path`` (its reset value), so that a migration's ``SET search_path``,
        on its own connection or left on a pooled one, cannot send maintgate's statements elsewhere.
        """
        qualified = self._qualified
        if qualified is not None:
            return qualified
        if self._state.schema is not None or self.engine.dialect.name != "postgresql":
            self._qualified = self.tables
            return self.tables
        schema = self._unqualified_schema()
        if schema is None:  # the tables are not created yet: look again next time
            return self.tables
        self._qualified = build_tables(self._state.name.removesuffix("state"), schema)
        return self._qualified

    def _unqualified_schema(self) -> str | None:
        """PostgreSQL: the schema the state table's bare name finds under the session's own
        ``search_path`` (its reset value), or None if it finds none."""
        with self._connect() as conn:
            conn.execute(text(RESET_SEARCH_PATH))
            found: str | None = conn.execute(text(_SCHEMA_OF), {"name": self._state.name}).scalar()
        return found

    def _changed(
        self,
        conn: Connection,
        tenant: str,
        tables: Tables,
        record: dict[str, Any],
        carry_state: bool,
        locked: bool = False,
    ) -> None:
        """Write ``record`` (the change's history row, :func:`_record`), number the change of
        ``tenant`` in the writing transaction, and announce it on PostgreSQL.

        In a short transaction of the store's own, the tenant's row takes the next change number
        from the counter, whose row lock is held until commit: numbers become visible in commit
        order, so gates that read "changed since N" never skip a change committed late. A write
        in a caller's transaction (a joined write, a migration's switch-off) must not hold the
        counter for as long as the caller likes: it marks the row ``PENDING``, which gates read
        on every refresh until the next numbered change renumbers it. The tenant's row is locked
        before the counter, always. The notification (sent on commit only) carries the state.
        """
        t = tables.state
        if not locked:
            touch = self._sql(tables, _touch)
            # No row yet (a schedule of a new tenant): insert it, whoever wins, then lock it.
            if conn.execute(touch, {"p_tenant": tenant}).rowcount != 1:
                self._ensure_row(conn, tenant, tables)
                conn.execute(touch, {"p_tenant": tenant})
        version: int | None = None
        own = conn.info.get(_OWN, False)
        postgres = conn.dialect.name == "postgresql"
        readable = carry_state and (postgres or own)
        row = None
        if postgres:
            # One round trip: the history row, the counter, the rows left PENDING, this row, the NOTIFY.
            row, version = self._numbered_in_one(conn, tenant, tables, own, record, carry_state)
        else:
            conn.execute(self._sql(tables, _history_insert), record)
            if own:
                version = self._next_version(conn, tables)
            number = (
                update(t).where(t.c.tenant == tenant).values(version=PENDING if version is None else version)
            )
            if readable and conn.dialect.update_returning:  # the row as numbered, in one round trip
                row = conn.execute(number.returning(*t.c)).first()
            else:
                conn.execute(number)
                row = conn.execute(select(t).where(t.c.tenant == tenant)).first() if readable else None
        if not readable:
            row = None
        pending = conn.info.get(_PENDING)
        if pending is not None:
            state = None if row is None else self._from_row(row)
            pending.append((tenant, state, version if row is not None else None))

    def _numbered_in_one(
        self,
        conn: Connection,
        tenant: str,
        tables: Tables,
        own: bool,
        record: dict[str, Any],
        carry_state: bool,
    ) -> tuple[Row[Any] | None, int | None]:
        """PostgreSQL: :func:`pgsql.numbered` (history row, change number or PENDING mark, NOTIFY).
        The row (already locked) and its number."""
        params = {**record, "p_tenant": tenant, "p_channel": self.channel}
        row = conn.execute(self._sql(tables, pgsql.numbered, own, True, carry_state), params).first()
        if not own or row is None:
            return row, None
        if row._mapping["taken"] is not None:
            return row, int(row._mapping["taken"])
        # No counter yet (tables from before change numbers): make it, then number as above.
        self._ensure_version_row(conn, tables)
        row = conn.execute(self._sql(tables, pgsql.numbered, own, False, carry_state), params).first()
        taken = None if row is None else row._mapping["taken"]
        return row, None if taken is None else int(taken)

    def _next_version(self, conn: Connection, tables: Tables) -> int:
        """Take the next change number (the counter stays locked until commit), and give it to
        rows left ``PENDING`` by committed writes in callers' transactions."""
        t, v = tables.state, tables.version
        bump = update(v).where(v.c.id == 1).values(version=v.c.version + 1)
        taken: int | None = None
        if conn.dialect.update_returning:
            taken = conn.execute(bump.returning(v.c.version)).scalar()
        elif conn.execute(bump).rowcount == 1:
            taken = conn.execute(select(v.c.version).where(v.c.id == 1)).scalar_one()
        if taken is None:
            self._ensure_version_row(conn, tables)
            conn.execute(bump)
            taken = conn.execute(select(v.c.version).where(v.c.id == 1)).scalar_one()
        version: int = taken
        # Rows a caller's open transaction holds are skipped: they are renumbered by a later change.
        waiting = select(t.c.tenant).where(t.c.version < 0).with_for_update(skip_locked=True)
        if conn.dialect.name in ("postgresql", "sqlite"):  # MySQL cannot update what it reads in one
            conn.execute(update(t).where(t.c.tenant.in_(waiting.scalar_subquery())).values(version=version))
            return version
        pending = conn.execute(waiting).scalars().all()
        if pending:
            conn.execute(update(t).where(t.c.tenant.in_(pending)).values(version=version))
        return version

    @staticmethod
    def _ensure_version_row(conn: Connection, tables: Tables) -> None:
        v = tables.version
        if conn.execute(select(v.c.id).where(v.c.id == 1)).first() is None:
            try:
                with conn.begin_nested():
                    conn.execute(v.insert().values(id=1, version=0))
            except sa_exc.IntegrityError:
                pass  # another process created it meanwhile

    def _log(
        self,
        conn: Connection,
        tenant: str,
        event: str,
        at: datetime,
        *,
        tables: Tables | None = None,
        schedules: bool = False,
        locked: bool = False,
        **details: Any,
    ) -> None:
        """Record ``event`` in the history (``details``: as :func:`_record` takes them) and number
        the change; ``schedules``: the change is (also) to the tenant's schedules, which its row
        does not describe; ``locked``: this transaction has just updated the tenant's row, so it
        holds its lock already."""
        # A schedule's change is not in the row: gates read it from the table.
        schedules = schedules or event in ("scheduled", "unscheduled")
        record = _record(tenant, event, at, **details)
        self._changed(conn, tenant, tables or self._t(), record, carry_state=not schedules, locked=locked)

    def _function(self, kind: str, conn: Connection) -> pgsql.ServerFunction | None:
        """PostgreSQL: the server function ``kind`` (:data:`FUNCTIONS`) if :meth:`create_tables`
        made it for these tables. Looked for on ``conn`` (never a second connection: a window
        holds one at most), once, and again a minute later while absent: tables created by other
        means, or by an older version of maintgate, work without them."""
        cached, checked = self._functions.get(kind, (None, -FUNCTION_RECHECK))
        if cached is not None or time.monotonic() - checked < FUNCTION_RECHECK:
            return cached
        built = self._built_functions()
        if built is None:
            return None
        schema = next(iter(built.values())).schema
        found = _functions_found(conn, schema, [f.name for f in built.values()])
        now = time.monotonic()
        for k, function in built.items():
            self._functions[k] = (function if function.name in found else None, now)
        return self._functions[kind][0]

    def _built_functions(self) -> dict[str, pgsql.ServerFunction] | None:
        """The server functions of these tables as this version makes them (built once); None
        while the tables are not found."""
        tables = self._t()
        if tables.state.schema is None:
            return None
        built = self._built_for
        if built is None or built[0] is not tables.state:
            functions = {k: self._sql(tables, build, self.engine.dialect) for k, build in FUNCTIONS.items()}
            built = self._built_for = (tables.state, functions)
        return built[1]

    def _prepare_windows(self) -> None:
        """PostgreSQL: find the tables and build what a window runs before the window holds its
        connection, which meanwhile idles outside a transaction (``idle_session_timeout``)."""
        if self.engine.dialect.name == "postgresql":
            self._built_functions()

    def _forget_functions(self) -> None:
        """The server functions were dropped (they go together): statements until they are back."""
        self._functions = dict.fromkeys(FUNCTIONS, (None, time.monotonic()))

    def _create_functions(self, conn: Connection) -> None:
        """Create the server functions of the tables ``conn`` has just made (where it sees them),
        each commented with what it belongs to, which :meth:`_drop_functions` goes by."""
        tables = self._tables_on(conn)
        marker = _functions_marker(tables)
        for build in FUNCTIONS.values():
            function = build(tables, conn.dialect)
            if _functions_found(conn, function.schema, [function.name]):
                continue
            try:
                with conn.begin_nested():
                    # The driver's own SQL: a % in a name is written %% (pyformat).
                    conn.exec_driver_sql(function.create.replace("%", "%%"))
                    literal_ = "'" + marker.replace("'", "''") + "'"
                    comment = f"COMMENT ON FUNCTION {function.qualified} IS {literal_}"
                    conn.exec_driver_sql(comment.replace("%", "%%"))
            except sa_exc.DBAPIError as exc:  # another process created it meanwhile
                if getattr(exc.orig, "sqlstate", None) not in ("42723", "23505"):
                    raise
        self._functions.clear()

    def _tables_on(self, conn: Connection) -> Tables:
        """The tables named with the schema ``conn`` finds them in (uncommitted ones included),
        as :meth:`_t` names them once committed."""
        if self._state.schema is not None:
            return self.tables
        schema = conn.execute(text(_SCHEMA_OF), {"name": self._state.name}).scalar()
        return build_tables(self._state.name.removesuffix("state"), schema)

    def _drop_functions(self, conn: Connection) -> None:
        """Drop every version of the server functions of these tables (they do not depend on
        them), and none of another store's."""
        tables = self._tables_on(conn)
        if tables.state.schema is None:
            return
        marker = _functions_marker(tables)
        ours = conn.execute(
            text(
                "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n"
                " ON n.oid = p.pronamespace WHERE n.nspname = :schema"
                " AND obj_description(p.oid, 'pg_proc') = :marker"
            ),
            {"schema": tables.state.schema, "marker": marker},
        ).scalars()
        for signature in list(ours):
            conn.exec_driver_sql(f"DROP FUNCTION {signature}".replace("%", "%%"))

    def _sql(self, tables: Tables, build: Callable[..., Any], *options: Hashable) -> Any:
        """``build(tables, *options)``, built once: the statements every window runs are prebuilt
        with bound parameters, since building one costs more than running it."""
        key = (build, options, tables.state)
        built = self._built.get(key)
        if built is None:
            built = self._built[key] = build(tables, *options)
        return built

    def _ensure_row(self, conn: Connection, tenant: str, tables: Tables | None = None) -> None:
        """Insert an inactive row for ``tenant`` unless one exists, race-free where the dialect can."""
        t = (tables or self._t()).state
        values = {"tenant": tenant, "active": False, "updated_at": utcnow()}
        name = conn.dialect.name
        if name in _UPSERT_INSERTS:
            conn.execute(_UPSERT_INSERTS[name](t).values(values).on_conflict_do_nothing())
        elif name in ("mysql", "mariadb"):
            conn.execute(t.insert().prefix_with("IGNORE").values(values))
        elif conn.execute(select(t.c.tenant).where(t.c.tenant == tenant)).first() is None:
            try:
                with conn.begin_nested():
                    conn.execute(t.insert().values(values))
            except sa_exc.IntegrityError:
                pass

    @staticmethod
    def _from_row(row: Row[Any]) -> MaintenanceState:
        m = row._mapping
        return _state(
            m,
            active=bool(m["active"]),
            source=m["source"],
            window_id=m["window_id"],
            lease_until=_aware(m["lease_until"]),
        )
