"""Regressions for defects found in review: each test fails on the code before its fix."""

from __future__ import annotations

import asyncio
import logging

import pytest
from sqlalchemy import create_engine, text

from maintgate import (
    ALL_TENANTS,
    InvalidArgument,
    MaintenanceMiddleware,
    MaintenanceStore,
    Renderer,
    WindowBusy,
    async_maintenance_window,
    maintenance_window,
    owner_alive,
)
from maintgate.migration import advisory_key
from tests.conftest import asgi_call, ok_app
from tests.helpers import Boom, columns, eventually, rename


def lock_is_free(store: MaintenanceStore, tenant: str = "demo") -> bool:
    if store.engine.dialect.name != "postgresql":
        return True
    other = create_engine(store.engine.url)
    try:
        with other.connect() as conn:
            key = advisory_key(store, tenant)
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            return bool(got)
    finally:
        other.dispose()


def test_a_successful_retry_after_a_failed_window_switches_maintenance_off(store, contacts):
    with pytest.raises(Boom), maintenance_window(store, "demo"):
        raise Boom("first try")
    with maintenance_window(store, "demo") as conn:
        rename(conn, contacts)
    state = store.get("demo")
    assert not state.active and state.error is None and state.owner is None
    assert columns(store, contacts) == {"id", "main-email-contact"}


def test_an_operators_maintenance_is_left_as_the_operator_set_it(store):
    store.activate("demo", message="operator's", retry_after=900, mode="read_only")
    with maintenance_window(store, "demo", message="window's", retry_after=30):
        during = store.get("demo")
        assert during.message == "operator's" and during.mode == "full", "the window needs full, no more"
    state = store.get("demo")
    assert state.active and state.message == "operator's" and state.retry_after == 900 and state.read_only


def test_an_operator_switching_on_during_a_window_is_respected(store):
    with maintenance_window(store, "demo", message="window"):
        store.activate("demo", message="keep it on")
        assert store.get("demo").owner is not None, "the window still owns it"
        with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
            pass
    state = store.get("demo")
    assert state.active and state.message == "keep it on" and state.owner is None


def test_an_operator_switching_off_during_a_window_keeps_the_window_exclusive(store):
    with maintenance_window(store, "demo"):
        store.deactivate("demo")
        with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
            pass
    assert not store.get("demo").active and store.get("demo").owner is None


def test_async_window_cancelled_in_the_block_records_and_releases(store, contacts):
    async def main():
        entered = asyncio.Event()

        async def migrate():
            async with async_maintenance_window(store, "demo") as conn:
                await conn.execute(text(f'ALTER TABLE {contacts} RENAME COLUMN "primary-email" TO "x"'))
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(migrate())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    state = store.get("demo")
    assert state.active and "CancelledError" in state.error and state.owner is None
    assert columns(store, contacts) == {"id", "primary-email"}
    assert lock_is_free(store)


@pytest.mark.parametrize("delay", [0, 0.001, 0.005, 0.02, 0.05, 0.1])
def test_async_window_cancelled_while_opening_leaves_no_lock_and_no_silent_state(store, delay):
    async def main():
        async def migrate():
            async with async_maintenance_window(store, "demo"):
                await asyncio.sleep(30)

        task = asyncio.create_task(migrate())
        await asyncio.sleep(delay)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert lock_is_free(store)
    state = store.get("demo")
    if state is not None:  # it opened: then the cancellation is on record
        assert state.active and state.owner is None and "CancelledError" in (state.error or "")


def test_django_window_marked_for_rollback_is_recorded(store):
    from tests.django_setup import setup

    setup()
    from django.db import transaction
    from django.test import override_settings

    from maintgate.django import get_store
    from maintgate.django import maintenance_window as django_window

    alias = "pg" if store.engine.dialect.name != "sqlite" else "default"
    prefix = store.tables.state.name.removesuffix("state")
    with override_settings(MAINTGATE={"DATABASE": alias, "TABLE_PREFIX": prefix}):
        django_store = get_store(alias)  # the store on Django's own database, where the window must be
        django_store.create_tables()
        try:
            with pytest.raises(Exception, match="marked for rollback"), django_window("demo", using=alias):
                transaction.set_rollback(True, using=alias)
            state = django_store.get("demo")
            assert state.active and "marked for rollback" in state.error
        finally:
            django_store.drop_tables()
            django_store.engine.dispose()


def test_a_caller_rolling_back_after_a_joined_window_is_visible(store, caplog):
    with caplog.at_level(logging.WARNING, logger="maintgate"), store.engine.connect() as conn:
        tx = conn.begin()
        with maintenance_window(store, "demo", connection=conn):
            pass
        if store.engine.dialect.name == "postgresql":
            assert owner_alive(store, store.get("demo")) is True, "the caller's transaction holds the lock"
            with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
                pass
        tx.rollback()
    state = store.get("demo")
    assert state.active and state.owner is not None
    if store.engine.dialect.name == "postgresql":  # once the lease that covered its opening is over
        assert eventually(lambda: owner_alive(store, store.get("demo")) is False, 6)
    assert any(getattr(r, "maintgate_event", "") == "window_rolled_back_by_caller" for r in caplog.records)


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


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_refused_lock_leaves_no_setting_on_the_pooled_connection(store):
    with maintenance_window(store, "demo"):
        for _ in range(3):
            with pytest.raises(WindowBusy), maintenance_window(store, "demo"):
                pass
        with store.engine.connect() as conn:
            assert conn.execute(text("SHOW client_connection_check_interval")).scalar() == "0"


def test_small_things(store):
    store.deactivate("never-seen")
    assert store.history("never-seen") == []
    with pytest.raises(InvalidArgument, match="limit"):
        store.history("demo", limit=-1)
    with (
        pytest.raises(Exception, match=r"UNIQUE|unique|duplicate"),
        maintenance_window(store, "demo") as conn,
    ):
        table = store.tables.history.name
        conn.execute(
            text(f"INSERT INTO {table} (id, tenant, event, at) VALUES (:i, 'x', 'e', :at)"),
            [{"i": 10**6, "at": "2026-01-01 00:00:00"}, {"i": 10**6, "at": "2026-01-01 00:00:00"}],
        )
    assert "[parameters:" not in store.get("demo").error


def test_an_operators_maintenance_survives_a_failed_window_and_its_retry(store):
    store.activate("demo", message="operator")
    with pytest.raises(Boom), maintenance_window(store, "demo"):
        raise Boom("first try")
    assert store.get("demo").active
    with maintenance_window(store, "demo"):
        pass
    state = store.get("demo")
    assert state.active and state.source == "operator", "the operator switched it on; it stays on"
