"""The maintenance state of every tenant, held in memory and refreshed in the background.

A process keeps what is in force or planned (the global switch, the tenants in maintenance,
their schedules), which is small next to the tenant count, and reads only what changed since
its last read: one query per TTL at most, whatever the number of tenants or requests. A tenant
that is not held is not in maintenance, so any tenant is answered from memory. Gates of one
process that read the same store with the same settings share one mirror; nothing of it
outlives them but a refresh that is still running.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from .errors import explain
from .state import ALL_TENANTS, Changes, MaintenanceState, Schedule, strictness, utcnow
from .state import in_force as states_in_force

logger = logging.getLogger("maintgate")


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()
"""Returned by :meth:`StateMirror.peek` when the state in memory is not fresh (or not there yet)."""

BACKOFF_START = 0.25
BACKOFF_MAX = 5.0
FULL_READ_EVERY = 60.0
"""Seconds between full reads, which also find rows written without a change number (by a
process of an earlier version, during a rolling upgrade)."""
MAX_RUNNING = 2
"""Refreshes of one mirror that may be running at once: one, and one more if the first got stuck."""


class ChangeSource(Protocol):
    """What a mirror reads: a :class:`~maintgate.core.store.MaintenanceStore` above all."""

    def changes(self, since: int | None, now: datetime | None = None) -> Changes: ...


@dataclass(frozen=True, slots=True)
class _View:
    """The state of every tenant at one moment, as requests read it without a lock."""

    effective: dict[str, MaintenanceState]
    default: MaintenanceState | None
    fresh_until: float
    boundary: float
    refreshed_at: float


_EMPTY = _View({}, None, -math.inf, math.inf, -math.inf)


class StateMirror:
    """Everything in force or planned in one store, kept current by refreshes and notifications.

    ``peek`` is the hot path: one attribute read, one clock read, one dict lookup. The rest
    runs on the uncommon path (``poll``), at most once per TTL per request burst.
    """

    def __init__(
        self,
        store: ChangeSource,
        *,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
        refresh_timeout: float = 5.0,
        log_interval: float = 30.0,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.refresh_timeout = refresh_timeout
        self._clock = clock
        self._now = now
        self._log_interval = log_interval
        self._lock = threading.Lock()
        self._view = _EMPTY
        self._manual: dict[str, MaintenanceState] = {}
        self._planned: dict[str, tuple[Schedule, ...]] = {}
        self._since: int | None = None
        self._seen: dict[str, tuple[int, MaintenanceState | None]] = {}
        self._round = _new_round()
        self._generation = 0
        self._merged = 0
        self._running = 0
        self._started_at = -math.inf
        self._ended_at = -math.inf
        self._again = False
        self._want_full = False
        self._full_at = -math.inf
        self._retry_at = -math.inf
        self._delay = BACKOFF_START
        self._pid = os.getpid()
        self._last_warning = -math.inf
        self._suppressed = 0
        self._down_since: float | None = None
        self.loaded = False
        """Whether the first state is in memory."""
        self.closed = False
        """Whether every gate using it closed: it reads nothing any more."""
        self.failing = False
        """Whether the last refresh failed or got no answer in time (the state may be old)."""
        self.slow = False
        """Whether a request stopped waiting for the refresh under way (cleared when it ends)."""
        self.waking = False
        """Whether the refresh under way is the first after an idle spell: nothing was read for two
        TTLs before it started, so requests wait a moment for it (cleared when it ends)."""
        self.listen: Callable[[StateMirror], object] | None = None
        """Set by an adapter: starts (or joins) this process's notification listener."""
        self.listener: Any = None
        self.gates: weakref.WeakSet[Any] = weakref.WeakSet()

    def __len__(self) -> int:
        """Tenants held: those in maintenance or with a planned window."""
        return len(self._manual.keys() | self._planned.keys())

    def peek(self, key: Hashable) -> MaintenanceState | None:
        """``key``'s state from memory while fresh, else ``MISS``; no lock, no I/O."""
        view = self._view
        if view.fresh_until > self._clock():
            return view.effective.get(key, view.default)  # type: ignore[call-overload, no-any-return]
        return MISS  # type: ignore[no-any-return]

    def state_of(self, key: str) -> MaintenanceState | None:
        """``key``'s state from memory however old (callers check :meth:`age` first)."""
        view = self._view
        return view.effective.get(key, view.default)

    def age(self) -> float:
        """Seconds since the state in memory was read from the store (infinite before the first read)."""
        return self._clock() - self._view.refreshed_at

    def poll(self) -> None:
        """The uncommon path's upkeep: a schedule boundary passed, a refresh is due, a listener is gone."""
        if os.getpid() != self._pid:
            self._after_fork()
        if self.closed:  # a gate used again after its server stopped: serve it as before
            with self._lock:
                self.closed = False
        now = self._clock()
        view = self._view
        if now >= view.boundary:
            with self._lock:
                self._derive()
        if now - view.refreshed_at >= self.ttl:
            self.refresh_soon()
        if self.listen is not None and (self.listener is None or not self.listener.alive()):
            try:
                self.listener = self.listen(self)
            except Exception:
                logger.exception("maintgate: could not start the notification listener; using the TTL")
                self.listen = None

    def refresh_soon(self, *, force: bool = False) -> Future[None]:
        """Start a refresh in a thread of its own unless one is running; the future settles when it ends.

        ``force`` skips the backoff and, if a refresh is running, runs another once it ends
        (something changed that the running one may have missed).
        """
        with self._lock:
            now = self._clock()
            if self.closed:
                return self._round
            if self._running:
                if now - self._started_at < self.refresh_timeout:
                    self._again = self._again or force
                    return self._round
                if not self.failing:  # the running refresh got no answer in time
                    self._failed(TimeoutError(f"no answer from the store within {self.refresh_timeout}s"))
                if self._running >= MAX_RUNNING:
                    return self._round
            elif now < self._retry_at and not force:
                return self._round
            if not self._running and now - self._ended_at > 2 * self.ttl:
                self.waking = True  # under traffic, a refresh starts within a TTL of the last one
            self._running += 1
            self._generation += 1
            self._started_at = now
            if self._round.done():
                self._round = _new_round()
            full = self._want_full or now - self._full_at >= FULL_READ_EVERY
            self._want_full = False
            args = (self._generation, None if full else self._since)
        threading.Thread(target=self._refresh, args=args, name="maintgate-refresh", daemon=True).start()
        return self._round

    def sync(self, timeout: float) -> bool:
        """Read what changed, with a read that starts now, and wait up to ``timeout`` for it."""
        with self._lock:
            asked = self._generation  # any read numbered above it started after this call
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and not self.closed:
            round_ = self.refresh_soon(force=True)
            try:
                round_.result(left)
            except TimeoutError:
                return False
            if self.failing:
                return False
            if self._merged > asked:
                return True
            time.sleep(0.005)  # a read that began before the call ended: the next one is ours
        return False

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the refresh under way (starting one if none); True if it ended."""
        round_ = self.refresh_soon()
        try:
            round_.result(timeout)
        except TimeoutError:
            self._timed_out(timeout)
            return False
        return True

    async def wait_async(self, timeout: float) -> bool:
        """:meth:`wait` without blocking the event loop."""
        import asyncio

        round_ = self.refresh_soon()
        try:
            await asyncio.wait_for(asyncio.wrap_future(round_), timeout)
        except TimeoutError:
            self._timed_out(timeout)
            return False
        return True

    def apply(self, tenant: str, state: MaintenanceState | None, version: int | None) -> None:
        """A notification: ``tenant``'s own state is ``state`` as of change ``version``.

        Without a state (not carried), a negative version (a caller's transaction) or none (an
        older writer), what changed is read instead.
        """
        if version is None:  # a sender from before change numbers: only a full read finds its rows
            self._want_full = True
        if version is None or version < 0 or state is None or not self.loaded:
            self.refresh_soon(force=True)
            return
        with self._lock:
            if version <= (self._since or 0):
                return
            if version <= self._seen.get(tenant, (0, None))[0]:
                return
            own = state if state.active else None
            self._seen[tenant] = (version, own)
            self._set_manual(tenant, own)
            self._derive()

    def ended(self, tenant: str, schedule_ids: Iterable[int], state: MaintenanceState | None) -> None:
        """This process committed an operator's switch-off: ``tenant``'s own state is ``state`` and
        those planned windows are gone. Shown at once; the read it asks for confirms it."""
        with self._lock:
            gone = set(schedule_ids)
            left = tuple(s for s in self._planned.get(tenant, ()) if s.id not in gone)
            if left:
                self._planned[tenant] = left
            else:
                self._planned.pop(tenant, None)
            self._set_manual(tenant, state if state is not None and state.active else None)
            self._derive()
        self.changed()

    def changed(self) -> None:
        """Something may have changed that no notification described: read what changed now."""
        self.refresh_soon(force=True)

    def _refresh(self, generation: int, since: int | None) -> None:
        started = self._clock()
        try:
            changes = self.store.changes(since, self._now())
        except Exception as exc:
            self.slow = self.waking = False
            with self._lock:
                self._running -= 1
                self._ended_at = self._clock()
                current = generation == self._generation
                if current:
                    self._failed(exc)
                round_ = self._round
            if current:
                round_.set_result(None)
            return
        self.slow = self.waking = False
        with self._lock:
            self._running -= 1
            self._ended_at = self._clock()
            if generation != self._generation:
                return  # a later refresh started meanwhile: its answer wins
            self._merge(changes)
            self._merged = generation
            if changes.full:
                self._full_at = started
            self.loaded = True
            self._derive(refreshed_at=started)
            recovered, self._down_since = self._down_since, None
            self.failing = False
            self._delay = BACKOFF_START
            self._retry_at = -math.inf
            again, self._again = self._again, False
            round_ = self._round
        round_.set_result(None)
        if recovered is not None:
            logger.warning(
                "maintgate: the maintenance store answers again after %.1fs",
                started - recovered,
                extra={"maintgate_event": "store_recovered", "downtime": started - recovered},
            )
        if again:
            self.refresh_soon(force=True)

    def _merge(self, changes: Changes) -> None:
        """Take what a refresh read; a notification newer than a row read keeps its state."""
        if changes.full:
            self._manual = {}
            self._planned = {}
        for tenant, state in changes.states.items():
            seen = self._seen.get(tenant)
            if seen is None or seen[0] <= changes.versions.get(tenant, 0):
                self._set_manual(tenant, state)
        for tenant, schedules in changes.schedules.items():
            if schedules:
                self._planned[tenant] = tuple(schedules)
            else:
                self._planned.pop(tenant, None)
        self._since = max(self._since or 0, changes.version)
        for tenant, (version, state) in list(self._seen.items()):
            if version <= self._since:
                del self._seen[tenant]
            else:
                self._set_manual(tenant, state)

    def _set_manual(self, tenant: str, state: MaintenanceState | None) -> None:
        if state is None:
            self._manual.pop(tenant, None)
        else:
            self._manual[tenant] = state

    def _derive(self, refreshed_at: float | None = None) -> None:
        """Rebuild what requests read, at the current time (caller holds the lock)."""
        now, mono = self._now(), self._clock()
        boundary: datetime | None = None

        def in_force(tenant: str) -> list[MaintenanceState]:
            nonlocal boundary
            found, edge = states_in_force(self._manual.get(tenant), self._planned.get(tenant, ()), now)
            if edge is not None and (boundary is None or edge < boundary):
                boundary = edge
            return found

        for tenant, schedules in list(self._planned.items()):
            left = tuple(s for s in schedules if s.ends_at is None or s.ends_at > now)
            if len(left) != len(schedules):
                if left:
                    self._planned[tenant] = left
                else:
                    del self._planned[tenant]
        everyone = in_force(ALL_TENANTS)
        default = min(everyone, key=strictness) if everyone else None
        effective: dict[str, MaintenanceState] = {}
        for tenant in self._manual.keys() | self._planned.keys():
            if tenant != ALL_TENANTS and (own := in_force(tenant)):
                effective[tenant] = min(own + everyone, key=strictness)
        refreshed = self._view.refreshed_at if refreshed_at is None else refreshed_at
        edge = math.inf if boundary is None else mono + max(0.0, (boundary - now).total_seconds())
        self._view = _View(effective, default, min(refreshed + self.ttl, edge), edge, refreshed)

    def _failed(self, exc: BaseException) -> None:
        """A refresh failed (caller holds the lock): back off, and warn at most once per interval."""
        now = self._clock()
        self.failing = True
        if self._down_since is None:
            self._down_since = now
        self._retry_at = now + self._delay
        self._delay = min(BACKOFF_MAX, self._delay * 2)
        if now - self._last_warning < self._log_interval:
            self._suppressed += 1
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._last_warning = now
        first = explain(exc, str(getattr(getattr(self.store, "engine", None), "url", "")))[:300]
        logger.warning(
            "maintgate: cannot read the maintenance state (%s: %s); answering from the state in "
            "memory, %s, and retrying in the background (%d similar warnings suppressed)",
            type(exc).__name__,
            first,
            f"read {self.age():.1f}s ago" if self.loaded else "of which there is none yet",
            suppressed,
            extra={"maintgate_event": "store_error", "suppressed": suppressed},
        )

    def _timed_out(self, waited: float) -> None:
        """A waiter gave up: a failure only if it waited as long as a refresh may take."""
        if waited < self.refresh_timeout:
            self.slow = True  # the next requests answer from memory until this read ends
            return
        with self._lock:
            if not self.failing:
                self._failed(TimeoutError(f"no answer from the store within {self.refresh_timeout}s"))

    def _after_fork(self) -> None:
        """A forked child inherits the state but no threads: forget refreshes and listeners under way."""
        with self._lock:
            self._pid = os.getpid()
            self._running = 0
            self._generation += 1
            self._round = _new_round()
            self.listener = None

    def close(self, timeout: float = 1.0) -> None:
        """Stop refreshing and leave the listener (it stops once nobody listens); wait up to
        ``timeout`` for a refresh under way, so that nothing of this mirror runs afterwards."""
        with self._lock:
            self.closed = True
            running, round_ = self._running, self._round
            # A gate used again goes through poll(), which reopens, listens and reads.
            self._view = replace(self._view, fresh_until=-math.inf)
            listener, self.listener = self.listener, None
        if listener is not None:
            listener.unsubscribe(self)
        if running:
            with contextlib.suppress(Exception):
                round_.result(timeout)


def _new_round() -> Future[None]:
    """A future that waiters share; running already, so one waiter giving up cannot cancel it."""
    round_: Future[None] = Future()
    round_.set_running_or_notify_cancel()
    return round_


_registry_lock = threading.Lock()
_registry: weakref.WeakKeyDictionary[Any, weakref.WeakValueDictionary[tuple[Any, ...], StateMirror]] = (
    weakref.WeakKeyDictionary()
)


def mirror_for(store: ChangeSource, **settings: Any) -> StateMirror:
    """The process's mirror of ``store`` for these settings, shared by every gate that uses them."""
    key = tuple(sorted(settings.items(), key=lambda item: item[0]))
    with _registry_lock:
        mirrors = _registry.get(store)
        if mirrors is None:
            mirrors = _registry[store] = weakref.WeakValueDictionary()
        mirror = mirrors.get(key)
        if mirror is None or mirror.closed:
            mirror = mirrors[key] = StateMirror(store, **settings)
        return mirror


def mirrors_of(store: object) -> list[StateMirror]:
    """The mirrors of ``store`` alive in this process (the store shows them its own commits)."""
    with _registry_lock:
        mirrors = _registry.get(store)
        return [] if mirrors is None else [m for m in mirrors.values() if not m.closed]
