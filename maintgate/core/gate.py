"""The gate's decision: does this request pass, or get a negotiated 503? Knows no framework."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, TypedDict

from cachetools import LRUCache

from .bypass import Bypass, SecretSource
from .errors import InvalidArgument, callable_option, positive_int, positive_seconds
from .mirror import MISS, ChangeSource, StateMirror, mirror_for
from .negotiation import negotiate
from .render import Renderer
from .request import RequestView
from .response import Response
from .state import (
    ALL_TENANTS,
    TENANT_MAX_LENGTH,
    MaintenanceState,
    is_valid_tenant,
    utcnow,
)
from .tenants import TenantResolver

logger = logging.getLogger("maintgate")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STORE_ERROR_POLICIES = ("last_known", "open", "closed")
STALE_WAIT = 0.025
"""Seconds a request waits for a refresh when the state in memory is older than ``max_staleness``
(after an idle spell): enough for a healthy database, never an outage's timeout."""
DEFAULT_MAX_STALENESS = 30.0
"""Seconds the state in memory answers for while the store cannot be read; then ``on_store_error`` decides."""


class Pending:
    """A request the state in memory cannot answer yet (none loaded, or too old): the adapter
    waits for the refresh with :meth:`Gate.resolve` or :meth:`Gate.resolve_async`."""

    __slots__ = ("key", "request", "tenant")

    def __init__(self, request: RequestView, tenant: str | None, key: str) -> None:
        self.request = request
        self.tenant = tenant
        self.key = key


class ExemptPaths:
    """Paths that always pass: exact strings, prefixes written ``"/static/*"``, or compiled regexes."""

    __slots__ = ("exact", "patterns", "prefixes")

    def __init__(self, paths: Iterable[str | re.Pattern[str]] = ()) -> None:
        if isinstance(paths, str | re.Pattern):
            paths = [paths]
        if not isinstance(paths, Iterable):
            raise InvalidArgument(f"exempt_paths must be a list of paths, got {paths!r}", "exempt_paths")
        exact, prefixes, patterns = set(), [], []
        for path in paths:
            if isinstance(path, re.Pattern) and isinstance(path.pattern, str):
                patterns.append(path)
            elif isinstance(path, str) and path.startswith("/"):
                if path.endswith("*"):
                    prefixes.append(path[:-1])
                else:
                    exact.add(path)
            else:
                raise InvalidArgument(
                    f"exempt path {path!r} must be a string starting with '/' or a compiled str regex",
                    "exempt_paths",
                )
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.patterns = tuple(patterns)

    def __contains__(self, path: str) -> bool:
        return (
            path in self.exact
            or (bool(self.prefixes) and path.startswith(self.prefixes))
            or any(p.fullmatch(path) for p in self.patterns)
        )


class GateOptions(TypedDict, total=False):
    """The keyword options of :class:`Gate`, for the adapters' ``**options``: type checkers see
    each one (a misspelt option fails them), and one definition serves every adapter."""

    tenant: TenantResolver | None
    cache_ttl: float
    exempt_paths: Iterable[str | re.Pattern[str]]
    allow_ips: Iterable[str]
    trusted_proxies: Iterable[str]
    bypass_secret: SecretSource | None
    bypass_cookie_max_age: int
    bypass: Callable[[RequestView], bool] | None
    forwarded_header: str
    on_block: Callable[[RequestView, MaintenanceState], None] | None
    log_blocked_every: int
    renderer: Renderer | None
    default_retry_after: int
    clock: Callable[[], float]
    now: Callable[[], datetime]
    log_interval: float
    notifications: bool | None
    on_store_error: str
    tenant_pattern: str | re.Pattern[str] | None
    tenant_max_length: int
    load_timeout: float
    max_staleness: float | None


class Gate:
    """Decides, per request, between passing it on and answering 503 for its tenant.

    The common case (a tenant not in maintenance) costs one tenant lookup and one dict
    read from the state every tenant has in memory: no lock, no I/O, no parsing.
    """

    def __init__(
        self,
        store: ChangeSource,
        *,
        tenant: TenantResolver | None = None,
        cache_ttl: float = 1.0,
        exempt_paths: Iterable[str | re.Pattern[str]] = (),
        allow_ips: Iterable[str] = (),
        trusted_proxies: Iterable[str] = (),
        bypass_secret: SecretSource | None = None,
        bypass_cookie_max_age: int = 12 * 3600,
        bypass: Callable[[RequestView], bool] | None = None,
        forwarded_header: str = "x-forwarded-for",
        on_block: Callable[[RequestView, MaintenanceState], None] | None = None,
        log_blocked_every: int = 100,
        renderer: Renderer | None = None,
        default_retry_after: int = 60,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
        log_interval: float = 30.0,
        notifications: bool | None = None,
        on_store_error: str = "last_known",
        tenant_pattern: str | re.Pattern[str] | None = None,
        tenant_max_length: int = TENANT_MAX_LENGTH,
        load_timeout: float = 5.0,
        max_staleness: float | None = None,
    ) -> None:
        if not callable(getattr(store, "changes", None)):
            raise TypeError(f"store must be a MaintenanceStore (or have .changes()), got {store!r}")
        callable_option("tenant", tenant, "a resolver (from_header(...), ...) or None")
        callable_option("on_block", on_block, "a callable (request, state)")
        callable_option("clock", clock, "a callable returning monotonic seconds", none_ok=False)
        callable_option("now", now, "a callable returning an aware datetime", none_ok=False)
        if renderer is not None and not isinstance(renderer, Renderer):
            raise InvalidArgument(f"renderer must be a maintgate Renderer, got {renderer!r}", "renderer")
        if notifications is not None and not isinstance(notifications, bool):
            raise InvalidArgument(
                f"notifications must be True, False or None, got {notifications!r}", "notifications"
            )
        if not isinstance(on_store_error, str) or on_store_error not in STORE_ERROR_POLICIES:
            raise InvalidArgument(
                f"on_store_error must be one of {STORE_ERROR_POLICIES}, got {on_store_error!r}",
                "on_store_error",
            )
        positive_int("default_retry_after", default_retry_after)
        positive_int("log_blocked_every", log_blocked_every)
        positive_int("tenant_max_length", tenant_max_length, upto=TENANT_MAX_LENGTH)
        if tenant_pattern is not None and not isinstance(
            getattr(tenant_pattern, "pattern", tenant_pattern), str
        ):
            raise InvalidArgument(f"tenant_pattern must be a regex, got {tenant_pattern!r}", "tenant_pattern")
        try:
            pattern = re.compile(tenant_pattern) if isinstance(tenant_pattern, str) else tenant_pattern
        except re.error as exc:
            raise InvalidArgument(
                f"tenant_pattern {tenant_pattern!r} is not a regex: {exc}", "tenant_pattern"
            ) from None
        ttl = positive_seconds("cache_ttl", cache_ttl)
        load_timeout = positive_seconds("load_timeout", load_timeout)
        log_interval = positive_seconds("log_interval", log_interval)
        staleness = max(DEFAULT_MAX_STALENESS, 3 * ttl) if max_staleness is None else max_staleness
        staleness = positive_seconds("max_staleness", staleness)
        if staleness < 2 * ttl:
            raise InvalidArgument(
                f"max_staleness ({staleness}s) must be at least twice cache_ttl ({ttl}s)", "max_staleness"
            )
        self.store = store
        self.tenant = tenant
        self.exempt = ExemptPaths(exempt_paths)
        self.bypass = Bypass(
            allow_ips=allow_ips,
            trusted_proxies=trusted_proxies,
            secret=bypass_secret,
            cookie_max_age=bypass_cookie_max_age,
            predicate=bypass,
            forwarded_header=forwarded_header,
            now=now,
        )
        self.on_block = on_block
        self._rendered: LRUCache[tuple[Any, ...], tuple[MaintenanceState, Response]] = LRUCache(256)
        self._rendered_lock = threading.Lock()
        self.log_blocked_every = log_blocked_every
        self._blocked = 0
        self.renderer = renderer if renderer is not None else Renderer()
        self.default_retry_after = default_retry_after
        self._now = now
        dialect = getattr(getattr(store, "engine", None), "dialect", None)
        listenable = (
            getattr(dialect, "name", None) == "postgresql" and getattr(dialect, "driver", None) == "psycopg"
        )
        if notifications and not listenable and getattr(store, "listen_url", None) is None:
            raise InvalidArgument(
                "notifications need PostgreSQL through psycopg (LISTEN/NOTIFY); this store's database "
                f"is {getattr(dialect, 'name', None)}: leave notifications unset, and gates use their TTL",
                "notifications",
            )
        self.notifications = listenable if notifications is None else bool(notifications)
        """Whether this gate subscribes to the store's PostgreSQL notifications (default: on PostgreSQL)."""
        self.on_store_error = on_store_error
        self._unknown = MaintenanceState(
            tenant=ALL_TENANTS,
            active=True,
            message="The service cannot check its maintenance status right now.",
            retry_after=default_retry_after,
        )
        self._tenant_max_length = tenant_max_length
        self._tenant_pattern = pattern
        self.load_timeout = load_timeout
        self.max_staleness = staleness
        self.mirror: StateMirror = mirror_for(
            store,
            ttl=ttl,
            clock=clock,
            now=now,
            refresh_timeout=load_timeout,
            log_interval=log_interval,
        )
        """Every tenant's state in this process, shared with the other gates of this store and settings."""
        self.mirror.gates.add(self)
        self.peek = self.mirror.peek
        """The hot path: a tenant's state from memory while fresh, else ``MISS``."""

    @property
    def notifications_live(self) -> bool:
        """Whether a listener delivers this store's changes right now (else the TTL bounds staleness)."""
        listener = self.mirror.listener
        return bool(self.notifications and listener is not None and listener.live())

    def check(self, request: RequestView) -> Response | Pending | None:
        """None to pass the request on, a Response to send, or Pending when the state must be loaded."""
        raw = self.tenant_of(request) if self.tenant is not None else None
        state = self.peek(ALL_TENANTS if raw is None else raw)
        if state is None:
            return None
        return self.check_uncommon(request, raw, state)

    def check_uncommon(self, request: RequestView, raw: str | None, state: Any) -> Response | Pending | None:
        """The rest of :meth:`check` once memory says anything but "fresh, not in maintenance".

        Adapters that resolve the tenant and peek themselves (the hot path, without a
        request view) call this with the raw tenant id and what :meth:`peek` returned.
        """
        if request.path in self.exempt:
            return None
        tenant = raw if raw is not None and self.accepts_tenant(raw) else None
        key = ALL_TENANTS if tenant is None else tenant
        if state is MISS or tenant != raw:  # stale, or an invalid id, which is no tenant: global only
            state = self._known(key)
            if state is MISS:
                return Pending(request, tenant, key)
        return self.respond(request, tenant, state)

    def accepts_tenant(self, tenant: str) -> bool:
        """Whether the gate looks ``tenant`` up; any other id counts as no tenant, before any query."""
        if len(tenant) > self._tenant_max_length or tenant == ALL_TENANTS:
            return False
        if not is_valid_tenant(tenant):
            return False
        return self._tenant_pattern is None or self._tenant_pattern.fullmatch(tenant) is not None

    def tenant_of(self, request: RequestView) -> str | None:
        """The raw tenant id the resolver finds, or None; a failing resolver means no tenant."""
        if self.tenant is None:
            return None
        try:
            tenant = self.tenant(request)
        except Exception:
            logger.exception("maintgate: tenant resolver %r failed; treating as no tenant", self.tenant)
            return None
        return tenant if isinstance(tenant, str) else None

    def resolve(self, pending: Pending) -> Response | None:
        """Finish a Pending check: wait for the state, in this thread (see :meth:`_patience`)."""
        self.mirror.wait(self._patience())
        return self.respond(pending.request, pending.tenant, self._settled(pending.key))

    async def resolve_async(self, pending: Pending) -> Response | None:
        """Finish a Pending check without blocking the event loop."""
        await self.mirror.wait_async(self._patience())
        return self.respond(pending.request, pending.tenant, self._settled(pending.key))

    def _patience(self) -> float:
        """How long a request waits for a read: ``load_timeout`` for the process's first state;
        once it has one, however old, a moment (``STALE_WAIT``) before the outage policy answers."""
        return STALE_WAIT if self.mirror.loaded else self.load_timeout

    def respond(
        self, request: RequestView, tenant: str | None, state: MaintenanceState | None
    ) -> Response | None:
        """The negotiated 503 for ``state``, a bypass redirect, or None when ``request`` may pass.

        Exempt paths are already let through by :meth:`check_uncommon`, before any load.
        """
        if state is None or not state.active:
            return None
        if state.read_only and request.method in SAFE_METHODS and request.scheme not in ("ws", "wss"):
            return None
        if self.bypass:
            try:
                admitted = self.bypass.check(request, tenant)
            except Exception:  # hostile input must never turn into a 500
                logger.exception("maintgate: a bypass rule failed on this request; not bypassing")
                admitted = False
            if admitted is True:
                return None
            if isinstance(admitted, Response):
                return admitted
        return self._blocked_response(request, tenant, state)

    def _blocked_response(
        self, request: RequestView, tenant: str | None, state: MaintenanceState
    ) -> Response:
        media_type = negotiate(request.header("accept"))
        retry_after = state.seconds_to_retry(self._now(), self.default_retry_after)
        head = request.method == "HEAD"
        # The same state, tenant, type and countdown give the same bytes: render them once.
        key = (id(state), tenant, media_type, retry_after, head)
        with self._rendered_lock:
            hit = self._rendered.get(key)
        if hit is not None and hit[0] is state:
            response = hit[1]
        else:
            body = self.renderer.render(media_type, state, tenant, retry_after)
            headers = [
                ("content-type", f"{media_type}; charset=utf-8"),
                ("content-length", str(len(body))),
                ("retry-after", str(retry_after)),
                ("cache-control", "no-store"),
                ("vary", "Accept"),
            ]
            response = Response(503, headers, b"" if head else body)
            with self._rendered_lock:
                self._rendered[key] = (state, response)
        self._note_block(request, tenant, state)
        return response

    def _note_block(self, request: RequestView, tenant: str | None, state: MaintenanceState) -> None:
        self._blocked += 1
        count = self._blocked
        if count == 1 or count % self.log_blocked_every == 0:
            logger.info(
                "maintgate: blocked %s %s for tenant %r (%d blocked so far; 1 in %d logged)",
                request.method,
                request.path[:200],
                tenant,
                count,
                self.log_blocked_every,
                extra={
                    "maintgate_event": "blocked",
                    "tenant": tenant,
                    "method": request.method,
                    "path": request.path[:200],
                    "mode": state.mode,
                    "blocked_count": count,
                },
            )
        if self.on_block is not None:
            try:
                self.on_block(request, state)
            except Exception:
                logger.exception("maintgate: on_block hook %r failed", self.on_block)

    def refresh(self, timeout: float | None = None) -> bool:
        """Read what changed from the store now, and wait for it (``load_timeout`` at most by default)."""
        return self.mirror.sync(self.load_timeout if timeout is None else timeout)

    def close(self) -> None:
        """Stop using the shared state: the last gate sharing this mirror (same store and settings)
        closes it, so its refreshes stop and it leaves the notification listener."""
        self.mirror.gates.discard(self)
        if not self.mirror.gates:
            self.mirror.close()

    def _known(self, key: str) -> Any:
        """``key``'s state from memory, the outage policy's answer, or ``MISS`` when worth waiting for."""
        mirror = self.mirror
        mirror.poll()
        if not mirror.loaded:
            return MISS  # the process's first state: wait for it, once
        age = mirror.age()
        if (mirror.waking or age > self.max_staleness) and not (mirror.failing or mirror.slow):
            return MISS  # after an idle spell: the refresh just started answers in a moment
        if age > self.max_staleness:
            return self._outage(key)
        return mirror.state_of(key)

    def _settled(self, key: str) -> MaintenanceState | None:
        """After waiting: the state in memory if it is recent enough, else the outage policy's answer."""
        mirror = self.mirror
        if not mirror.loaded or mirror.age() > self.max_staleness:
            return self._outage(key)
        return mirror.state_of(key)

    def _outage(self, key: str) -> MaintenanceState | None:
        """What ``on_store_error`` answers while the state in memory is missing or too old."""
        if self.on_store_error == "closed":
            return self._unknown
        if self.on_store_error == "open" or not self.mirror.loaded:
            return None
        return self.mirror.state_of(key)
