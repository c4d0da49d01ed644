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

import difflib
import inspect
import re
from collections.abc import Callable
from typing import Any, cast

from ..core.errors import InvalidArgument
from ..core.gate import Gate
from ..core.render import Renderer
from ..core.tenants import from_header, from_path_prefix, from_subdomain

INJECTED = frozenset({"store", "clock", "now"})
"""Gate arguments that are not settings: the store comes from ``DATABASES``; clocks are for tests."""
GATE_KEYS = {name.upper(): name for name in inspect.signature(Gate).parameters if name not in INJECTED}
"""Each setting that is a gate option (``CACHE_TTL``), with the option's name: one source of truth."""
STORE_KEYS = frozenset({"DATABASE", "DATABASE_URL", "TABLE_PREFIX", "SCHEMA"})
KEYS = frozenset(GATE_KEYS) | STORE_KEYS
"""Every key ``settings.MAINTGATE`` accepts."""


def raw() -> dict[str, Any]:
    """``settings.MAINTGATE`` as it is now (an empty dict when unset)."""
    from django.conf import settings

    value = getattr(settings, "MAINTGATE", None)
    return {} if value is None else value


def get(name: str, default: Any = None) -> Any:
    """One maintgate setting, read now."""
    value = raw()
    return value.get(name, default) if isinstance(value, dict) else default


def _import(path: str, key: str) -> Any:
    from django.utils.module_loading import import_string

    try:
        return import_string(path)
    except Exception as exc:  # ImportError, or whatever importing the module raised
        raise InvalidArgument(f"cannot import {path!r} ({type(exc).__name__}: {exc})", key) from None


def _callable(value: Any, key: str) -> Callable[..., Any] | None:
    """A hook given as a callable or a dotted path."""
    if value is None or callable(value):
        return cast("Callable[..., Any] | None", value)
    if isinstance(value, str):
        return cast("Callable[..., Any]", _import(value, key))
    raise InvalidArgument(f"must be a callable or a dotted path, got {value!r}", key)


def _tenant(spec: Any, key: str) -> Callable[..., str | None] | None:
    """The resolver ``TENANT`` names: ``"header:NAME"``, ``"subdomain:DOMAIN"``, ``"path:/PREFIX"``,
    a dotted path, or a callable."""
    if spec is None or callable(spec):
        return cast("Callable[..., str | None] | None", spec)
    if isinstance(spec, str):
        kind, sep, arg = spec.partition(":")
        try:
            if sep and kind == "header":
                return from_header(arg)
            if sep and kind == "subdomain":
                return from_subdomain(arg)
            if sep and kind == "path":
                return from_path_prefix(arg)
        except InvalidArgument as exc:
            raise InvalidArgument(str(exc), key) from None
        if "." in spec and not sep:
            return cast("Callable[..., str | None]", _import(spec, key))
    raise InvalidArgument(
        f"{spec!r}: use 'header:NAME', 'subdomain:DOMAIN', 'path:/PREFIX', a dotted path or a callable", key
    )


def _exempt_paths(paths: Any, key: str) -> Any:
    """``"re:PATTERN"`` strings compiled; the gate checks the rest."""
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list | tuple):
        return paths
    try:
        return [re.compile(p[3:]) if isinstance(p, str) and p.startswith("re:") else p for p in paths]
    except re.error as exc:
        raise InvalidArgument(f"a 're:' pattern is not a regex: {exc}", key) from None


def _renderer(value: Any, key: str) -> Any:
    """A ``Renderer`` built from a dict of its options."""
    if not isinstance(value, dict):
        return value
    names = sorted(inspect.signature(Renderer).parameters)
    unknown = sorted(repr(k) for k in value if k not in names)
    if unknown:
        raise InvalidArgument(f"unknown Renderer options {', '.join(unknown)}; known: {names}", key)
    try:
        return Renderer(**value)
    except (InvalidArgument, TypeError) as exc:
        raise InvalidArgument(str(exc), key) from None


CONVERT: dict[str, Callable[[Any, str], Any]] = {
    "TENANT": _tenant,
    "EXEMPT_PATHS": _exempt_paths,
    "BYPASS": _callable,
    "ON_BLOCK": _callable,
    "RENDERER": _renderer,
}
"""Settings written differently from the gate option they stand for."""


class _NeverRead:
    """A store for validating options: building a gate does not read it."""

    def changes(self, since: int | None, now: Any = None) -> Any:
        raise AssertionError("validating settings never reads the database")


def read() -> tuple[dict[str, Any], dict[str, str]]:
    """The gate options ``settings.MAINTGATE`` gives, and what is wrong with it: every bad key at
    once, each with its message. Validated as the gate validates them, without a database."""
    value = raw()
    if not isinstance(value, dict):
        return {}, {"MAINTGATE": f"must be a dict, got {type(value).__name__}"}
    options: dict[str, Any] = {}
    problems = store_problems(value)
    for key, setting in value.items():
        if key not in KEYS:
            problems[key] = "not a maintgate setting"
        elif key in GATE_KEYS:
            try:
                options[GATE_KEYS[key]] = CONVERT.get(key, _same)(setting, key)
            except InvalidArgument as exc:
                problems[key] = str(exc)
    while True:
        try:
            Gate(_NeverRead(), **options).close()
            return options, problems
        except InvalidArgument as exc:
            key = (exc.option or "").upper()
            if exc.option not in options:  # not one option's fault: name the whole setting
                problems["MAINTGATE"] = str(exc)
                return {}, problems
            problems[key] = str(exc)
            del options[exc.option]


def store_problems(value: dict[Any, Any]) -> dict[str, str]:
    """What is wrong with the settings that say where maintgate's tables are, without a database."""
    from sqlalchemy import make_url

    from ..core.errors import explain
    from ..core.schema import build_tables

    problems: dict[str, str] = {}
    url = value.get("DATABASE_URL")
    if url is not None:
        try:
            if not isinstance(url, str):
                raise TypeError(f"must be a SQLAlchemy URL string, got {url!r}")
            make_url(url).get_dialect()
        except Exception as exc:
            problems["DATABASE_URL"] = explain(exc, url if isinstance(url, str) else "")
    try:
        build_tables(value.get("TABLE_PREFIX", "maintgate_"), None)
    except InvalidArgument as exc:
        problems["TABLE_PREFIX"] = str(exc)
    schema = value.get("SCHEMA")
    if schema is not None and not isinstance(schema, str):
        problems["SCHEMA"] = f"must be a schema name or None, got {schema!r}"
    database = value.get("DATABASE", "default")
    if not isinstance(database, str):
        problems["DATABASE"] = f"must be the alias of a database in settings.DATABASES, got {database!r}"
    return problems


def check_store() -> None:
    """InvalidArgument naming every store setting that is wrong, before a store is built from them."""
    value = raw()
    problems = store_problems(value) if isinstance(value, dict) else {}
    if problems:
        first = next(iter(problems))
        raise InvalidArgument("; ".join(describe(k, m) for k, m in problems.items()), first)


def _same(value: Any, key: str) -> Any:
    return value


def describe(key: str, message: str) -> str:
    """A problem as it is reported: the setting, then what is wrong."""
    return f"MAINTGATE: {message}" if key == "MAINTGATE" else f"MAINTGATE[{key!r}]: {message}"


def suggestion(key: object) -> str | None:
    """The known key an unknown one most resembles (``TENNANT`` → ``TENANT``), if any."""
    if not isinstance(key, str):
        return None
    close = difflib.get_close_matches(key.upper(), sorted(KEYS), n=1)
    return close[0] if close else None


def gate_options() -> dict[str, Any]:
    """Keyword options for :class:`maintgate.core.Gate` from the settings; InvalidArgument names
    every bad key."""
    options, problems = read()
    if problems:
        first = next(iter(problems))
        raise InvalidArgument("; ".join(describe(key, message) for key, message in problems.items()), first)
    return options


def database_alias() -> str:
    """The Django database maintgate's tables live in (``MAINTGATE["DATABASE"]``, default ``default``)."""
    return str(get("DATABASE", "default"))


def build_gate() -> Gate:
    """The gate the Django middleware uses, built from the settings."""
    from . import get_store

    options = gate_options()  # every bad setting named before anything is built
    return Gate(get_store(database_alias()), **options)
