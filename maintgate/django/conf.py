"""maintgate's Django settings, read lazily from ``settings.MAINTGATE`` so overrides in tests just work.

Example::

    MAINTGATE = {
        "TENANT": "header:X-Tenant-ID",  # or "subdomain:example.com", "path:/t", a dotted path
        "CACHE_TTL": 1.0,
        "EXEMPT_PATHS": ["/healthz", "/static/*"],
        "ALLOW_IPS": ["10.0.0.0/8"],
        "TRUSTED_PROXIES": ["127.0.0.1"],
        "BYPASS_SECRET": "a long random string",
    }
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

from ..core.errors import InvalidArgument
from ..core.gate import Gate
from ..core.render import Renderer
from ..core.tenants import from_header, from_path_prefix, from_subdomain

KNOWN = frozenset(
    {
        "DATABASE",
        "DATABASE_URL",
        "TABLE_PREFIX",
        "SCHEMA",
        "TENANT",
        "CACHE_TTL",
        "LOAD_TIMEOUT",
        "MAX_STALENESS",
        "EXEMPT_PATHS",
        "ALLOW_IPS",
        "TRUSTED_PROXIES",
        "BYPASS_SECRET",
        "BYPASS_COOKIE_MAX_AGE",
        "BYPASS",
        "ON_BLOCK",
        "DEFAULT_RETRY_AFTER",
        "RENDERER",
        "ON_STORE_ERROR",
        "NOTIFICATIONS",
        "TENANT_PATTERN",
        "TENANT_MAX_LENGTH",
        "LOG_BLOCKED_EVERY",
        "FORWARDED_HEADER",
    }
)


def raw() -> dict[str, Any]:
    """``settings.MAINTGATE`` as it is now (an empty dict when unset)."""
    from django.conf import settings

    value = getattr(settings, "MAINTGATE", None)
    return {} if value is None else value


def get(name: str, default: Any = None) -> Any:
    """One maintgate setting, read now."""
    value = raw()
    return value.get(name, default) if isinstance(value, dict) else default


def _import(path: str, name: str) -> Any:
    from django.utils.module_loading import import_string

    try:
        return import_string(path)
    except ImportError as exc:
        raise InvalidArgument(f"MAINTGATE[{name!r}]: cannot import {path!r} ({exc})") from None


def _callable(name: str) -> Callable[..., Any] | None:
    value = get(name)
    if value is None or callable(value):
        return cast("Callable[..., Any] | None", value)
    if isinstance(value, str):
        return cast("Callable[..., Any]", _import(value, name))
    raise InvalidArgument(f"MAINTGATE[{name!r}] must be a callable or a dotted path, got {value!r}")


def tenant_resolver() -> Callable[..., str | None] | None:
    """The resolver ``MAINTGATE["TENANT"]`` names."""
    spec = get("TENANT")
    if spec is None or callable(spec):
        return cast("Callable[..., str | None] | None", spec)
    if not isinstance(spec, str):
        raise InvalidArgument(f"MAINTGATE['TENANT'] must be a string or a callable, got {spec!r}")
    kind, sep, arg = spec.partition(":")
    if sep and kind == "header":
        return from_header(arg)
    if sep and kind == "subdomain":
        return from_subdomain(arg)
    if sep and kind == "path":
        return from_path_prefix(arg)
    if "." in spec and not sep:
        return cast("Callable[..., str | None]", _import(spec, "TENANT"))
    raise InvalidArgument(
        f"MAINTGATE['TENANT'] = {spec!r}: use 'header:NAME', 'subdomain:DOMAIN', 'path:/PREFIX' "
        "or a dotted path"
    )


def _exempt_paths() -> list[Any]:
    paths = get("EXEMPT_PATHS", [])
    if isinstance(paths, str):
        paths = [paths]
    return [re.compile(p[3:]) if isinstance(p, str) and p.startswith("re:") else p for p in paths]


def gate_options() -> dict[str, Any]:
    """Keyword options for :class:`maintgate.core.Gate`, validated as far as possible without a database."""
    value = raw()
    if not isinstance(value, dict):
        raise InvalidArgument(f"MAINTGATE must be a dict, got {type(value).__name__}")
    unknown = sorted(set(value) - KNOWN)
    if unknown:
        raise InvalidArgument(f"MAINTGATE has unknown keys {unknown}; known: {sorted(KNOWN)}")
    renderer = get("RENDERER")
    if isinstance(renderer, dict):
        renderer = Renderer(**renderer)
    elif renderer is not None and not isinstance(renderer, Renderer):
        raise InvalidArgument("MAINTGATE['RENDERER'] must be a dict of Renderer options or a Renderer")
    options: dict[str, Any] = {
        "tenant": tenant_resolver(),
        "cache_ttl": get("CACHE_TTL", 1.0),
        "load_timeout": get("LOAD_TIMEOUT", 5.0),
        "max_staleness": get("MAX_STALENESS"),
        "exempt_paths": _exempt_paths(),
        "allow_ips": get("ALLOW_IPS", ()),
        "trusted_proxies": get("TRUSTED_PROXIES", ()),
        "bypass_secret": get("BYPASS_SECRET"),
        "bypass_cookie_max_age": get("BYPASS_COOKIE_MAX_AGE", 12 * 3600),
        "bypass": _callable("BYPASS"),
        "on_block": _callable("ON_BLOCK"),
        "default_retry_after": get("DEFAULT_RETRY_AFTER", 60),
        "on_store_error": get("ON_STORE_ERROR", "last_known"),
        "notifications": get("NOTIFICATIONS"),
        "tenant_pattern": get("TENANT_PATTERN"),
        "tenant_max_length": get("TENANT_MAX_LENGTH", 128),
        "log_blocked_every": get("LOG_BLOCKED_EVERY", 100),
        "forwarded_header": get("FORWARDED_HEADER", "x-forwarded-for"),
    }
    if renderer is not None:
        options["renderer"] = renderer
    return options


def database_alias() -> str:
    """The Django database maintgate's tables live in (``MAINTGATE["DATABASE"]``, default ``default``)."""
    return str(get("DATABASE", "default"))


def build_gate() -> Gate:
    """The gate the Django middleware uses, built from the settings."""
    from . import get_store

    return Gate(get_store(database_alias()), **gate_options())
