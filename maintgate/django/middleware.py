"""Django middleware, sync and async capable: ``"maintgate.django.middleware.MaintenanceMiddleware"``.

It only translates: Django's request into the core's request view, the core's response into
an HttpResponse. Put it first in ``MIDDLEWARE`` so that maintenance costs nothing downstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

from ..core.gate import Gate, Pending
from ..core.response import Response
from ..wsgi import WSGIRequest
from . import conf


class DjangoRequest(WSGIRequest):
    """The core's request view over a Django request: headers from ``META``, as in WSGI."""

    __slots__ = ("request",)

    def __init__(self, request: HttpRequest) -> None:
        super().__init__(request.META)
        self.request = request

    @property
    def path(self) -> str:
        return self.request.path_info

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

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        result = self.gate.check(DjangoRequest(request))
        if isinstance(result, Pending):
            result = self.gate.resolve(result)
        if result is None:
            return self.get_response(request)
        return to_django(result)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        result = self.gate.check(DjangoRequest(request))
        if isinstance(result, Pending):
            result = await self.gate.resolve_async(result)
        if result is None:
            return await self.get_response(request)
        return to_django(result)
