"""PostgreSQL statements of the store's writes, each doing in one round trip what took several.

They are built once per set of tables with bound parameters (:meth:`MaintenanceStore._sql`):
building a statement of this size costs more than running it, and a fleet rollout runs them for
every tenant (``python -m benchmarks.window``, ``benchmarks.rollout``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    false,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Dialect

from . import plan
from .schema import Tables
from .state import FULL, OPERATOR, WINDOW

PENDING = -1
"""The version of a row whose change has no number yet (written in a caller's transaction)."""
RENUMBER_MAX = 1000
"""Rows left PENDING that one numbered change renumbers at most."""
NOTIFY_MAX = 7900
"""Bytes of a NOTIFY payload past which it carries no state (PostgreSQL caps payloads at 8,000)."""


def _param(t: Any, column: str, name: str | None = None) -> Any:
    """Bound parameter ``:p_<name or column>``, typed as ``column`` of table ``t``."""
    return bindparam(f"p_{name or column}", type_=t.c[column].type)


def history_values(tables: Tables) -> dict[str, Any]:
    """A history row's columns as bound parameters ``h_<column>``."""
    h = tables.history
    return {c.key: bindparam(f"h_{c.key}", type_=c.type) for c in h.c if c.key != "id"}


def _key(name: str) -> Any:
    return literal_column(f"'{name}'")


def announced(row: Any, numbered: bool, carry_state: bool = True, payload: bool = False) -> Any:
    """SELECT the written row (the data-modifying CTE ``row``) and send its NOTIFY, on channel
    ``:p_channel``: JSON ``{"tenant", "version", "state"}``, what
    :func:`maintgate.core.store.state_from_payload` reads. ``numbered``: the row's ``taken``
    column is its change number, and nothing is sent without one; otherwise the version is null
    (PENDING). A payload past ``NOTIFY_MAX`` bytes (a long message) carries no state.
    ``payload``: the payload sent is a column too (``sent``)."""
    version = row.c.taken if numbered else null()
    if carry_state:
        c = row.c
        # Full while an open window needs full, over an operator's read-only (as the store's _state).
        mode = case(
            (and_(c.window_id.is_not(None), c.window_mode == FULL), FULL), else_=func.coalesce(c.mode, FULL)
        )
        fields = {
            "active": c.active,
            "mode": mode,
            "message": c.message,
            "error": c.error,
            "retry_after": c.retry_after,
            "ends_at": c.ends_at,
            "started_at": c.started_at,
            "updated_at": c.updated_at,
            "source": c.source,
        }
        state = func.json_build_object(*(x for k, v in fields.items() for x in (_key(k), v)))
        full = func.json_build_object(
            _key("tenant"), c.tenant, _key("version"), version, _key("state"), state
        )
        row = select(row, cast(full, String).label("payload")).cte("payload")
        version = row.c.taken if numbered else null()
    short = cast(func.json_build_object(_key("tenant"), row.c.tenant, _key("version"), version), String)
    text = (
        case((func.octet_length(row.c.payload) > NOTIFY_MAX, short), else_=row.c.payload)
        if carry_state
        else short
    )
    sent: Any = func.pg_notify(bindparam("p_channel", type_=String), text)
    if numbered:
        sent = case((row.c.taken.is_not(None), sent))
    columns = [c for c in row.c if c.key != "payload"]
    if payload:
        columns.append(text.label("sent"))
    return select(*columns, sent.label("notified"))


def numbered(tables: Tables, own: bool, record: bool, carry_state: bool, payload: bool = False) -> Any:
    """Write the history row (``record``), number the change of tenant ``:p_tenant`` and announce it.

    ``own`` (a short transaction of the store's): take the next change number from the counter
    (locked until commit; the tenant's row is already locked), give it to the rows left PENDING
    and to the tenant's row. Otherwise mark that row PENDING. The NOTIFY goes in the same
    statement, sent on commit. Returns the row as numbered, and ``taken``, the number (NULL:
    PENDING, or no counter row yet, in which case nothing was announced).
    """
    # The state table as "s": every column is named with it, and psycopg caches the conversion
    # of statements under 4 kB only.
    t: Any = tables.state.alias("s")
    v = tables.version
    tenant = bindparam("p_tenant", type_=t.c.tenant.type)
    ctes = [tables.history.insert().values(history_values(tables)).cte("record")] if record else []
    if own:
        taken = (
            v.update().where(v.c.id == 1).values(version=v.c.version + 1).returning(v.c.version).cte("taken")
        )
        number = select(taken.c.version).scalar_subquery()
        w = tables.state.alias("waiting")
        # Rows a caller's open transaction holds are skipped: they are renumbered by a later change.
        # Found in the version index and updated by ctid (a TID scan) whatever the statistics say:
        # without any (a restore, a bulk import), a filter on `version < 0` was planned as two
        # scans of the whole table (PENDING is the one negative version; an equality the planner
        # takes to be selective). Past RENUMBER_MAX, the next change numbers the rest; gates
        # read every PENDING row meanwhile.
        waiting: Any = (
            select(literal_column("waiting.ctid"))
            .select_from(w)
            .where(w.c.version == PENDING, w.c.tenant != tenant)
            .limit(RENUMBER_MAX)
            .with_for_update(skip_locked=True)
        )
        ctes.append(
            update(t)
            .where(
                literal_column("s.ctid") == func.any(func.array(waiting.scalar_subquery())),
                number.is_not(None),
            )
            .values(version=number)
            .cte("renumbered")
        )
        write = (
            update(t)
            .where(t.c.tenant == tenant)
            .values(version=func.coalesce(number, t.c.version))
            .returning(*t.c, number.label("taken"))
        )
    else:
        write = (
            update(t)
            .where(t.c.tenant == tenant)
            .values(version=PENDING)
            .returning(*t.c, null().label("taken"))
        )
    # Own: nothing is announced without a number (no counter row yet: the caller numbers it again).
    return announced(write.add_cte(*ctes).cte("numbered"), own, carry_state, payload)


def switch_on(tables: Tables, lock_timeout: Any) -> Any:
    """A window's switch-on, tenant ``:p_tenant``: the tenant's advisory lock (tried), its row
    inserted or updated unless another window's lease holds it, in one statement. Returns the
    tenant, or nothing if the lock or the row was not free (nothing changed then).

    Its transaction commits without waiting for the WAL flush (``synchronous_commit`` off for it
    alone): the write-ahead log is flushed in order, so the migration's commit, which waits,
    makes the switch-on durable first. A crash can lose a switch-on only with everything after
    it: nothing was migrated, and the tenant serves as before.
    """
    t = tables.state
    lk = select(
        lock_timeout.label("lt"),
        func.set_config("synchronous_commit", "off", True).label("sc"),
        func.pg_try_advisory_xact_lock(bindparam("p_key", type_=BigInteger)).label("got"),
    ).cte("lk")
    now = bindparam("p_now", type_=t.c.updated_at.type)
    given = (
        "message",
        "retry_after",
        "ends_at",
        "mode",
        "window_id",
        "lease_until",
        "owner_host",
        "owner_pid",
    )
    new = {
        "tenant": _param(t, "tenant"),
        "active": true(),
        "started_at": now,
        **{k: _param(t, k) for k in given},
        "source": literal(WINDOW, t.c.source.type),
        "error": null(),
        "updated_at": now,
        "window_mode": _param(t, "window_mode", "mode"),
        "owner_backend_pid": null(),
    }
    insert = pg_insert(t).from_select(
        [t.c[k] for k in new],
        select(*new.values()).where(lk.c.got, lk.c.lt.is_not(None), lk.c.sc.is_not(None)),
    )
    x = insert.excluded
    operators = and_(t.c.active == true(), t.c.source == OPERATOR)
    kept = {k: case((operators, t.c[k]), else_=x[k]) for k in ("message", "retry_after", "ends_at", "mode")}
    return (
        insert.on_conflict_do_update(
            index_elements=[t.c.tenant],
            set_={
                "started_at": case((t.c.active == true(), t.c.started_at), else_=x.started_at),
                **kept,
                "source": case((operators, t.c.source), else_=x.source),
                **{k: x[k] for k in new if k not in kept and k not in ("tenant", "started_at", "source")},
            },
            # On PostgreSQL we hold the tenant's lock: no migration transaction holds it.
            where=or_(t.c.window_id.is_(None), t.c.lease_until.is_(None), t.c.lease_until < now),
        )
        .returning(t.c.tenant)
        .add_cte(lk)
    )


def xid_function(server_version: tuple[Any, ...] | None) -> str:
    """The function that gives the current transaction's id (it changes if the work ends the
    transaction), on a server of ``server_version``."""
    return "pg_current_xact_id" if (server_version or (0,)) >= (13,) else "txid_current"


def hold(tables: Tables, server_version: tuple[int, ...]) -> Any:
    """The migration transaction's first statement: try tenant ``:p_tenant``'s advisory lock (key
    ``:p_key``), and read the backend pid, the window that holds the row and the transaction's id;
    on PostgreSQL 14+, also notice a dead client within a second while busy in a statement."""
    t = tables.state
    xid = getattr(func, xid_function(server_version))()
    columns = [
        func.pg_try_advisory_xact_lock(bindparam("p_key", type_=BigInteger)),
        func.pg_backend_pid(),
        select(t.c.window_id)
        .where(t.c.tenant == bindparam("p_tenant", type_=t.c.tenant.type))
        .scalar_subquery(),
        func.cast(xid, String),
    ]
    if server_version >= (14,):
        columns.append(func.set_config("client_connection_check_interval", "1s", True))
    return select(*columns)


@dataclass(frozen=True)
class ClientBound:
    """A statement as a driver that binds parameters itself sends it (psycopg's ``ClientCursor``,
    whose simple-query messages may hold several statements): its SQL, and the values of the
    parameters SQLAlchemy bound as literals."""

    sql: str
    values: dict[str, Any]


def client_bound(statement: Any, dialect: Dialect) -> ClientBound | None:
    """``statement`` compiled for ``dialect`` to bind client-side; None if a parameter given at
    run time needs SQLAlchemy's processing first (a type's bind processor, which only its own
    execution applies). The literals' values are processed here."""
    compiled = statement.compile(dialect=dialect)
    given = {name for bind, name in compiled.bind_names.items() if bind.required}
    values = compiled.construct_params(dict.fromkeys(given))
    for bind, name in compiled.bind_names.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            if name in given:
                return None
            values[name] = process(values[name])
    return ClientBound(compiled.string, {k: v for k, v in values.items() if k not in given})


@dataclass(frozen=True)
class Opening:
    """A window's opening as one simple-query message: the switch-on function's call, committed,
    then the migration transaction's BEGIN and its first statement (:func:`hold`)."""

    switch_on: ClientBound
    hold: ClientBound

    def message(self, begin: str) -> str:
        """The message, ``begin`` the migration transaction's BEGIN (with its isolation level)."""
        # BEGIN takes the call's implicit transaction into an explicit one, which COMMIT ends
        # without the warning a COMMIT of an implicit one logs on the server.
        return f"{self.switch_on.sql}; BEGIN; COMMIT; {begin}; {self.hold.sql}"


def opening(tables: Tables, call: Any, dialect: Dialect) -> Opening | None:
    """:class:`Opening` for the switch-on function ``call``, None where it cannot bind client-side."""
    switch_on = client_bound(call, dialect)
    version = tuple(v for v in dialect.server_version_info or (0,) if isinstance(v, int))
    held = client_bound(hold(tables, version), dialect)
    if switch_on is None or held is None:
        return None
    return Opening(switch_on, held)


def switch_off(tables: Tables, xid_function: str | None) -> Any:
    """A window's switch-off in the migration's transaction: fenced on tenant ``:p_tenant`` and window
    ``:p_window_id`` (and, with ``xid_function``, on the transaction being ``:p_transaction`` still),
    with its history row, its PENDING mark and its NOTIFY, in one statement. An operator's
    maintenance stays on. Returns the row, or nothing if nothing was switched off."""
    t: Any = tables.state.alias("s")
    operators = t.c.source == OPERATOR
    fence = [
        t.c.tenant == bindparam("p_tenant", type_=t.c.tenant.type),
        t.c.window_id == bindparam("p_window_id", type_=t.c.window_id.type),
    ]
    if xid_function is not None:
        fence.append(
            func.cast(getattr(func, xid_function)(), String) == bindparam("p_transaction", type_=String)
        )
    off = (
        update(t)
        .where(*fence)
        .values(
            ends_at=case((operators, t.c.ends_at), else_=null()),
            error=null(),
            active=case((operators, t.c.active), else_=false()),
            source=case((operators, t.c.source), else_=null()),
            updated_at=bindparam("p_now", type_=t.c.updated_at.type),
            **dict.fromkeys(("window_id", "lease_until", "window_mode"), null()),
            **dict.fromkeys(("owner_host", "owner_pid", "owner_backend_pid"), null()),
            version=-1,
        )
        .returning(*t.c)
        .cte("off")
    )
    values = history_values(tables)
    record = tables.history.insert().from_select(list(values), select(*values.values()).select_from(off))
    return announced(off, numbered=False).add_cte(record.cte("record"))


@dataclass(frozen=True)
class ServerFunction:
    """A PL/pgSQL function made of prebuilt statements: what took a transaction of several
    round trips is one call, whose plans the server keeps for the session (unlike prepared
    statements, through any pooler). Its name carries a digest of its definition, so a library
    version whose statements differ looks for (and creates) a function of its own."""

    schema: str
    name: str
    qualified: str
    create: str
    call: Any
    """``SELECT schema.name(...)``, the arguments bound by their parameter names."""


_TOKEN = re.compile(r"%%|%\((\w+)\)s")
"""A bound parameter in SQL compiled with the ``pyformat`` paramstyle, or a doubled ``%``: the
compiler doubles every ``%`` of the text (identifiers and literals included), so this reads the
SQL exactly as the driver would."""


def _pyformat_dialect(dialect: Dialect) -> Dialect:
    pyformat: Dialect = type(dialect)(paramstyle="pyformat")  # type: ignore[call-arg]
    pyformat.server_version_info = dialect.server_version_info
    return pyformat


def _plpgsql(statement: Any, dialect: Dialect, args: dict[str, Any]) -> str:
    """``statement`` as a PL/pgSQL function runs it: its ``p_``/``h_`` parameters become the
    function's arguments (added to ``args``), every other bound value a literal."""
    compiled = statement.compile(dialect=dialect)

    def bound(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return "%"
        bind = compiled.binds[name]
        if name.startswith(("p_", "h_")):
            args.setdefault(name, bind.type)
            return name
        as_literal = literal(bind.value, bind.type).compile(
            dialect=dialect, compile_kwargs={"literal_binds": True}
        )
        return str(as_literal).replace("%%", "%")

    return _TOKEN.sub(bound, compiled.string)


def _unsized(type_: Any) -> Any:
    """``type_`` without a length: a cast to VARCHAR(n) would cut a longer value where the
    column refuses it."""
    if isinstance(type_, String) and type_.length is not None:
        type_ = type_.copy()
        type_.length = None
    return type_


def _function(
    tables: Tables, dialect: Dialect, kind: str, body: str, args: dict[str, Any], returns: str = "text"
) -> ServerFunction:
    schema = tables.state.schema
    assert schema is not None  # the store's qualified tables
    types = {a: dialect.type_compiler_instance.process(_unsized(t)) for a, t in args.items()}
    signature = ", ".join(f"{a} {t}" for a, t in types.items())
    quote = "$maintgate$"
    while quote in body:  # a schema's name could hold it
        quote = quote[:-1] + "_$"
    definition = f"({signature}) RETURNS {returns} LANGUAGE plpgsql AS {quote}\n{body}\n{quote}"
    digest = hashlib.blake2b(definition.encode(), digest_size=6).hexdigest()
    name = f"{tables.state.name.removesuffix('state')[:32]}{kind}_{digest}"
    prep = dialect.identifier_preparer
    # As the server reads it (a psycopg preparer doubles %), and as text() reads it (: starts a bind).
    qualified = f"{prep.quote_schema(schema)}.{prep.quote(name)}".replace("%%", "%")
    arguments = ", ".join(f"CAST(:{a} AS {t})" for a, t in types.items())
    call = sql_text(f"SELECT {qualified.replace(':', chr(92) + ':')}({arguments})").bindparams(
        *(bindparam(a, type_=t) for a, t in args.items())
    )
    return ServerFunction(schema, name, qualified, f"CREATE FUNCTION {qualified}{definition}", call)


NOT_READ_COMMITTED = ""
"""What the switch-on function returns, having changed nothing, when its transaction is not
READ COMMITTED (a server whose default isolation is stricter)."""


def switch_on_function(tables: Tables, dialect: Dialect, lock_timeout: Any) -> ServerFunction:
    """A window's switch-on and its announcement (:func:`switch_on`, then :func:`numbered` in a
    transaction of the store's own) as one function, called in autocommit: one round trip.

    Returns the NOTIFY payload it sent (the row as switched on, see :func:`announced`), NULL
    if the tenant was not free (nothing changed), or :data:`NOT_READ_COMMITTED`.
    """
    compiling = _pyformat_dialect(dialect)
    args: dict[str, Any] = {}
    on = _plpgsql(switch_on(tables, lock_timeout), compiling, args)
    first = _plpgsql(numbered(tables, True, True, True, payload=True), compiling, args)
    again = _plpgsql(numbered(tables, True, False, True, payload=True), compiling, args)
    counter = _plpgsql(
        pg_insert(tables.version).values(id=1, version=0).on_conflict_do_nothing(), compiling, args
    )
    body = f"""DECLARE
  v_on text;
  v_row record;
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RETURN '{NOT_READ_COMMITTED}';
  END IF;
  {on}
  INTO v_on;
  IF v_on IS NULL THEN
    RETURN NULL;
  END IF;
  {first}
  INTO v_row;
  IF v_row.taken IS NULL THEN  -- no counter row yet (tables from before change numbers)
    {counter};
    {again}
    INTO v_row;
  END IF;
  RETURN v_row.sent;
END"""
    return _function(tables, dialect, "switch_on", body, args)


CLAIM_LOST = ""
"""What the switch-off function returns first, having switched nothing off, when the rollout's
done mark it was given found the tenant's claim held by another runner."""


def switch_off_function(tables: Tables, dialect: Dialect) -> ServerFunction:
    """A window's switch-off (:func:`switch_off`, fenced on the migration's transaction too) as
    one function, called in that transaction; with ``p_rollout``, a rollout's done mark first
    (:func:`plan.done`, fenced on the runner's claim), the session's search_path put back to
    ``p_search_path``, and with ``p_status``, the runner's next claim after the switch-off
    (:func:`plan.claim`: in ``p_status``, then PENDING), which commits with the window.

    Returns ``{tenant, next, status}``: the tenant switched off (NULL if none, :data:`CLAIM_LOST`),
    the tenant claimed next (NULL if none) and the status it was claimed from. A rollout's windows
    run READ COMMITTED (:func:`maintgate.migration.rollout_window`): under a snapshot the claim
    could fail the window's commit on a concurrent runner's update.
    """
    compiling = _pyformat_dialect(dialect)
    args: dict[str, Any] = {}
    off = _plpgsql(switch_off(tables, xid_function(dialect.server_version_info)), compiling, args)
    mark = _plpgsql(plan.done(tables, tracked=True), compiling, args)
    args["p_search_path"] = Text()
    take = _plpgsql(plan.claim(tables, postgres=True, in_window=True), compiling, args)
    body = f"""DECLARE
  v_row record;
  v_path text;
  v_next text;
BEGIN
  IF p_rollout IS NOT NULL THEN
    {mark}
    INTO v_path;
    IF NOT FOUND THEN
      RETURN ARRAY['{CLAIM_LOST}'];
    END IF;
    IF p_search_path IS NOT NULL AND v_path IS DISTINCT FROM p_search_path THEN
      PERFORM set_config('search_path', p_search_path, false);
    END IF;
  END IF;
  {off}
  INTO v_row;
  IF v_row.tenant IS NOT NULL AND p_status IS NOT NULL THEN
    {take}
    INTO v_next;
    IF v_next IS NULL AND p_status = '{plan.RUNNING}' THEN
      p_status := '{plan.PENDING}';
      {take}
      INTO v_next;
    END IF;
  END IF;
  RETURN ARRAY[v_row.tenant, v_next, p_status];
END"""
    return _function(tables, dialect, "switch_off", body, args, returns="text[]")


def claim_function(tables: Tables, dialect: Dialect) -> ServerFunction:
    """A rollout runner's claim (:func:`maintgate.core.plan.claim`) as one function: the server
    keeps its plan, which costs more to make than the claim does to run. Returns the tenant or NULL."""
    args: dict[str, Any] = {}
    take = _plpgsql(plan.claim(tables, postgres=True), _pyformat_dialect(dialect), args)
    body = f"""DECLARE
  v_tenant text;
  v_unsynced text;
BEGIN
  {take}
  INTO v_tenant, v_unsynced;
  RETURN v_tenant;
END"""
    return _function(tables, dialect, "claim", body, args)
