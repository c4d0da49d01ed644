"""What a fleet rollout's runner writes for every tenant: its claim and its done mark (see
:mod:`maintgate.fleet`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Integer,
    Interval,
    String,
    and_,
    bindparam,
    exists,
    func,
    literal_column,
    or_,
    select,
    update,
)

from .schema import Tables

PENDING, RUNNING, DONE, FAILED, DROPPED = "pending", "running", "done", "failed", "dropped"


@dataclass(slots=True)
class Done:
    """A rollout's done mark for the tenant of a window, written in the window's transaction."""

    rollout: str
    runner: str
    search_path: str | None = None
    """PostgreSQL: the search_path the window's pooled connection came with, put back before the
    commit if the migration changed it for the session (the next tenant's window would inherit it)."""
    claim_next: str | None = None
    """PostgreSQL, with the server functions: claim the runner's next tenant in the same call, in
    status ``claim_next`` first (RUNNING: an expired claim), then PENDING (:func:`claim`).
    It commits with the window, so it saves the claim's own round trip and commit."""
    budget: int | None = None
    """The failure budget the next claim checks (:func:`claim`'s ``:p_budget``)."""
    lease: timedelta = timedelta(0)
    """How long the next claim lasts (:func:`claim`'s ``:p_lease``)."""
    claimed: str | None = None
    """The next tenant claimed with the switch-off: the runner's once the window has committed."""
    claimed_from: str | None = None
    """The status ``claimed`` was in: PENDING, or RUNNING (a dead runner's expired claim)."""

    def lost(self, tenant: str) -> str:
        return (
            f"rollout {self.rollout!r}: tenant {tenant!r} was taken over by another runner; "
            "this window rolls back"
        )


def done(tables: Tables, tracked: bool) -> Any:
    """Mark tenant ``:p_tenant`` done in rollout ``:p_rollout`` at ``:p_now``, fenced on runner
    ``:p_runner``'s claim; ``tracked``: return the session's search_path as well."""
    rt = tables.rollout_tenant
    statement = (
        update(rt)
        .where(
            rt.c.name == bindparam("p_rollout", type_=rt.c.name.type),
            rt.c.tenant == bindparam("p_tenant", type_=rt.c.tenant.type),
            rt.c.runner == bindparam("p_runner", type_=rt.c.runner.type),
        )
        .values(
            status=DONE,
            finished_at=bindparam("p_now", type_=rt.c.finished_at.type),
            error=None,
            lease_until=None,
        )
    )
    return statement.returning(func.current_setting("search_path")) if tracked else statement


def claim(tables: Tables, postgres: bool, in_window: bool = False) -> Any:
    """Take, for runner ``:p_runner``, the first tenant of rollout ``:p_rollout`` in status
    ``:p_status`` (RUNNING: one whose claim ran out) in plan order, if the rollout is not stopped,
    its failure budget ``:p_budget`` (NULL: none) is not spent, and its canary allows it. Returns
    the tenant.

    One UPDATE whatever the plan's size: an index range, never a scan. On PostgreSQL the claim
    lasts ``:p_lease`` from the statement's time by the database's clock (runners' clocks may
    disagree) and, on its own, commits without waiting for the WAL flush: a claim a crash loses is
    taken again, and the window's commit, which waits, flushes it first anyway. ``in_window``: it
    runs in a window's transaction, whose commit must wait. Elsewhere it lasts until ``:p_until``.
    """
    r, rt = tables.rollout, tables.rollout_tenant
    name = bindparam("p_rollout", type_=r.c.name.type)
    status = bindparam("p_status", type_=String)
    budget = bindparam("p_budget", type_=Integer)
    now = bindparam("p_now", type_=rt.c.started_at.type)
    x, failed = rt.alias("x"), rt.alias("f")
    canary = select(r.c.canary).where(r.c.name == name).scalar_subquery()

    def first_position(status: str) -> Any:
        """The lowest position in ``status``, or the canary's size if none is lower: a min()
        the plan's (name, status, position) index answers at once, whatever the statistics
        (a NOT EXISTS with ``position < canary`` was planned as a scan of the whole plan)."""
        low = rt.alias(f"low_{status}")
        lowest = select(func.min(low.c.position)).where(low.c.name == name, low.c.status == status)
        return func.coalesce(lowest.scalar_subquery(), canary)

    spent = select(func.count()).where(failed.c.name == name, failed.c.status == FAILED).scalar_subquery()
    checks = [
        exists().where(r.c.name == name, r.c.stop_reason.is_(None)),
        first_position(FAILED) >= canary,  # no canary tenant failed
        # Past the canary only once every canary tenant has finished.
        or_(
            x.c.position < canary,
            and_(first_position(PENDING) >= canary, first_position(RUNNING) >= canary),
        ),
        or_(budget.is_(None), spent < budget),
        or_(status != RUNNING, x.c.lease_until < (func.statement_timestamp() if postgres else now)),
    ]
    # PostgreSQL: the row found is updated by its ctid (a TID scan), whatever the planner thinks
    # of a plan just created (by tenant, a stale estimate can scan the whole plan per claim).
    key = literal_column("ctid") if postgres else x.c.tenant
    first = select(key).where(x.c.name == name, x.c.status == status, *checks).order_by(x.c.position).limit(1)
    returned: list[Any] = [rt.c.tenant]
    if postgres:
        first = first.with_for_update(skip_locked=True)
        if not in_window:
            returned.append(func.set_config("synchronous_commit", "off", True))
        # The statement's time: in a window's transaction, now() is when the migration began.
        until = func.statement_timestamp() + bindparam("p_lease", type_=Interval)
    else:
        until = bindparam("p_until", type_=rt.c.lease_until.type)
    found = (literal_column("ctid") if postgres else rt.c.tenant) == first.scalar_subquery()
    return (
        update(rt)
        .where(rt.c.name == name, found)
        .values(
            status=RUNNING,
            runner=bindparam("p_runner", type_=rt.c.runner.type),
            lease_until=until,
            attempts=rt.c.attempts + 1,
            started_at=now,
            finished_at=None,
        )
        .returning(*returned)
    )
