"""Hostile input, fuzzed with hypothesis: Accept, Host and other headers, non-UTF-8 bytes, huge values.

The gate never raises, never answers 500, never echoes unescaped input into HTML, and the
Accept parser always picks one of the types it serves.
"""

from __future__ import annotations

import html
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maintgate import ALL_TENANTS, MaintenanceMiddleware, MaintenanceStore, WSGIMaintenanceMiddleware
from maintgate.asgi import ASGIRequest
from maintgate.core.negotiation import HTML, PROBLEM_JSON, TEXT, negotiate
from maintgate.tenants import from_header, from_path_prefix, from_subdomain
from tests.conftest import asgi_call

SERVED = {PROBLEM_JSON, HTML, TEXT}
header_bytes = st.binary(max_size=300) | st.builds(
    lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 3000)
)
media = st.sampled_from(
    ["text/html", "application/json", "*/*", "text/*", "application/*", "text/plain", "image/png"]
)
params = st.lists(
    st.sampled_from(["q=0", "q=1", "q=0.5", "q=.7", "q=abc", "q=", "level=1", "q=1e9", "q=-1", "q=nan"]),
    max_size=3,
)
accept_values = st.lists(st.builds(lambda m, p: ";".join([m, *p]), media, params), max_size=8).map(
    ", ".join
) | st.text(max_size=500)


@given(accept_values)
def test_negotiate_never_raises_and_serves_a_known_type(accept):
    assert negotiate(accept) in SERVED


@given(st.binary(max_size=2000))
def test_negotiate_survives_any_latin1_bytes(raw):
    assert negotiate(raw.decode("latin-1")) in SERVED


hosts = st.one_of(
    st.text(max_size=100),
    st.builds(lambda name, port: f"{name}.example.com:{port}", st.text(max_size=30), st.integers(-5, 70000)),
    st.sampled_from(["[::1]:8000", "[2001:db8::1]", "xn--bcher-kva.example.com", "bücher.example.com",
                     "DEMO.EXAMPLE.COM.", "..example.com", "example.com:", ":8080", "a" * 5000]),
)  # fmt: skip


@given(hosts)
def test_resolvers_return_a_string_or_none_for_any_host(host):
    raw = host.encode("utf-8", "surrogatepass")
    scope = {"type": "http", "path": "/t/" + host, "headers": [(b"host", raw), (b"x-tenant-id", raw)]}
    request = ASGIRequest(scope)
    for resolver in (from_subdomain("example.com"), from_header("X-Tenant-ID"), from_path_prefix("/t")):
        value = resolver(request)
        assert value is None or isinstance(value, str)
    label = from_subdomain("example.com")(request)
    assert label is None or ("." not in label and ":" not in label)


@pytest.fixture(scope="module")
def blocked_store(tmp_path_factory):
    store = MaintenanceStore(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    store.create_tables()
    store.activate(ALL_TENANTS, message="Fuzzing <everything> & more")
    yield store
    store.engine.dispose()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tenant=header_bytes, accept=header_bytes, host=header_bytes, path=st.text(max_size=200))
def test_the_gate_answers_any_bytes_with_a_sane_503_and_no_unescaped_echo(
    blocked_store, tenant, accept, host, path
):
    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = MaintenanceMiddleware(ok, blocked_store, tenant=from_header("X-Tenant-ID"), bypass_secret="s" * 16)
    headers = [(b"x-tenant-id", tenant), (b"accept", accept), (b"host", host), (b"cookie", tenant)]
    status, response_headers, body = asgi_call(app, "/" + path, raw_headers=headers, client=None)
    assert status == 503
    kind = response_headers["content-type"]
    if kind.startswith("application/problem+json"):
        assert json.loads(body)["status"] == 503
    if kind.startswith("text/html"):
        page = body.decode("utf-8")
        for value in (tenant, host, accept):
            text = value.decode("latin-1")
            if len(text) > 3 and html.escape(text) != text:
                assert text not in page, "raw input echoed into HTML"
    app.gate.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tenant=st.binary(max_size=400), accept=st.binary(max_size=400))
def test_the_wsgi_gate_answers_any_latin1_header(blocked_store, tenant, accept):
    import io

    app = WSGIMaintenanceMiddleware(lambda e, s: [b""], blocked_store, tenant=from_header("X-Tenant-ID"))
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "wsgi.input": io.BytesIO(),
        "HTTP_X_TENANT_ID": tenant.decode("latin-1"),
        "HTTP_ACCEPT": accept.decode("latin-1"),
    }
    seen = []
    body = b"".join(app(environ, lambda status, headers, exc=None: seen.append(status)))
    assert seen == ["503 Service Unavailable"] and body
    app.gate.close()
