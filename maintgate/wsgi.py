"""WSGI middleware (Flask, Django, any WSGI app): translates environs for the core gate."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Unpack

from .core.errors import InvalidArgument
from .core.gate import Gate, GateOptions, Pending
from .core.state import ALL_TENANTS
from .core.store import MaintenanceStore
from .core.tenants import BUILT_IN, HEADER, HOST

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

_environ_keys: dict[str, str] = {}


class WSGIRequest:
    """The core's request view over a WSGI environ."""

    __slots__ = ("environ",)

    def __init__(self, environ: Environ) -> None:
        self.environ = environ

    @property
    def method(self) -> str:
        return str(self.environ.get("REQUEST_METHOD", "GET"))

    @property
    def path(self) -> str:
        return environ_path(self.environ)

    @property
    def scheme(self) -> str:
        return str(self.environ.get("wsgi.url_scheme", "http"))

    @property
    def query(self) -> str:
        return str(self.environ.get("QUERY_STRING", ""))

    @property
    def host(self) -> str | None:
        return environ_host(self.environ)

    @property
    def client(self) -> str | None:
        return self.environ.get("REMOTE_ADDR") or None

    def header(self, name: str) -> str | None:
        key = _environ_keys.get(name)
        if key is None:
            key = _environ_keys[name] = _environ_key(name)
        return self.environ.get(key)


def _environ_key(header: str) -> str:
    """Where PEP 3333 puts a header in the environ: ``x-tenant-id`` → ``HTTP_X_TENANT_ID``."""
    upper = header.upper().replace("-", "_")
    return upper if upper in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + upper


def environ_host(environ: Environ) -> str | None:
    """The host a WSGI app sees: ``HTTP_HOST``, else ``SERVER_NAME`` (PEP 3333's URL reconstruction)."""
    return environ.get("HTTP_HOST") or environ.get("SERVER_NAME")


def environ_path(environ: Environ) -> str:
    """The path a WSGI app sees, relative to its mount point."""
    return environ.get("PATH_INFO", "") or "/"


def _environ_tenant(gate: Gate) -> Callable[[Environ], str | None] | None:
    """The gate's tenant resolver as a function of the environ: built-ins skip the request view.

    A built-in resolver's ``parse`` interprets the value on both paths; the values are read by
    the same functions as the request view's.
    """
    resolver: Any = gate.tenant
    if resolver is None:
        return None
    if type(resolver) not in BUILT_IN:
        return lambda environ: gate.tenant_of(WSGIRequest(environ))
    parse = resolver.parse
    if resolver.reads == HEADER:
        key = _environ_key(resolver.name)
        return lambda environ: parse(environ.get(key))
    if resolver.reads == HOST:
        return lambda environ: parse(environ_host(environ))
    return lambda environ: parse(environ_path(environ))


class WSGIMaintenanceMiddleware:
    """Answers requests of tenants under maintenance with a negotiated 503; passes the rest.

    Safe under threaded servers: reads from memory take no lock, and requests that need a read
    wait on the mirror's one refresh, which reads every tenant. Keyword options are those of
    :class:`maintgate.core.Gate`.
    """

    def __init__(
        self,
        app: WSGIApp,
        store: MaintenanceStore | None = None,
        *,
        gate: Gate | None = None,
        **options: Unpack[GateOptions],
    ) -> None:
        if (store is None) == (gate is None):
            raise TypeError("pass either a store (with gate options) or a ready Gate")
        self.app = app
        if gate is not None and not isinstance(gate, Gate):
            raise InvalidArgument(f"gate must be a maintgate Gate, got {gate!r}", "gate")
        self.gate = gate if gate is not None else Gate(store, **options)  # type: ignore[arg-type]
        self._tenant = _environ_tenant(self.gate)
        self._peek = self.gate.peek
        from .notify import listen_for

        listen_for(self.gate)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        raw = self._tenant(environ) if self._tenant is not None else None
        state = self._peek(ALL_TENANTS if raw is None else raw)
        if state is None:
            return self.app(environ, start_response)
        response = self.gate.check_uncommon(WSGIRequest(environ), raw, state)
        if isinstance(response, Pending):
            response = self.gate.resolve(response)
        if response is None:
            return self.app(environ, start_response)
        start_response(response.status_line, list(response.headers))  # a copy: servers may append
        return [response.body]
