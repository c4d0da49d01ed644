"""Fixtures shared by the suite: real databases (a SQLite file and PostgreSQL), stores, clocks."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, event, text

from maintgate import MaintenanceStore
from tests.fleet import Fleet

POSTGRES_URL = os.environ.get(
    "MAINTGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("MAINTGATE_REQUIRE_POSTGRES") == "1"
MYSQL_URL = os.environ.get("MAINTGATE_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REQUIRE_MYSQL = os.environ.get("MAINTGATE_REQUIRE_MYSQL") == "1"
_pg_checked: list[str | None] = []
_mysql_checked: list[str | None] = []


def _unreachable(url: str, memo: list[str | None]) -> str | None:
    if not memo:
        try:
            engine = create_engine(url, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("select 1"))
            engine.dispose()
            memo.append(None)
        except Exception as exc:
            memo.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    return memo[0]


def require_mysql() -> None:
    """Skip (or, with MAINTGATE_REQUIRE_MYSQL=1 as in CI, fail) when MariaDB/MySQL is down."""
    why = _unreachable(MYSQL_URL, _mysql_checked)
    if why is None:
        return
    message = (
        f"MariaDB/MySQL not reachable at {MYSQL_URL} ({why}). Start it, or point "
        "MAINTGATE_TEST_MYSQL_URL at a server; CI sets MAINTGATE_REQUIRE_MYSQL=1 to fail instead."
    )
    if REQUIRE_MYSQL:
        pytest.fail(message)
    pytest.skip(message)


def postgres_unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when the server answers."""
    return _unreachable(POSTGRES_URL, _pg_checked)


def require_postgres() -> None:
    """Skip (or, with MAINTGATE_REQUIRE_POSTGRES=1 as in CI, fail) when PostgreSQL is down."""
    why = postgres_unavailable()
    if why is None:
        return
    message = (
        f"PostgreSQL not reachable at {POSTGRES_URL} ({why}). Start it, or point "
        "MAINTGATE_TEST_POSTGRES_URL at a server; CI sets MAINTGATE_REQUIRE_POSTGRES=1 to fail instead."
    )
    if REQUIRE_POSTGRES:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _no_listener_outlives_its_test() -> Iterator[None]:
    yield
    from maintgate.notify import stop_thread_listeners

    stop_thread_listeners(timeout=0)  # daemon threads: they notice within half a second


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A database URL: a fresh SQLite file, or the shared PostgreSQL test database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'maintgate.db'}"
    require_postgres()
    return POSTGRES_URL


@pytest.fixture
def store(database_url: str) -> Iterator[MaintenanceStore]:
    """A store with freshly created tables under a unique prefix (so tests never collide)."""
    store = MaintenanceStore(database_url, table_prefix=f"mg{uuid.uuid4().hex[:10]}_")
    store.create_tables()
    yield store
    store.drop_tables()
    store.engine.dispose()


class QueryCounter:
    """Counts the SELECTs a real engine sends (to prove what the cache saves).

    Transaction control (the BEGIN that SQLite needs for transactional DDL) is not a query.
    """

    def __init__(self, engine, only_lookups: bool = False) -> None:
        self.only_lookups = only_lookups
        self.count = 0
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement: str, *args) -> None:
        if statement.lstrip()[:6].upper() == "SELECT" and (not self.only_lookups or "UNION ALL" in statement):
            with self._lock:
                self.count += 1


@pytest.fixture
def queries(store: MaintenanceStore) -> QueryCounter:
    return QueryCounter(store.engine)


class ManualClock:
    """A monotonic clock, and a wall clock moving with it, that the test moves by hand: no sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._start = start
        self.wall_start = datetime.now(UTC)

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return self.wall_start + timedelta(seconds=self.now - self._start)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def asgi_call(
    app,
    path: str = "/",
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    client: tuple[str, int] | None = ("203.0.113.9", 40000),
    query: str = "",
    scheme: str = "http",
    raw_headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """Call an ASGI app once with a hand-built scope; (status, headers, body).

    ``raw_headers`` sends header lines as bytes, repeated or not UTF-8, instead of ``headers``.
    """
    import asyncio

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "scheme": scheme,
        "query_string": query.encode("latin-1"),
        "headers": raw_headers
        if raw_headers is not None
        else [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
        "client": client,
    }
    sent: list[dict] = []
    received = []

    async def receive():
        if not received:
            received.append(True)
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # like a server: nothing more until the client goes away

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode("latin-1") for k, v in start["headers"]}, body


def ok_wsgi(environ, start_response):
    """A WSGI app that answers 200 "ok"."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


async def ok_app(scope, receive, send):
    """The smallest ASGI app: 200 "ok"."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_call(app, tenant: str) -> int:
    """Call a WSGI app once as tenant ``tenant``; the status code."""
    import io

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "SERVER_NAME": "t",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "HTTP_X_TENANT_ID": tenant,
    }
    status = []
    b"".join(app(environ, lambda s, h, e=None: status.append(int(s[:3]))))
    return status[0]


@pytest.fixture
def fleet(store: MaintenanceStore) -> Iterator[Callable[[int], Fleet]]:
    """Fleets of per-tenant tables for rollouts (``fleet(count)``), dropped after the test."""
    made: list[Fleet] = []

    def build(count: int) -> Fleet:
        made.append(Fleet(store, count))
        return made[-1]

    yield build
    for f in made:
        f.drop()


@pytest.fixture
def contacts(store: MaintenanceStore) -> Iterator[str]:
    """A tenant table with the seed incident's column, named uniquely for this test."""
    from sqlalchemy import text as sql

    name = f"contacts_{uuid.uuid4().hex[:8]}"
    with store.engine.begin() as conn:
        conn.execute(sql(f'CREATE TABLE {name} (id INTEGER PRIMARY KEY, "primary-email" VARCHAR(200))'))
    yield name
    with store.engine.begin() as conn:
        conn.execute(sql(f"DROP TABLE IF EXISTS {name}"))
