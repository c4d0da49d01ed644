"""Settings of the Django example: maintgate's app and middleware, SQLite, tenant from a header."""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = "example-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "exampleproject.urls"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = ["maintgate.django", "exampleproject"]
MIDDLEWARE = ["maintgate.django.middleware.MaintenanceMiddleware"]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_SQLITE_PATH", str(BASE_DIR / "example.db")),
    }
}

MAINTGATE = {
    "TENANT": "header:X-Tenant-ID",
    "EXEMPT_PATHS": ["/healthz"],
}
