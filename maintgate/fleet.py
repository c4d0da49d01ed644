"""Fleet rollout: one migration across many tenants, each inside its own migration window.

The plan lives in the store's database (``{prefix}rollout`` and ``{prefix}rollout_tenant``), so
a rollout survives its runner: running the same name again resumes it. A tenant is marked done
*inside* its window's transaction, with the migration and the switch-off, so a tenant is never
migrated twice, whatever crashes when. Runners claim the next tenant in a short transaction of
their own (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, where several runners share one plan).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from .core import plan
from .core.errors import InvalidArgument, MaintgateError, WindowBusy
from .core.plan import DONE, DROPPED, FAILED, PENDING, RUNNING, Done
from .core.state import ALL_TENANTS, WINDOW, check_tenant, utcnow
from .core.store import (
    UNCALLABLE,
    MaintenanceStore,
    _check_retry_after,
    _driver_set,
    _read_committed,
    hook_cursors,
    put_back_all,
)
from .migration import _describe, _pool_capacity, maintenance_window, rollout_window

logger = logging.getLogger("maintgate")

RUNNER_LEASE = 30.0
"""Seconds a runner's claim on a tenant lasts unless renewed; a crashed runner's tenants are
taken over once it ends (and once the tenant's own window is gone)."""
BUSY_RETRY = 1.0
"""Seconds before a tenant whose window another process holds is tried again."""
RUN_AGAIN_ATTEMPTS = 10
"""Attempts at a tenant whose window failed to serialize (SERIALIZABLE) or deadlocked, each of
which PostgreSQL says to run again, before it counts as failed."""
RUN_AGAIN = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
ANALYZE_AFTER = 100
"""PostgreSQL: a run that plans this many new tenants has the plan's table analyzed."""
BUSY_ATTEMPTS = 60
"""Attempts after which a tenant that another window holds all along fails (about a minute)."""

Migrate = Callable[[Any, str], Any]
Opener = Callable[..., AbstractContextManager[tuple[Any, Connection]]]
"""Opens a tenant's window: ``opener(store, tenant, message=, retry_after=, lease=)`` yields what
the migration is handed and the SQLAlchemy connection of the window's transaction."""


@contextmanager
def sqlalchemy_window(
    store: MaintenanceStore,
    tenant: str,
    *,
    message: str | None,
    retry_after: int | None,
    lease: float,
    done: Done | None = None,
) -> Iterator[tuple[Connection, Connection]]:
    """The rollout's default window: :func:`maintgate.maintenance_window` on the store's engine;
    with ``done``, the tenant's done mark is written with the switch-off. (An opener that wraps
    this one is called as the :data:`Opener` is: without ``done``.)"""
    if done is None:
        with maintenance_window(store, tenant, message=message, retry_after=retry_after, lease=lease) as conn:
            yield conn, conn
        return
    with rollout_window(store, tenant, done, message=message, retry_after=retry_after, lease=lease) as conn:
        yield conn, conn


ABORTED = "aborted by the operator (interrupted twice): rolled back, maintenance stays on"


class RolloutAborted(MaintgateError):
    """An open window of a rollout was aborted by its runner (a second interrupt)."""


class RolloutBusy(MaintgateError):
    """Another runner holds this rollout where only one may run at a time (SQLite)."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a rollout stands, as :func:`rollout` reports it to ``on_progress``."""

    total: int
    done: int
    failed: int
    running: int
    elapsed: float
    done_here: int
    """Tenants this runner migrated in this run (the rate is computed from these)."""

    @property
    def rate(self) -> float:
        """Tenants per second this runner migrates."""
        return self.done_here / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def left(self) -> int:
        """Tenants neither done nor failed."""
        return self.total - self.done - self.failed


@dataclass(frozen=True, slots=True)
class RolloutReport:
    """What a rollout run did, and where the whole rollout stands."""

    name: str
    done: tuple[str, ...]
    """Tenants migrated by this run."""
    failed: dict[str, str]
    """Every failed tenant of the rollout, with its error: it stays in maintenance."""
    skipped: tuple[str, ...]
    """Tenants done before this run (a resumed rollout)."""
    not_started: tuple[str, ...]
    """Tenants nobody has migrated yet: serving, untouched."""
    done_elsewhere: tuple[str, ...] = ()
    """Tenants other runners of the rollout migrated while this run ran."""
    dropped: tuple[str, ...] = ()
    """Planned tenants this run's list left out: never migrated, unless listed again."""
    stopped: str | None = None
    """Why the rollout stopped claiming tenants, or None."""
    notes: tuple[str, ...] = field(default=())

    @property
    def complete(self) -> bool:
        """Whether every tenant of the rollout is done."""
        return not self.failed and not self.not_started


def _runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def rollout(
    store: MaintenanceStore,
    name: str,
    tenants: Iterable[str],
    migrate: Migrate,
    *,
    concurrency: int = 4,
    canary: int = 0,
    max_failures: int | None = 0,
    message: str | None = None,
    retry_after: int | None = None,
    retry_failed: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    abort: threading.Event | None = None,
    lease: float = RUNNER_LEASE,
    opener: Opener = sqlalchemy_window,
) -> RolloutReport:
    """Run ``migrate(connection, tenant)`` for each tenant inside that tenant's migration window.

    At most ``concurrency`` windows are open at once (one on SQLite, which has one writer).
    ``canary=N``: the first N tenants go first, and any failure among them stops the rollout.
    ``max_failures=K``: once K tenants have failed, no new tenant is claimed (0: the first
    failure stops it; None: never). Windows already open finish; the rest stay untouched.
    Running the same ``name`` again resumes: done tenants are skipped, failed ones are retried
    only with ``retry_failed=True``. Setting ``stop`` stops claiming (open windows finish);
    setting ``abort`` also fails the open windows (maintenance stays on, the error recorded).
    Ctrl-C (KeyboardInterrupt) does the first, then the second.
    ``lease``: how long a crashed runner's tenants (and, off PostgreSQL, its windows) stay
    claimed before another runner takes them over; a running runner renews it. ``opener``
    opens each window (:mod:`maintgate.django` passes one on Django's connection).
    """
    _check(name, concurrency, canary, max_failures)
    dialect = store.engine.dialect.name
    if dialect not in ("postgresql", "sqlite"):
        raise MaintgateError(
            f"a rollout needs PostgreSQL or SQLite, not {dialect}: there DDL commits implicitly, so "
            "a tenant's migration could not commit with its switch-off and its place in the plan; "
            "run single windows with allow_non_transactional_ddl=True instead"
        )
    if isinstance(tenants, str | bytes):
        raise InvalidArgument("tenants must be a list of tenant ids, not one string", "tenants")
    wanted = [check_tenant(t) for t in tenants]
    if not wanted:
        raise InvalidArgument(
            "no tenants: a run's list is the fleet (pending tenants it does not name are dropped)",
            "tenants",
        )
    if ALL_TENANTS in wanted:
        raise InvalidArgument(
            f"{ALL_TENANTS!r} (the global switch) is not a tenant of a rollout: a window on it would "
            "put every tenant in maintenance",
            "tenants",
        )
    _check_retry_after(retry_after)
    notes: list[str] = []
    if dialect == "sqlite" and concurrency > 1:
        concurrency = 1
        notes.append("SQLite has one writer: windows run one at a time")
    if isinstance(lease, bool) or not isinstance(lease, int | float) or not 0 < lease < 86400:
        raise InvalidArgument(f"lease must be a number of seconds, got {lease!r}", "lease")
    capacity = _pool_capacity(store.engine)
    if concurrency + 2 > capacity:
        raise InvalidArgument(
            f"concurrency {concurrency} needs {concurrency + 2} connections of the store's engine (one "
            f"per open window, one to claim tenants, one for leases and progress); its pool lends at "
            f"most {int(capacity)}: lower concurrency, or raise pool_size or max_overflow",
            "concurrency",
        )
    runner = _Runner(store, name, migrate, message, retry_after, canary, max_failures, stop, on_progress)
    runner.lease = float(lease)
    runner.opener = opener
    try:
        runner.plan(wanted, retry_failed)
    except OperationalError as exc:
        if dialect != "sqlite" or "locked" not in str(exc):
            raise
        raise RolloutBusy(
            f"rollout {name!r}: SQLite's write lock is held (a migration is running, most likely a "
            "runner of this rollout's): on SQLite one runner runs a rollout at a time; several "
            "runners need PostgreSQL"
        ) from None
    skipped = runner.statuses(DONE)
    runner.start_heartbeat()
    failure: Exception | None = None
    try:
        workers = [
            threading.Thread(target=runner.work, name=f"maintgate-rollout-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                try:
                    worker.join(0.2)
                    if abort is not None and abort.is_set() and not runner.aborted.is_set():
                        runner.abort()
                    runner.report_progress()
                except Exception as exc:
                    # A progress callback (or its output) failed: claim nothing more, let the open
                    # windows finish, then raise it.
                    failure = failure or exc
                    runner.stop.set()
                except KeyboardInterrupt:
                    # First Ctrl-C: claim nothing more, let open windows finish. Second: abort them.
                    if runner.stop.is_set():
                        runner.abort()
                    else:
                        runner.interrupted = True
                        runner.stop.set()
                        logger.warning(
                            "maintgate: rollout %r interrupted: no new tenant is claimed, open windows "
                            "finish; interrupt again to abort them (they fail: maintenance stays on)",
                            name,
                        )
    finally:
        runner.stop_heartbeat()
    if failure is not None:
        raise failure
    runner.report_progress(force=True)
    rows = runner.rows()
    failed = {t: e or "" for t, s, e in rows if s == FAILED}
    listed = set(wanted)
    # This run's tenants a runner with another list dropped meanwhile are not done either.
    left = tuple(t for t, s, _ in rows if s in (PENDING, RUNNING) or (s == DROPPED and t in listed))
    mine = set(runner.done_here) | set(skipped)
    elsewhere = tuple(t for t, s, _ in rows if s == DONE and t not in mine)
    stopped = runner.stop_reason() or (
        "this runner was stopped (interrupted): it claimed no new tenant; other runners go on"
        if runner.interrupted or (stop is not None and stop.is_set())
        else None
    )
    if runner.errors:
        raise runner.errors[0]
    return RolloutReport(
        name=name,
        done=tuple(runner.done_here),
        failed=failed,
        skipped=tuple(t for t in skipped),
        not_started=left,
        done_elsewhere=elsewhere,
        dropped=tuple(t for t, s, _ in rows if s == DROPPED and t not in listed),
        stopped=stopped,
        notes=tuple(notes),
    )


def stop_rollout(store: MaintenanceStore, name: str, reason: str = "stopped by an operator") -> bool:
    """Have every runner of rollout ``name`` stop claiming tenants; False if there is no such rollout."""
    r = store._t().rollout
    with _writing(store) as conn:
        changed = conn.execute(update(r).where(r.c.name == name).values(stop_reason=reason)).rowcount
    return changed == 1


def rollout_status(store: MaintenanceStore, name: str) -> dict[str, Any] | None:
    """Counts by status, each failed tenant's error, and why it stopped; None if no such rollout."""
    tables = store._t()
    r, rt = tables.rollout, tables.rollout_tenant
    with store._connect() as conn:
        head = conn.execute(select(r).where(r.c.name == name)).first()
        if head is None:
            return None
        counts = _counts(conn, rt, name)
        failed = conn.execute(
            select(rt.c.tenant, rt.c.error, rt.c.attempts)
            .where(rt.c.name == name, rt.c.status == FAILED)
            .order_by(rt.c.position)
        ).all()
    return {
        "name": name,
        "total": _total(counts),
        **{status: counts.get(status, 0) for status in (PENDING, RUNNING, DONE, FAILED, DROPPED)},
        "stopped": head.stop_reason,
        "failures": [{"tenant": t, "error": e, "attempts": a} for t, e, a in failed],
    }


def _check(name: str, concurrency: int, canary: int, max_failures: int | None) -> None:
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise InvalidArgument(f"a rollout name is 1 to 128 characters, got {name!r}", "name")
    for option, value in (("concurrency", concurrency), ("canary", canary)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (1 if option == "concurrency" else 0)
        ):
            raise InvalidArgument(f"{option} must be a whole number, got {value!r}", option)
    if max_failures is not None and (
        isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0
    ):
        raise InvalidArgument(
            f"max_failures must be a whole number or None, got {max_failures!r}", "max_failures"
        )


class _Runner:
    """One process's share of a rollout: claims tenants, runs their windows, records the outcome."""

    def __init__(
        self,
        store: MaintenanceStore,
        name: str,
        migrate: Migrate,
        message: str | None,
        retry_after: int | None,
        canary: int,
        max_failures: int | None,
        stop: threading.Event | None,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.store = store
        self.name = name
        self.migrate = migrate
        self.message = message
        self.retry_after = retry_after
        self.canary = canary
        self.max_failures = max_failures
        self.budget = None if max_failures is None else max(1, max_failures)
        self.interrupted = False
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.id = _runner_id()
        self.lease = RUNNER_LEASE
        self.opener: Opener = sqlalchemy_window
        self.postgres = store.engine.dialect.name == "postgresql"
        tables = store._t()  # named with their schema: a migration may move search_path
        self.r = tables.rollout
        self.rt = tables.rollout_tenant
        self.claim_lock = threading.Lock()
        self.held: set[str] = set()
        self.claimed_at: dict[str, tuple[float, datetime]] = {}
        self.done_here: list[str] = []
        self.errors: list[BaseException] = []
        self.open: dict[str, Connection] = {}
        self.aborted = threading.Event()
        self._checked: dict[type, type] = {}
        self._checking: dict[int, Connection] = {}
        self.started = time.monotonic()
        self._beat = threading.Event()
        self._heart: threading.Thread | None = None
        self._last_progress = 0.0
        self._expired_check = 0.0
        self._claimer: Connection | None = None
        self._claimer_held = ExitStack()
        self._claim_statement = plan.claim(tables, self.postgres)

    # -- the plan ----------------------------------------------------------------------------------

    def plan(self, tenants: list[str], retry_failed: bool) -> None:
        """Create the rollout, or join it: new tenants go to the end; on SQLite, refuse a second runner."""
        r, rt = self.r, self.rt
        now = utcnow()
        with _writing(self.store) as conn:
            if conn.execute(select(r.c.name).where(r.c.name == self.name)).first() is None:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(r).values(name=self.name, created_at=now, canary=self.canary))
                except IntegrityError:
                    pass  # another runner created it meanwhile: join it
            # Runners joining at once take turns here, so each sees the tenants the other planned.
            head = conn.execute(select(r).where(r.c.name == self.name).with_for_update()).one()
            if (
                not self.postgres
                and head.runner
                and head.runner_lease_until
                and _aware(head.runner_lease_until) > now
            ):
                raise RolloutBusy(
                    f"rollout {self.name!r} is being run by {head.runner} (until "
                    f"{_aware(head.runner_lease_until).isoformat()}): on SQLite one runner runs a "
                    "rollout at a time; several runners need PostgreSQL"
                )
            values: dict[str, Any] = {"stop_reason": None}
            if self.canary and head.canary != self.canary:  # a runner without one keeps the plan's
                values["canary"] = self.canary
            if not self.postgres:
                values.update(runner=self.id, runner_lease_until=now + timedelta(seconds=self.lease))
            conn.execute(update(r).where(r.c.name == self.name).values(**values))
            known = dict(conn.execute(select(rt.c.tenant, rt.c.status).where(rt.c.name == self.name)).all())
            listed = dict.fromkeys(tenants)
            # A run's list is the fleet as it is now: pending and failed tenants it leaves out
            # (deleted ones, say) are dropped, and dropped ones it names again are pending again.
            # Only rows still in the status read move: another runner may finish one meanwhile.
            moves = (
                (DROPPED, (PENDING, FAILED), [t for t, st in known.items() if st in (PENDING, FAILED)]),
                (PENDING, (DROPPED,), [t for t in listed if known.get(t) == DROPPED]),
            )
            for status, was, names in moves:
                names = [t for t in names if (t in listed) == (status == PENDING)]
                for start in range(0, len(names), 1000):
                    conn.execute(
                        update(rt)
                        .where(
                            rt.c.name == self.name,
                            rt.c.tenant.in_(names[start : start + 1000]),
                            rt.c.status.in_(was),
                        )
                        .values(status=status)
                    )
            last = conn.execute(select(func.max(rt.c.position)).where(rt.c.name == self.name)).scalar()
            position = -1 if last is None else int(last)
            fresh = []
            for tenant in listed:
                if tenant not in known:
                    position += 1
                    fresh.append(
                        {
                            "name": self.name,
                            "tenant": tenant,
                            "position": position,
                            "status": PENDING,
                            "attempts": 0,
                        }
                    )
            for start in range(0, len(fresh), 1000):
                conn.execute(insert(rt), fresh[start : start + 1000])
            if retry_failed:
                conn.execute(
                    update(rt)
                    .where(rt.c.name == self.name, rt.c.status == FAILED)
                    .values(status=PENDING, error=None, runner=None, lease_until=None)
                )
        if self.postgres and len(fresh) >= ANALYZE_AFTER:
            # Statistics for the rows just planned: without them the planner may pick the plan's
            # (name, status, position) index for a claim's write by tenant and scan every row.
            with self.store._connect() as conn:
                conn.exec_driver_sql(f"ANALYZE {conn.dialect.identifier_preparer.format_table(rt)}")
                conn.commit()

    def statuses(self, status: str) -> list[str]:
        rt = self.rt
        with self.store._connect() as conn:
            return list(
                conn.execute(
                    select(rt.c.tenant)
                    .where(rt.c.name == self.name, rt.c.status == status)
                    .order_by(rt.c.position)
                ).scalars()
            )

    def rows(self) -> list[tuple[str, str, str | None]]:
        rt = self.rt
        with self.store._connect() as conn:
            return [
                (t, s, e)
                for t, s, e in conn.execute(
                    select(rt.c.tenant, rt.c.status, rt.c.error)
                    .where(rt.c.name == self.name)
                    .order_by(rt.c.position)
                ).all()
            ]

    def stop_reason(self) -> str | None:
        with self.store._connect() as conn:
            reason: str | None = conn.execute(
                select(self.r.c.stop_reason).where(self.r.c.name == self.name)
            ).scalar()
        return reason

    # -- claiming --------------------------------------------------------------------------------

    def claim(self) -> str | None:
        """The next tenant to migrate, now held by this runner; None when there is none to take.

        One UPDATE whatever the plan's size (an index range, never a scan), which also checks the
        rollout's stop, its failure budget and its canary; only when it takes nothing does a
        second read say why. On PostgreSQL it runs in autocommit on a connection the runner holds.
        """
        with self.claim_lock:
            if self.stop.is_set():  # this runner's own stop: the others go on
                return None
            for attempt in (1, 2):
                try:
                    with self._claiming() as conn:
                        return self._claim(conn)
                except DBAPIError as exc:
                    if attempt == 2 or not exc.connection_invalidated:
                        raise
                    self._drop_claimer()  # its session was ended (idle_session_timeout, a restart)
            return None  # not reached

    def _claim(self, conn: Connection) -> str | None:
        now = utcnow()
        # A crashed runner's tenants first (looked for now and then: usually there are none),
        # then the next pending one in plan order.
        first = self._claim_status()
        tenant = self._take(conn, now, first)
        if tenant is None and first == RUNNING:
            tenant = self._take(conn, now, PENDING)
        if tenant is None:
            if self._expired_check > time.monotonic():
                self._expired_check = 0.0  # nothing pending: look for expired claims next time
            self._why_none(conn)
            return None
        if not self.postgres:
            # SQLite's one runner: its lease is renewed here too, since the heartbeat cannot write
            # while a window holds the database's write lock.
            conn.execute(
                update(self.r)
                .where(self.r.c.name == self.name, self.r.c.runner == self.id)
                .values(runner_lease_until=now + timedelta(seconds=self.lease))
            )
        self._took(tenant, now)
        return tenant

    def _claim_status(self) -> str:
        """Where the next claim looks first: RUNNING (a crashed runner's tenants, whose claims ran
        out) now and then, usually there are none; PENDING otherwise, and after RUNNING."""
        if time.monotonic() >= self._expired_check:
            self._expired_check = time.monotonic() + min(1.0, self.lease / 3)
            return RUNNING
        return PENDING

    def _took(self, tenant: str, now: datetime) -> None:
        """``tenant`` is claimed: the heartbeat renews its lease from now on."""
        self.held.add(tenant)
        self.claimed_at[tenant] = (time.monotonic(), now)

    def _unclaim(self, tenant: str, status: str) -> None:
        """Give back a tenant claimed ahead (with a window's switch-off) from ``status`` that this
        runner stopped before running: pending again, as if never claimed; or, taken over from a
        dead runner (whose window may have left it in maintenance), an expired claim again, which
        the next runner takes over at once."""
        rt = self.rt
        values: dict[str, Any] = {"runner": None, "attempts": rt.c.attempts - 1}
        if status == RUNNING:
            values["lease_until"] = self._later(0)
        else:
            values.update(status=PENDING, lease_until=None, started_at=None)
        with _writing(self.store) as conn:
            conn.execute(self._my_claim(tenant).values(**values))
        self.held.discard(tenant)
        self.claimed_at.pop(tenant, None)

    def _take(self, conn: Connection, now: datetime, status: str) -> str | None:
        """Take the first tenant in ``status`` (RUNNING: whose lease ran out) in plan order, if the
        rollout is not stopped, its budget not spent, and its canary allows it (:func:`plan.claim`):
        on PostgreSQL one call of its server function where ``create_tables`` made it."""
        params = {
            "p_rollout": self.name,
            "p_status": status,
            "p_budget": self.budget,
            "p_runner": self.id,
            "p_now": now,
            "p_lease": timedelta(seconds=self.lease),
            "p_until": now + timedelta(seconds=self.lease),
        }
        function = self.store._function("claim", conn) if self.postgres else None
        if function is not None:
            # In autocommit a failed call changes nothing; in a transaction, a savepoint sees to it.
            guard = conn.begin_nested() if not _autocommit(conn) else nullcontext()
            try:
                with guard:
                    called: str | None = conn.execute(function.call, params).scalar()
                return called
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) not in UNCALLABLE:
                    raise
                self.store._forget_functions()
        taken: str | None = conn.execute(self._claim_statement, params).scalar()
        return taken

    def _why_none(self, conn: Connection) -> None:
        """Nothing was taken: stop the rollout if its canary failed or its budget is spent."""
        r, rt = self.r, self.rt
        of_this = rt.c.name == r.c.name
        in_canary = rt.c.position < r.c.canary
        stop_reason, canary_failed, failed = conn.execute(
            select(
                r.c.stop_reason,
                select(rt.c.tenant)
                .where(of_this, rt.c.status == FAILED, in_canary)
                .order_by(rt.c.position)
                .limit(1)
                .scalar_subquery(),
                select(func.count()).where(of_this, rt.c.status == FAILED).scalar_subquery(),
            ).where(r.c.name == self.name)
        ).one()
        if stop_reason:
            return
        if canary_failed is not None:
            self._stop(
                conn, f"canary failed: tenant {canary_failed!r}; the rest of the fleet was not touched"
            )
        elif self.budget is not None and failed >= self.budget:
            self._stop(
                conn, f"failure budget spent: {failed} tenant(s) failed (max_failures={self.max_failures})"
            )

    @contextmanager
    def _claiming(self) -> Iterator[Connection]:
        """Where claims run: on PostgreSQL a connection held by the runner, in autocommit (a claim
        is one statement); on SQLite a write transaction of its own each time.

        A claim updates a row another runner may have just claimed: under a snapshot (a server
        whose default isolation is REPEATABLE READ) that fails to serialize, so there the claims
        run in READ COMMITTED transactions instead of autocommit.
        """
        if not self.postgres:
            with _writing(self.store) as conn:
                yield conn
            return
        if self._claimer is None or self._claimer.closed or self._claimer.invalidated:
            self._drop_claimer()
            conn = self._claimer_held.enter_context(self.store._connect())
            # Set on the driver, and put back when the runner lets the connection go: through
            # SQLAlchemy's option the pool would put back the level it saw at its first connect.
            self._claimer_held.enter_context(_driver_set(conn, "autocommit", True))
            with conn.begin():  # SQLAlchemy's: in autocommit the driver sends no BEGIN
                level = conn.execute(select(func.current_setting("transaction_isolation"))).scalar()
            if level != "read committed":
                self._claimer_held.enter_context(_read_committed(conn))
            self._claimer = conn
        with self._claimer.begin():
            yield self._claimer

    def _drop_claimer(self) -> None:
        self._claimer = None
        self._claimer_held.close()

    def _stop(self, conn: Connection, reason: str) -> None:
        r = self.r
        conn.execute(
            update(r).where(r.c.name == self.name, r.c.stop_reason.is_(None)).values(stop_reason=reason)
        )

    # -- running -----------------------------------------------------------------------------------

    def work(self) -> None:
        """A worker: claim, migrate inside the tenant's window, repeat until nothing is left. On
        PostgreSQL a window that commits has claimed the worker's next tenant with its switch-off."""
        ahead: tuple[str, str] | None = None  # a tenant claimed with the last switch-off, and from
        try:
            while True:
                if ahead is not None and self.stop.is_set():
                    self._unclaim(*ahead)
                    ahead = None
                tenant = ahead[0] if ahead is not None else self.claim()
                ahead = None
                if tenant is None:
                    if self._others_running():
                        time.sleep(0.1)  # their tenants may be ours to take, or unlock the canary
                        continue
                    return
                ahead = self.run(tenant)
        except BaseException as exc:  # reported by rollout(), after the other workers end
            self.errors.append(exc)
            self.stop.set()
            if ahead is not None:
                try:
                    self._unclaim(*ahead)
                except Exception:  # its claim runs out instead, and another runner takes it
                    logger.exception(
                        "maintgate: rollout %r could not give back tenant %r", self.name, ahead[0]
                    )

    def _others_running(self) -> bool:
        """Whether other tenants are still claimed: by this runner's other workers or a live
        runner (whose end may unlock the canary), or a crashed one (taken over once its lease
        expires). A worker with nothing to claim waits for them rather than ending."""
        if self.stop.is_set() or self.stop_reason():
            return False
        rt = self.rt
        with self.store._connect() as conn:
            running = conn.execute(
                select(func.count()).where(
                    rt.c.name == self.name,
                    rt.c.status == RUNNING,
                )
            ).scalar()
        return bool(running)

    def run(self, tenant: str) -> tuple[str, str] | None:
        """One tenant's window: done is recorded in the window's transaction, failure after it.
        Returns the next tenant and the status it was claimed from, if the window claimed it
        (committed with the window)."""
        if not self._still_ours(tenant):
            self.held.discard(tenant)
            logger.warning(
                "maintgate: rollout %r: this runner's claim on tenant %r ran out before its window "
                "opened (the process stalled?); another runner has it",
                self.name,
                tenant,
            )
            return None
        # The default window writes the done mark with its switch-off (one round trip on
        # PostgreSQL, which claims the next tenant too); another opener's window gets it at the
        # end of the work, in its transaction.
        folded = self.opener is sqlalchemy_window
        done = Done(self.name, self.id)
        if folded and self.postgres and not self.stop.is_set():
            done.claim_next = self._claim_status()
            done.budget = self.budget
            done.lease = timedelta(seconds=self.lease)
        try:
            with self.opener(
                self.store,
                tenant,
                message=self.message,
                retry_after=self.retry_after,
                lease=self.lease,
                **({"done": done} if folded else {}),
            ) as (handed, conn):
                self.open[tenant] = conn
                if self.aborted.is_set():
                    raise RolloutAborted(ABORTED)
                if self.postgres and folded:
                    # A pooled connection carries a migration's session-level SET search_path to
                    # the next tenant's window: the done mark puts back the path it came with.
                    done.search_path = _entry_search_path(conn)
                with self._abort_checked(conn):
                    self.migrate(handed, tenant)
                    self._abort_check()
                    if not folded:
                        self.store.mark_done(conn, tenant, done, utcnow())
        except WindowBusy as exc:
            # Another process's window holds the tenant (a runner thought dead, say): not ours to
            # fail, unless it holds it all along.
            if self._attempts(tenant) >= BUSY_ATTEMPTS:
                self._release(tenant, FAILED, f"another window held the tenant at every attempt: {exc}")
            else:
                self._release(tenant, PENDING, str(exc), retry_in=BUSY_RETRY)
        except Exception as exc:
            if _run_again(exc) and self._attempts(tenant) < RUN_AGAIN_ATTEMPTS:
                # A serialization failure or a deadlock: PostgreSQL's answer is to run it again.
                released = self._release(tenant, PENDING, _describe(exc), retry_in=random.uniform(0.05, 0.5))
            else:
                released = self._release(tenant, FAILED, _describe(exc))
            if not released:
                self._lost(tenant, exc)
        else:
            self.done_here.append(tenant)
            if done.claimed is not None:
                self._took(done.claimed, utcnow())
                return done.claimed, done.claimed_from or PENDING
        finally:
            self.held.discard(tenant)
            self.claimed_at.pop(tenant, None)
            self.open.pop(tenant, None)
        return None

    def _later(self, seconds: float) -> Any:
        """``seconds`` from now; on PostgreSQL by the database's clock, so that runners on hosts
        whose clocks disagree still agree on when a claim runs out."""
        if self.postgres:
            return func.now() + timedelta(seconds=seconds)
        return utcnow() + timedelta(seconds=seconds)

    def _still_ours(self, tenant: str) -> bool:
        """Whether this runner still holds ``tenant``: checked (and the lease renewed) only when the
        claim is old enough that its lease may have run out, as when the process stalled."""
        since, at = self.claimed_at.get(tenant, (time.monotonic(), utcnow()))
        margin = self.lease / 3
        if time.monotonic() - since < margin and (utcnow() - at).total_seconds() < margin:
            return True
        with _writing(self.store) as conn:
            renewed = conn.execute(
                self._my_claim(tenant).values(lease_until=self._later(self.lease))
            ).rowcount
        return renewed == 1

    def _my_claim(self, tenant: str) -> Any:
        """An UPDATE of ``tenant``'s plan row that changes it only while this runner holds its claim."""
        rt = self.rt
        return update(rt).where(
            rt.c.name == self.name, rt.c.tenant == tenant, rt.c.runner == self.id, rt.c.status == RUNNING
        )

    def _attempts(self, tenant: str) -> int:
        rt = self.rt
        with self.store._connect() as conn:
            attempts = conn.execute(
                select(rt.c.attempts).where(rt.c.name == self.name, rt.c.tenant == tenant)
            ).scalar()
        return int(attempts or 0)

    def _abort_check(self, *args: Any) -> None:
        if self.aborted.is_set():
            raise RolloutAborted(ABORTED)

    @contextmanager
    def _abort_checked(self, conn: Connection) -> Iterator[None]:
        """Until the window ends, each statement on ``conn`` raises :class:`RolloutAborted` once the
        rollout is aborted: with psycopg, through cursor classes set on its driver connection
        meanwhile (:func:`hook_cursors`), else through a listener on ``conn``."""
        driver = conn.connection.driver_connection
        if not self.postgres or not isinstance(getattr(driver, "cursor_factory", None), type):
            event.listen(conn, "before_cursor_execute", self._abort_check)
            yield
            return
        self._checking[id(driver)] = conn
        saved = hook_cursors(conn, self._checked, self._abort_check_cursor)
        try:
            yield
        finally:
            put_back_all(conn, saved)
            if self._checking.get(id(driver)) is conn:  # closed in its block, another window may have it
                del self._checking[id(driver)]

    def _abort_check_cursor(self, cursor: Any) -> None:
        """:meth:`_abort_check` for a statement on a window's connection while the window holds it
        (closed in its block, it went back to the pool: another checkout's statements pass)."""
        conn = self._checking.get(id(cursor.connection))
        if conn is not None and not conn.closed:
            self._abort_check()

    def abort(self) -> None:
        """Fail every open window: its next statement raises, and one running now is cancelled."""
        self.aborted.set()
        self.stop.set()
        for conn in list(self.open.values()):
            try:
                driver = conn.connection.driver_connection
                cancel = getattr(driver, "cancel_safe", None) or getattr(driver, "cancel", None)
                if self.postgres and cancel is not None:
                    cancel()
                elif not self.postgres and driver is not None and hasattr(driver, "interrupt"):
                    driver.interrupt()
            except Exception:
                logger.exception("maintgate: could not interrupt an open window's statement")

    def _lost(self, tenant: str, exc: BaseException) -> None:
        """A window failed on a tenant this runner no longer held (it stalled past its lease): if
        the runner that took it over has migrated it, the failure is moot, and the maintenance
        that failure left is switched off. Anything else that holds the tenant (a window, an
        operator's switch, a schedule) is left alone, and logged."""
        rt = self.rt
        with self.store._connect() as conn:
            status = conn.execute(
                select(rt.c.status).where(rt.c.name == self.name, rt.c.tenant == tenant)
            ).scalar()
        state = self.store.get(tenant)
        only_ours = (
            status == DONE
            and state is not None
            and state.active
            and state.source == WINDOW
            and state.window_id is None
            and not self.store.schedules(tenant)
        )
        logger.warning(
            "maintgate: rollout %r: tenant %r was taken over by another runner while this one "
            "stalled; its window here failed (%s); %s",
            self.name,
            tenant,
            _describe(exc).splitlines()[0],
            "the tenant is migrated: maintenance switched off again"
            if only_ours
            else "what holds the tenant now is not this failure's: left as it is",
        )
        if only_ours:
            self.store.deactivate(tenant)

    def _release(self, tenant: str, status: str, error: str, retry_in: float = 0.0) -> bool:
        rt = self.rt
        values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow(), "runner": None}
        values["lease_until"] = self._later(retry_in) if retry_in else None
        if retry_in:  # pending again, but not before then
            values.update(status=RUNNING, runner=None)
        with _writing(self.store) as conn:
            released = conn.execute(
                update(rt)
                .where(rt.c.name == self.name, rt.c.tenant == tenant, rt.c.runner == self.id)
                .values(**values)
            ).rowcount
        if not released:
            return False
        if status == FAILED:
            logger.warning(
                "maintgate: rollout %r: tenant %r failed and stays in maintenance: %s",
                self.name,
                tenant,
                error.splitlines()[0] if error else "",
                extra={"maintgate_event": "rollout_tenant_failed", "tenant": tenant, "rollout": self.name},
            )
        return True

    # -- leases and progress ---------------------------------------------------------------------

    def start_heartbeat(self) -> None:
        self._heart = threading.Thread(target=self._heartbeat, name="maintgate-rollout-lease", daemon=True)
        self._heart.start()

    def stop_heartbeat(self) -> None:
        self._drop_claimer()
        self._beat.set()
        if self._heart is not None:
            self._heart.join(5)
        if not self.postgres:
            with _writing(self.store) as conn:
                conn.execute(
                    update(self.r)
                    .where(self.r.c.name == self.name, self.r.c.runner == self.id)
                    .values(runner=None, runner_lease_until=None)
                )

    def _heartbeat(self) -> None:
        while not self._beat.wait(self.lease / 3):
            try:
                until = utcnow() + timedelta(seconds=self.lease)  # SQLite's runner lease: one host
                with _writing(self.store) as conn:
                    held = list(self.held)
                    if held:
                        conn.execute(
                            update(self.rt)
                            .where(
                                self.rt.c.name == self.name,
                                self.rt.c.runner == self.id,
                                self.rt.c.tenant.in_(held),
                            )
                            .values(lease_until=self._later(self.lease))
                        )
                    if not self.postgres:
                        conn.execute(
                            update(self.r)
                            .where(self.r.c.name == self.name, self.r.c.runner == self.id)
                            .values(runner_lease_until=until)
                        )
            except Exception:
                logger.exception("maintgate: rollout %r could not renew its leases", self.name)

    def report_progress(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if not force and now - self._last_progress < 0.5:
            return
        self._last_progress = now
        rt = self.rt
        with self.store._connect() as conn:
            counts = _counts(conn, rt, self.name)
        self.on_progress(
            Progress(
                total=_total(counts),
                done=counts.get(DONE, 0),
                failed=counts.get(FAILED, 0),
                running=counts.get(RUNNING, 0),
                elapsed=now - self.started,
                done_here=len(self.done_here),
            )
        )


def _entry_search_path(conn: Connection) -> str | None:
    """The search_path a pooled connection had when a rollout's window first used it."""
    info = conn.connection.info
    if _SEARCH_PATH not in info:
        info[_SEARCH_PATH] = conn.execute(select(func.current_setting("search_path"))).scalar()
    path: str | None = info[_SEARCH_PATH]
    return path


_SEARCH_PATH = "maintgate_rollout_search_path"


@contextmanager
def _writing(store: MaintenanceStore) -> Iterator[Connection]:
    """A transaction that reads, then writes: on SQLite it takes the write lock from the start; on
    PostgreSQL it is READ COMMITTED whatever the engine's level (a SERIALIZABLE engine would fail
    runners' writes to the plan on each other's)."""
    with store._connect() as conn, ExitStack() as stack:
        conn.execution_options(sqlite_immediate=True)
        if conn.dialect.name == "postgresql":
            stack.enter_context(_read_committed(conn))
        with conn.begin():
            yield conn


def _autocommit(conn: Connection) -> bool:
    """Whether ``conn``'s driver connection is in autocommit (an attribute: no round trip)."""
    return bool(getattr(conn.connection.driver_connection, "autocommit", False))


def _run_again(exc: BaseException) -> bool:
    """Whether ``exc``, or an error that led to it, is PostgreSQL's "run the transaction again"."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain of causes, never a cycle followed forever
        if seen is None:
            return False
        orig = getattr(seen, "orig", None)
        if (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) in RUN_AGAIN:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _total(counts: dict[str, int]) -> int:
    """The tenants a rollout plans to migrate: every status but dropped."""
    return sum(n for status, n in counts.items() if status != DROPPED)


def _counts(conn: Connection, rt: Any, name: str) -> dict[str, int]:
    """How many tenants of rollout ``name`` are in each status."""
    rows = conn.execute(select(rt.c.status, func.count()).where(rt.c.name == name).group_by(rt.c.status))
    return {status: int(count) for status, count in rows.all()}


def _aware(moment: Any) -> Any:
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
