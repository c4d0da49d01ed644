"""The gate while PostgreSQL goes away and comes back: connections killed, refused, black-holed.

The store reaches PostgreSQL through a TCP proxy the test controls, so the outage is real: the
driver sees reset connections, refused connections and connections that never answer.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx2 as httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from maintgate import MaintenanceMiddleware, MaintenanceStore
from maintgate.tenants import from_header
from tests import apps
from tests.conftest import POSTGRES_URL, asgi_call, ok_app, require_postgres
from tests.helpers import eventually
from tests.servers import uvicorn_server
from tests.tcp_proxy import TCPProxy

APP_NAME = "maintgate-outage-test"


@pytest.fixture
def proxied():
    """(direct store, store through the proxy, proxy) on one set of PostgreSQL tables."""
    require_postgres()
    url = make_url(POSTGRES_URL)
    proxy = TCPProxy((url.host or "127.0.0.1", url.port or 5432))
    prefix = f"mg{uuid.uuid4().hex[:10]}_"
    direct = MaintenanceStore(POSTGRES_URL, table_prefix=prefix)
    direct.create_tables()
    through = url.set(host="127.0.0.1", port=proxy.port, query={"application_name": APP_NAME})
    gated = MaintenanceStore(through.render_as_string(hide_password=False), table_prefix=prefix)
    yield direct, gated, proxy
    proxy.close()
    gated.engine.dispose()
    direct.drop_tables()
    direct.engine.dispose()


@pytest.mark.parametrize(
    ("policy", "known_on", "known_off", "unknown"),
    [("last_known", 503, 200, 200), ("open", 200, 200, 200), ("closed", 503, 503, 503)],
)
def test_outage_policies(proxied, policy, known_on, known_off, unknown):
    direct, gated, proxy = proxied
    direct.activate("on")
    app = MaintenanceMiddleware(
        ok_app,
        gated,
        tenant=from_header("X-Tenant-ID"),
        cache_ttl=0.2,
        max_staleness=1.0,
        on_store_error=policy,
        notifications=False,
    )
    assert asgi_call(app, headers={"X-Tenant-ID": "on"})[0] == 503
    assert asgi_call(app, headers={"X-Tenant-ID": "off"})[0] == 200
    proxy.cut("refuse")
    time.sleep(0.3)
    # Within max_staleness every policy answers from the state in memory, and nobody waits.
    for tenant, status in (("on", 503), ("off", 200), ("never-seen", 200)):
        started = time.monotonic()
        assert asgi_call(app, headers={"X-Tenant-ID": tenant})[0] == status
        assert time.monotonic() - started < 0.05
    assert eventually(lambda: app.gate.mirror.failing, 2)
    time.sleep(1.0)  # past max_staleness: the policy decides
    for _ in range(3):
        started = time.monotonic()
        assert asgi_call(app, headers={"X-Tenant-ID": "on"})[0] == known_on
        assert asgi_call(app, headers={"X-Tenant-ID": "off"})[0] == known_off
        assert asgi_call(app, headers={"X-Tenant-ID": "never-seen"})[0] == unknown
        assert time.monotonic() - started < 2.5
        time.sleep(0.25)
    app.gate.close()


def test_load_through_an_outage_and_back(proxied, capsys):
    direct, gated, proxy = proxied
    direct.activate("demo", message="Migrating")
    app = MaintenanceMiddleware(apps.starlette_app(), gated, tenant=from_header("X-Tenant-ID"), cache_ttl=1.0)
    expected = {"demo": 503, "t1": 200, "t2": 200, "t3": 200}
    stop = threading.Event()
    phase = {"name": "normal"}
    log: list[tuple[str, str, int, float]] = []
    lock = threading.Lock()

    def hammer(base: str, tenants: list[str]) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            i = 0
            while not stop.is_set():
                tenant = tenants[i % len(tenants)]
                i += 1
                started = time.perf_counter()
                try:
                    status = client.get("/", headers={"X-Tenant-ID": tenant}).status_code
                except httpx.HTTPError:
                    status = -1
                with lock:
                    log.append((phase["name"], tenant, status, time.perf_counter() - started))

    with uvicorn_server(app) as base:
        threads = [threading.Thread(target=hammer, args=(base, list(expected))) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        phase["name"] = "terminated"
        with direct.engine.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = :n"),
                {"n": APP_NAME},
            )
        time.sleep(1.0)
        phase["name"] = "refused"
        proxy.cut("refuse")
        time.sleep(2.0)
        phase["name"] = "blackholed"
        proxy.cut("blackhole")
        time.sleep(2.5)
        phase["name"] = "recovered"
        proxy.restore()
        direct.activate("t1", message="after the outage")
        restored = time.perf_counter()
        seen = None
        with httpx.Client(base_url=base, timeout=10) as probe:
            while time.perf_counter() - restored < 15:
                if probe.get("/", headers={"X-Tenant-ID": "t1"}).status_code == 503:
                    seen = time.perf_counter() - restored
                    break
                time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join(15)
    app.gate.close()

    outage = [entry for entry in log if entry[0] in ("terminated", "refused", "blackholed")]
    unexpected = [e for e in log if e[0] != "recovered" and e[2] != expected[e[1]]]
    errors = [
        e
        for e in log
        if e[2] == -1
        or (
            e[2] >= 500
            and not (e[2] == 503 and (expected[e[1]] == 503 or (e[0] == "recovered" and e[1] == "t1")))
        )
    ]
    worst = max(e[3] for e in outage)
    with capsys.disabled():
        print(
            f"\noutage figures: {len(log)} requests served, {len(outage)} during the outage, "
            f"{len(errors)} errors (5xx other than maintenance, or failed), worst latency during the "
            f"outage {worst * 1000:.0f} ms, state change seen {seen:.2f} s after recovery"
        )
    assert errors == []
    assert unexpected == [], unexpected[:5]
    assert worst < 2.5, "an outage must not add the database's timeout to every request"
    assert seen is not None and seen < 8.0


def test_a_server_that_stops_answering_mid_query_never_hangs_requests(proxied):
    direct, gated, proxy = proxied
    direct.activate("on")
    app = MaintenanceMiddleware(
        ok_app, gated, tenant=from_header("X-Tenant-ID"), cache_ttl=0.2, load_timeout=0.5, notifications=False
    )
    assert asgi_call(app, headers={"X-Tenant-ID": "on"})[0] == 503
    proxy.stall()  # open connections stay open; nothing comes back
    time.sleep(0.3)
    worst = 0.0
    finish = time.monotonic() + 2.0  # four times the load timeout: refreshes hang, requests don't
    while time.monotonic() < finish:
        for tenant, status in (("on", 503), ("other", 200)):
            started = time.monotonic()
            assert asgi_call(app, headers={"X-Tenant-ID": tenant})[0] == status, "the state in memory"
            worst = max(worst, time.monotonic() - started)
        time.sleep(0.01)
    assert worst < 0.05, f"a request waited {worst * 1000:.0f} ms on a stalled database"
    assert app.gate.mirror.failing, "a refresh that never answers counts as a failure"
    proxy.restore()
    direct.deactivate("on")
    assert eventually(lambda: asgi_call(app, headers={"X-Tenant-ID": "on"})[0] == 200, 10)
    # Eventually: on a loaded machine a refresh after the first good one may itself outlast
    # the 0.5 s load timeout, which rightly counts as failing until it answers.
    assert eventually(lambda: not app.gate.mirror.failing, 5)
    app.gate.close()


def test_the_wsgi_gate_does_not_hang_either(proxied):
    from maintgate import WSGIMaintenanceMiddleware
    from tests.conftest import wsgi_call

    _direct, gated, proxy = proxied
    app = WSGIMaintenanceMiddleware(
        lambda e, s: (s("200 OK", []), [b"ok"])[1],
        gated,
        tenant=from_header("X-Tenant-ID"),
        cache_ttl=0.2,
        load_timeout=0.5,
        notifications=False,
    )
    assert wsgi_call(app, "x") == 200
    proxy.stall()
    time.sleep(0.3)
    started = time.monotonic()
    assert wsgi_call(app, "x") == 200
    assert time.monotonic() - started < 1.5
    app.gate.close()
