"""The maintenance state of one tenant, as the store records it."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import InvalidTenant

ALL_TENANTS = "*"
"""Tenant id of the global switch: it covers every tenant and requests with no tenant."""

FULL = "full"
"""Maintenance mode that answers every request with a 503."""
READ_ONLY = "read_only"
"""Maintenance mode that lets GET, HEAD and OPTIONS through and answers writes with a 503."""
MODES = (FULL, READ_ONLY)

OPERATOR = "operator"
"""``source`` of maintenance an operator switched on (activate, the CLI)."""
WINDOW = "window"
"""``source`` of maintenance a migration window switched on."""

TENANT_MAX_LENGTH = 128
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def is_valid_tenant(tenant: object) -> bool:
    """Whether ``tenant`` is a tenant id the store accepts (the global switch included)."""
    if not isinstance(tenant, str):
        return False
    if tenant == ALL_TENANTS:
        return True
    return 0 < len(tenant) <= TENANT_MAX_LENGTH and TENANT_PATTERN.fullmatch(tenant) is not None


def check_tenant(tenant: str) -> str:
    """Return ``tenant`` unchanged, or raise :class:`InvalidTenant` naming the bad value."""
    if not is_valid_tenant(tenant):
        shown = repr(tenant) if len(repr(tenant)) <= 80 else repr(tenant)[:77] + "..."
        raise InvalidTenant(
            f"invalid tenant id {shown}: use 1-{TENANT_MAX_LENGTH} characters from "
            "A-Z a-z 0-9 _ . - starting with a letter or digit, or '*' for every tenant (the global switch)"
        )
    return tenant


@dataclass(frozen=True, slots=True)
class Owner:
    """The process that holds a migration window: host, pid and, on PostgreSQL, its backend pid."""

    host: str
    pid: int
    backend_pid: int | None = None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a tenant's append-only history: what happened, when, by whom, and why."""

    id: int
    tenant: str
    event: str
    at: datetime
    message: str | None = None
    error: str | None = None
    owner: Owner | None = None
    window_id: str | None = None


@dataclass(frozen=True, slots=True)
class MaintenanceState:
    """One tenant's maintenance row: whether it is on, why, and for how long."""

    tenant: str
    active: bool
    message: str | None = None
    error: str | None = None
    retry_after: int | None = None
    ends_at: datetime | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    owner: Owner | None = None
    mode: str = FULL
    schedule_id: int | None = None
    source: str | None = None
    window_id: str | None = None
    lease_until: datetime | None = None

    @property
    def read_only(self) -> bool:
        """Whether only writes are blocked (reads pass)."""
        return self.mode == READ_ONLY

    @property
    def is_global(self) -> bool:
        """Whether this is the global switch rather than one tenant's state."""
        return self.tenant == ALL_TENANTS

    def seconds_to_retry(self, now: datetime, default: int) -> int:
        """Seconds a client should wait: until ``ends_at`` if it lies ahead, else ``retry_after``."""
        if self.ends_at is not None:
            left = (self.ends_at - now).total_seconds()
            if left > 0:
                return max(1, math.ceil(left))
        if self.retry_after is not None and self.retry_after > 0:
            return self.retry_after
        return default


def strictness(state: MaintenanceState) -> tuple[bool, bool, bool]:
    """Sort key of states that apply at once: full before read-only, then the tenant's own, then manual."""
    return (state.mode != FULL, state.is_global, state.schedule_id is not None)


@dataclass(frozen=True, slots=True)
class Window:
    """An open migration window, as :meth:`MaintenanceStore.open_window` returns it.

    Every write that ends the window names ``id`` and must change exactly its row.
    ``lease_until`` is when the lease written at opening expires (on PostgreSQL it covers only the
    opening: the lock on the migration's transaction holds the tenant after that). ``schema`` is
    where maintgate's tables were found (the store's statements name it, whatever the migration
    connection's ``search_path`` becomes).
    """

    id: str
    tenant: str
    owner: Owner
    mode: str = FULL
    message: str | None = None
    lease_until: datetime | None = None
    schema: str | None = None


@dataclass(frozen=True, slots=True)
class Schedule:
    """A planned maintenance window: the gate switches it on at ``starts_at`` and off at ``ends_at``."""

    id: int
    tenant: str
    starts_at: datetime
    ends_at: datetime | None
    message: str | None = None
    mode: str = FULL
    retry_after: int | None = None
    created_at: datetime | None = None

    def as_state(self) -> MaintenanceState:
        """The maintenance state this window means while it is on."""
        return MaintenanceState(
            tenant=self.tenant,
            active=True,
            message=self.message,
            retry_after=self.retry_after,
            ends_at=self.ends_at,
            started_at=self.starts_at,
            updated_at=self.created_at,
            mode=self.mode,
            schedule_id=self.id,
        )


def in_force(
    manual: MaintenanceState | None, schedules: Iterable[Schedule], now: datetime
) -> tuple[list[MaintenanceState], datetime | None]:
    """What one switch (a tenant's or the global one) has in force at ``now`` — its manual state
    if active, and its planned windows that are on — and when that next changes by itself."""
    found = [manual] if manual is not None and manual.active else []
    boundary: datetime | None = None
    for schedule in schedules:
        if schedule.starts_at > now:
            edge: datetime | None = schedule.starts_at
        elif schedule.ends_at is not None and schedule.ends_at <= now:
            continue
        else:
            found.append(schedule.as_state())
            edge = schedule.ends_at
        if edge is not None and (boundary is None or edge < boundary):
            boundary = edge
    return found, boundary


@dataclass(frozen=True, slots=True)
class Ended:
    """What :meth:`MaintenanceStore.deactivate` ended, so an operator is told exactly that."""

    tenant: str
    switch: bool
    """Whether the tenant's own switch was on (an operator's or a window's)."""
    schedules: tuple[Schedule, ...] = ()
    """The planned windows that were on and are now deleted."""
    released: MaintenanceState | None = None
    """The state as it was when a window whose owner is gone held the tenant, cleared too."""
    state: MaintenanceState | None = None
    """The tenant's row as it is now (None if it has none)."""

    def __bool__(self) -> bool:
        return self.switch or bool(self.schedules) or self.released is not None


@dataclass(frozen=True, slots=True)
class Lookup:
    """What applies to a tenant now, and when that may change by itself (a schedule boundary)."""

    state: MaintenanceState | None
    changes_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Changes:
    """What :meth:`MaintenanceStore.changes` read: everything (``full``) or what changed since a number.

    ``states`` maps each tenant read to its active state, or None when it is not on; ``schedules``
    maps it to its planned windows not over yet; ``versions`` gives each row's change number and
    ``version`` the highest change number the read covers.
    """

    full: bool
    version: int
    states: dict[str, MaintenanceState | None]
    schedules: dict[str, list[Schedule]]
    versions: dict[str, int]
