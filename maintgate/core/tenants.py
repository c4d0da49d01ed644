"""Tenant resolvers: callables that take a request view and return a tenant id or None.

The built-in resolvers are small classes whose settings adapters can read, so the
ASGI and WSGI adapters resolve them straight from the scope or environ on the hot
path, without building a request view.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import InvalidArgument
from .request import RequestView

TenantResolver = Callable[[RequestView], "str | None"]


class HeaderTenant:
    """Tenant id from a request header."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument(f"from_header needs a header name, got {name!r}")
        self.name = name.strip().lower()

    def __call__(self, request: RequestView) -> str | None:
        return request.header(self.name) or None

    def __repr__(self) -> str:
        return f"from_header({self.name!r})"


class SubdomainTenant:
    """Tenant id from the one DNS label left of a base domain."""

    __slots__ = ("base_domain", "excluded", "suffix")

    def __init__(self, base_domain: str, exclude: tuple[str, ...] = ("www",)) -> None:
        if not isinstance(base_domain, str) or not base_domain.strip(". "):
            raise InvalidArgument(f"from_subdomain needs a base domain, got {base_domain!r}")
        self.base_domain = base_domain.strip(". ").lower()
        self.suffix = "." + self.base_domain
        self.excluded = frozenset(label.lower() for label in exclude)

    def __call__(self, request: RequestView) -> str | None:
        return self.from_host(request.host)

    def from_host(self, host: str | None) -> str | None:
        """The tenant named by a Host header value, or None."""
        if not host or host[0] == "[":
            return None
        host = host.partition(":")[0].rstrip(".").lower()
        if not host.endswith(self.suffix):
            return None
        label = host[: -len(self.suffix)]
        if not label or "." in label or label in self.excluded:
            return None
        return label

    def __repr__(self) -> str:
        return f"from_subdomain({self.base_domain!r})"


class PathPrefixTenant:
    """Tenant id from the path segment after a fixed prefix."""

    __slots__ = ("offset", "prefix", "start")

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise InvalidArgument(f"from_path_prefix needs a prefix starting with '/', got {prefix!r}")
        self.prefix = prefix
        self.start = prefix.rstrip("/") + "/"
        self.offset = len(self.start)

    def __call__(self, request: RequestView) -> str | None:
        return self.from_path(request.path)

    def from_path(self, path: str) -> str | None:
        """The tenant named by a request path, or None."""
        if not path.startswith(self.start):
            return None
        end = path.find("/", self.offset)
        return (path[self.offset :] if end < 0 else path[self.offset : end]) or None

    def __repr__(self) -> str:
        return f"from_path_prefix({self.prefix!r})"


def from_header(name: str) -> HeaderTenant:
    """Read the tenant id from a request header, e.g. ``from_header("X-Tenant-ID")``."""
    return HeaderTenant(name)


def from_subdomain(base_domain: str, *, exclude: tuple[str, ...] = ("www",)) -> SubdomainTenant:
    """Read the tenant from the label left of ``base_domain``: ``demo.example.com`` → ``demo``.

    Ports and a trailing dot are ignored, hosts compare case-insensitively, and hosts
    with several labels before the base domain, IP literals and the bare base domain
    have no tenant.
    """
    return SubdomainTenant(base_domain, exclude)


def from_path_prefix(prefix: str) -> PathPrefixTenant:
    """Read the tenant from the path segment after ``prefix``: ``/t/demo/x`` → ``demo``."""
    return PathPrefixTenant(prefix)
