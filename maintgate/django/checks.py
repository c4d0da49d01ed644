"""Django system checks: a bad MAINTGATE setting is reported at start-up, with a stable id."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, register

from ..core.errors import InvalidArgument, MaintgateError
from ..core.gate import Gate
from . import conf

# Each setting key that can be wrong maps to the id the docs explain.
IDS = {
    "MAINTGATE": "maintgate.E001",
    "unknown": "maintgate.E002",
    "TENANT": "maintgate.E003",
    "CACHE": "maintgate.E004",
    "EXEMPT_PATHS": "maintgate.E005",
    "IPS": "maintgate.E006",
    "BYPASS": "maintgate.E007",
    "DATABASE": "maintgate.E008",
    "RENDERER": "maintgate.E009",
}


def _id_for(message: str) -> str:
    for needle, check_id in (
        ("unknown keys", IDS["unknown"]),
        ("must be a dict", IDS["MAINTGATE"]),
        ("TENANT", IDS["TENANT"]),
        ("from_header", IDS["TENANT"]),
        ("from_subdomain", IDS["TENANT"]),
        ("from_path_prefix", IDS["TENANT"]),
        ("cache", IDS["CACHE"]),
        ("on_store_error", IDS["CACHE"]),
        ("max_staleness", IDS["CACHE"]),
        ("load_timeout", IDS["CACHE"]),
        ("tenant_pattern", IDS["TENANT"]),
        ("tenant_max_length", IDS["TENANT"]),
        ("forwarded_header", IDS["IPS"]),
        ("exempt path", IDS["EXEMPT_PATHS"]),
        ("allow_ips", IDS["IPS"]),
        ("trusted_proxies", IDS["IPS"]),
        ("bypass", IDS["BYPASS"]),
        ("BYPASS", IDS["BYPASS"]),
        ("on_block", IDS["BYPASS"]),
        ("RENDERER", IDS["RENDERER"]),
        ("html_template", IDS["RENDERER"]),
        ("_text", IDS["RENDERER"]),
    ):
        if needle in message:
            return check_id
    return IDS["MAINTGATE"]


class _NeverRead:
    def changes(self, since: int | None, now: Any = None) -> Any:
        raise AssertionError("system checks never read the database")


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """Validate ``settings.MAINTGATE`` and the database it points at, without touching the database."""
    errors: list[Error] = []
    try:
        # Build a real gate (the same validation as at start-up) over a store it never reads.
        Gate(_NeverRead(), **conf.gate_options()).close()
    except (InvalidArgument, TypeError) as exc:
        errors.append(
            Error(
                str(exc), hint="See the configuration reference in maintgate's README.", id=_id_for(str(exc))
            )
        )
    try:
        from django.conf import settings

        from . import database_url

        alias = conf.database_alias()
        if conf.get("DATABASE_URL") is None:
            if alias not in settings.DATABASES:
                raise MaintgateError(f"MAINTGATE['DATABASE'] = {alias!r} is not in settings.DATABASES")
            database_url(alias)
    except MaintgateError as exc:
        errors.append(Error(str(exc), id=IDS["DATABASE"]))
    return errors
