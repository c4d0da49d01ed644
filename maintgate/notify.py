"""PostgreSQL LISTEN/NOTIFY: every committed state change reaches every worker at once.

Every write of the store issues ``pg_notify(store.channel, tenant)`` in its own transaction,
so a notification is delivered only on commit (a rolled-back window never announces "off").
Each process runs one listener per channel, a thread (WSGI, sync use) or an asyncio task on
psycopg's async connection (ASGI); it drops the tenant's cache entry in every gate that
subscribed, or all of them for the global switch. It reconnects with backoff; while it is
down, and after it reconnects (a notification may have been missed), gates fall back to the
TTL and a full invalidation.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import threading
import time
import uuid
import weakref
from typing import Any

from .core.gate import Gate
from .core.state import ALL_TENANTS
from .core.store import state_from_payload

logger = logging.getLogger("maintgate")

APPLICATION_NAME = "maintgate-listener"
# TCP keepalives: a listener connection that dies silently is noticed within about 20 s.
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "application_name": APPLICATION_NAME,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 2,
}
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
PROBE_TIMEOUT = 2.0
"""Seconds a new listener waits for its own test notification before it says notifications don't work."""


def _conninfo(gate: Gate) -> str:
    store: Any = gate.store
    url = (store.listen_url or store.engine.url).set(drivername="postgresql")
    return str(url.render_as_string(hide_password=False))


def _probe_payload() -> tuple[str, str]:
    token = uuid.uuid4().hex
    return token, json.dumps({"probe": token})


class _Listener:
    """The subscribers of one channel and what to do with a notification; the transport is a subclass's."""

    def __init__(self, conninfo: str, channel: str) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.gates: weakref.WeakSet[Gate] = weakref.WeakSet()
        self.connected = threading.Event()
        self.received = 0
        self.reconnects = 0
        self.given_up = False

    def subscribe(self, gate: Gate) -> None:
        """Drop ``gate``'s entries on every notification from now on."""
        self.gates.add(gate)
        if self.connected.is_set():
            gate.notifications_live = True

    def deliver(self, payload: str) -> None:
        """Apply a tenant's new state carried by the notification, or drop what is cached of it."""
        self.received += 1
        if payload.startswith('{"probe"'):
            return  # another process's listener testing the channel
        tenant, state = state_from_payload(payload)
        for gate in list(self.gates):
            if tenant == ALL_TENANTS or state is None or not state.active:
                gate.invalidate(None if tenant == ALL_TENANTS else tenant)
            else:
                gate.apply(tenant, state)

    def lost(self, exc: BaseException, delay: float) -> None:
        self.connected.clear()
        for gate in list(self.gates):
            gate.notifications_live = False
        logger.warning(
            "maintgate: notification listener on %s lost its connection (%s); retrying in %.1fs, "
            "gates fall back to their TTL meanwhile",
            self.channel,
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            delay,
            extra={"maintgate_event": "listener_down", "channel": self.channel},
        )

    def unavailable(self) -> None:
        """LISTEN does not deliver here: say so once, plainly; gates keep their TTL."""
        self.given_up = True
        self.connected.clear()
        for gate in list(self.gates):
            gate.notifications_live = False
        logger.warning(
            "maintgate: notifications are off: a LISTEN on %s did not receive its own test notification "
            "within %.0fs. A pooler in transaction mode (PgBouncer) does not forward notifications; pass "
            "listen_url= (a direct connection to PostgreSQL) to MaintenanceStore to have them. Gates see "
            "changes within their cache TTL meanwhile",
            _where(self.conninfo),
            PROBE_TIMEOUT,
            extra={"maintgate_event": "notifications_unavailable", "channel": self.channel},
        )

    def established(self) -> None:
        self.reconnects += 1
        # Anything may have changed while no notification could arrive.
        for gate in list(self.gates):
            gate.invalidate(None)
            gate.notifications_live = True
        self.connected.set()


class ThreadListener(_Listener):
    """A daemon thread that LISTENs on a channel with a blocking psycopg connection."""

    def __init__(self, conninfo: str, channel: str) -> None:
        super().__init__(conninfo, channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"maintgate-listen-{channel}", daemon=True)
        self._conn: Any = None

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        delay = BACKOFF_START
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, **CONNECT_OPTIONS) as conn:
                    self._conn = conn
                    conn.execute(f'LISTEN "{self.channel}"')
                    if not self._probe(conn):
                        with contextlib.suppress(Exception):
                            conn.execute("UNLISTEN *")
                        self.unavailable()
                        break
                    self.established()
                    delay = BACKOFF_START
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self.deliver(note.payload)
            except Exception as exc:
                if self._stop.is_set():
                    break
                self.lost(exc, delay)
                self._stop.wait(delay)
                delay = min(BACKOFF_MAX, delay * 2)
            finally:
                self._conn = None
        self.connected.clear()

    def _probe(self, conn: Any) -> bool:
        """Whether a notification sent from another connection reaches this LISTEN."""
        import psycopg

        token, payload = _probe_payload()
        with psycopg.connect(self.conninfo, autocommit=True, **CONNECT_OPTIONS) as sender:
            sender.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
        deadline = time.monotonic() + PROBE_TIMEOUT
        while (left := deadline - time.monotonic()) > 0 and not self._stop.is_set():
            for note in conn.notifies(timeout=left):
                if token in note.payload:
                    return True
                self.deliver(note.payload)
        return False


class AsyncListener(_Listener):
    """An asyncio task that LISTENs on a channel with psycopg's async connection."""

    def __init__(self, conninfo: str, channel: str) -> None:
        super().__init__(conninfo, channel)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"maintgate-listen-{self.channel}"
        )

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.connected.clear()

    async def _run(self) -> None:
        import psycopg

        delay = BACKOFF_START
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, **CONNECT_OPTIONS
                )
                async with conn:
                    await conn.execute(f'LISTEN "{self.channel}"')
                    if not await self._probe(conn):
                        with contextlib.suppress(Exception):
                            await conn.execute("UNLISTEN *")
                        self.unavailable()
                        return
                    self.established()
                    delay = BACKOFF_START
                    async for note in conn.notifies():
                        self.deliver(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.lost(exc, delay)
                await asyncio.sleep(delay)
                delay = min(BACKOFF_MAX, delay * 2)

    async def _probe(self, conn: Any) -> bool:
        """Whether a notification sent from another connection reaches this LISTEN."""
        import psycopg

        token, payload = _probe_payload()
        sender = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True, **CONNECT_OPTIONS)
        async with sender:
            await sender.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
        deadline = time.monotonic() + PROBE_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            async for note in conn.notifies(timeout=left):
                if token in note.payload:
                    return True
                self.deliver(note.payload)
        return False


_threads: dict[tuple[str, str], ThreadListener] = {}
_tasks: dict[tuple[int, str, str], AsyncListener] = {}
_lock = threading.Lock()


def _where(conninfo: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(conninfo)
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def listen_in_thread(gate: Gate) -> ThreadListener | None:
    """Subscribe ``gate`` to its store's channel through this process's listener thread."""
    if not gate.notifications:
        return None
    key = (_conninfo(gate), gate.store.channel)  # type: ignore[attr-defined]
    with _lock:
        listener = _threads.get(key)
        if listener is None or not (listener.alive() or listener.given_up):  # none, or gone (a fork)
            listener = _threads[key] = ThreadListener(*key)
            listener.start()
        listener.subscribe(gate)
    return listener


def listen_in_loop(gate: Gate) -> AsyncListener | None:
    """Subscribe ``gate`` through this event loop's listener task (call it from the loop)."""
    if not gate.notifications:
        return None
    loop = asyncio.get_running_loop()
    key = (id(loop), _conninfo(gate), gate.store.channel)  # type: ignore[attr-defined]
    with _lock:
        for stale in [k for k, v in _tasks.items() if v.task is not None and v.task.done()]:
            del _tasks[stale]  # listeners of event loops that are gone
        listener = _tasks.get(key)
        if listener is None or listener.task is None or (listener.task.done() and not listener.given_up):
            listener = _tasks[key] = AsyncListener(key[1], key[2])
            listener.start()
        listener.subscribe(gate)
    return listener


async def stop_loop_listeners() -> None:
    """Stop this event loop's listener tasks (ASGI lifespan shutdown)."""
    loop_id = id(asyncio.get_running_loop())
    with _lock:
        mine = [k for k in _tasks if k[0] == loop_id]
        listeners = [_tasks.pop(k) for k in mine]
    for listener in listeners:
        for gate in list(listener.gates):
            gate.notifications_live = False
            gate._listening = False  # a later event loop starts its own listener
        await listener.stop()


def stop_thread_listeners(timeout: float = 1.0) -> None:
    """Stop every listener thread (at exit, or in tests), waiting up to ``timeout`` for each."""
    with _lock:
        listeners = list(_threads.values())
        _threads.clear()
    for listener in listeners:
        listener.stop(timeout)


atexit.register(stop_thread_listeners)
