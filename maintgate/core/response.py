"""A framework-neutral response: what the core hands to the ASGI, WSGI and Django adapters."""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus


@dataclass(slots=True)
class Response:
    """Status, headers (lower-case names, ASCII values) and body of a response the gate sends.

    The gate may hand the same object to many requests: adapters read it, never change it.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def status_line(self) -> str:
        """``"503 Service Unavailable"``, as WSGI's ``start_response`` wants it."""
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:
            phrase = ""
        return f"{self.status} {phrase}".rstrip()
