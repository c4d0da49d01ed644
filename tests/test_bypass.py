"""Bypass rules: exempt paths, IP/CIDR behind trusted proxies, the signed secret cookie, a predicate."""

from __future__ import annotations

import logging
import re

import pytest

from maintgate import ALL_TENANTS, MaintenanceMiddleware
from maintgate.core.errors import InvalidArgument
from maintgate.tenants import from_header
from tests.conftest import ManualClock, asgi_call, ok_app

SECRET = "correct horse battery staple"


@pytest.fixture
def make(store, clock: ManualClock):
    gates = []

    def build(**options):
        store.activate(ALL_TENANTS, message="down")
        app = MaintenanceMiddleware(
            ok_app, store, tenant=from_header("X-Tenant-ID"), clock=clock, now=clock.wall, **options
        )
        gates.append(app)
        return app

    yield build
    for app in gates:
        app.gate.close()


def status(app, path="/", **kwargs) -> int:
    return asgi_call(app, path, **kwargs)[0]


def test_exempt_paths_exact_prefix_and_regex(make):
    app = make(exempt_paths=["/healthz", "/static/*", re.compile(r"/api/v\d+/status")])
    assert status(app, "/healthz") == 200
    assert status(app, "/healthz/x") == 503, "exact means exact"
    assert status(app, "/static/app.css") == 200
    assert status(app, "/api/v2/status") == 200
    assert status(app, "/api/v2/status/x") == 503, "a regex must match the whole path"
    assert status(app, "/") == 503


def test_ip_allowlist_matches_exactly(make):
    app = make(allow_ips=["10.0.0.1", "192.168.0.0/24", "2001:db8::/32"])
    assert status(app, client=("10.0.0.1", 1)) == 200
    assert status(app, client=("10.0.0.10", 1)) == 503, "10.0.0.1 must not match 10.0.0.10"
    assert status(app, client=("192.168.0.77", 1)) == 200
    assert status(app, client=("192.168.1.1", 1)) == 503
    assert status(app, client=("2001:db8::5", 1)) == 200
    assert status(app, client=None) == 503
    assert status(app, client=("not-an-ip", 1)) == 503


def test_forwarded_headers_count_only_from_trusted_proxies(make):
    app = make(allow_ips=["10.0.0.1"], trusted_proxies=["127.0.0.1", "172.16.0.0/12"])
    forged = {"X-Forwarded-For": "10.0.0.1"}
    assert status(app, headers=forged, client=("203.0.113.9", 1)) == 503, "untrusted peer: header ignored"
    assert status(app, headers=forged, client=("127.0.0.1", 1)) == 200
    chain = {"X-Forwarded-For": "10.0.0.1, 198.51.100.7, 172.16.0.3"}
    assert status(app, headers=chain, client=("127.0.0.1", 1)) == 503, "right-most untrusted is 198.51.100.7"
    spoof = {"X-Forwarded-For": "10.0.0.1, 198.51.100.7"}
    assert status(app, headers=spoof, client=("127.0.0.1", 1)) == 503
    good = {"X-Forwarded-For": "198.51.100.7, 10.0.0.1, 172.16.0.3"}
    assert status(app, headers=good, client=("127.0.0.1", 1)) == 200
    rfc7239 = {"Forwarded": 'for=198.51.100.7, for="10.0.0.1:4711";proto=https'}
    assert status(app, headers=rfc7239, client=("127.0.0.1", 1)) == 503, "only the configured header counts"
    garbage = {"X-Forwarded-For": "10.0.0.1, unknown"}
    assert status(app, headers=garbage, client=("127.0.0.1", 1)) == 503
    huge = {"X-Forwarded-For": "1.2.3.4, " * 5000 + "10.0.0.1"}
    assert status(app, headers=huge, client=("127.0.0.1", 1)) == 200, "the right end is what the proxy wrote"


def test_secret_header_query_and_signed_cookie(make, clock):
    app = make(bypass_secret=SECRET)
    assert status(app, headers={"X-Maintgate-Bypass": SECRET}) == 200
    assert status(app, headers={"X-Maintgate-Bypass": SECRET + "x"}) == 503
    code, headers, _ = asgi_call(app, "/reports", query=f"maintgate_bypass={SECRET}&page=2")
    assert code == 302 and headers["location"] == "?page=2"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Max-Age=43200" in cookie
    assert "Secure" not in cookie
    value = cookie.split(";")[0]
    assert status(app, headers={"Cookie": f"theme=dark; {value}"}) == 200
    https = asgi_call(app, "/", query=f"maintgate_bypass={SECRET}", scheme="https")[1]["set-cookie"]
    assert "; Secure" in https
    assert status(app, query="maintgate_bypass=wrong") == 503
    name, _, signed = value.partition("=")
    tenant, expires, signature = signed.split(":")
    forged = f"{name}={tenant}:{int(expires) + 10**6}:{signature}"
    assert status(app, headers={"Cookie": forged}) == 503, "a longer expiry breaks the signature"
    assert status(app, headers={"Cookie": f"{name}={tenant}:{expires}:AAAA"}) == 503
    clock.advance(12 * 3600 + 1)
    assert status(app, headers={"Cookie": value}) == 503, "expired"


def test_per_tenant_secrets(make):
    app = make(bypass_secret={"demo": "demo-secret-0123456789", "other": "other-secret-0123456789"})
    demo = {"X-Tenant-ID": "demo"}
    cookie = asgi_call(app, headers=demo, query="maintgate_bypass=demo-secret-0123456789")[1]["set-cookie"]
    value = cookie.split(";")[0]
    assert status(app, headers={**demo, "Cookie": value}) == 200
    assert status(app, headers={"X-Tenant-ID": "other", "Cookie": value}) == 503
    assert (
        status(app, headers={"X-Tenant-ID": "other", "X-Maintgate-Bypass": "demo-secret-0123456789"}) == 503
    )
    assert status(app, headers={"X-Maintgate-Bypass": "demo-secret-0123456789"}) == 503, (
        "no tenant: no secret"
    )


def test_predicate_and_hook(make, caplog):
    seen = []
    app = make(
        bypass=lambda request: request.header("x-staff") == "yes",
        on_block=lambda request, state: seen.append((request.path, state.message)),
        log_blocked_every=2,
    )
    assert status(app, headers={"X-Staff": "yes"}) == 200
    with caplog.at_level(logging.INFO, logger="maintgate"):
        for _ in range(5):
            assert status(app, "/x") == 503
    assert seen == [("/x", "down")] * 5
    blocked = [r for r in caplog.records if getattr(r, "maintgate_event", None) == "blocked"]
    assert [r.blocked_count for r in blocked] == [1, 2, 4], "the first, then one in every 2"


def test_failing_predicate_and_hook_never_500(make, caplog):
    def boom(*args):
        raise RuntimeError("hook bug")

    app = make(bypass=boom, on_block=boom)
    with caplog.at_level(logging.ERROR, logger="maintgate"):
        assert status(app) == 503
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 2


def test_bad_bypass_configuration_is_refused(store):
    for options, fragment in (
        ({"allow_ips": ["10.0.0.300"]}, "allow_ips"),
        ({"trusted_proxies": "proxy.local"}, "trusted_proxies"),
        ({"bypass_secret": "short"}, "16 characters"),
        ({"bypass_cookie_max_age": 0}, "cookie_max_age"),
        ({"bypass": "yes"}, "callable"),
        ({"on_block": 1}, "on_block"),
    ):
        with pytest.raises(InvalidArgument, match=fragment):
            MaintenanceMiddleware(ok_app, store, **options)


def test_state_changes_are_logged_with_structured_extra(store, caplog):
    with caplog.at_level(logging.INFO, logger="maintgate"):
        store.activate("demo", message="m")
        store.deactivate("demo")
    events = [(r.maintgate_event, r.tenant) for r in caplog.records if hasattr(r, "maintgate_event")]
    assert events == [("activated", "demo"), ("deactivated", "demo")]


def test_secrets_and_signatures_are_compared_in_constant_time(make, monkeypatch):
    """Every secret and cookie check goes through hmac.compare_digest, never ``==``."""
    import hmac as real_hmac

    from maintgate.core import bypass as bypass_module

    compared = []
    original = real_hmac.compare_digest

    def spy(a, b):
        compared.append((bytes(a), bytes(b)))
        return original(a, b)

    monkeypatch.setattr(bypass_module.hmac, "compare_digest", spy)
    app = make(bypass_secret=SECRET)
    assert status(app, headers={"X-Maintgate-Bypass": "wrong-secret-0000"}) == 503
    assert (b"wrong-secret-0000", SECRET.encode()) in compared
    compared.clear()
    assert status(app, headers={"Cookie": "maintgate_bypass=*:99999999999:forged"}) == 503
    assert compared and compared[0][0] == b"forged"
    compared.clear()
    assert status(app, query="maintgate_bypass=guess") == 503
    assert (b"guess", SECRET.encode()) in compared


def test_forwarded_header_mode_and_spoofing_tricks(make):
    app = make(allow_ips=["10.0.0.1"], trusted_proxies=["127.0.0.1"], forwarded_header="forwarded")
    proxy = ("127.0.0.1", 1)
    rfc7239 = {"Forwarded": 'for=198.51.100.7, for="10.0.0.1:4711";proto=https'}
    assert status(app, headers=rfc7239, client=proxy) == 200
    assert status(app, headers={"X-Forwarded-For": "10.0.0.1"}, client=proxy) == 503, (
        "XFF ignored in this mode"
    )
    xff = make(allow_ips=["10.0.0.1"], trusted_proxies=["127.0.0.1"])
    padded = {"X-Forwarded-For": "10.0.0.1" + " " * 2100 + ", 198.51.100.7"}
    assert status(xff, headers=padded, client=proxy) == 503, "padding cannot push the proxy's entry out"
    honest = {"X-Forwarded-For": "1.2.3.4" + " " * 2100 + ", 10.0.0.1"}
    assert status(xff, headers=honest, client=proxy) == 200
    scope_headers = [(b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-for", b"198.51.100.7")]
    assert asgi_call(xff, raw_headers=scope_headers, client=proxy)[0] == 503, (
        "a repeated header counts whole, as HAProxy adds one"
    )
    cookies = [(b"cookie", b"a=b"), (b"cookie", b"maintgate_bypass=\xc3\xa9:1:x")]
    assert asgi_call(make(bypass_secret=SECRET), raw_headers=cookies, client=proxy)[0] == 503, (
        "non-ASCII cookie: no 500"
    )
    many = "&".join(f"f{i}=1" for i in range(200)) + "&maintgate_bypass=x"
    assert status(make(bypass_secret=SECRET), query=many) == 503, "too many fields: no 500"


def test_the_bypass_redirect_stays_on_this_site(make):
    app = make(bypass_secret=SECRET)
    code, headers, _ = asgi_call(app, "//evil.example/x", query=f"maintgate_bypass={SECRET}&a=1")
    assert code == 302 and headers["location"] == "?a=1"
    code, headers, _ = asgi_call(app, "/reports", query=f"maintgate_bypass={SECRET}")
    assert headers["location"] == "?"


def test_ipv4_mapped_peers_of_a_dual_stack_server_match_ipv4_rules(make):
    """A dual-stack server reports IPv4 peers as ::ffff:a.b.c.d."""
    app = make(allow_ips=["10.0.0.0/8"], trusted_proxies=["127.0.0.1"])
    assert status(app, client=("::ffff:10.1.2.3", 1)) == 200
    assert status(app, client=("::ffff:203.0.113.9", 1)) == 503
    forwarded = {"X-Forwarded-For": "::ffff:10.9.9.9"}
    assert status(app, headers=forwarded, client=("::ffff:127.0.0.1", 1)) == 200, "a mapped trusted proxy"


def test_secrets_shorter_than_16_characters_are_refused_from_every_source(make, store, caplog):
    short = ({"demo": "x"}, {"demo": "long-enough-secret-0123", "*": "short"}, {"demo": 12345678901234567})
    for secret in short:
        with pytest.raises(InvalidArgument, match="16 characters"):
            MaintenanceMiddleware(ok_app, store, tenant=from_header("X-Tenant-ID"), bypass_secret=secret)

    app = make(bypass_secret=lambda tenant: "x" if tenant == "demo" else "long-enough-secret-0123")
    demo = {"X-Tenant-ID": "demo"}
    with caplog.at_level(logging.ERROR, logger="maintgate"):
        assert status(app, headers={**demo, "X-Maintgate-Bypass": "x"}) == 503
        assert status(app, headers=demo, query="maintgate_bypass=x") == 503
    refused = [r for r in caplog.records if "16 characters" in r.getMessage()]
    assert refused and "demo" in refused[0].getMessage(), "the short value is refused and logged"
    assert "'x'" not in refused[0].getMessage(), "the secret itself is not logged"
    other = {"X-Tenant-ID": "other", "X-Maintgate-Bypass": "long-enough-secret-0123"}
    assert status(app, headers=other) == 200, "a callable's long enough value still works"


def test_a_mapping_filled_after_the_gate_is_built_is_held_to_16_characters_too(make, caplog):
    secrets: dict[str, str] = {}
    app = make(bypass_secret=secrets)
    secrets["demo"] = "abc"
    with caplog.at_level(logging.ERROR, logger="maintgate"):
        assert status(app, headers={"X-Tenant-ID": "demo", "X-Maintgate-Bypass": "abc"}) == 503
    assert any("16 characters" in r.getMessage() for r in caplog.records)
    secrets["demo"] = "long-enough-secret-0123"
    assert (
        status(app, headers={"X-Tenant-ID": "demo", "X-Maintgate-Bypass": "long-enough-secret-0123"}) == 200
    )
