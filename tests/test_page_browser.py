"""The maintenance page in real headless Chromium: text, escaping, dark mode, translation, refresh."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from maintgate import MaintenanceMiddleware, MaintenanceStore, Renderer
from maintgate.tenants import from_path_prefix
from tests.servers import uvicorn_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM is None:
        message = (
            "Chromium is not installed: `apt-get install chromium` to run the browser tests "
            "(.ci/run installs it and sets MAINTGATE_REQUIRE_BROWSER=1)."
        )
        if os.environ.get("MAINTGATE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def browse(chromium: str, tmp_path: Path, url: str, *extra: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    done = subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def first_pixel(png: Path) -> tuple[int, int, int]:
    """The top-left pixel of a PNG: whatever the row filter, it is stored as is."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompressobj().decompress(idat, 16)
    return raw[1], raw[2], raw[3]


class CountingApp:
    """An app behind the gate that counts page loads and can end maintenance after the first."""

    def __init__(
        self, store: MaintenanceStore, renderer: Renderer | None = None, end_after_first: bool = False
    ):
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]}
            )
            await send(
                {"type": "http.response.body", "body": b"<!doctype html><title>App</title><p>the app</p>"}
            )

        options = {"renderer": renderer} if renderer else {}
        self.gate_app = MaintenanceMiddleware(app, store, tenant=from_path_prefix("/t"), **options)
        self.store = store
        self.hits: list[str] = []
        self.end_after_first = end_after_first

    async def __call__(self, scope, receive, send):
        page = scope["type"] == "http" and scope["path"].startswith("/t/")
        if page:
            self.hits.append(scope["path"])
        await self.gate_app(scope, receive, send)
        if self.end_after_first and page and len(self.hits) == 1:
            self.store.deactivate("demo")
            self.gate_app.gate.refresh()


@pytest.fixture
def sqlite_store(tmp_path) -> MaintenanceStore:
    store = MaintenanceStore(f"sqlite:///{tmp_path / 'page.db'}")
    store.create_tables()
    yield store
    store.engine.dispose()


def test_page_renders_escaped_text_and_a_screenshot_in_dark_mode_on_mobile(chromium, sqlite_store, tmp_path):
    sqlite_store.activate("demo", message='Renaming <primary-email> & "friends"', retry_after=600)
    app = CountingApp(sqlite_store)
    with uvicorn_server(app) as base:
        dom = browse(chromium, tmp_path, f"{base}/t/demo/", "--dump-dom")
        shot = tmp_path / "maintenance-dark-mobile.png"
        browse(
            chromium,
            tmp_path,
            f"{base}/t/demo/",
            "--window-size=390,844",
            "--force-dark-mode",
            f"--screenshot={shot}",
        )
        light = tmp_path / "maintenance-light.png"
        browse(chromium, tmp_path, f"{base}/t/demo/", "--window-size=1024,768", f"--screenshot={light}")
    assert '<html lang="en">' in dom
    assert "<title>Down for maintenance</title>" in dom
    assert 'Renaming &lt;primary-email&gt; &amp; "friends"' in dom
    assert "Tenant: demo" in dom and "This page reloads in 600 seconds." in dom
    assert '<meta http-equiv="refresh" content="600">' in dom
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in dom
    assert "http://" not in dom.split("</head>")[0] and "https://" not in dom, "no external assets"
    assert shot.stat().st_size > 1000 and light.stat().st_size > 1000
    assert sum(first_pixel(shot)) < 120, "dark background in dark mode"
    assert sum(first_pixel(light)) > 700, "light background otherwise"
    app.gate_app.gate.close()


def test_page_text_can_be_translated(chromium, sqlite_store, tmp_path):
    sqlite_store.activate("demo", retry_after=30)
    renderer = Renderer(
        lang="de",
        title="Wartungsarbeiten",
        default_message="Wir sind gleich zurück.",
        tenant_text="Mandant: {tenant}",
        retry_text="Diese Seite lädt sich in {seconds} Sekunden neu.",
    )
    app = CountingApp(sqlite_store, renderer)
    with uvicorn_server(app) as base:
        dom = browse(chromium, tmp_path, f"{base}/t/demo/", "--dump-dom")
    assert '<html lang="de">' in dom and "<title>Wartungsarbeiten</title>" in dom
    assert "Wir sind gleich zurück." in dom and "Mandant: demo" in dom
    assert "Diese Seite lädt sich in 30 Sekunden neu." in dom
    app.gate_app.gate.close()


def test_page_refreshes_itself_after_retry_after(chromium, sqlite_store, tmp_path):
    sqlite_store.activate("demo", retry_after=2)
    app = CountingApp(sqlite_store, end_after_first=True)
    with uvicorn_server(app) as base:
        dom = browse(chromium, tmp_path, f"{base}/t/demo/", "--virtual-time-budget=10000", "--dump-dom")
    assert app.hits == ["/t/demo/", "/t/demo/"], "the page asked again after Retry-After"
    assert "the app" in dom, "and showed the app once maintenance was over"
    app.gate_app.gate.close()
