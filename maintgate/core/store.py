"""Read and write maintenance state in the app's own database, through SQLAlchemy Core."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Row,
    String,
    and_,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    literal,
    make_url,
    null,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .errors import InvalidArgument
from .schema import DEFAULT_PREFIX, Tables, build_tables
from .state import (
    ALL_TENANTS,
    FULL,
    MODES,
    HistoryEntry,
    Lookup,
    MaintenanceState,
    Owner,
    Schedule,
    check_tenant,
    utcnow,
)

logger = logging.getLogger("maintgate")

OPERATOR = "operator"
WINDOW = "window"


def _KEEP_OPERATOR(t: Any) -> Any:
    """``source`` for a window's write: still the operator's if the operator had it on."""
    return case((and_(t.c.active == true(), t.c.source == OPERATOR), OPERATOR), else_=WINDOW)


_UPSERT_INSERTS = {"postgresql": pg_insert, "sqlite": sqlite_insert}


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
        conn.exec_driver_sql("BEGIN")


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _state(m: Mapping[str, Any], *, active: bool, **extra: Any) -> MaintenanceState:
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
        mode=m["mode"] or FULL,
        **extra,
    )


def _owner(m: Mapping[str, Any]) -> Owner | None:
    if m["owner_host"] is None:
        return None
    return Owner(m["owner_host"], m["owner_pid"], m["owner_backend_pid"])


def _owner_values(owner: Owner | None) -> dict[str, Any]:
    if owner is None:
        return {"owner_host": None, "owner_pid": None, "owner_backend_pid": None}
    return {"owner_host": owner.host, "owner_pid": owner.pid, "owner_backend_pid": owner.backend_pid}


def announce(event: str, tenant: str, *, level: int = logging.INFO, **details: Any) -> None:
    """Log a state change under the ``maintgate`` logger, with the details as structured ``extra``."""
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


LOOKUP_TIMEOUT = 2.0
"""Seconds a connection attempt, a pool checkout or a state lookup may take on engines the store builds."""


def _bounded_options(url: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Engine options with bounded waits, unless the caller set them: an outage must not hang requests."""
    merged = dict(options)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return merged
    merged.setdefault("pool_timeout", LOOKUP_TIMEOUT)
    merged.setdefault("pool_pre_ping", True)
    connect_args = dict(merged.get("connect_args", {}))
    driver = make_url(url).get_driver_name()
    if driver in ("psycopg", "psycopg2", "pymysql", "mysqldb"):
        connect_args.setdefault("connect_timeout", int(LOOKUP_TIMEOUT))
    elif driver == "pg8000":
        connect_args.setdefault("timeout", LOOKUP_TIMEOUT)
    merged["connect_args"] = connect_args
    return merged


def _schedule(m: Mapping[str, Any]) -> Schedule:
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
    ) -> None:
        if isinstance(database, Engine):
            if engine_options:
                raise InvalidArgument("engine_options only apply when the store builds the engine")
            self.engine = database
        elif isinstance(database, str):
            self.engine = create_engine(database, **_bounded_options(database, engine_options or {}))
            if self.engine.dialect.name == "sqlite":
                make_sqlite_transactional(self.engine)
        else:
            raise TypeError(f"database must be a SQLAlchemy URL or Engine, got {database!r}")
        self.tables: Tables = build_tables(table_prefix, schema)
        self._state = self.tables.state
        self.lookup_timeout = LOOKUP_TIMEOUT
        name = f"{schema or ''}.{self._state.name}".encode()
        self.channel = "maintgate_" + hashlib.blake2b(name, digest_size=8).hexdigest()
        """The PostgreSQL NOTIFY channel on which this store announces every committed change."""

    def __repr__(self) -> str:
        return f"MaintenanceStore({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def _begin(self, connection: Connection | None) -> Iterator[Connection]:
        """A connection in a transaction: the caller's (never committed here) or a new one."""
        if connection is not None:
            yield connection
        else:
            with self.engine.begin() as conn:
                yield conn

    def create_tables(self, connection: Connection | None = None) -> None:
        """Create maintgate's tables where they are missing; safe to call again."""
        with self._begin(connection) as conn:
            self.tables.metadata.create_all(conn, checkfirst=True)

    def drop_tables(self, connection: Connection | None = None) -> None:
        """Drop maintgate's tables (tests and uninstall)."""
        with self._begin(connection) as conn:
            self.tables.metadata.drop_all(conn, checkfirst=True)

    def get(self, tenant: str, *, connection: Connection | None = None) -> MaintenanceState | None:
        """The recorded state of ``tenant`` (or the global switch), or None if it has none."""
        check_tenant(tenant)
        with self._begin(connection) as conn:
            row = conn.execute(select(self._state).where(self._state.c.tenant == tenant)).first()
        return None if row is None else self._from_row(row)

    def effective(self, tenant: str | None, now: datetime | None = None) -> MaintenanceState | None:
        """The active state that applies to ``tenant`` (its own or the global switch, manual or scheduled)."""
        return self.lookup(tenant, now).state

    def lookup(self, tenant: str | None, now: datetime | None = None) -> Lookup:
        """What applies to ``tenant`` at ``now``, and when a schedule will change that by itself.

        The tenant's rows and the global switch's, manual and scheduled, come back in one
        query, so a gate's cache miss costs one round trip. Of several active states the
        strictest wins (full over read-only), then the tenant's own over the global one.
        """
        now = now or utcnow()
        wanted = [ALL_TENANTS] if tenant is None or tenant == ALL_TENANTS else [tenant, ALL_TENANTS]
        t, sc = self._state, self.tables.schedule
        manual = select(
            literal("state").label("kind"),
            cast(null(), Integer).label("id"),
            t.c.tenant,
            t.c.mode,
            t.c.message,
            t.c.error,
            t.c.retry_after,
            t.c.ends_at,
            t.c.started_at,
            t.c.updated_at,
            t.c.owner_host,
            t.c.owner_pid,
            t.c.owner_backend_pid,
        ).where(t.c.tenant.in_(wanted), t.c.active)
        planned = select(
            literal("schedule").label("kind"),
            sc.c.id,
            sc.c.tenant,
            sc.c.mode,
            sc.c.message,
            cast(null(), String).label("error"),
            sc.c.retry_after,
            sc.c.ends_at,
            sc.c.starts_at.label("started_at"),
            sc.c.created_at.label("updated_at"),
            cast(null(), String).label("owner_host"),
            cast(null(), Integer).label("owner_pid"),
            cast(null(), Integer).label("owner_backend_pid"),
        ).where(sc.c.tenant.in_(wanted), or_(sc.c.ends_at.is_(None), sc.c.ends_at > _to_db(now)))
        with self.engine.connect() as conn:
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
        active.sort(key=lambda s: (s.mode != FULL, s.is_global, s.schedule_id is not None))
        return Lookup(active[0], changes_at)

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
        sc = self.tables.schedule
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
                conn, tenant, "scheduled", now, message=f"{start.isoformat()} to {until}: {message or ''}"
            )
        return Schedule(id=new_id, **{**values, "starts_at": start, "ends_at": end})  # type: ignore[arg-type]

    def schedules(self, tenant: str | None = None) -> list[Schedule]:
        """Planned windows that are on now or still to come, soonest first (of one tenant, or all)."""
        sc = self.tables.schedule
        query = select(sc).where(or_(sc.c.ends_at.is_(None), sc.c.ends_at > _to_db(utcnow())))
        if tenant is not None:
            query = query.where(sc.c.tenant == check_tenant(tenant))
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(sc.c.starts_at, sc.c.id)).all()
        return [_schedule(r._mapping) for r in rows]

    def unschedule(self, schedule_id: int, *, connection: Connection | None = None) -> bool:
        """Cancel a planned window; False if there was none with that id."""
        sc = self.tables.schedule
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
        t = self._state
        with self.engine.connect() as conn:
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
        state = self._activate(tenant, message, retry_after, ends_at, None, "activated", connection, mode)
        announce("activated", tenant, message=message, mode=mode, retry_after=retry_after)
        return state

    def deactivate(self, tenant: str, *, connection: Connection | None = None) -> MaintenanceState | None:
        """Switch maintenance off for ``tenant``; returns the new state, or None if it had none."""
        with self._begin(connection) as conn:
            changed = self._deactivate(tenant, None, "deactivated", conn)
            row = conn.execute(select(self._state).where(self._state.c.tenant == tenant)).first()
        if changed:
            announce("deactivated", tenant)
        return None if row is None else self._from_row(row)

    def history(self, tenant: str, *, limit: int = 100) -> list[HistoryEntry]:
        """The latest ``limit`` events of ``tenant`` (switches, windows, failures), oldest first."""
        check_tenant(tenant)
        if not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be a positive int, got {limit!r}")
        h = self.tables.history
        with self.engine.connect() as conn:
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
            )
            for m in (r._mapping for r in reversed(rows))
        ]

    def _activate(
        self,
        tenant: str,
        message: str | None,
        retry_after: int | None,
        ends_at: datetime | None,
        owner: Owner | None,
        event: str,
        connection: Connection | None,
        mode: str = FULL,
    ) -> MaintenanceState:
        """Switch on: by an operator (``owner`` None, window ownership untouched) or by a window."""
        check_tenant(tenant)
        _check_retry_after(retry_after)
        _check_mode(mode)
        now = utcnow()
        t = self._state
        values: list[tuple[Any, Any]] = [
            # First: MySQL evaluates SET left to right, and this must see the old `active`.
            (t.c.started_at, case((t.c.active == true(), t.c.started_at), else_=now)),
            # A window keeps an operator's maintenance the operator's: it must stay on afterwards.
            (t.c.source, OPERATOR if owner is None else _KEEP_OPERATOR(t)),
            (t.c.active, True),
            (t.c.message, message),
            (t.c.error, None),
            (t.c.retry_after, retry_after),
            (t.c.ends_at, _to_db(ends_at)),
            (t.c.updated_at, now),
            (t.c.mode, mode),
        ]
        if owner is not None:
            values += [(getattr(t.c, k), v) for k, v in _owner_values(owner).items()]
        with self._begin(connection) as conn:
            self._ensure_row(conn, tenant)
            conn.execute(update(t).where(t.c.tenant == tenant).ordered_values(*values))
            self._log(conn, tenant, event, now, message=message, owner=owner)
            row = conn.execute(select(t).where(t.c.tenant == tenant)).one()
        return self._from_row(row)

    def _deactivate(self, tenant: str, owner: Owner | None, event: str, conn: Connection) -> bool:
        """Switch off and log it on ``conn``; writes only, so that it also runs on a lent connection.

        An operator's "off" (``owner`` None) leaves a running window's ownership alone and also
        ends planned windows that are on now. Returns whether there was anything to switch off.
        """
        check_tenant(tenant)
        t = self._state
        now = utcnow()
        values: dict[str, Any] = {
            "active": False,
            "error": None,
            "ends_at": None,
            "updated_at": now,
            "source": None,
        }
        if owner is not None:
            values.update(_owner_values(None))
        changed = conn.execute(update(t).where(t.c.tenant == tenant).values(**values)).rowcount
        if owner is None:
            sc = self.tables.schedule
            changed += conn.execute(
                delete(sc).where(
                    sc.c.tenant == tenant,
                    sc.c.starts_at <= _to_db(now),
                    or_(sc.c.ends_at.is_(None), sc.c.ends_at > _to_db(now)),
                )
            ).rowcount
        if changed or owner is not None:
            self._log(conn, tenant, event, now, owner=owner)
        return bool(changed)

    def _source(self, tenant: str, conn: Connection) -> str | None:
        """Who switched ``tenant`` on: ``"operator"``, ``"window"``, or None when it is off."""
        t = self._state
        return conn.execute(select(t.c.source).where(t.c.tenant == tenant, t.c.active)).scalar()

    def _release(
        self, tenant: str, owner: Owner, restore: MaintenanceState | None, event: str, connection: Connection
    ) -> None:
        """End a window's ownership but leave maintenance on, as the operator had it (``restore``)."""
        t = self._state
        now = utcnow()
        values: dict[str, Any] = {"updated_at": now, "source": OPERATOR, **_owner_values(None)}
        if restore is not None:
            values.update(
                message=restore.message,
                retry_after=restore.retry_after,
                ends_at=_to_db(restore.ends_at),
                mode=restore.mode,
            )
        connection.execute(update(t).where(t.c.tenant == tenant).values(**values))
        self._log(connection, tenant, event, now, owner=owner)

    def _record_failure(
        self, tenant: str, error: str, owner: Owner | None, connection: Connection | None
    ) -> None:
        """Keep maintenance on, say why, and end the window's ownership, in a transaction of its own."""
        t = self._state
        now = utcnow()
        with self._begin(connection) as conn:
            self._ensure_row(conn, tenant)
            conn.execute(
                update(t)
                .where(t.c.tenant == tenant)
                .ordered_values(
                    (t.c.started_at, case((t.c.active == true(), t.c.started_at), else_=now)),
                    (t.c.source, _KEEP_OPERATOR(t)),
                    (t.c.active, True),
                    (t.c.error, error),
                    (t.c.updated_at, now),
                    *((getattr(t.c, k), v) for k, v in _owner_values(None).items()),
                )
            )
            self._log(conn, tenant, "window_failed", now, error=error, owner=owner)

    def _notify(self, conn: Connection, tenant: str) -> None:
        """PostgreSQL: announce a change of ``tenant`` in the writing transaction (sent on commit only)."""
        if conn.dialect.name == "postgresql":
            conn.execute(select(func.pg_notify(self.channel, tenant)))

    def _log(
        self,
        conn: Connection,
        tenant: str,
        event: str,
        at: datetime,
        *,
        message: str | None = None,
        error: str | None = None,
        owner: Owner | None = None,
    ) -> None:
        conn.execute(
            self.tables.history.insert().values(
                tenant=tenant, event=event, at=at, message=message, error=error, **_owner_values(owner)
            )
        )
        self._notify(conn, tenant)

    def _ensure_row(self, conn: Connection, tenant: str) -> None:
        """Insert an inactive row for ``tenant`` unless one exists, race-free where the dialect can."""
        t = self._state
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
        return _state(m, active=bool(m["active"]), source=m["source"])
