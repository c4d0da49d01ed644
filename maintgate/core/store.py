"""Read and write maintenance state in the app's own database, through SQLAlchemy Core."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    case,
    create_engine,
    event,
    select,
    true,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .errors import InvalidArgument
from .schema import DEFAULT_PREFIX, Tables, build_tables
from .state import ALL_TENANTS, HistoryEntry, MaintenanceState, Owner, check_tenant, utcnow

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


def _owner(m: Mapping[str, Any]) -> Owner | None:
    if m["owner_host"] is None:
        return None
    return Owner(m["owner_host"], m["owner_pid"], m["owner_backend_pid"])


def _owner_values(owner: Owner | None) -> dict[str, Any]:
    if owner is None:
        return {"owner_host": None, "owner_pid": None, "owner_backend_pid": None}
    return {"owner_host": owner.host, "owner_pid": owner.pid, "owner_backend_pid": owner.backend_pid}


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
            self.engine = create_engine(database, **dict(engine_options or {}))
            if self.engine.dialect.name == "sqlite":
                make_sqlite_transactional(self.engine)
        else:
            raise TypeError(f"database must be a SQLAlchemy URL or Engine, got {database!r}")
        self.tables: Tables = build_tables(table_prefix, schema)
        self._state = self.tables.state

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

    def effective(self, tenant: str | None) -> MaintenanceState | None:
        """The active state that applies to ``tenant``: its own, else the global switch, else None.

        One query serves both rows, so a gate's cache miss costs exactly one round trip.
        """
        wanted = [ALL_TENANTS] if tenant is None or tenant == ALL_TENANTS else [tenant, ALL_TENANTS]
        t = self._state
        with self.engine.connect() as conn:
            rows = conn.execute(select(t).where(t.c.tenant.in_(wanted), t.c.active)).all()
        found: MaintenanceState | None = None
        for row in rows:
            state = self._from_row(row)
            if found is None or not state.is_global:
                found = state
        return found

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
        connection: Connection | None = None,
    ) -> MaintenanceState:
        """Switch maintenance on for ``tenant`` (or ``ALL_TENANTS``) and return the new state.

        Re-activating an active tenant updates its message but keeps its ``started_at``.
        """
        return self._activate(tenant, message, retry_after, ends_at, None, "activated", connection)

    def deactivate(self, tenant: str, *, connection: Connection | None = None) -> MaintenanceState | None:
        """Switch maintenance off for ``tenant``; returns the new state, or None if it had none."""
        with self._begin(connection) as conn:
            self._deactivate(tenant, None, "deactivated", conn)
            row = conn.execute(select(self._state).where(self._state.c.tenant == tenant)).first()
        return None if row is None else self._from_row(row)

    def history(self, tenant: str, *, limit: int = 100) -> list[HistoryEntry]:
        """The latest ``limit`` events of ``tenant`` (switches, windows, failures), oldest first."""
        check_tenant(tenant)
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
    ) -> MaintenanceState:
        check_tenant(tenant)
        if retry_after is not None and (not isinstance(retry_after, int) or retry_after < 0):
            raise InvalidArgument(f"retry_after must be a non-negative int of seconds, got {retry_after!r}")
        now = utcnow()
        t = self._state
        with self._begin(connection) as conn:
            self._ensure_row(conn, tenant)
            conn.execute(
                update(t)
                .where(t.c.tenant == tenant)
                .values(
                    started_at=case((t.c.active == true(), t.c.started_at), else_=now),
                    active=True,
                    message=message,
                    error=None,
                    retry_after=retry_after,
                    ends_at=_to_db(ends_at),
                    updated_at=now,
                    **_owner_values(owner),
                )
            )
            self._log(conn, tenant, event, now, message=message, owner=owner)
            row = conn.execute(select(t).where(t.c.tenant == tenant)).one()
        return self._from_row(row)

    def _deactivate(self, tenant: str, owner: Owner | None, event: str, conn: Connection) -> None:
        """Switch off and log it on ``conn``; writes only, so that it also runs on a lent connection."""
        check_tenant(tenant)
        t = self._state
        now = utcnow()
        conn.execute(
            update(t)
            .where(t.c.tenant == tenant)
            .values(active=False, error=None, ends_at=None, updated_at=now, **_owner_values(None))
        )
        self._log(conn, tenant, event, now, owner=owner)

    def _release(self, tenant: str, owner: Owner, event: str, connection: Connection) -> None:
        """End a window's ownership but leave maintenance as it is (an operator had it on)."""
        t = self._state
        now = utcnow()
        connection.execute(
            update(t).where(t.c.tenant == tenant).values(updated_at=now, **_owner_values(None))
        )
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
                .values(
                    active=True,
                    error=error,
                    started_at=case((t.c.active == true(), t.c.started_at), else_=now),
                    updated_at=now,
                    **_owner_values(None),
                )
            )
            self._log(conn, tenant, "window_failed", now, error=error, owner=owner)

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
        return MaintenanceState(
            tenant=m["tenant"],
            active=bool(m["active"]),
            message=m["message"],
            error=m["error"],
            retry_after=m["retry_after"],
            ends_at=_aware(m["ends_at"]),
            started_at=_aware(m["started_at"]),
            updated_at=_aware(m["updated_at"]),
            owner=_owner(m),
        )
