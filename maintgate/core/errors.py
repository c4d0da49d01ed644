"""Errors raised by maintgate."""


class MaintgateError(Exception):
    """Base class of every error maintgate raises."""


class InvalidTenant(MaintgateError, ValueError):
    """A tenant id that is empty, too long or uses characters outside the allowed set."""


class InvalidArgument(MaintgateError, ValueError):
    """A bad argument or setting, named in the message; raised when the object is built."""


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
