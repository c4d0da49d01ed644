"""PostgreSQL LISTEN/NOTIFY: every committed state change reaches every process at once.

Every write of the store issues ``pg_notify(store.channel, payload)`` in the transaction that
writes the change, so a notification is delivered only on commit (a rolled-back window never announces "off").
The payload carries the tenant, its change number and its new state, which each process's
mirror applies without a query. Each process runs one listener thread per channel, for every
gate, sync or async, on any event loop; it stops once no gate of that store is left. It
reconnects with backoff; while it is down, gates see changes within their TTL, and once it is
back they read what changed meanwhile (one query, nothing dropped).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import threading
import time
import uuid
import weakref
from typing import Any

from .core.mirror import StateMirror
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


def _conninfo(mirror: StateMirror) -> str:
    store: Any = mirror.store
    url = (store.listen_url or store.engine.url).set(drivername="postgresql")
    return str(url.render_as_string(hide_password=False))


def _probe_payload() -> tuple[str, str]:
    token = uuid.uuid4().hex
    return token, json.dumps({"probe": token})


class ThreadListener:
    """A daemon thread that LISTENs on a channel with a blocking psycopg connection."""

    def __init__(self, conninfo: str, channel: str) -> None:
        self.conninfo = conninfo
        self.channel = channel
        self.mirrors: weakref.WeakSet[StateMirror] = weakref.WeakSet()
        self.connected = threading.Event()
        self.given_up = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"maintgate-listen-{channel}", daemon=True)

    def subscribe(self, mirror: StateMirror) -> None:
        """Deliver this channel's notifications to ``mirror`` from now on."""
        self.mirrors.add(mirror)

    def unsubscribe(self, mirror: StateMirror) -> None:
        """Stop delivering to ``mirror``; the thread ends by itself once nobody listens."""
        self.mirrors.discard(mirror)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        """Whether the thread runs, or gave up for good (then nobody should start another)."""
        return self.given_up or self._thread.is_alive()

    def live(self) -> bool:
        """Whether notifications are being delivered right now."""
        return self.connected.is_set() and self._thread.is_alive()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if timeout:
            self._thread.join(timeout)

    def deliver(self, payload: str) -> None:
        """Apply a tenant's new state carried by the notification, or have it read."""
        if payload.startswith('{"probe"'):
            return  # another process's listener testing the channel
        tenant, state, version = state_from_payload(payload)
        for mirror in list(self.mirrors):
            mirror.apply(tenant, state, version)

    def _lost(self, exc: BaseException, delay: float) -> None:
        self.connected.clear()
        logger.warning(
            "maintgate: notification listener on %s lost its connection (%s); retrying in %.1fs, "
            "gates fall back to their TTL meanwhile",
            self.channel,
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
            delay,
            extra={"maintgate_event": "listener_down", "channel": self.channel},
        )

    def _unavailable(self) -> None:
        """LISTEN does not deliver here: say so once, plainly; gates keep their TTL."""
        self.given_up = True
        self.connected.clear()
        logger.warning(
            "maintgate: notifications are off: a LISTEN on %s did not receive its own test notification "
            "within %.0fs. A pooler in transaction mode (PgBouncer) does not forward notifications; pass "
            "listen_url= (a direct connection to PostgreSQL) to MaintenanceStore to have them. Gates see "
            "changes within their cache TTL meanwhile",
            _where(self.conninfo),
            PROBE_TIMEOUT,
            extra={"maintgate_event": "notifications_unavailable", "channel": self.channel},
        )

    def _established(self) -> None:
        # Anything may have changed while no notification could arrive: read what did, keep the rest.
        # Live only once those reads are asked for, so a read asked for after that covers them.
        for mirror in list(self.mirrors):
            mirror.changed()
        self.connected.set()

    def _wanted(self) -> bool:
        return not self._stop.is_set() and len(self.mirrors) > 0

    def _run(self) -> None:
        import psycopg

        delay = BACKOFF_START
        try:
            while self._wanted():
                try:
                    with psycopg.connect(self.conninfo, autocommit=True, **CONNECT_OPTIONS) as conn:
                        conn.execute(f'LISTEN "{self.channel}"')
                        if not self._probe(conn):
                            with contextlib.suppress(Exception):
                                conn.execute("UNLISTEN *")
                            self._unavailable()
                            return
                        self._established()
                        delay = BACKOFF_START
                        while self._wanted():
                            for note in conn.notifies(timeout=0.5):
                                self.deliver(note.payload)
                        with contextlib.suppress(Exception):
                            conn.execute("UNLISTEN *")
                except Exception as exc:
                    if not self._wanted():
                        break
                    self._lost(exc, delay)
                    self._stop.wait(delay)
                    delay = min(BACKOFF_MAX, delay * 2)
        finally:
            self.connected.clear()
            with _lock:
                if not self.given_up and _threads.get((self.conninfo, self.channel)) is self:
                    del _threads[(self.conninfo, self.channel)]

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


_threads: dict[tuple[str, str], ThreadListener] = {}
_lock = threading.Lock()


def _where(conninfo: str) -> str:
    from sqlalchemy.engine import make_url

    url = make_url(conninfo)
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def listen_for(gate: Any) -> None:
    """Have ``gate``'s mirror start (or join) this process's listener on its first uncommon request,
    if the gate wants notifications: what every adapter does once, when it is built."""
    if gate.notifications and gate.mirror.listen is None:
        gate.mirror.listen = listen_in_thread


def listen_in_thread(mirror: StateMirror) -> ThreadListener:
    """Subscribe ``mirror`` to its store's channel through this process's listener thread."""
    key = (_conninfo(mirror), mirror.store.channel)  # type: ignore[attr-defined]
    with _lock:
        listener = _threads.get(key)
        if listener is None or not listener.alive():  # none, or gone (a fork, or nobody listened)
            listener = _threads[key] = ThreadListener(*key)
            listener.subscribe(mirror)
            listener.start()
        else:
            listener.subscribe(mirror)
    return listener


def stop_thread_listeners(timeout: float = 1.0) -> None:
    """Stop every listener thread (at exit, or in tests), waiting up to ``timeout`` for each."""
    with _lock:
        listeners = list(_threads.values())
        _threads.clear()
    for listener in listeners:
        listener.stop(timeout)


atexit.register(stop_thread_listeners)
