"""Tenant resolvers, over real ASGI scopes and WSGI environs."""

from __future__ import annotations

import pytest

from maintgate.asgi import ASGIRequest
from maintgate.tenants import from_header, from_path_prefix, from_subdomain
from maintgate.wsgi import WSGIRequest


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
