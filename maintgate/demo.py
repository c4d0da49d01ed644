"""``maintgate demo``: the seed incident, replayed against SQLite with a real server and real HTTP.

Tenant ``demo`` renames ``primary-email`` to ``main-email-contact``. This time the
switch-off commits with the rename, API clients get JSON while it runs, and a failing
migration rolls back, keeps maintenance on and says why.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, TextIO
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from sqlalchemy import text

from . import report
from .core.render import Renderer
from .core.store import MaintenanceStore
from .migration import maintenance_window
from .tenants import from_header
from .wsgi import WSGIMaintenanceMiddleware

CACHE_TTL = 0.2
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def contacts_app(store: MaintenanceStore) -> Callable[..., Iterable[bytes]]:
    """A tiny WSGI API: ``GET /contacts`` lists the tenant's contacts as JSON."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/contacts":
            start_response("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"error": "not found"}']
        with store.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM contacts ORDER BY id"))]
        body = json.dumps({"tenant": environ.get("HTTP_X_TENANT_ID"), "contacts": rows}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve(app: Callable[..., Iterable[bytes]]) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 with an OS-chosen port, in a thread; yields the base URL."""
    server = make_server("127.0.0.1", 0, app, server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, accept: str) -> tuple[int, Message, str]:
    """GET ``url`` as tenant demo; (status, headers, body) whatever the status."""
    request = urllib.request.Request(url, headers={"X-Tenant-ID": "demo", "Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read().decode()


class Timeline:
    """Prints numbered, timed steps."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.start = time.monotonic()

    def say(self, text_: str) -> None:
        print(f"[{time.monotonic() - self.start:5.2f}s] {text_}", file=self.out, flush=True)

    def detail(self, text_: str) -> None:
        print(f"         {text_}", file=self.out, flush=True)


def _show(timeline: Timeline, who: str, response: tuple[int, Message, str]) -> None:
    status, headers, body = response
    kind = headers.get("Content-Type", "").split(";")[0]
    extra = f", Retry-After: {headers['Retry-After']}" if headers.get("Retry-After") else ""
    timeline.detail(f"{who}: {status} {kind}{extra}")
    if kind == "application/problem+json":
        problem = json.loads(body)
        timeline.detail(f"  detail={problem.get('detail')!r} tenant={problem.get('tenant')!r}")
        if problem.get("error"):
            timeline.detail(f"  error={problem['error'].splitlines()[0]!r}")
    elif kind == "application/json":
        timeline.detail(f"  {body[:140]}")
    elif kind == "text/html":
        title = body.split("<title>")[1].split("</title>")[0] if "<title>" in body else ""
        timeline.detail(f"  <title>{title}</title> …")


def run_demo(out: TextIO) -> int:
    """Replay the seed story; returns 0 when every step behaved as promised."""
    timeline = Timeline(out)
    problems: list[str] = []

    def expect(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)
            timeline.detail(f"!! unexpected: {what}")

    with tempfile.TemporaryDirectory(prefix="maintgate-demo-") as tmp:
        db = Path(tmp) / "demo.db"
        store = MaintenanceStore(f"sqlite:///{db}")
        store.create_tables()
        with store.engine.begin() as conn:
            conn.execute(
                text('CREATE TABLE contacts (id INTEGER PRIMARY KEY, name TEXT, "primary-email" TEXT)')
            )
            conn.execute(
                text("INSERT INTO contacts VALUES (:id, :name, :email)"),
                [
                    {"id": 1, "name": "Ada", "email": "ada@example.com"},
                    {"id": 2, "name": "Grace", "email": "grace@example.com"},
                ],
            )
        gate = WSGIMaintenanceMiddleware(
            contacts_app(store),
            store,
            tenant=from_header("X-Tenant-ID"),
            cache_ttl=CACHE_TTL,
            renderer=Renderer(expose_error=True),
        )
        timeline.say(f"SQLite database {db}; cache TTL {CACHE_TTL}s")
        with serve(gate) as base:
            url = base + "/contacts"
            timeline.say(f"contacts API for tenant 'demo' served at {url}")
            response = fetch(url, "application/json")
            _show(timeline, "API client", response)
            expect(response[0] == 200 and "primary-email" in response[2], "tenant demo serves 200 at first")

            timeline.say("migration window opens: maintenance on, in its own committed transaction")
            with maintenance_window(store, "demo", message="Renaming primary-email", retry_after=30) as conn:
                time.sleep(CACHE_TTL + 0.05)
                api, page = fetch(url, "application/json"), fetch(url, BROWSER)
                _show(timeline, "API client", api)
                _show(timeline, "browser", page)
                expect(
                    api[0] == 503 and "problem+json" in api[1].get("Content-Type", ""), "API gets JSON 503"
                )
                expect(
                    page[0] == 503 and "text/html" in page[1].get("Content-Type", ""), "browser gets HTML 503"
                )
                timeline.say('ALTER TABLE contacts RENAME COLUMN "primary-email" TO "main-email-contact"')
                conn.execute(
                    text('ALTER TABLE contacts RENAME COLUMN "primary-email" TO "main-email-contact"')
                )
            timeline.say("window closed: the rename and the switch-off committed in one transaction")
            time.sleep(CACHE_TTL + 0.05)
            response = fetch(url, "application/json")
            _show(timeline, "API client", response)
            expect(
                response[0] == 200 and "main-email-contact" in response[2], "200 again, with the new column"
            )

            timeline.say("a second migration: rename again, then add a NOT NULL column, which fails")
            try:
                with maintenance_window(
                    store, "demo", message="Adding phone numbers", retry_after=60
                ) as conn:
                    conn.execute(text('ALTER TABLE contacts RENAME COLUMN "main-email-contact" TO "email"'))
                    conn.execute(text("ALTER TABLE contacts ADD COLUMN phone TEXT NOT NULL"))
            except Exception as exc:
                timeline.detail(
                    f"the migration raised {type(exc).__name__}; the window re-raised it unchanged"
                )
            else:
                expect(False, "the failing migration raised")
            with store.engine.connect() as c:
                cols = [r[1] for r in c.execute(text("PRAGMA table_info(contacts)"))]
            timeline.say(f"rolled back: contacts columns are {cols}")
            expect(
                "main-email-contact" in cols and "email" not in cols,
                "the rename rolled back with the failure",
            )
            time.sleep(CACHE_TTL + 0.05)
            response = fetch(url, "application/json")
            _show(timeline, "API client", response)
            expect(
                response[0] == 503 and "NOT NULL" in response[2], "maintenance stays on and the 503 says why"
            )
            state = store.get("demo")
            timeline.say("maintgate status demo")
            for line in report.status_lines(report.status(store, "demo")[0]):
                timeline.detail(line)
            expect(state is not None and state.active and bool(state.error), "status shows the error")

            timeline.say("maintgate off demo  (an operator ends it)")
            store.deactivate("demo")
            time.sleep(CACHE_TTL + 0.05)
            response = fetch(url, "application/json")
            _show(timeline, "API client", response)
            expect(response[0] == 200, "serving again after off")

            timeline.say("history of tenant demo:")
            for entry in store.history("demo"):
                detail = (
                    (entry.error or entry.message or "").splitlines()[0]
                    if (entry.error or entry.message)
                    else ""
                )
                timeline.detail(f"{entry.event:<17} {detail}"[:150])
        gate.gate.close()
        store.engine.dispose()
    if problems:
        timeline.say(f"FAILED: {len(problems)} step(s) did not behave: {'; '.join(problems)}")
        return 1
    timeline.say("done: every step behaved as promised")
    return 0
