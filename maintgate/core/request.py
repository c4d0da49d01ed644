"""The core's view of a request: what adapters translate ASGI scopes and WSGI environs into."""

from __future__ import annotations

from typing import Protocol


class RequestView(Protocol):
    """A read-only, lazily decoded view of one HTTP or websocket request."""

    @property
    def method(self) -> str:
        """The HTTP method, upper case (``GET`` for a websocket handshake)."""
        ...

    @property
    def path(self) -> str:
        """The path within the app, decoded, without the query string."""
        ...

    @property
    def scheme(self) -> str:
        """``http``, ``https``, ``ws`` or ``wss``."""
        ...

    @property
    def query(self) -> str:
        """The raw query string (latin-1 decoded), without the ``?``."""
        ...

    @property
    def host(self) -> str | None:
        """The Host header as sent (port included), or None."""
        ...

    @property
    def client(self) -> str | None:
        """The direct peer's IP address, or None where the server does not say."""
        ...

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower case), latin-1 decoded, or None."""
        ...
