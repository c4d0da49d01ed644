"""One Django configuration for the whole test process: settings can be configured only once."""

from __future__ import annotations

import tempfile
from pathlib import Path

import django
from django.conf import settings

from tests.conftest import POSTGRES_URL

SQLITE_PATH = Path(tempfile.mkdtemp(prefix="maintgate-django-")) / "django.db"


def setup() -> None:
    """Configure Django once: ``default`` is a SQLite file, ``pg`` the PostgreSQL test database."""
    if settings.configured:
        return
    from sqlalchemy.engine import make_url

    pg = make_url(POSTGRES_URL)
    settings.configure(
        DEBUG=False,
        SECRET_KEY="maintgate-tests",
        ROOT_URLCONF="tests.apps",
        ALLOWED_HOSTS=["*"],
        MIDDLEWARE=[],
        INSTALLED_APPS=["maintgate.django", "tests.djapp", "tests.djmig"],
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        DATABASES={
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(SQLITE_PATH)},
            "pg": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": pg.database,
                "USER": pg.username or "",
                "PASSWORD": pg.password or "",
                "HOST": pg.host or "",
                "PORT": str(pg.port or ""),
            },
        },
    )
    django.setup()


def manage(*args: str) -> str:
    """``manage.py maintgate ARGS``, run in this process: what it wrote to its stdout."""
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("maintgate", *args, stdout=out)
    return out.getvalue()
