"""Tenant resolvers, over real ASGI scopes and WSGI environs."""

from __future__ import annotations

import pytest

from maintgate import ALL_TENANTS, MaintenanceMiddleware, Renderer, WSGIMaintenanceMiddleware
from maintgate.asgi import ASGIRequest
from maintgate.tenants import from_header, from_path_prefix, from_subdomain
from maintgate.wsgi import WSGIRequest
from tests.conftest import asgi_call, ok_app, ok_wsgi


def asgi(path="/", headers=()):
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [(k.encode(), v.encode("latin-1")) for k, v in headers],
    }
    return ASGIRequest(scope)


def wsgi(path="/", headers=()):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
    for k, v in headers:
        environ["HTTP_" + k.upper().replace("-", "_")] = v
    return WSGIRequest(environ)


@pytest.mark.parametrize("make", [asgi, wsgi])
def test_from_header(make):
    resolver = from_header("X-Tenant-ID")
    assert resolver(make(headers=[("x-tenant-id", "demo")])) == "demo"
    assert resolver(make(headers=[("x-other", "demo")])) is None
    assert resolver(make(headers=[("x-tenant-id", "")])) is None


@pytest.mark.parametrize("make", [asgi, wsgi])
@pytest.mark.parametrize(
    ("host", "tenant"),
    [
        ("demo.example.com", "demo"),
        ("DEMO.Example.COM", "demo"),
        ("demo.example.com:8443", "demo"),
        ("demo.example.com.", "demo"),
        ("example.com", None),
        ("www.example.com", None),
        ("a.b.example.com", None),
        ("demo.example.org", None),
        ("evilexample.com", None),
        ("[::1]:8000", None),
        ("127.0.0.1:8000", None),
        ("", None),
    ],
)
def test_from_subdomain(make, host, tenant):
    assert from_subdomain("example.com")(make(headers=[("host", host)])) == tenant


@pytest.mark.parametrize("make", [asgi, wsgi])
@pytest.mark.parametrize(
    ("path", "tenant"),
    [
        ("/t/demo/api/x", "demo"),
        ("/t/demo", "demo"),
        ("/t/", None),
        ("/t", None),
        ("/tx/demo", None),
        ("/api", None),
    ],
)
def test_from_path_prefix(make, path, tenant):
    assert from_path_prefix("/t/")(make(path=path)) == tenant
    assert from_path_prefix("/t")(make(path=path)) == tenant


def test_bad_resolver_configuration_is_refused():
    with pytest.raises(ValueError, match="header name"):
        from_header("")
    with pytest.raises(ValueError, match="base domain"):
        from_subdomain(".")
    with pytest.raises(ValueError, match="starting with '/'"):
        from_path_prefix("t")


def test_asgi_paths_are_read_relative_to_the_mount_point(store):
    """A Starlette Mount (or uvicorn --root-path) puts the mount point in root_path and path."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route
    from starlette.testclient import TestClient

    from maintgate import MaintenanceMiddleware

    async def hello(request):
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/healthz", hello), Route("/t/{tenant}/x", hello)])
    store.activate("demo")
    by_header = MaintenanceMiddleware(
        inner, store, tenant=from_header("X-Tenant-ID"), exempt_paths=["/healthz"], notifications=False
    )
    by_path = MaintenanceMiddleware(inner, store, tenant=from_path_prefix("/t"), notifications=False)
    outer = Starlette(routes=[Mount("/api", app=by_header), Mount("/v2", app=by_path)])
    with TestClient(outer) as client:
        demo = {"X-Tenant-ID": "demo"}
        assert client.get("/api/healthz", headers=demo).status_code == 200, "exempt, as under WSGI"
        assert client.get("/api/t/x/x", headers=demo).status_code == 503
        assert client.get("/v2/t/demo/x").status_code == 503, "the tenant after the mount point"
        assert client.get("/v2/t/other/x").status_code == 200
    by_header.gate.close()
    by_path.gate.close()


def _wsgi_status(app, environ: dict) -> int:
    import io

    base = {
        "REQUEST_METHOD": "GET",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "SERVER_PORT": "80",
    }
    status = []
    b"".join(app({**base, **environ}, lambda s, h, e=None: status.append(int(s[:3]))))
    return status[0]


RESOLVERS = {
    "header": from_header("X-Tenant-ID"),
    "subdomain": from_subdomain("example.com"),
    "path": from_path_prefix("/t"),
}
# (resolver, ASGI scope parts, WSGI environ, expected status with tenant "a" in maintenance)
REQUESTS = [
    (
        "header",
        {"raw_headers": [(b"x-tenant-id", b"a"), (b"x-tenant-id", b"b")]},
        {"HTTP_X_TENANT_ID": "a, b"},
        503,
    ),
    (
        "header",
        {"raw_headers": [(b"x-tenant-id", b"b"), (b"x-tenant-id", b"a")]},
        {"HTTP_X_TENANT_ID": "b,a"},
        200,
    ),
    ("header", {"raw_headers": [(b"x-tenant-id", b" a ")]}, {"HTTP_X_TENANT_ID": " a "}, 503),
    ("header", {"raw_headers": [(b"x-tenant-id", b"")]}, {"HTTP_X_TENANT_ID": ""}, 200),
    (
        "subdomain",
        {"raw_headers": [(b"host", b"a.example.com:8000")]},
        {"HTTP_HOST": "a.example.com:8000"},
        503,
    ),
    (
        "subdomain",
        {"raw_headers": [], "scope": {"server": ("a.example.com", 80)}},
        {"SERVER_NAME": "a.example.com"},
        503,
    ),
    (
        "subdomain",
        {"raw_headers": [(b"host", b"b.example.com")]},
        {"HTTP_HOST": "b.example.com", "SERVER_NAME": "a.example.com"},
        200,
    ),
    (
        "path",
        {"path": "/api/t/a/x", "scope": {"root_path": "/api"}},
        {"SCRIPT_NAME": "/api", "PATH_INFO": "/t/a/x"},
        503,
    ),
    ("path", {"path": "/t/b/x"}, {"PATH_INFO": "/t/b/x"}, 200),
    ("path", {"path": "/t/a"}, {"PATH_INFO": "/t/a"}, 503),
]


@pytest.mark.parametrize(("kind", "asgi", "environ", "expected"), REQUESTS)
def test_the_fast_path_and_the_request_view_read_a_tenant_the_same_way(store, kind, asgi, environ, expected):
    """Each built-in resolver is one definition: the adapters' fast path and a view-based call agree."""
    store.activate("a")
    resolver = RESOLVERS[kind]
    through_view = lambda request: resolver(request)  # noqa: E731 - not a built-in: the adapter builds a view
    for tenant in (resolver, through_view):
        gated = MaintenanceMiddleware(ok_app, store, tenant=tenant, notifications=False)
        asgi_app = gated
        scope = dict(asgi)
        path, extra = scope.pop("path", "/"), scope.pop("scope", None)
        if extra is not None:
            asgi_app = _with_scope(asgi_app, extra)
        assert asgi_call(asgi_app, path, **scope)[0] == expected, (tenant, "asgi")
        wsgi_app = WSGIMaintenanceMiddleware(ok_wsgi, store, tenant=tenant, notifications=False)
        assert _wsgi_status(wsgi_app, {"PATH_INFO": "/", "SERVER_NAME": "t", **environ}) == expected, (
            tenant,
            "wsgi",
        )
        gated.gate.close()
        wsgi_app.gate.close()


def _with_scope(app, extra: dict):
    """What a server or a Mount puts in the scope: ``root_path``, ``server``."""

    async def mounted(scope, receive, send):
        await app({**scope, **extra}, receive, send)

    return mounted


def test_resolvers_tried_in_order(store):
    """Issue 11, point 7: an API client sends a header, a browser cannot: try one, then the other."""
    from maintgate.tenants import first_of

    store.activate("acme")
    resolver = first_of(from_header("X-Tenant-ID"), from_subdomain("example.com"))
    assert "from_header" in repr(resolver) and "from_subdomain" in repr(resolver)
    asgi_app = MaintenanceMiddleware(ok_app, store, tenant=resolver, notifications=False)
    wsgi_app = WSGIMaintenanceMiddleware(ok_wsgi, store, tenant=resolver, notifications=False)
    cases = [
        ({"X-Tenant-ID": "acme"}, {"HTTP_X_TENANT_ID": "acme"}, 503),  # the header
        ({"Host": "acme.example.com"}, {"HTTP_HOST": "acme.example.com"}, 503),  # no header: the host
        (
            {"X-Tenant-ID": "other", "Host": "acme.example.com"},
            {"HTTP_X_TENANT_ID": "other", "HTTP_HOST": "acme.example.com"},
            200,
        ),
        ({"Host": "www.example.com"}, {"HTTP_HOST": "www.example.com"}, 200),
    ]
    for headers, environ, expected in cases:
        assert asgi_call(asgi_app, headers=headers)[0] == expected, headers
        assert _wsgi_status(wsgi_app, {"PATH_INFO": "/", "SERVER_NAME": "t", **environ}) == expected, environ
    asgi_app.gate.close()
    wsgi_app.gate.close()


def test_the_tenant_id_rule_is_stated_without_python_names():
    from maintgate import InvalidTenant, MaintenanceStore

    store = MaintenanceStore("sqlite://")
    with pytest.raises(InvalidTenant) as info:
        store.activate("no spaces")
    message = str(info.value)
    assert "ALL_TENANTS" not in message and "'*'" in message and "1-128" in message


def test_misbehaving_custom_code_never_makes_the_gate_answer_500(store):
    store.activate(ALL_TENANTS, message="down")

    def broken_problem(state, tenant, retry_after):
        raise RuntimeError("template bug")

    app = MaintenanceMiddleware(ok_app, store, tenant=lambda request: ["not", "a", "str"])
    assert asgi_call(app)[0] == 503
    app.gate.close()
    app = MaintenanceMiddleware(ok_app, store, renderer=Renderer(problem=broken_problem))
    status, _headers, body = asgi_call(app)
    assert status == 503 and b'"detail": "down"' in body
    app.gate.close()
