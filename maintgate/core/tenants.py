"""Tenant resolvers: callables that take a request view and return a tenant id or None.

Each built-in resolver declares what it reads (``reads``: a header, the host, the path)
and interprets that value in one place (``parse``). Called with a request view, it reads
through the view; the adapters read the same value straight from the scope or environ on
the hot path, and hand it to the same ``parse``, so both paths always agree.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import InvalidArgument
from .request import RequestView

TenantResolver = Callable[[RequestView], "str | None"]


HEADER = "header"
HOST = "host"
PATH = "path"


def first_value(value: str | None) -> str | None:
    """The first of a header's comma-separated values (a repeated header arrives joined), stripped."""
    if not value:
        return None
    if "," in value:  # rare: keep the common case free of allocations
        value = value[: value.index(",")]
    return value.strip() or None


class HeaderTenant:
    """Tenant id from a request header: its first value, if the header is repeated or a list."""

    __slots__ = ("name",)
    reads = HEADER

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise InvalidArgument(f"from_header needs a header name, got {name!r}")
        self.name = name.strip().lower()

    def __call__(self, request: RequestView) -> str | None:
        return self.parse(request.header(self.name))

    @staticmethod
    def parse(value: str | None) -> str | None:
        """The tenant named by the header's value, or None."""
        return first_value(value)

    def __repr__(self) -> str:
        return f"from_header({self.name!r})"


class SubdomainTenant:
    """Tenant id from the one DNS label left of a base domain."""

    __slots__ = ("base_domain", "excluded", "suffix")
    reads = HOST

    def __init__(self, base_domain: str, exclude: tuple[str, ...] = ("www",)) -> None:
        if not isinstance(base_domain, str) or not base_domain.strip(". "):
            raise InvalidArgument(f"from_subdomain needs a base domain, got {base_domain!r}")
        self.base_domain = base_domain.strip(". ").lower()
        self.suffix = "." + self.base_domain
        self.excluded = frozenset(label.lower() for label in exclude)

    def __call__(self, request: RequestView) -> str | None:
        return self.parse(request.host)

    def parse(self, host: str | None) -> str | None:
        """The tenant named by a Host header value, or None."""
        host = first_value(host)
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
    reads = PATH

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not prefix.startswith("/"):
            raise InvalidArgument(f"from_path_prefix needs a prefix starting with '/', got {prefix!r}")
        self.prefix = prefix
        self.start = prefix.rstrip("/") + "/"
        self.offset = len(self.start)

    def __call__(self, request: RequestView) -> str | None:
        return self.parse(request.path)

    def parse(self, path: str) -> str | None:
        """The tenant named by a request path (relative to the app's mount point), or None."""
        if not path.startswith(self.start):
            return None
        end = path.find("/", self.offset)
        return (path[self.offset :] if end < 0 else path[self.offset : end]) or None

    def __repr__(self) -> str:
        return f"from_path_prefix({self.prefix!r})"


class FirstOf:
    """The first tenant id that one of several resolvers finds, tried in order."""

    __slots__ = ("resolvers",)

    def __init__(self, resolvers: tuple[TenantResolver, ...]) -> None:
        if not resolvers or not all(callable(r) for r in resolvers):
            raise InvalidArgument(f"first_of needs one or more resolvers, got {resolvers!r}")
        self.resolvers = resolvers

    def __call__(self, request: RequestView) -> str | None:
        for resolver in self.resolvers:
            tenant = resolver(request)
            if tenant:
                return tenant
        return None

    def __repr__(self) -> str:
        return f"first_of({', '.join(map(repr, self.resolvers))})"


def first_of(*resolvers: TenantResolver) -> FirstOf:
    """Try resolvers in order, e.g. ``first_of(from_header("X-Tenant-ID"), from_subdomain("example.com"))``:
    API clients send the header, browsers cannot, and get the subdomain's tenant."""
    return FirstOf(resolvers)


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


BUILT_IN = (HeaderTenant, SubdomainTenant, PathPrefixTenant)
"""The resolvers adapters read straight from the scope or environ (by ``reads``, then ``parse``)."""
