"""Django middleware, sync and async capable: ``"maintgate.django.middleware.MaintenanceMiddleware"``.

It only translates: Django's request into the core's request view, the core's response into
an HttpResponse. Put it first in ``MIDDLEWARE`` (just after ``CorsMiddleware``, if any, so the
503 carries CORS headers) so that maintenance costs nothing downstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

from ..core.gate import Gate, Pending
from ..core.response import Response
from ..core.state import ALL_TENANTS
from ..notify import listen_for
from ..wsgi import WSGIRequest, _environ_tenant
from . import conf


class DjangoRequest(WSGIRequest):
    """The core's request view over a Django request: headers from ``META``, as in WSGI."""

    __slots__ = ("request",)

    def __init__(self, request: HttpRequest) -> None:
        super().__init__(request.META)
        self.request = request

    @property
    def path(self) -> str:
        return str(self.request.path_info)

    @property
    def scheme(self) -> str:
        return self.request.scheme or "http"


def to_django(response: Response) -> HttpResponse:
    """The core's neutral response as an HttpResponse."""
    result = HttpResponse(response.body, status=response.status)
    for name, value in response.headers:
        if name != "content-length":
            result.headers[name] = value
    return result


class MaintenanceMiddleware:
    """Answers requests of tenants under maintenance with a negotiated 503; passes the rest."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any], gate: Gate | None = None) -> None:
        self.get_response = get_response
        self.gate = gate if gate is not None else conf.build_gate()
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)
        # META is a WSGI-style environ under both handlers: resolve the tenant straight from it.
        self._tenant = _environ_tenant(self.gate)
        self._peek = self.gate.peek
        listen_for(self.gate)

    def _check(self, request: HttpRequest) -> Response | Pending | None:
        raw = self._tenant(request.META) if self._tenant is not None else None
        state = self._peek(ALL_TENANTS if raw is None else raw)
        if state is None:
            return None
        return self.gate.check_uncommon(DjangoRequest(request), raw, state)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        result = self._check(request)
        if result is None:
            return self.get_response(request)
        if type(result) is Pending:
            result = self.gate.resolve(result)
            if result is None:
                return self.get_response(request)
        return to_django(result)  # type: ignore[arg-type]

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        result = self._check(request)
        if isinstance(result, Pending):
            result = await self.gate.resolve_async(result)
        if result is None:
            return await self.get_response(request)
        return to_django(result)
