"""Django, in a process of its own (settings are per process): bare vs pass-through vs maintgate vs
django-maintenance-mode (its default file backend), maintenance off and on. Prints JSON.

Run by ``python -m benchmarks``; on its own: ``python -m benchmarks.django_bench [--quick]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

TMP = Path(tempfile.mkdtemp(prefix="maintgate-bench-django-"))


def configure() -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        INSTALLED_APPS=["maintgate.django", "maintenance_mode"],
        MIDDLEWARE=[],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(TMP / "django.db")}},
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}],
        USE_TZ=True,
        MAINTGATE={"TENANT": "header:X-Tenant-ID", "CACHE_TTL": 3600},
        MAINTENANCE_MODE_STATE_FILE_PATH=str(TMP / "maintenance_mode_state.txt"),
    )
    django.setup()


def hello(request):
    from django.http import HttpResponse

    return HttpResponse("Hello, world!")


def _patterns():
    from django.urls import path

    return [path("", hello)]


urlpatterns: list = []


class PassThrough:
    """The cheapest Django middleware."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)


def handler(middleware: list[str]):
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    with override_settings(MIDDLEWARE=middleware):
        return WSGIHandler()


def main() -> None:
    quick = "--quick" in sys.argv
    configure()
    urlpatterns[:] = _patterns()
    from maintenance_mode.core import set_maintenance_mode

    from benchmarks.hot_path import time_wsgi
    from maintgate import ALL_TENANTS, WSGIMaintenanceMiddleware
    from maintgate.django import get_store
    from maintgate.tenants import from_header

    store = get_store()
    store.create_tables()
    set_maintenance_mode(False)
    bare = handler([])
    wrapped = WSGIMaintenanceMiddleware(bare, store, tenant=from_header("X-Tenant-ID"), cache_ttl=3600)
    apps = {
        "bare": bare,
        "pass": handler([f"{__name__}.PassThrough"]),
        "maintgate": handler(["maintgate.django.middleware.MaintenanceMiddleware"]),
        "maintgate_wsgi": wrapped,
        "peer": handler(["maintenance_mode.middleware.MaintenanceModeMiddleware"]),
    }
    n = 500 if quick else 5_000
    hot = time_wsgi(apps, n, 15)
    store.activate(ALL_TENANTS, message="Benchmarking the 503 path")
    set_maintenance_mode(True)
    wrapped.gate.refresh()
    gated = handler(["maintgate.django.middleware.MaintenanceMiddleware"])
    blocked = time_wsgi({"maintgate_json": gated, "maintgate_wsgi_json": wrapped, "peer": apps["peer"]}, n, 9)
    html = "text/html,*/*;q=0.8"
    blocked.update(time_wsgi({"maintgate_html": gated, "maintgate_wsgi_html": wrapped}, n, 9, accept=html))
    set_maintenance_mode(False)
    json.dump({"hot": hot, "blocked": blocked}, sys.stdout)


if __name__ == "__main__":
    main()
