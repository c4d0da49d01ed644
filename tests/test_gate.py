"""The gate in front of real apps (Starlette over ASGI; Flask and Django over WSGI) on real databases."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from maintgate import ALL_TENANTS, MaintenanceMiddleware, MaintenanceStore, WSGIMaintenanceMiddleware
from maintgate.tenants import from_header
from tests import apps
from tests.conftest import ManualClock, QueryCounter, ok_app
from tests.helpers import elsewhere, eventually

BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def wrap(kind: str, store: MaintenanceStore, clock: ManualClock, **options):
    """The app of ``kind`` behind maintgate, and an httpx client that talks to it."""
    options.setdefault("tenant", from_header("X-Tenant-ID"))
    options.setdefault("exempt_paths", ["/healthz"])
    if kind == "starlette":
        app = MaintenanceMiddleware(apps.starlette_app(), store, clock=clock, **options)
        return app, TestClient(app)
    inner = apps.flask_app() if kind == "flask" else apps.django_app()
    app = WSGIMaintenanceMiddleware(inner, store, clock=clock, **options)
    return app, httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://testserver")


@pytest.fixture
def make_app(clock):
    """``wrap`` bound to the test's clock; closes every gate it built when the test ends."""
    built = []

    def make(kind, store, **options):
        app, client = wrap(kind, store, clock, **options)
        built.append(app)
        return app, client

    make.clock = clock
    yield make
    for app in built:
        app.gate.close()


@pytest.fixture(params=["starlette", "flask", "django"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def served(kind, store, make_app) -> Iterator[tuple]:
    app, client = make_app(kind, store)
    with client:
        yield app, client


def get(client, tenant=None, path="/", accept=None, method="GET"):
    headers = {}
    if tenant is not None:
        headers["X-Tenant-ID"] = tenant
    if accept is not None:
        headers["Accept"] = accept
    return client.request(method, path, headers=headers)


def assert_503_headers(response, retry_after: str):
    assert response.status_code == 503
    assert response.headers["retry-after"] == retry_after
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["vary"] == "Accept"


def test_passes_when_not_in_maintenance(served):
    _, client = served
    response = get(client, "demo")
    assert response.status_code == 200 and response.json() == {"ok": True, "tenant": "demo"}


def test_api_clients_get_problem_json(served, store):
    _, client = served
    store.activate("demo", message="Renaming a field", retry_after=600)
    for accept in (None, "*/*", "application/json"):
        response = get(client, "demo", accept=accept)
        assert_503_headers(response, "600")
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json() == {
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "Renaming a field",
            "tenant": "demo",
            "retry_after": 600,
        }
    assert get(client, "other").status_code == 200


def test_browsers_get_an_escaped_html_page(served, store):
    _, client = served
    store.activate("demo", message="<img src=x onerror=alert(1)>", retry_after=30)
    response = get(client, "demo", accept=BROWSER)
    assert_503_headers(response, "30")
    assert response.headers["content-type"].startswith("text/html")
    assert "&lt;img src=x onerror=alert(1)&gt;" in response.text
    assert "<img" not in response.text


def test_plain_text_where_preferred(served, store):
    _, client = served
    store.activate("demo", message="Back soon")
    response = get(client, "demo", accept="text/plain")
    assert_503_headers(response, "60")
    assert response.headers["content-type"].startswith("text/plain")
    assert "Back soon" in response.text


def test_head_gets_headers_without_a_body(served, store):
    _, client = served
    store.activate("demo")
    response = get(client, "demo", method="HEAD")
    assert response.status_code == 503 and response.content == b""
    assert int(response.headers["content-length"]) > 0


def test_exempt_paths_always_pass(served, store):
    _, client = served
    store.activate("demo")
    store.activate(ALL_TENANTS)
    assert get(client, "demo", path="/healthz").text == "ok"
    assert get(client, None, path="/healthz").text == "ok"


def test_global_switch_blocks_every_tenant_and_no_tenant(served, store):
    _, client = served
    store.activate(ALL_TENANTS, message="Database upgrade")
    for tenant in ("demo", "other", None):
        response = get(client, tenant)
        assert response.status_code == 503 and response.json()["detail"] == "Database upgrade"
        assert response.json()["tenant"] == tenant


def test_no_tenant_only_sees_the_global_switch(served, store):
    _, client = served
    store.activate("demo")
    assert get(client, None).status_code == 200


def test_state_changes_show_after_the_ttl_and_cached_requests_do_no_query(kind, store, make_app):
    """Without notifications (any database but PostgreSQL) the TTL alone bounds staleness."""
    _, client = make_app(kind, store, notifications=False)
    clock = make_app.clock
    queries = QueryCounter(store.engine)
    assert get(client, "demo").status_code == 200
    assert queries.count == 1
    for _ in range(50):
        assert get(client, "demo").status_code == 200
    assert queries.count == 1, "a cached request must not touch the database"
    other = elsewhere(store)
    other.activate("demo")
    writes = queries.count
    clock.advance(0.5)
    assert get(client, "demo").status_code == 200, "still inside the 1 s TTL"
    clock.advance(0.6)
    # Past the TTL, requests are answered from memory while one refresh runs in the background.
    assert eventually(lambda: get(client, "demo").status_code == 503)
    assert queries.count == writes + 1, "one refresh, one query"
    other.deactivate("demo")
    clock.advance(1.1)
    assert eventually(lambda: get(client, "demo").status_code == 200)


def test_hostile_tenant_ids_get_a_sane_answer(served, store, clock):
    _, client = served
    huge = "d" * 10_000
    assert get(client, huge).status_code == 200
    assert get(client, "<script>x</script>").status_code == 200
    store.activate(ALL_TENANTS)
    clock.advance(2)
    for tenant in (huge, "<script>x</script>", "demo"):
        response = get(client, tenant, accept=BROWSER)
        assert response.status_code == 503
        assert "<script>x" not in response.text and huge not in response.text
    assert len(served[0].gate.mirror) == 1, "memory holds what is on, never what requests name"


def raw_request(kind, app, client, headers: dict[str, bytes]) -> tuple[int, dict[str, str]]:
    """Send header bytes as they come off the wire: latin-1 decoded in a WSGI environ (PEP 3333)."""
    if kind == "starlette":
        response = client.get("/", headers=headers)
        return response.status_code, dict(response.headers)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": __import__("io").BytesIO(),
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value.decode("latin-1")
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"] = int(status.split()[0])
        seen["headers"] = {k.lower(): v for k, v in response_headers}

    b"".join(app(environ, start_response))
    return seen["status"], seen["headers"]


def test_non_utf8_header_bytes(kind, served, store, clock):
    app, client = served
    store.activate("demo")
    status, _ = raw_request(
        kind, app, client, {"X-Tenant-ID": b"\xff\xfe\x80demo", "Accept": b"\xff text/html"}
    )
    assert status == 200
    store.activate(ALL_TENANTS)
    clock.advance(2)
    status, headers = raw_request(
        kind, app, client, {"X-Tenant-ID": b"\xff\xfe", "Accept": b"\xc3\x28;q=\xff"}
    )
    assert status == 503 and headers["content-type"].startswith("application/problem+json")


def test_garbage_accept_gets_json(served, store):
    _, client = served
    store.activate("demo")
    for accept in (";;;", "q=1", "text/html;q=zz", "*/*;q=-1", "x" * 20_000):
        response = get(client, "demo", accept=accept)
        assert response.status_code == 503
        json.loads(response.text)


def test_retry_after_counts_down_to_ends_at(served, store):
    from datetime import UTC, datetime, timedelta

    _, client = served
    store.activate("demo", retry_after=600, ends_at=datetime.now(UTC) + timedelta(seconds=120))
    seconds = int(get(client, "demo").headers["retry-after"])
    assert 115 <= seconds <= 120


def test_store_errors_use_last_known_state_and_never_500(served, store, clock, caplog):
    _, client = served
    store.activate("demo")
    assert get(client, "demo").status_code == 503
    assert get(client, "fresh").status_code == 200
    store.drop_tables()
    clock.advance(2)
    with caplog.at_level(logging.WARNING, logger="maintgate"):
        for _ in range(3):
            assert get(client, "demo").status_code == 503, "the state in memory: in maintenance"
            assert get(client, "fresh").status_code == 200
            assert get(client, "never-seen").status_code == 200, "not held in memory: not in maintenance"
            assert eventually(lambda: served[0].gate.mirror.failing)
            clock.advance(6)  # past the retry backoff: the next request tries again
        warnings = [r for r in caplog.records if r.name == "maintgate"]
    assert len(warnings) == 1, "store warnings are rate-limited"
    assert "cannot read the maintenance state" in warnings[0].getMessage()
    assert "run `maintgate init`" in warnings[0].getMessage(), "says what to do, not a cut-off SQL fragment"
    assert "SELECT" not in warnings[0].getMessage()
    store.create_tables()


def test_unreachable_database_lets_requests_through(kind, make_app, caplog):
    store = MaintenanceStore(
        "postgresql+psycopg://postgres@127.0.0.1:9/none",
        engine_options={"connect_args": {"connect_timeout": 1}},
    )
    _, client = make_app(kind, store)
    with client, caplog.at_level(logging.WARNING, logger="maintgate"):
        for tenant in ("demo", None, "demo"):
            assert get(client, tenant).status_code == 200
    assert any("cannot read the maintenance state" in r.getMessage() for r in caplog.records)


def test_a_failing_custom_resolver_means_no_tenant(kind, store, clock, make_app, caplog):
    def broken(request):
        raise RuntimeError("resolver bug")

    _, client = make_app(kind, store, tenant=broken)
    store.activate("demo")
    with client, caplog.at_level(logging.ERROR, logger="maintgate"):
        assert get(client, "demo").status_code == 200
        store.activate(ALL_TENANTS)
        clock.advance(2)
        assert get(client, "demo").status_code == 503
    assert any("resolver" in r.getMessage() for r in caplog.records)


def test_custom_resolver_sees_a_request_view(kind, store, make_app):
    seen = []

    def by_query(request):
        seen.append((request.method, request.path, request.header("x-tenant-id")))
        return request.header("x-tenant-id")

    _, client = make_app(kind, store, tenant=by_query)
    store.activate("demo")
    with client:
        assert get(client, "demo").status_code == 503
    assert seen == [("GET", "/", "demo")]


def test_lifespan_passes_through(store, make_app):
    apps.lifespan_events.clear()
    _, client = make_app("starlette", store)
    with client:
        assert apps.lifespan_events == ["startup"]
    assert apps.lifespan_events == ["startup", "shutdown"]


def test_websocket_refused_during_maintenance(store, clock, make_app):
    _, client = make_app("starlette", store)
    with client:
        with client.websocket_connect("/ws", headers={"X-Tenant-ID": "demo"}) as ws:
            assert ws.receive_text() == "hello"
        store.activate("demo", message="ws down")
        clock.advance(2)
        with (
            pytest.raises(WebSocketDenialResponse) as info,
            client.websocket_connect("/ws", headers={"X-Tenant-ID": "demo"}),
        ):
            pass
        assert info.value.status_code == 503
        assert info.value.json()["detail"] == "ws down"


WRONG_TYPES = {
    "tenant": "header:X-Tenant-ID",
    "cache_ttl": "2",
    "exempt_paths": 5,
    "allow_ips": 5,
    "trusted_proxies": [None],
    "forwarded_header": 5,
    "bypass_secret": 5,
    "bypass_cookie_max_age": "60",
    "bypass": "yes",
    "on_block": 1,
    "log_blocked_every": "100",
    "renderer": "fancy",
    "default_retry_after": "60",
    "clock": 5,
    "now": "today",
    "log_interval": "30",
    "notifications": "yes",
    "on_store_error": ["open"],
    "tenant_pattern": 5,
    "tenant_max_length": "128",
    "load_timeout": "5",
    "max_staleness": "30",
}


@pytest.mark.parametrize("option", sorted(WRONG_TYPES))
def test_a_wrong_type_for_any_option_raises_invalid_argument_naming_it(store, option):
    from typing import get_type_hints

    from maintgate import InvalidArgument
    from maintgate.core.gate import Gate, GateOptions

    assert set(WRONG_TYPES) == set(get_type_hints(GateOptions)), "every option has a wrong value here"
    for build in (
        lambda **kw: Gate(store, **kw),
        lambda **kw: MaintenanceMiddleware(ok_app, store, **kw),
        lambda **kw: WSGIMaintenanceMiddleware(lambda environ, start_response: [], store, **kw),
    ):
        with pytest.raises(InvalidArgument) as info:
            build(**{option: WRONG_TYPES[option]})
        assert info.value.option == option and option in str(info.value), info.value


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("load_timeout", float("inf")),
        ("max_staleness", float("inf")),
        ("cache_ttl", float("nan")),
        ("exempt_paths", [__import__("re").compile(b"/x")]),
        ("tenant_pattern", __import__("re").compile(b".*")),
        ("gate", 5),
    ],
)
def test_values_that_would_fail_at_request_time_are_refused_when_built(store, option, value):
    from maintgate import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        if option == "gate":
            MaintenanceMiddleware(ok_app, gate=value)
        else:
            MaintenanceMiddleware(ok_app, store, **{option: value})
    assert info.value.option == option, info.value


def test_notifications_asked_of_a_database_that_cannot_send_them_are_refused(tmp_path):
    from maintgate import InvalidArgument

    store = MaintenanceStore(f"sqlite:///{tmp_path / 'n.db'}")
    with pytest.raises(InvalidArgument, match="notifications need PostgreSQL") as refused:
        WSGIMaintenanceMiddleware(
            lambda e, s: [], store, tenant=from_header("X-Tenant-ID"), notifications=True
        )
    assert refused.value.option == "notifications"
    off = WSGIMaintenanceMiddleware(lambda e, s: [], store, tenant=from_header("X-Tenant-ID"))
    assert off.gate.notifications is False
    store.engine.dispose()
