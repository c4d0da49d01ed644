"""Pure ASGI middleware (Starlette, FastAPI, any ASGI app): translates scopes for the core gate."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Unpack

from .core.errors import InvalidArgument
from .core.gate import Gate, GateOptions, Pending
from .core.response import Response
from .core.state import ALL_TENANTS
from .core.store import MaintenanceStore
from .core.tenants import BUILT_IN, HEADER, PATH

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_encoded: dict[str, bytes] = {}


class ASGIRequest:
    """The core's request view over an ASGI scope; decodes only what is asked for."""

    __slots__ = ("scope",)

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    @property
    def method(self) -> str:
        return str(self.scope.get("method", "GET"))

    @property
    def path(self) -> str:
        """The path the app sees: relative to the mount point, as WSGI's ``PATH_INFO`` is."""
        return app_path(self.scope)

    @property
    def scheme(self) -> str:
        return str(self.scope.get("scheme", "http"))

    @property
    def query(self) -> str:
        return bytes(self.scope.get("query_string", b"")).decode("latin-1")

    @property
    def host(self) -> str | None:
        return scope_host(self.scope)

    @property
    def client(self) -> str | None:
        client = self.scope.get("client")
        return client[0] if client else None

    def header(self, name: str) -> str | None:
        """All values of a repeated header joined, as WSGI servers do (``; `` for cookies)."""
        key = _encoded.get(name)
        if key is None:
            key = _encoded[name] = name.encode("latin-1")
        values = [value for header, value in self.scope.get("headers", ()) if header == key]
        if not values:
            return None
        return (b"; " if key == b"cookie" else b", ").join(values).decode("latin-1")


class MaintenanceMiddleware:
    """Answers requests of tenants under maintenance with a negotiated 503; passes the rest.

    Lifespan and other scopes pass straight through. A websocket handshake under
    maintenance is denied with the 503 where the server supports the
    ``websocket.http.response`` extension, and closed before accept (code 1013) elsewhere.
    Keyword options are those of :class:`maintgate.core.Gate`.
    """

    def __init__(
        self,
        app: ASGIApp,
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
        self._tenant = _scope_tenant(self.gate)
        self._peek = self.gate.peek
        from .notify import listen_for

        listen_for(self.gate)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                receive = _on_shutdown(receive, self.gate)
            await self.app(scope, receive, send)
            return
        raw = self._tenant(scope) if self._tenant is not None else None
        state = self._peek(ALL_TENANTS if raw is None else raw)
        if state is None:
            await self.app(scope, receive, send)
            return
        result = self.gate.check_uncommon(ASGIRequest(scope), raw, state)
        if type(result) is Pending:
            result = await self.gate.resolve_async(result)
        if result is None:
            await self.app(scope, receive, send)
        elif kind == "http":
            await _send_http(send, result)  # type: ignore[arg-type]
        else:
            await _deny_websocket(scope, send, result)  # type: ignore[arg-type]


def _on_shutdown(receive: Receive, gate: Gate) -> Receive:
    """Release what the gate started (its listener, if no other gate uses it) when the server stops."""

    async def watched() -> Message:
        message = await receive()
        if message.get("type") == "lifespan.shutdown":
            gate.close()
        return message

    return watched


def _scope_tenant(gate: Gate) -> Callable[[Scope], str | None] | None:
    """The gate's tenant resolver as a function of the scope: built-ins skip the request view.

    A built-in resolver's ``parse`` interprets the value on both paths; only the reading differs.
    """
    resolver: Any = gate.tenant
    if resolver is None:
        return None
    if type(resolver) not in BUILT_IN:
        return lambda scope: gate.tenant_of(ASGIRequest(scope))
    parse = resolver.parse
    if resolver.reads == HEADER:
        return _header_reader(resolver.name, parse)
    if resolver.reads == PATH:
        return lambda scope: parse(app_path(scope))
    return lambda scope: parse(scope_host(scope))


def scope_host(scope: Scope) -> str | None:
    """The host an ASGI app sees: the Host header, else the server's address (as Starlette's URL)."""
    for header, value in scope.get("headers", ()):
        if header == b"host":
            return str(value.decode("latin-1"))
    server = scope.get("server")
    return str(server[0]) if server else None


def app_path(scope: Scope) -> str:
    """``path`` without the ``root_path`` a Mount or ``--root-path`` put before it (servers differ)."""
    path = str(scope.get("path", ""))
    root = scope.get("root_path")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root) :] or "/"
    return path


def _header_reader(name: str, parse: Callable[[str], str | None]) -> Callable[[Scope], str | None]:
    """``parse`` of the header's first line: what ``parse`` of all its lines joined gives too."""
    key = name.encode("latin-1")

    def read_header(scope: Scope) -> str | None:
        for header, value in scope.get("headers", ()):
            if header == key:
                return parse(value.decode("latin-1"))
        return None

    return read_header


async def _send_http(send: Send, response: Response) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


async def _deny_websocket(scope: Scope, send: Send, response: Response) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": response.status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers],
            }
        )
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1013, "reason": "maintenance"})
