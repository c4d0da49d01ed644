"""The Django app: middleware (sync and async) in a real Django stack, settings, checks, the command."""

from __future__ import annotations

import json

import pytest

from tests.conftest import asgi_call
from tests.django_setup import manage, setup

setup()

from django.conf import settings  # noqa: E402
from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.core.handlers.wsgi import WSGIHandler  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.core.management.base import CommandError  # noqa: E402
from django.test import override_settings  # noqa: E402

from maintgate import ALL_TENANTS, MaintenanceStore  # noqa: E402
from maintgate.django import checks, get_store  # noqa: E402

MIDDLEWARE = ["maintgate.django.middleware.MaintenanceMiddleware"]
BROWSER = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"


@pytest.fixture
def configured(store: MaintenanceStore):
    """Django settings pointing maintgate at the test's store, with the middleware installed."""
    url = store.engine.url.render_as_string(hide_password=False)
    prefix = store.tables.state.name.removesuffix("state")
    maintgate = {
        "DATABASE_URL": url,
        "TABLE_PREFIX": prefix,
        "TENANT": "header:X-Tenant-ID",
        "EXEMPT_PATHS": ["/healthz"],
        "CACHE_TTL": 0.01,
    }
    with override_settings(MAINTGATE=maintgate, MIDDLEWARE=MIDDLEWARE, ROOT_URLCONF="tests.apps"):
        from tests import apps

        apps.django_app()  # installs the URL patterns
        yield get_store("default")  # the middleware's own store: its writes show at once
    get_store("default").engine.dispose()


def wsgi_get(handler, path="/", headers=None, method="GET"):
    import io

    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
    }
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = int(status[:3])
        seen["headers"] = {k.lower(): v for k, v in response_headers}

    body = b"".join(handler(environ, start_response))
    return seen["status"], seen["headers"], body


def test_sync_middleware_in_a_django_wsgi_stack(configured):
    store = configured
    handler = WSGIHandler()
    assert wsgi_get(handler, headers={"X-Tenant-ID": "demo"})[0] == 200
    store.activate("demo", message="Renaming", retry_after=120)
    import time

    time.sleep(0.02)
    status, headers, body = wsgi_get(handler, headers={"X-Tenant-ID": "demo"})
    assert status == 503 and headers["retry-after"] == "120" and headers["vary"] == "Accept"
    assert headers["content-type"].startswith("application/problem+json")
    assert json.loads(body)["detail"] == "Renaming"
    status, headers, body = wsgi_get(handler, headers={"X-Tenant-ID": "demo", "Accept": BROWSER})
    assert status == 503 and b"Renaming" in body and headers["content-type"].startswith("text/html")
    assert wsgi_get(handler, "/healthz", headers={"X-Tenant-ID": "demo"})[0] == 200
    assert wsgi_get(handler, headers={"X-Tenant-ID": "other"})[0] == 200


def test_async_middleware_in_a_django_asgi_stack(configured):
    store = configured
    handler = ASGIHandler()
    demo = {"X-Tenant-ID": "demo", "Host": "testserver"}
    assert asgi_call(handler, headers=demo)[0] == 200
    store.activate(ALL_TENANTS, message="Upgrade")
    import time

    time.sleep(0.02)
    status, _headers, body = asgi_call(handler, headers=demo)
    assert status == 503 and json.loads(body)["detail"] == "Upgrade"
    assert asgi_call(handler, "/healthz", headers=demo)[0] == 200


@pytest.mark.parametrize(
    ("maintgate", "check_id"),
    [
        ("nope", "maintgate.E001"),
        ({"TENNANT": "header:X"}, "maintgate.E002"),
        ({"TENANT": "cookie:tenant"}, "maintgate.E003"),
        ({"TENANT": "no.such.module.resolver"}, "maintgate.E003"),
        ({"CACHE_TTL": 0}, "maintgate.E004"),
        ({"EXEMPT_PATHS": ["healthz"]}, "maintgate.E005"),
        ({"ALLOW_IPS": ["10.0.0.999"]}, "maintgate.E006"),
        ({"BYPASS_SECRET": "short"}, "maintgate.E007"),
        ({"DATABASE": "missing"}, "maintgate.E008"),
        ({"RENDERER": {"html_template": "$oops"}}, "maintgate.E009"),
    ],
)
def test_system_checks_report_bad_settings_with_stable_ids(maintgate, check_id):
    with override_settings(MAINTGATE=maintgate):
        errors = checks.check_settings()
    assert [e.id for e in errors] == [check_id], errors


def test_good_settings_pass_the_checks():
    with override_settings(MAINTGATE={"TENANT": "subdomain:example.com", "EXEMPT_PATHS": ["re:^/static/"]}):
        assert checks.check_settings() == []
    with override_settings(MAINTGATE=None):
        assert checks.check_settings() == []


def test_settings_are_read_lazily(configured):
    from maintgate.django import conf

    assert conf.gate_options()["cache_ttl"] == 0.01
    with override_settings(MAINTGATE={**conf.raw(), "CACHE_TTL": 5}):
        assert conf.gate_options()["cache_ttl"] == 5


def test_management_command_uses_the_cli(configured):
    store = configured
    manage("on", "demo", "--message", "From manage.py", "--retry-after", "60")
    assert store.get("demo").message == "From manage.py"
    (row,) = json.loads(manage("status", "--json"))
    assert row["tenant"] == "demo" and row["active"] and row["owner_alive"] is None
    assert "activated" in manage("history", "demo")
    call_command("maintgate", "off", "demo")
    assert not store.get("demo").active
    with pytest.raises(CommandError, match="invalid tenant id"):
        call_command("maintgate", "on", "bad id")


def test_a_long_cache_ttl_in_settings_builds_a_gate(configured):
    """MAX_STALENESS left out follows CACHE_TTL (three TTLs), as the gate's own default does."""
    from maintgate.django import conf

    with override_settings(MAINTGATE={**settings.MAINTGATE, "CACHE_TTL": 3600}):
        gate = conf.build_gate()
        assert gate.max_staleness == 3 * 3600
        gate.close()


def readme_settings_table() -> dict[str, str]:
    """Each key of the README's Django settings table, with the check id documented for it."""
    import re
    from pathlib import Path

    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    section = text.split("### Django settings", 1)[1].split("\n#", 1)[0]
    documented = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            check_id = re.search(r"E\d{3}", cells[2])
            for key in re.findall(r"`([A-Z_]+)`", cells[0]):
                documented[key] = f"maintgate.{check_id.group()}" if check_id else ""
    return documented


def test_the_readmes_settings_table_is_every_gate_option_and_store_setting():
    import inspect

    from maintgate.core.gate import Gate
    from maintgate.django import conf

    documented = readme_settings_table()
    options = {name.upper() for name in inspect.signature(Gate).parameters} - {"STORE", "CLOCK", "NOW"}
    assert set(documented) == options | {"DATABASE", "DATABASE_URL", "TABLE_PREFIX", "SCHEMA"}
    assert set(documented) == set(conf.KEYS), "the code accepts what the README documents, no more"
    assert documented == {key: checks.IDS[key] for key in documented}, "each key has its documented id"


def test_every_bad_setting_is_reported_at_once_each_with_its_documented_id():
    import re

    bad = {
        "TENNANT": "header:X-Tenant-ID",
        "TENANT": "cookie:tenant",
        "CACHE_TTL": "fast",
        "EXEMPT_PATHS": ["healthz"],
        "ALLOW_IPS": ["10.0.0.999"],
        "BYPASS_SECRET": "short",
        "RENDERER": {"colour": "red"},
        "DEFAULT_RETRY_AFTER": "60",
        "LOAD_TIMEOUT": 2.0,
        "LOG_INTERVAL": 10,
    }
    with override_settings(MAINTGATE=bad):
        errors = checks.check_settings()
    reported = {re.match(r"MAINTGATE\['(\w+)'\]", e.msg).group(1): e.id for e in errors}
    documented = readme_settings_table()
    expected = {key: documented.get(key, "maintgate.E002") for key in bad}
    del expected["LOAD_TIMEOUT"], expected["LOG_INTERVAL"]
    assert reported == expected, errors
    assert len(errors) == len(expected), "one error per bad key"
    (unknown,) = [e for e in errors if e.id == "maintgate.E002"]
    assert "'TENANT'" in unknown.hint, "a misspelt key gets the key it resembles"


def test_a_wrong_type_in_settings_names_the_setting_at_runtime(configured):
    from maintgate import InvalidArgument
    from maintgate.django import conf

    wrong = {**settings.MAINTGATE, "CACHE_TTL": "2"}
    with override_settings(MAINTGATE=wrong), pytest.raises(InvalidArgument, match=r"CACHE_TTL") as info:
        conf.build_gate()
    assert info.value.option == "CACHE_TTL"


def test_manage_py_maintgate_help_is_djangos_and_offers_only_what_makes_sense(capsys):
    from django.core.management import ManagementUtility

    with pytest.raises(SystemExit) as done:
        ManagementUtility(["manage.py", "maintgate", "--help"]).execute()
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "usage: manage.py maintgate" in out, out
    assert "--settings" in out, "Django's own options are there"
    for command in ("init", "status", "on", "off", "release", "unschedule", "history", "migrate"):
        assert command in out, command
    for standalone in (
        "demo",
        "MAINTGATE_DATABASE_URL",
        "--database-url",
        "--table-prefix",
        "usage: maintgate",
    ):
        assert standalone not in out, standalone
    with pytest.raises(CommandError, match="invalid choice: 'demo'"):
        call_command("maintgate", "demo")
    assert "usage: manage.py maintgate migrate (TENANT | --all)" in manage("migrate", "--help")


def test_manage_py_maintgate_writes_through_djangos_own_store(configured, tmp_path, monkeypatch):
    """The command's write shows at once in the middleware's gate (same store, same process):
    no second store built from a URL put back into argv, which waits for the gate's TTL."""
    with override_settings(MAINTGATE={**settings.MAINTGATE, "CACHE_TTL": 60}):
        handler = WSGIHandler()
        demo = {"X-Tenant-ID": "demo"}
        assert wsgi_get(handler, "/", demo)[0] == 200
        out = manage("on", "demo", "--message", "Now")
        assert "demo: IN MAINTENANCE because of its own switch" in out, out
        assert wsgi_get(handler, "/", demo)[0] == 503, "the gate saw the command's write at once"
        (row,) = json.loads(manage("status", "--json"))
        assert row["tenant"] == "demo" and row["effective"] == "maintenance"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CommandError, match=r"unrecognized arguments|invalid choice"):
        call_command("maintgate", "--database-url", "sqlite:///stray.db", "init")
    assert list(elsewhere.iterdir()) == [], "no stray SQLite file"


@pytest.mark.parametrize(
    ("maintgate", "key"),
    [
        ({"DATABASE_URL": 5}, "DATABASE_URL"),
        ({"DATABASE_URL": "not a url"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgres://x/y"}, "DATABASE_URL"),
        ({"TABLE_PREFIX": 5}, "TABLE_PREFIX"),
        ({"TABLE_PREFIX": "bad-prefix"}, "TABLE_PREFIX"),
        ({"SCHEMA": 5}, "SCHEMA"),
    ],
)
def test_store_settings_are_checked_too_and_named_at_run_time(maintgate, key):
    from maintgate import InvalidArgument

    with override_settings(MAINTGATE=maintgate):
        errors = checks.check_settings()
        assert [(e.id, f"MAINTGATE['{key}']" in e.msg) for e in errors] == [("maintgate.E008", True)], errors
        with pytest.raises(InvalidArgument, match=key):
            get_store("default")


@pytest.mark.parametrize(
    ("maintgate", "check_id"),
    [
        ({1: "x"}, "maintgate.E002"),
        ({"RENDERER": {1: "a", "zz": 2}}, "maintgate.E009"),
        ({"RENDERER": {"tenant_text": "{tenant.x}"}}, "maintgate.E009"),
        ({"RENDERER": {"retry_text": "{seconds.y}"}}, "maintgate.E009"),
        ({"RENDERER": {"tenant_text": "{tenant[x]}"}}, "maintgate.E009"),
        ({"TENANT": "tests.raises_on_import.resolver"}, "maintgate.E003"),
        ({"LOAD_TIMEOUT": float("inf")}, "maintgate.E004"),
    ],
)
def test_the_checks_report_odd_values_instead_of_crashing(maintgate, check_id):
    with override_settings(MAINTGATE={**maintgate, "TENNANT": "x"}):
        errors = checks.check_settings()
    assert sorted(e.id for e in errors) == sorted([check_id, "maintgate.E002"]), errors


def test_manage_py_maintgate_rollout_runs_on_djangos_store(configured, tmp_path):
    from tests.fleet import Fleet

    with pytest.raises(CommandError, match="no rollout named 'nothing'"):
        manage("rollout", "status", "nothing")
    fleet = Fleet(configured, 3)
    listing = tmp_path / "tenants.txt"
    listing.write_text("\n".join(fleet.tenants))
    try:
        out = manage("rollout", "run", "dj", "--tenants", str(listing), "--call", "tests.fleet:migrate")
        assert "rollout dj: 3 migrated now, 0 done before, 0 failed, 0 not started" in out, out
        assert fleet.migrated() == dict.fromkeys(fleet.tenants, 1)
        assert json.loads(manage("rollout", "status", "dj", "--json"))["done"] == 3
    finally:
        fleet.drop()
