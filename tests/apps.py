"""Real apps under test: Starlette (ASGI), Flask (WSGI) and Django (WSGI), each with the same routes.

Routes: ``/`` answers JSON 200, ``/healthz`` answers "ok", ``/ws`` (Starlette) is a
websocket that greets and closes.
"""

from __future__ import annotations

from typing import Any

lifespan_events: list[str] = []


def starlette_app() -> Any:
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route, WebSocketRoute

    async def home(request):
        return JSONResponse({"ok": True, "tenant": request.headers.get("x-tenant-id")})

    async def healthz(request):
        return PlainTextResponse("ok")

    async def ws(websocket):
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    @asynccontextmanager
    async def lifespan(app):
        lifespan_events.append("startup")
        yield
        lifespan_events.append("shutdown")

    return Starlette(
        routes=[
            Route("/", home, methods=["GET", "HEAD", "POST"]),
            Route("/healthz", healthz),
            WebSocketRoute("/ws", ws),
        ],
        lifespan=lifespan,
    )


def flask_app() -> Any:
    from flask import Flask, jsonify, request

    app = Flask("maintgate_test_flask")

    @app.route("/", methods=["GET", "HEAD", "POST"])
    def home():
        return jsonify(ok=True, tenant=request.headers.get("X-Tenant-ID"))

    @app.route("/healthz")
    def healthz():
        return "ok"

    return app.wsgi_app


def _django_home(request):
    from django.http import JsonResponse

    return JsonResponse({"ok": True, "tenant": request.headers.get("X-Tenant-ID")})


def _django_healthz(request):
    from django.http import HttpResponse

    return HttpResponse("ok")


def _urlpatterns() -> list:
    from django.urls import path

    return [path("", _django_home), path("healthz", _django_healthz)]


urlpatterns: list = []


def django_app() -> Any:
    from tests.django_setup import setup

    setup()
    urlpatterns[:] = _urlpatterns()
    from django.core.wsgi import get_wsgi_application

    return get_wsgi_application()
