"""Django system checks: every bad MAINTGATE setting is reported at start-up, each with the id
the README's settings table gives for its key."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, register

from ..core.errors import MaintgateError
from . import conf

E = "maintgate.E{:03d}".format
IDS = {
    **dict.fromkeys(["TENANT", "TENANT_PATTERN", "TENANT_MAX_LENGTH"], E(3)),
    **dict.fromkeys(
        ["CACHE_TTL", "LOAD_TIMEOUT", "MAX_STALENESS", "ON_STORE_ERROR", "NOTIFICATIONS", "LOG_INTERVAL"],
        E(4),
    ),
    "EXEMPT_PATHS": E(5),
    **dict.fromkeys(["ALLOW_IPS", "TRUSTED_PROXIES", "FORWARDED_HEADER"], E(6)),
    **dict.fromkeys(
        ["BYPASS_SECRET", "BYPASS_COOKIE_MAX_AGE", "BYPASS", "ON_BLOCK", "LOG_BLOCKED_EVERY"], E(7)
    ),
    **dict.fromkeys(sorted(conf.STORE_KEYS), E(8)),
    **dict.fromkeys(["RENDERER", "DEFAULT_RETRY_AFTER"], E(9)),
}
"""The check id of each setting key; E001 is MAINTGATE itself, E002 an unknown key."""
NOT_A_DICT, UNKNOWN = E(1), E(2)
HINT = "See the Django settings table in maintgate's README."


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """Validate ``settings.MAINTGATE`` and the database it points at, without touching the database."""
    errors: list[Error] = []
    for key, message in conf.read()[1].items():
        hint = HINT
        if key not in conf.KEYS and key != "MAINTGATE":
            near = conf.suggestion(key)
            hint = f"Did you mean {near!r}? {HINT}" if near else HINT
        check_id = NOT_A_DICT if key == "MAINTGATE" else IDS.get(key, UNKNOWN)
        errors.append(Error(conf.describe(key, message), hint=hint, id=check_id))
    try:
        from django.conf import settings

        from . import database_url

        alias = conf.database_alias()
        if conf.get("DATABASE_URL") is None and isinstance(conf.get("DATABASE", "default"), str):
            if alias not in settings.DATABASES:
                raise MaintgateError(f"{alias!r} is not in settings.DATABASES")
            database_url(alias)
    except Exception as exc:  # an unknown engine, a PORT that is not a number, ...
        errors.append(Error(conf.describe("DATABASE", str(exc)), hint=HINT, id=IDS["DATABASE"]))
    return errors
