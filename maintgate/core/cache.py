"""A bounded TTL cache of maintenance states with single-flight loading, for threads and asyncio."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from cachetools import LRUCache, TTLCache

from .errors import InvalidArgument

V = TypeVar("V")


class _Miss:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS: Any = _Miss()
"""Returned by :meth:`StateCache.peek` when the key is absent or stale."""


class _IndexedTTLCache(TTLCache):  # type: ignore[type-arg]
    """A TTLCache that drops keys from a plain-dict read index whenever it evicts them.

    TTLCache owns the bound, the expiry and the eviction order; the index only makes
    reads lock-free and cheap (a TTLCache read costs about 1.5 µs here, the index 0.1 µs).
    """

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float], index: dict) -> None:
        super().__init__(maxsize, ttl, timer)
        self._index = index

    def popitem(self) -> tuple[Any, Any]:
        key, value = super().popitem()
        self._index.pop(key, None)
        return key, value

    def expire(self, time: float | None = None) -> list[tuple[Any, Any]]:
        expired = super().expire(time)
        for key, _ in expired:
            self._index.pop(key, None)
        return expired


class StateCache(Generic[V]):
    """Caches loaded values for ``ttl`` seconds, at most ``maxsize`` keys, one load per key at a time.

    ``loader(key)`` returns ``(value, max_age)``: ``max_age`` (seconds, or None) shortens the
    entry's life when the value is known to change sooner, at a schedule boundary say.
    A failing load falls back to the last value loaded for that key (or ``default``)
    and caches that too, so an outage costs one failing query per key per TTL.
    """

    def __init__(
        self,
        loader: Callable[[Hashable], tuple[V, float | None]],
        *,
        ttl: float = 1.0,
        maxsize: int = 10_000,
        timer: Callable[[], float] = time.monotonic,
        default: V | None = None,
        on_error: Callable[[Hashable, BaseException], None] | None = None,
        max_workers: int = 4,
    ) -> None:
        if not ttl > 0:
            raise InvalidArgument(f"cache ttl must be > 0 seconds, got {ttl!r}")
        if not isinstance(maxsize, int) or maxsize < 1:
            raise InvalidArgument(f"cache maxsize must be a positive int, got {maxsize!r}")
        self.ttl = float(ttl)
        self.maxsize = maxsize
        self._loader = loader
        self._timer = timer
        self._default = default
        self._on_error = on_error
        self._max_workers = max_workers
        self._index: dict[Hashable, tuple[float, V]] = {}
        self._store = _IndexedTTLCache(maxsize, self.ttl, timer, self._index)
        self._last_known: LRUCache[Hashable, V] = LRUCache(maxsize)
        self._inflight: dict[Hashable, Future[V]] = {}
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return len(self._index)

    def peek(self, key: Hashable) -> V:
        """The fresh cached value for ``key``, or ``MISS``; takes no lock and does no I/O."""
        entry = self._index.get(key)
        if entry is not None and entry[0] > self._timer():
            return entry[1]
        return MISS

    def load(self, key: Hashable) -> V:
        """The value for ``key``, loading it in this thread unless another thread already is."""
        fut, owner = self._claim(key)
        if owner:
            self._fill(key, fut)
        return fut.result()

    async def load_async(self, key: Hashable) -> V:
        """The value for ``key``; a load runs in a worker thread, once however many tasks wait."""
        fut, owner = self._claim(key)
        if owner:
            self._pool().submit(self._fill, key, fut)
        return await asyncio.wrap_future(fut)

    def invalidate(self, key: Hashable | None = None) -> None:
        """Forget ``key``, or every key, so that the next request reloads it."""
        with self._lock:
            if key is None:
                self._store.clear()
                self._index.clear()
            else:
                self._store.pop(key, None)
                self._index.pop(key, None)

    def close(self) -> None:
        """Stop the worker threads used by :meth:`load_async`."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def _claim(self, key: Hashable) -> tuple[Future[V], bool]:
        with self._lock:
            value = self.peek(key)
            if value is not MISS:
                done: Future[V] = Future()
                done.set_result(value)
                return done, False
            fut = self._inflight.get(key)
            if fut is not None:
                return fut, False
            fut = self._inflight[key] = Future()
            # A running future cannot be cancelled, so one waiter giving up cannot fail the others.
            fut.set_running_or_notify_cancel()
            return fut, True

    def _fill(self, key: Hashable, fut: Future[V]) -> None:
        try:
            try:
                value, max_age = self._loader(key)
            except Exception as exc:
                if self._on_error is not None:
                    self._on_error(key, exc)
                with self._lock:
                    value, max_age = self._last_known.get(key, self._default), None  # type: ignore[arg-type]
            else:
                with self._lock:
                    self._last_known[key] = value
            life = self.ttl if max_age is None else max(0.0, min(self.ttl, max_age))
            with self._lock:
                self._store[key] = value
                self._index[key] = (self._timer() + life, value)
                del self._inflight[key]
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(exc)
            raise
        fut.set_result(value)

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix="maintgate"
                )
            return self._executor
