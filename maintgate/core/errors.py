"""Errors raised by maintgate."""

import math


class MaintgateError(Exception):
    """Base class of every error maintgate raises."""


class InvalidTenant(MaintgateError, ValueError):
    """A tenant id that is empty, too long or uses characters outside the allowed set."""


class InvalidArgument(MaintgateError, ValueError):
    """A bad argument or setting, named in the message and in ``option``; raised when the object is built."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option
        """The keyword argument at fault (``"cache_ttl"``), when there is one."""


def positive_seconds(option: str, value: object) -> float:
    """``value`` as seconds, or InvalidArgument naming ``option`` (a string or bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise InvalidArgument(f"{option} must be a positive number of seconds, got {value!r}", option)
    return float(value)


def positive_int(option: str, value: object, upto: int | None = None) -> int:
    """``value`` as a whole number from 1 (to ``upto``), or InvalidArgument naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upto and value > upto):
        limit = f"an int from 1 to {upto}" if upto else "a positive int"
        raise InvalidArgument(f"{option} must be {limit}, got {value!r}", option)
    return value


def callable_option(option: str, value: object, what: str, *, none_ok: bool = True) -> None:
    """InvalidArgument naming ``option`` unless ``value`` is a callable (or None, if ``none_ok``)."""
    if not (callable(value) or (none_ok and value is None)):
        raise InvalidArgument(f"{option} must be {what}, got {value!r}", option)


class WindowBusy(MaintgateError):
    """Another migration window for this tenant is still open; nothing was changed."""


class WindowLost(MaintgateError):
    """A migration window is no longer the one that holds its tenant, or its transaction changed.

    The window fails instead of switching maintenance off: maintenance stays on.
    """


class WindowRefused(MaintgateError):
    """Raised by a window's work before it changed anything, to withdraw the window.

    The window then ends as if never opened (an operator's maintenance stays on) instead of
    keeping maintenance on with an error: e.g. Alembic's stock ``env.py``, which would migrate
    on a connection of its own.
    """


DRIVER_HINTS = {
    "postgresql": "use postgresql+psycopg:// and pip install 'maintgate[postgres]'",
    "mysql": "use mysql+pymysql:// and pip install 'maintgate[mysql]'",
    "mariadb": "use mariadb+pymysql:// and pip install 'maintgate[mysql]'",
}


def explain(exc: BaseException, url: str = "") -> str:
    """One line that says what went wrong and what to do, for the mistakes people make first."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, ModuleNotFoundError):
        backend = url.partition(":")[0].partition("+")[0]
        hint = DRIVER_HINTS.get(backend, "install the driver the URL names")
        return f"the database driver is not installed ({first}): {hint}"
    if "Can't load plugin: sqlalchemy.dialects:postgres" in text:
        return "write postgresql:// (or postgresql+psycopg://), not postgres://"
    lowered = text.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        return f"maintgate's tables are not there ({first}): run `maintgate init`"
    if "doesn't exist" in lowered and "table" in lowered:  # MySQL, MariaDB
        return f"maintgate's tables are not there ({first}): run `maintgate init`"
    return first
